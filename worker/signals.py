"""Process-level hooks for the worker and beat: schema at start, metrics at exit."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import beat_init, task_failure, worker_init, worker_process_shutdown

log = logging.getLogger("opsfleet.worker")


def connect_worker_signals(app: Celery) -> None:
    @worker_init.connect(weak=False)
    def _migrate_on_worker_start(**_kwargs) -> None:
        # Fail at start, with the reason, rather than on the first task.
        app.opsfleet.ledger.migrate()

    @beat_init.connect(weak=False)
    def _migrate_on_beat_start(**_kwargs) -> None:
        app.opsfleet.ledger.migrate()

    @worker_process_shutdown.connect(weak=False)
    def _forget_dead_child_gauges(pid=None, **_kwargs) -> None:
        from worker.adapters.metrics import mark_process_dead

        mark_process_dead(pid or os.getpid())

    @task_failure.connect(weak=False)
    def _log_task_failure(sender=None, task_id=None, exception=None, einfo=None, **_kwargs) -> None:
        log.error("task %s (%s) failed: %r\n%s", getattr(sender, "name", "?"), task_id, exception, einfo)
