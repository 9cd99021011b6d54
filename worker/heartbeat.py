"""A worker's heartbeat: its main process writes its ledger row on a timer.

The web reads the rows at scrape time (`worker.adapters.fleet_collector`), so
a worker's liveness is judged from outside it: a SIGKILLed worker simply
stops beating. A graceful stop removes the row (stopped on purpose is not
down). A ledger outage costs beats, never the worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from worker.adapters.ledger import Ledger, LedgerUnavailable

log = logging.getLogger("opsfleet.worker")


class Heartbeat:
    def __init__(self, ledger: Ledger, hostname: str, queues: Iterable[str], interval_seconds: float):
        self.ledger = ledger
        self.hostname = hostname
        self.queues = sorted(queues)
        self.interval = interval_seconds
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> bool:
        try:
            self.ledger.beat(self.hostname, self.pid, self.queues, self.interval)
            return True
        except LedgerUnavailable as err:
            log.warning("heartbeat not written: %s", err)
            return False

    def start(self) -> Heartbeat:
        self.beat_once()  # seen as up from the moment it is ready
        self._thread = threading.Thread(target=self._run, name="opsfleet-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        try:
            self.ledger.forget_worker(self.hostname, self.pid)
        except LedgerUnavailable as err:
            log.warning("heartbeat row not removed at shutdown: %s", err)
