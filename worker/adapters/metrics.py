"""Prometheus metrics, correct across gunicorn workers and Celery children.

prometheus-client's multiprocess mode: every process writes its samples to
files in PROMETHEUS_MULTIPROC_DIR and a scrape sums them. The directory must
be in the environment before prometheus_client is first imported, so the
process entry points call `metrics_multiproc.use_multiprocess_dir` before
importing this module.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from worker.adapters.metrics_multiproc import MULTIPROC_ENV

WEBHOOK_REQUESTS = Counter(
    "opsfleet_webhook_requests_total", "Webhook requests answered, by sender and HTTP status.", ["source", "code"]
)
ALERTS_RECEIVED = Counter(
    "opsfleet_alerts_received_total", "Alerts received from Alertmanager, by alert status.", ["status"]
)
ALERT_DECISIONS = Counter(
    "opsfleet_alert_decisions_total",
    "What the engine decided per alert: act, dry_run, skip, ignore, or repeat of a handled alert.",
    ["outcome"],
)
ALERT_HELD_BACK = Counter(
    "opsfleet_alerts_held_back_total",
    "Alerts that matched a rule but did not act (skip, escalate, dry run), by why: storm, locked, cooldown, "
    "cap, dry_run, unknown_target, other.",
    ["outcome", "reason"],
)
# The edge's group commit: how many notifications shared a ledger transaction, and how long it took.
ALERT_INTAKE_BATCH = Histogram(
    "opsfleet_alert_intake_batch_notifications",
    "Alertmanager notifications decided and committed in one ledger transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
ALERT_INTAKE_SECONDS = Histogram(
    "opsfleet_alert_intake_seconds",
    "Time one group commit of Alertmanager notifications took (decide, record, enqueue).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25),
)
RUNS_FINISHED = Counter("opsfleet_runs_total", "Runs that reached a final status.", ["trigger", "playbook", "status"])
# Alert-triggered runs only, by the rule that decided them (rules are configured: bounded).
REMEDIATIONS = Counter(
    "opsfleet_remediations_total",
    "Alert remediation runs that reached a final status, by rule, playbook and outcome.",
    ["rule", "playbook", "outcome"],
)
RUN_DURATION = Histogram(
    "opsfleet_run_duration_seconds",
    "From a run's start to its end.",
    ["playbook"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
GITHUB_DELIVERIES = Counter(
    "opsfleet_github_deliveries_total",
    "GitHub deliveries accepted, by event and outcome (deploy, ignored, redelivery).",
    ["event", "outcome"],
)
DEPLOYS = Counter(
    "opsfleet_deploys_total",
    "Deploy runs ended, by environment and outcome (succeeded, rolled_back, rollback_failed, superseded, failed).",
    ["environment", "outcome"],
)
ROLLBACKS = Counter(
    "opsfleet_rollbacks_total",
    "Rollbacks ended, by environment, kind (automatic: a deploy's own after a failed step; manual: "
    "opsfleet rollback or POST /api/rollbacks; repair: of a deploy whose worker died) and outcome "
    "(succeeded, failed).",
    ["environment", "kind", "outcome"],
)
DEPLOY_DURATION = Histogram(
    "opsfleet_deploy_duration_seconds",
    "From the deploy's lock to its release recorded.",
    ["environment"],
    buckets=(5, 10, 20, 30, 60, 120, 300, 600),
)
# 1 for the live release of each environment, 0 for the one it replaced.
RELEASE_INFO = Gauge(
    "opsfleet_release_info",
    "The live release per environment (1; the one it replaced 0).",
    ["environment", "sha"],
    multiprocess_mode="mostrecent",
)
RUN_START_LATENCY = Histogram(
    "opsfleet_run_start_latency_seconds",
    "From a run's record (for alerts: the webhook's commit) to a worker starting it: alert-to-action latency.",
    ["trigger", "playbook"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
STEPS_FINISHED = Counter("opsfleet_steps_total", "Steps finished, by outcome.", ["playbook", "step", "status"])
SWEEPER_ACTIONS = Counter(
    "opsfleet_sweeper_actions_total",
    "Sweeper actions: runs re-enqueued from the ledger, runs failed on an expired lease.",
    ["action"],
)
REPORTS = Counter("opsfleet_reports_total", "Reports to outside services, by outcome.", ["service", "outcome"])
LOG_ROTATIONS = Counter("opsfleet_log_rotations_total", "Live log files rotated, by log set and mode.", ["set", "mode"])
LOG_ROTATED_BYTES = Counter(
    "opsfleet_log_rotated_bytes_total", "Bytes moved out of live log files by rotation.", ["set"]
)
LOG_ROTATED_LINES = Counter(
    "opsfleet_log_rotated_lines_total", "Lines in rotated files, counted when they are compressed.", ["set"]
)
LOG_WRITER_PAUSE = Histogram(
    "opsfleet_log_writer_pause_seconds",
    "copytruncate: how long the writer was paused for the final copy and the truncate.",
    ["set"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CLEANUP_REMOVED = Counter("opsfleet_cleanup_removed_total", "Things cleanup removed, by kind.", ["kind"])
CLEANUP_RECLAIMED_BYTES = Counter(
    "opsfleet_cleanup_reclaimed_bytes_total", "Bytes cleanup gave back (disk; ledger rows count 0), by kind.", ["kind"]
)

# Backups. Gauges are "mostrecent" across processes: the last value any worker set.
BACKUP_LAST_SUCCESS = Gauge(
    "opsfleet_backup_last_success_timestamp_seconds",
    "When the series' last verified backup was committed (Unix time).",
    ["kind", "series"],
    multiprocess_mode="mostrecent",
)
BACKUP_SIZE = Gauge(
    "opsfleet_backup_size_bytes",
    "Size of the series' last committed backup.",
    ["kind", "series"],
    multiprocess_mode="mostrecent",
)
BACKUP_MAX_AGE = Gauge(
    "opsfleet_backup_max_age_seconds",
    "How old the series' newest backup may get before it is overdue (26 h daily, 8 d weekly, 32 d monthly).",
    ["kind", "series"],
    multiprocess_mode="mostrecent",
)
BACKUP_DURATION = Histogram(
    "opsfleet_backup_duration_seconds",
    "Dump or archive of one series, including its streaming verification.",
    ["kind"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
BACKUP_VERIFICATIONS = Counter(
    "opsfleet_backup_verifications_total", "Full-read verifications of backup files, by result.", ["kind", "result"]
)
BACKUP_SKIPPED = Counter(
    "opsfleet_backup_skipped_overlaps_total",
    "Series not backed up because another run held its lock.",
    ["series"],
)
BACKUP_FAILURES = Counter("opsfleet_backup_failures_total", "Backup sets that failed, by step.", ["step"])
BACKUP_PRUNED = Counter("opsfleet_backup_pruned_total", "Backup items deleted by retention.", ["series"])
RESTORE_DRILL_SECONDS = Gauge(
    "opsfleet_restore_drill_seconds",
    "Time the last restore drill took (restore and all checks).",
    multiprocess_mode="mostrecent",
)
RESTORE_DRILL_RESULT = Gauge(
    "opsfleet_restore_drill_success",
    "1 when the last restore drill passed, 0 when it failed.",
    multiprocess_mode="mostrecent",
)

# Celery task metrics with celery-exporter's names and labels (danihodovic/
# celery-exporter), so its dashboards and alerts work unchanged. Counted from
# Celery's signals in the process where each thing happens (publisher, worker
# main process, prefork child); multiprocess mode sums them at scrape.
# `hostname` is the Celery node name (opsfleet-main@host-1), the same value
# celery_worker_up carries; for `sent` it is the publishing machine's name.
TASK_LABELS = ["name", "hostname", "queue_name"]
TASK_SENT = Counter("celery_task_sent", "Sent when a task message is published.", TASK_LABELS)
TASK_RECEIVED = Counter("celery_task_received", "Sent when the worker receives a task.", TASK_LABELS)
TASK_STARTED = Counter("celery_task_started", "Sent just before the worker executes the task.", TASK_LABELS)
TASK_SUCCEEDED = Counter("celery_task_succeeded", "Sent if the task executed successfully.", TASK_LABELS)
TASK_FAILED = Counter(
    "celery_task_failed", "Sent if the execution of the task failed.", ["name", "hostname", "exception", "queue_name"]
)
TASK_REJECTED = Counter(
    "celery_task_rejected",
    "The task was rejected by the worker, possibly to be re-queued or moved to a dead letter queue.",
    TASK_LABELS,
)
TASK_REVOKED = Counter("celery_task_revoked", "Sent if the task has been revoked.", TASK_LABELS)
TASK_RETRIED = Counter(
    "celery_task_retried", "Sent if the task failed, but will be retried in the future.", TASK_LABELS
)
TASK_RUNTIME = Histogram("celery_task_runtime", "Histogram of task runtime measurements.", TASK_LABELS)
TASK_QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_time",
    "From publishing a task to a worker starting it (seconds).",
    TASK_LABELS,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def scrape(*collectors) -> bytes:
    """One exposition for all processes sharing the multiprocess directory,
    plus `collectors` read at scrape time (worker liveness, queue lengths)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        if not collectors:
            return generate_latest(REGISTRY)
        registry = CollectorRegistry()
        registry.register(_Union(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


def serve(port: int, host: str = "0.0.0.0"):
    """Serve this host's metrics (every process sharing the folder) on host:port,
    from a thread; returns the server, to shut down."""
    from prometheus_client import start_http_server

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    server, _thread = start_http_server(port, host, registry=registry)
    return server


class _Union:
    """The default registry's samples inside another registry."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        return self.source.collect()


DEPLOY_OUTCOMES = ("succeeded", "rolled_back", "rollback_failed", "superseded", "failed")


def zero_deploy_outcomes(environments) -> None:
    """Export every (environment, outcome) of DEPLOYS at 0 from the start.

    A counter child appears only when first incremented, and Prometheus'
    increase() cannot see a series born at 1: the first failed deploy after a
    restart would never fire OpsfleetDeployFailed. Present at 0, it does."""
    for environment in environments:
        for outcome in DEPLOY_OUTCOMES:
            DEPLOYS.labels(environment, outcome)
        for kind in ("automatic", "manual", "repair"):
            for outcome in ("succeeded", "failed"):
                ROLLBACKS.labels(environment, kind, outcome)


ALERT_OUTCOMES = ("act", "dry_run", "skip", "escalate", "ignore", "repeat")


def zero_alert_outcomes() -> None:
    """Every outcome of ALERT_DECISIONS at 0 from the start, for the same reason:
    OpsfleetRemediationCapReached is an increase() of the escalate outcome, and the
    first escalation after a restart would otherwise be a series born at 1."""
    for outcome in ALERT_OUTCOMES:
        ALERT_DECISIONS.labels(outcome)


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


__all__ = [
    "ALERTS_RECEIVED",
    "BACKUP_DURATION",
    "BACKUP_FAILURES",
    "BACKUP_LAST_SUCCESS",
    "BACKUP_MAX_AGE",
    "BACKUP_PRUNED",
    "BACKUP_SIZE",
    "BACKUP_SKIPPED",
    "BACKUP_VERIFICATIONS",
    "RESTORE_DRILL_RESULT",
    "RESTORE_DRILL_SECONDS",
    "CLEANUP_RECLAIMED_BYTES",
    "DEPLOYS",
    "DEPLOY_DURATION",
    "ROLLBACKS",
    "DEPLOY_OUTCOMES",
    "GITHUB_DELIVERIES",
    "RELEASE_INFO",
    "CLEANUP_REMOVED",
    "LOG_ROTATED_BYTES",
    "LOG_ROTATED_LINES",
    "LOG_ROTATIONS",
    "LOG_WRITER_PAUSE",
    "ALERT_DECISIONS",
    "ALERT_HELD_BACK",
    "CONTENT_TYPE",
    "REPORTS",
    "REMEDIATIONS",
    "RUNS_FINISHED",
    "RUN_DURATION",
    "RUN_START_LATENCY",
    "STEPS_FINISHED",
    "SWEEPER_ACTIONS",
    "TASK_FAILED",
    "TASK_QUEUE_WAIT",
    "TASK_RECEIVED",
    "TASK_REJECTED",
    "TASK_RETRIED",
    "TASK_REVOKED",
    "TASK_RUNTIME",
    "TASK_SENT",
    "TASK_STARTED",
    "TASK_SUCCEEDED",
    "WEBHOOK_REQUESTS",
    "mark_process_dead",
    "scrape",
    "zero_alert_outcomes",
    "zero_deploy_outcomes",
    "serve",
]
