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
the batch with LedgerUnavailable (each answers 503, Alertmanager sends again).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
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

    The thread starts on the first `submit` in each process (gunicorn forks
    after the app is made; a thread does not survive a fork).
    """

    def __init__(self, accept: Callable[[list[Item]], list[Result]], *, max_batch: int = 64, wait_seconds: float = 25):
        self._accept = accept
        self._max_batch = max_batch
        self._wait_seconds = wait_seconds
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._start_guard = threading.Lock()
        self._pid: int | None = None

    def submit(self, item: Item) -> Result:
        """Accept `item` with whatever else is waiting; raise what accepting it raised."""
        self._ensure_committer()
        job: _Job[Item, Result] = _Job(item)
        self._queue.put(job)
        # Not done in time: a job never taken is never committed; one taken gets a
        # few more seconds. Either way a 5xx is safe: the resend is a repeat, not a second run.
        if not job.done.wait(self._wait_seconds) and (job.abandon() or not job.done.wait(5)):
            raise IntakeTimeout(f"not confirmed within {self._wait_seconds:g} s (the ledger is slow or locked)")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _ensure_committer(self) -> None:
        if self._pid == os.getpid():
            return
        with self._start_guard:
            if self._pid != os.getpid():
                self._queue = queue.SimpleQueue()  # a parent's queue holds no job of this process
                threading.Thread(target=self._run, args=(self._queue,), name="opsfleet-intake", daemon=True).start()
                self._pid = os.getpid()

    def _run(self, jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            batch = [jobs.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            taken = [job for job in batch if job.take()]
            if taken:
                self._commit(taken)

    def _commit(self, batch: list[_Job]) -> None:
        try:
            results = self._accept([job.item for job in batch])
        except LedgerUnavailable as err:
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
