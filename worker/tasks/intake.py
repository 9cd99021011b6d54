"""Accepting events at the edge: decide, commit to the ledger, then enqueue.

Called by the web process inside a request; it does no work beyond that.
The order is the guarantee: the event and its runs are committed before the
edge answers 2xx, and enqueued after, so a broker that loses the message
cannot lose the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from worker.adapters import metrics
from worker.adapters.ledger import NewRun
from worker.decide import Alert, AlertDecision, decide_alerts
from worker.tasks.runs import enqueue_runs

_OUTCOME_STATUS = {"act": "queued", "dry_run": "skipped", "skip": "skipped"}


@dataclass(frozen=True)
class AlertIntake:
    event_id: int
    decisions: list[dict]
    run_ids: list[int]
    enqueued: list[int]


def _summary(alert: Alert) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
    return f"{alert.name} firing since {alert.starts_at} ({labels})"


def _new_run(decision: AlertDecision) -> NewRun:
    return NewRun(
        trigger="alert",
        playbook=decision.playbook or "",
        status=_OUTCOME_STATUS[decision.outcome],
        reason=decision.reason,
        rule=decision.rule,
        target=decision.target,
        params=decision.params,
        summary=_summary(decision.alert),
        dedup_key=decision.dedup_key,
    )


def accept_alerts(app: Celery, *, alerts: list[Alert], summary: str, body: str) -> AlertIntake:
    runtime = app.opsfleet
    decisions = decide_alerts(alerts, runtime.config)
    acting = [d for d in decisions if d.makes_run]
    recorded = runtime.ledger.record_event(
        source="alertmanager", summary=summary, body=body, new_runs=[_new_run(d) for d in acting]
    )
    for alert in alerts:
        metrics.ALERTS_RECEIVED.labels(alert.status).inc()
    report = []
    runs_by_decision = dict(zip([id(d) for d in acting], recorded.runs, strict=True))
    for decision in decisions:
        run = runs_by_decision.get(id(decision))
        outcome = decision.outcome if run is None or run.created else "repeat"
        metrics.ALERT_DECISIONS.labels(outcome).inc()
        report.append(
            {
                "fingerprint": decision.alert.fingerprint,
                "alertname": decision.alert.name,
                "outcome": outcome,
                "reason": decision.reason,
                "rule": decision.rule,
                "target": decision.target,
                "run_id": run.id if run else None,
            }
        )
    new_queued = [r.id for r in recorded.runs if r.created and r.status == "queued"]
    enqueued = enqueue_runs(app, runtime.ledger, new_queued)
    return AlertIntake(recorded.event_id, report, sorted({r.id for r in recorded.runs}), enqueued)
