"""Builds the Celery app from the configuration: broker, queues, routes, limits.

Settings live here, one comment per non-default saying which failure it
prevents. `worker.celery_app` holds the app the worker and beat processes
run; the web builds its own from the same function to enqueue.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

import beat_schedule
from worker.adapters import file_broker, redis_broker
from worker.config import LoadedConfig
from worker.runtime import Runtime

QUEUE_REMEDIATE = "opsfleet.remediate"
QUEUE_REPORT = "opsfleet.report"
QUEUE_MAINTENANCE = "opsfleet.maintenance"
QUEUES = (QUEUE_REMEDIATE, QUEUE_REPORT, QUEUE_MAINTENANCE)


def host_queue(host: str) -> str:
    """Steps that touch one host's Docker daemon or files run on that host's
    worker (`opsfleet worker --host NAME`), which alone consumes this queue."""
    return f"opsfleet.host.{host}"


def known_queues(loaded: LoadedConfig) -> list[str]:
    """Every queue the configuration can route to: the shared ones and each pinned host's."""
    config = loaded.config
    hosts = {s.host for s in config.services.values() if s.host}
    if config.fleet.maintenance_host:
        hosts.add(config.fleet.maintenance_host)
    return [*QUEUES, *(host_queue(h) for h in sorted(hosts))]


TASK_MODULES = (
    "worker.tasks.runs",
    "worker.tasks.report",
    "worker.tasks.report_github",
    "worker.tasks.sweeper",
    "worker.tasks.schedule",
)

# Task name → queue. The edge only enqueues by name, so it needs none of the
# task code (Docker, Slack) to start.
ROUTES = {
    "opsfleet.runs.start": QUEUE_REMEDIATE,
    "opsfleet.runs.step": QUEUE_REMEDIATE,
    "opsfleet.runs.finish": QUEUE_REMEDIATE,
    "opsfleet.report.slack": QUEUE_REPORT,
    "opsfleet.report.github": QUEUE_REPORT,
    "opsfleet.sweeper.sweep": QUEUE_MAINTENANCE,
    "opsfleet.schedule.trigger": QUEUE_MAINTENANCE,
}


def broker_url_and_options(loaded: LoadedConfig) -> tuple[str, dict]:
    redis_url = loaded.secrets.get("REDIS_URL")
    if redis_url:
        return redis_url, {
            # Above the longest step's hard limit: otherwise Redis hands a task
            # that is still running to a second worker.
            "visibility_timeout": loaded.config.broker.visibility_timeout_seconds,
            # Every key under our prefix: the machine's Redis is shared.
            "global_keyprefix": loaded.config.broker.key_prefix,
            "socket_connect_timeout": loaded.config.broker.publish_timeout_seconds,
            "socket_timeout": 10,
        }
    # Embedded: kombu's filesystem transport needs no server. It drops a
    # message once fetched, which the ledger's sweeper makes good.
    folder = Path(loaded.data_dir) / "broker"
    for sub in ("queue", "control", "processed"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # A hostname only to keep kombu from warning about its absence; the
    # transport uses the folders below.
    return "filesystem://localhost/", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "processed_folder": str(folder / "processed"),
        "store_processed": False,
        "polling_interval": 0.2,
    }


def task_time_limits(loaded: LoadedConfig) -> dict[str, dict]:
    """Explicit soft/hard limits for every task (soft raises inside the task so
    it can record the failure; hard kills the child as the last resort)."""
    worker = loaded.config.worker
    step = {"soft_time_limit": worker.step_soft_timeout_seconds, "time_limit": worker.step_hard_timeout_seconds}
    quick = {"soft_time_limit": 60, "time_limit": 90}
    return {
        "opsfleet.runs.start": quick,
        "opsfleet.runs.step": step,
        "opsfleet.runs.finish": quick,
        "opsfleet.report.slack": {"soft_time_limit": 120, "time_limit": 150},
        "opsfleet.report.github": {"soft_time_limit": 120, "time_limit": 150},
        "opsfleet.sweeper.sweep": quick,
        "opsfleet.schedule.trigger": quick,
    }


def create_celery(loaded: LoadedConfig, *, include_tasks: bool = True) -> Celery:
    broker_url, transport_options = broker_url_and_options(loaded)
    app = Celery("opsfleet", include=list(TASK_MODULES) if include_tasks else [])
    exchange = Exchange("opsfleet", type="direct")
    app.conf.update(
        broker_url=broker_url,
        # kombu's transports, fixed: a worker survives Redis going away while it runs a
        # task (worker/adapters/redis_broker.py); the embedded broker's messages appear
        # whole (worker/adapters/file_broker.py). Other schemes keep their own.
        broker_transport=(
            redis_broker.TRANSPORT
            if broker_url.startswith(("redis://", "rediss://"))
            else file_broker.TRANSPORT
            if broker_url.startswith("filesystem://")
            else None
        ),  # fmt: skip
        broker_transport_options=transport_options,
        # The ledger holds every result; a result backend would be a second truth.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # A task is acknowledged after it ran, not when fetched: a worker that
        # dies mid-task leaves it to be redelivered. Safe because every task
        # checks the ledger first and does nothing if its work is done.
        task_acks_late=True,
        # ...and a child killed by SIGKILL/OOM requeues its task instead of
        # acknowledging it as failed.
        task_reject_on_worker_lost=True,
        # A worker reserves only the task it is running: a long restart can't
        # sit on tasks other workers could run now.
        worker_prefetch_multiplier=1,
        task_soft_time_limit=loaded.config.worker.step_soft_timeout_seconds,
        task_time_limit=loaded.config.worker.step_hard_timeout_seconds,
        task_annotations=task_time_limits(loaded),
        # Events let monitoring (celery-exporter, flower) see tasks.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=QUEUE_REMEDIATE,
        task_default_exchange="opsfleet",
        task_default_routing_key=QUEUE_REMEDIATE,
        task_queues=[Queue(name, exchange, routing_key=name) for name in QUEUES],
        task_routes={name: {"queue": queue, "routing_key": queue} for name, queue in ROUTES.items()},
        # The edge must answer fast: a broker that is down costs it a short
        # bounded wait, after which the sweeper enqueues from the ledger.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        broker_connection_timeout=loaded.config.broker.publish_timeout_seconds,
        broker_connection_retry_on_startup=True,
        # JSON only: a pickled message from a compromised broker could run code.
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        beat_schedule_filename=str(Path(loaded.data_dir) / "celerybeat-schedule"),
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule.build_schedule(loaded.config),
    )
    app.opsfleet = Runtime(loaded)
    if include_tasks:
        app.loader.import_default_modules()  # register the tasks now, not at worker start
    return app
