"""Group commit at the edge: notifications that arrive together share one transaction.

Every acting notification locks its rule while it decides (the storm breaker
counts across requests), so one transaction per request makes a storm a queue
of commits, each a dozen round trips long. Instead, request threads hand their
parsed notification to one committer thread per web process; it takes what has
queued up while the previous commit ran (nothing is held back to wait for
company, so a lone notification is committed at once) and accepts the lot in
one transaction. Each request waits for its own result and answers from it,
so 2xx still means "in the ledger".

One notification that makes the transaction fail does not fail the others:
the batch is retried one by one. A ledger that is down fails every request of
the batch with LedgerUnavailable (each answers 503, Alertmanager sends again);
one that hangs answers 503 within `wait_seconds` of the request's arrival, and
at once while a commit has been stuck for `stalled_seconds` (the ledger's own
intake timeouts end such a commit: worker/adapters/ledger.py, Ledger.intake).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from worker.adapters.ledger import LedgerUnavailable

log = logging.getLogger("opsfleet.web")

Item = TypeVar("Item")
Result = TypeVar("Result")


class IntakeTimeout(Exception):
    """The committer did not confirm in time; the request answers 5xx (the sender retries)."""


class _Job(Generic[Item, Result]):
    __slots__ = ("item", "result", "error", "done", "state", "guard")

    def __init__(self, item: Item):
        self.item = item
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.state = "waiting"  # → "taken" by the committer, or "abandoned" by a request that gave up
        self.guard = threading.Lock()

    def take(self) -> bool:
        with self.guard:
            if self.state != "waiting":
                return False
            self.state = "taken"
            return True

    def abandon(self) -> bool:
        """True if the committer had not taken the job: it never will."""
        with self.guard:
            if self.state != "waiting":
                return False
            self.state = "abandoned"
            return True


class IntakeBatcher(Generic[Item, Result]):
    """`accept(items) -> results` (one per item, in order) run on one committer thread.

    A batch holds at most `max_batch` items and `max_weight` of their weight (an item
    heavier than that goes alone): a batch must not need more of the ledger than the
    largest single item (PostgreSQL takes at most 65,535 parameters per statement).
    An exception of a `final` type fails the whole batch as it is (the items are
    recorded already: accepting them again one by one would record them twice).

    The thread starts on the first `submit` in each process (gunicorn forks
    after the app is made; a thread does not survive a fork).
    """

    def __init__(
        self,
        accept: Callable[[list[Item]], list[Result]],
        *,
        weight: Callable[[Item], int] = lambda item: 1,
        max_weight: int = 10_000,
        final: tuple[type[Exception], ...] = (),
        max_batch: int = 64,
        wait_seconds: float = 10,
        stalled_seconds: float = 8,
    ):
        self._accept = accept
        self._weight = weight
        self._max_weight = max_weight
        self._final = final
        self._max_batch = max_batch
        self._wait_seconds = wait_seconds
        self._stalled_seconds = stalled_seconds
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._start_guard = threading.Lock()
        self._pid: int | None = None
        self._commit_began: float | None = None  # monotonic; None between commits

    def submit(self, item: Item, arrived: float | None = None) -> Result:
        """Accept `item` with whatever else is waiting; raise what accepting it raised.

        `arrived` (time.monotonic() when the request came in): the wait counts from it.
        While a commit has been running for more than `stalled_seconds` (the ledger hangs),
        a new item is refused at once instead of tying up a request thread, so the health
        endpoints still get one."""
        self._ensure_committer()
        stalled = self.stalled_for()
        if stalled is not None:
            raise IntakeTimeout(f"the ledger has not finished a commit for {stalled:.0f} s")
        deadline = (arrived if arrived is not None else time.monotonic()) + self._wait_seconds
        job: _Job[Item, Result] = _Job(item)
        self._queue.put(job)
        # Not done in time: a job never taken is never committed; one taken may still be, and
        # the resend is then a repeat, not a second run. Either way 5xx is the safe answer.
        if not job.done.wait(max(0.0, deadline - time.monotonic())) and (job.abandon() or not job.done.is_set()):
            raise IntakeTimeout(f"not confirmed within {self._wait_seconds:g} s (the ledger is slow or locked)")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def stalled_for(self) -> float | None:
        """Seconds the running commit has taken, once over `stalled_seconds`; else None."""
        began = self._commit_began
        if began is None or time.monotonic() - began <= self._stalled_seconds:
            return None
        return time.monotonic() - began

    def _ensure_committer(self) -> None:
        if self._pid == os.getpid():
            return
        with self._start_guard:
            if self._pid != os.getpid():
                self._queue = queue.SimpleQueue()  # a parent's queue holds no job of this process
                threading.Thread(target=self._run, args=(self._queue,), name="opsfleet-intake", daemon=True).start()
                self._pid = os.getpid()

    def _run(self, jobs: queue.SimpleQueue[_Job]) -> None:
        carried: _Job | None = None  # taken off the queue, but over the last batch's weight
        while True:
            batch = [carried if carried is not None else jobs.get()]
            carried = None
            weight = self._weight(batch[0].item)
            while len(batch) < self._max_batch:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if weight + self._weight(job.item) > self._max_weight:
                    carried = job
                    break
                batch.append(job)
                weight += self._weight(job.item)
            taken = [job for job in batch if job.take()]
            if taken:
                self._commit_began = time.monotonic()
                try:
                    self._commit(taken)
                except Exception as err:  # a bug here must not end the committer: fail the batch, go on
                    log.exception("the intake committer failed a batch of %d", len(taken))
                    for job in taken:
                        if not job.done.is_set():
                            job.error = err
                            job.done.set()
                finally:
                    self._commit_began = None

    def _commit(self, batch: list[_Job]) -> None:
        try:
            results = self._accept([job.item for job in batch])
        except LedgerUnavailable as err:
            log.warning("ledger unavailable: %d notification(s) not recorded, each answered 503: %s", len(batch), err)
            for job in batch:
                job.error = err
                job.done.set()
            return
        except self._final as err:
            log.warning("a batch of %d failed after it was recorded: %s", len(batch), err)
            for job in batch:
                job.error = err
                job.done.set()
            return
        except Exception as err:
            if len(batch) > 1:
                log.warning("a batch of %d notifications failed (%s); accepting them one by one", len(batch), err)
                for job in batch:
                    self._commit([job])
                return
            batch[0].error = err
            batch[0].done.set()
            return
        except BaseException as err:  # not ours to swallow: fail the batch, let the next submit start a committer
            for job in batch:
                job.error = err
                job.done.set()
            self._pid = None
            raise
        for job, result in zip(batch, results, strict=True):
            job.result = result
            job.done.set()
