"""Celery task metrics from Celery's own signals, in the process where each happens.

`sent` is counted by whoever publishes (the web, beat, a worker chaining the
next step); `received`, `rejected` and `revoked` by the worker's main
process; `started`, `succeeded`, `failed`, `retried`, the runtime and the
queue wait by the prefork child that runs the task. Multiprocess mode sums
them at scrape. A metrics error is logged and never reaches the task.
"""

from __future__ import annotations

import functools
import logging
import socket
import time

from celery.signals import (
    after_task_publish,
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_rejected,
    task_retry,
    task_revoked,
    task_success,
)

log = logging.getLogger("opsfleet.metrics")

# Stamped on every message by the publisher: the queue wait is measured from it.
SENT_AT_HEADER = "opsfleet_sent_at"
UNKNOWN = "unknown"

_started: dict[str, float] = {}  # task id → monotonic start, in the child running it
_connected = False


def _safe(handler):
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            handler(*args, **kwargs)
        except Exception:  # noqa: BLE001  (metrics must never fail a task)
            log.exception("task metrics: %s failed", handler.__name__)

    return wrapper


def _queue(delivery_info) -> str:
    info = delivery_info or {}
    return info.get("routing_key") or info.get("exchange") or UNKNOWN


def _request_labels(task) -> dict[str, str]:
    request = task.request
    return {
        "name": task.name or UNKNOWN,
        "hostname": request.hostname or UNKNOWN,
        "queue_name": _queue(request.delivery_info),
    }


@_safe
def _stamp(sender=None, headers=None, **_kwargs) -> None:
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


@_safe
def _on_sent(sender=None, routing_key=None, headers=None, **_kwargs) -> None:
    from worker.adapters import metrics

    name = sender if isinstance(sender, str) else (headers or {}).get("task", UNKNOWN)
    metrics.TASK_SENT.labels(name=name, hostname=socket.gethostname(), queue_name=routing_key or UNKNOWN).inc()


@_safe
def _on_received(sender=None, request=None, **_kwargs) -> None:
    from worker.adapters import metrics

    metrics.TASK_RECEIVED.labels(
        name=request.name or UNKNOWN, hostname=request.hostname or UNKNOWN, queue_name=_queue(request.delivery_info)
    ).inc()


@_safe
def _on_prerun(sender=None, task_id=None, task=None, **_kwargs) -> None:
    from worker.adapters import metrics

    _started[task_id] = time.monotonic()
    labels = _request_labels(task)
    metrics.TASK_STARTED.labels(**labels).inc()
    sent_at = getattr(task.request, SENT_AT_HEADER, None)
    if isinstance(sent_at, int | float):
        metrics.TASK_QUEUE_WAIT.labels(**labels).observe(max(0.0, time.time() - sent_at))


@_safe
def _on_postrun(sender=None, task_id=None, task=None, **_kwargs) -> None:
    from worker.adapters import metrics

    started = _started.pop(task_id, None)
    if started is not None:
        metrics.TASK_RUNTIME.labels(**_request_labels(task)).observe(time.monotonic() - started)


@_safe
def _on_success(sender=None, **_kwargs) -> None:
    from worker.adapters import metrics

    metrics.TASK_SUCCEEDED.labels(**_request_labels(sender)).inc()


@_safe
def _on_failure(sender=None, exception=None, **_kwargs) -> None:
    from worker.adapters import metrics

    metrics.TASK_FAILED.labels(**_request_labels(sender), exception=type(exception).__name__).inc()


@_safe
def _on_retry(sender=None, request=None, **_kwargs) -> None:
    from worker.adapters import metrics

    metrics.TASK_RETRIED.labels(
        name=getattr(sender, "name", None) or UNKNOWN,
        hostname=getattr(request, "hostname", None) or UNKNOWN,
        queue_name=_queue(getattr(request, "delivery_info", None)),
    ).inc()


@_safe
def _on_revoked(sender=None, request=None, **_kwargs) -> None:
    from worker.adapters import metrics

    metrics.TASK_REVOKED.labels(
        name=getattr(request, "name", None) or getattr(sender, "name", None) or UNKNOWN,
        hostname=getattr(request, "hostname", None) or UNKNOWN,
        queue_name=_queue(getattr(request, "delivery_info", None)),
    ).inc()


@_safe
def _on_rejected(sender=None, message=None, **_kwargs) -> None:
    from worker.adapters import metrics

    headers = getattr(message, "headers", None) or {}
    metrics.TASK_REJECTED.labels(
        name=headers.get("task") or UNKNOWN,
        hostname=getattr(sender, "hostname", None) or UNKNOWN,
        queue_name=_queue(getattr(message, "delivery_info", None)),
    ).inc()


def connect_task_metrics() -> None:
    """Connect the handlers once per process (web, worker and beat all call it)."""
    global _connected
    if _connected:
        return
    _connected = True
    before_task_publish.connect(_stamp, weak=False)
    after_task_publish.connect(_on_sent, weak=False)
    task_received.connect(_on_received, weak=False)
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
    task_success.connect(_on_success, weak=False)
    task_failure.connect(_on_failure, weak=False)
    task_retry.connect(_on_retry, weak=False)
    task_revoked.connect(_on_revoked, weak=False)
    task_rejected.connect(_on_rejected, weak=False)
