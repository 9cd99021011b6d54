"""webhooks.batching: the group commit's contract, with a recording `accept`
(the ledger behind it is tested in test_remediation_safety, through the edge)."""

from __future__ import annotations

import threading
import time

import pytest

from webhooks.batching import IntakeBatcher, IntakeTimeout
from worker.adapters.ledger import LedgerUnavailable


class Recorder:
    """An accept that records each batch; the first call waits for `release` so others queue up."""

    def __init__(self, fail=None):
        self.batches: list[list] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail:
            self.fail(items)
        return [f"done {item}" for item in items]


def submit_in_threads(batcher, items):
    results: dict = {}

    def one(item):
        try:
            results[item] = batcher.submit(item)
        except Exception as err:  # noqa: BLE001 - the test reads what each request got
            results[item] = err

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    return results, threads


def queued(batcher, count):
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < count:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.005)


def test_what_queues_during_a_commit_is_committed_together_and_each_gets_its_own_answer():
    accept = Recorder()
    batcher = IntakeBatcher(accept)
    first, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    rest, threads = submit_in_threads(batcher, ["b", "c", "d", "e"])
    queued(batcher, 4)
    accept.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert accept.batches[0] == ["a"] and sorted(accept.batches[1]) == ["b", "c", "d", "e"]
    assert len(accept.batches) == 2
    assert {**first, **rest} == {item: f"done {item}" for item in "abcde"}


def test_one_notification_that_fails_the_batch_fails_alone():
    def fail(items):
        if "poison" in items:
            raise ValueError("cannot store this one")

    accept = Recorder(fail)
    batcher = IntakeBatcher(accept)
    _, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    results, threads = submit_in_threads(batcher, ["b", "poison", "c"])
    queued(batcher, 3)
    accept.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert results["b"] == "done b" and results["c"] == "done c"
    assert isinstance(results["poison"], ValueError)
    # The batch of three, then each alone.
    assert sorted(accept.batches[1]) == ["b", "c", "poison"] and sorted(map(len, accept.batches[2:])) == [1, 1, 1]


def test_a_ledger_that_is_down_fails_every_request_of_the_batch_without_retrying_each():
    def down(items):
        raise LedgerUnavailable("connection refused")

    accept = Recorder(down)
    batcher = IntakeBatcher(accept)
    first, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    results, threads = submit_in_threads(batcher, ["b", "c"])
    queued(batcher, 2)
    accept.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert all(isinstance(answer, LedgerUnavailable) for answer in {**first, **results}.values())
    assert len(accept.batches) == 2


def test_a_request_that_gave_up_waiting_is_never_committed_afterwards():
    accept = Recorder()
    batcher = IntakeBatcher(accept, wait_seconds=0.2)
    first, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    with pytest.raises(IntakeTimeout, match=r"not confirmed within 0.2 s"):
        batcher.submit("late")
    accept.release.set()
    for thread in first_threads:
        thread.join(10)
    assert batcher.submit("next") == "done next"
    assert "late" not in [item for batch in accept.batches for item in batch]
