"""Process-level hooks for the worker and beat: schema at start, metrics at exit."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import (
    beat_init,
    task_failure,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

log = logging.getLogger("opsfleet.worker")


def connect_worker_signals(app: Celery) -> None:
    from worker.heartbeat import Heartbeat
    from worker.task_metrics import connect_task_metrics

    connect_task_metrics()
    heartbeats: list[Heartbeat] = []

    @worker_ready.connect(weak=False)
    def _start_heartbeat(sender=None, **_kwargs) -> None:
        # The main process only (children are forked before this); sender is the consumer.
        queues = [q.name for q in sender.task_consumer.queues] if sender.task_consumer else []
        heartbeats.append(
            Heartbeat(
                app.opsfleet.ledger, sender.hostname, queues, app.opsfleet.config.worker.heartbeat_interval_seconds
            ).start()
        )

    servers: list = []

    @worker_ready.connect(weak=False)
    def _serve_metrics(**_kwargs) -> None:
        settings = app.opsfleet.config.worker
        if settings.metrics_port:
            from worker.adapters.metrics import serve

            servers.append(serve(settings.metrics_port, settings.metrics_host))
            log.info("metrics on http://%s:%s/metrics", settings.metrics_host, settings.metrics_port)

    @worker_shutdown.connect(weak=False)
    def _stop_heartbeat(**_kwargs) -> None:
        while heartbeats:
            heartbeats.pop().stop()
        while servers:
            servers.pop().shutdown()

    @worker_init.connect(weak=False)
    def _migrate_on_worker_start(**_kwargs) -> None:
        from worker.tasks.playbooks import load_all

        # Fail at start, with the reason, rather than on the first task.
        app.opsfleet.ledger.migrate()
        load_all()  # in the parent, once: the forked children share it

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
