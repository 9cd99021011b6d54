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


def queued_behind_a_commit(batcher, accept, items):
    """Item "a" alone in a commit that `accept` holds, `items` queued behind it, then let go:
    the answers of "a" and of `items`, once every request has its answer."""
    first, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    rest, threads = submit_in_threads(batcher, items)
    queued(batcher, len(items))
    accept.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    return first, rest


def test_what_queues_during_a_commit_is_committed_together_and_each_gets_its_own_answer():
    accept = Recorder()
    batcher = IntakeBatcher(accept)
    first, rest = queued_behind_a_commit(batcher, accept, ["b", "c", "d", "e"])
    assert accept.batches[0] == ["a"] and sorted(accept.batches[1]) == ["b", "c", "d", "e"]
    assert len(accept.batches) == 2
    assert {**first, **rest} == {item: f"done {item}" for item in "abcde"}


def test_one_notification_that_fails_the_batch_fails_alone():
    def fail(items):
        if "poison" in items:
            raise ValueError("cannot store this one")

    accept = Recorder(fail)
    batcher = IntakeBatcher(accept)
    _, results = queued_behind_a_commit(batcher, accept, ["b", "poison", "c"])
    assert results["b"] == "done b" and results["c"] == "done c"
    assert isinstance(results["poison"], ValueError)
    # The batch of three, then each alone.
    assert sorted(accept.batches[1]) == ["b", "c", "poison"] and sorted(map(len, accept.batches[2:])) == [1, 1, 1]


def test_a_ledger_that_is_down_fails_every_request_of_the_batch_without_retrying_each():
    def down(items):
        raise LedgerUnavailable("connection refused")

    accept = Recorder(down)
    batcher = IntakeBatcher(accept)
    first, results = queued_behind_a_commit(batcher, accept, ["b", "c"])
    assert all(isinstance(answer, LedgerUnavailable) for answer in {**first, **results}.values())
    assert len(accept.batches) == 2


def test_a_batch_never_weighs_more_than_the_limit_and_a_heavier_item_goes_alone():
    accept = Recorder()
    batcher = IntakeBatcher(accept, weight=len, max_weight=10)
    _, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    # Queued in this order: 4 + 4 fit, the 5 would make 13 and waits; then 12 alone.
    results, threads = [], []
    for item in ("aaaa", "bbbb", "ccccc", "d" * 12):
        got, started = submit_in_threads(batcher, [item])
        queued(batcher, len(threads) + 1)
        results.append(got)
        threads += started
    accept.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert accept.batches[1:] == [["aaaa", "bbbb"], ["ccccc"], ["d" * 12]]
    assert all(list(got.values())[0].startswith("done") for got in results)


def test_while_a_commit_hangs_new_requests_are_refused_at_once():
    accept = Recorder()
    batcher = IntakeBatcher(accept, wait_seconds=30, stalled_seconds=0.3)
    _, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    time.sleep(0.4)
    with pytest.raises(IntakeTimeout, match="has not finished a commit for"):
        batcher.submit("b")
    assert batcher._queue.qsize() == 0  # refused, not queued
    assert batcher.stalled_for() > 0.3  # what /readyz reports
    accept.release.set()
    for thread in first_threads:
        thread.join(10)
    assert batcher.submit("c") == "done c" and batcher.stalled_for() is None


def test_the_wait_counts_from_the_request_s_arrival():
    accept = Recorder()
    batcher = IntakeBatcher(accept, wait_seconds=5)
    _, first_threads = submit_in_threads(batcher, ["a"])
    assert accept.entered.wait(10)
    with pytest.raises(IntakeTimeout, match="not confirmed within 5 s"):
        batcher.submit("late", arrived=time.monotonic() - 5)  # waited 5 s for a request thread already
    accept.release.set()
    for thread in first_threads:
        thread.join(10)


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


class Recorded(Exception):
    """Stands for worker.tasks.intake.AlertsCommitted: the batch is in the ledger already."""


def test_a_batch_that_failed_after_it_was_recorded_is_not_accepted_again_one_by_one():
    def fail(items):
        if len(items) > 1:
            raise Recorded("answering failed after the commit")

    accept = Recorder(fail)
    batcher = IntakeBatcher(accept, final=(Recorded,))
    _, results = queued_behind_a_commit(batcher, accept, ["b", "c"])
    assert all(isinstance(answer, Recorded) for answer in results.values())
    assert len(accept.batches) == 2  # no third and fourth call, one per item


def test_the_committer_survives_a_bug_in_accept_and_serves_the_next_request():
    calls = []

    def accept(items):
        calls.append(items)
        return [] if len(calls) == 1 else [f"done {item}" for item in items]  # first: one result short

    batcher = IntakeBatcher(accept)
    with pytest.raises(ValueError):
        batcher.submit("a")
    assert batcher.submit("b") == "done b"
