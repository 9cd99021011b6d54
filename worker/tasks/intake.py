"""Accepting events at the edge: decide, commit to the ledger, then enqueue.

Called by the web process inside a request; it does no work beyond that.
The order is the guarantee: the event and its runs are committed before the
edge answers 2xx, and enqueued after, so a broker that loses the message
cannot lose the run.

For Alertmanager notifications, per alert:
- resolved → never an action; runs answering that firing are marked
  resolved and their Slack threads told so;
- firing and already handled (same rule, fingerprint, startsAt) → a repeat,
  counted on the existing run;
- firing and new → worker.safety decides (storm, lock, cooldown, cap, dry
  run), reading and writing the ledger in one transaction with the rules and
  targets involved locked.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from celery import Celery

from worker.adapters import metrics
from worker.adapters.ledger import IntakeTx, NewRun
from worker.decide import Alert, AlertDecision, decide_alerts
from worker.safety import RuleState, TargetState, judge
from worker.tasks.runs import enqueue_runs, request_report


@dataclass(frozen=True)
class AlertIntake:
    event_id: int
    decisions: list[dict]
    run_ids: list[int]
    enqueued: list[int]
    resolved_runs: list[int]


def _summary(alert: Alert) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
    return f"{alert.name} firing since {alert.starts_at} ({labels})"


def _alert_run(decision: AlertDecision, status: str, reason: str) -> NewRun:
    return NewRun(
        trigger="alert",
        playbook=decision.playbook or "",
        status=status,
        reason=reason,
        rule=decision.rule,
        target=decision.target,
        params=decision.params,
        summary=_summary(decision.alert),
        dedup_key=decision.dedup_key,
        fingerprint=decision.alert.fingerprint,
        alert_starts_at=decision.alert.starts_at,
    )


class _Judge:
    """Applies worker.safety to new firings, with the state read from `tx` once per rule."""

    def __init__(self, tx: IntakeTx, decisions: list[AlertDecision], truncated: int):
        self.tx = tx
        self.truncated = truncated
        self.payload_subjects: dict[str, set[str]] = defaultdict(set)
        for d in decisions:
            if d.makes_run:
                self.payload_subjects[d.rule].add(d.subject)
        self.rule_states: dict[str, RuleState] = {}

    def rule_state(self, d: AlertDecision) -> RuleState:
        if d.rule not in self.rule_states:
            since = self.tx.now - d.policy.storm_window
            subjects = self.tx.rule_subjects(d.rule, since) | self.payload_subjects[d.rule]
            self.rule_states[d.rule] = RuleState(len(subjects), self.truncated, self.tx.storm_escalated(d.rule, since))
        return self.rule_states[d.rule]

    def decide(self, d: AlertDecision):
        target = TargetState()
        if d.target:
            target = TargetState(**self.tx.target_history(d.rule, d.target, self.tx.now - d.policy.cap_window))
        verdict = judge(d.policy, self.rule_state(d), target, self.tx.now)
        if verdict.storm and verdict.verdict == "escalate":
            state = self.rule_states[d.rule]
            self.rule_states[d.rule] = RuleState(state.subjects_in_window, state.truncated_alerts, True)
        return verdict


def _escalation(decision: AlertDecision, reason: str, storm: bool, alerts_in_payload: int) -> NewRun:
    target = None if storm else decision.target
    what = f"storm on rule {decision.rule}" if storm else f"{decision.rule} on {decision.target}"
    return NewRun(
        trigger="alert",
        playbook="escalate",
        status="queued",
        reason=reason,
        rule=decision.rule,
        target=target,
        params={"reason": reason, "alert": _summary(decision.alert), "storm": storm, "alerts": alerts_in_payload},
        summary=f"escalation: {what}: {reason}",
    )


def accept_alerts(app: Celery, *, alerts: list[Alert], truncated: int, summary: str, body: str) -> AlertIntake:
    runtime = app.opsfleet
    decisions = decide_alerts(alerts, runtime.config)
    acting = [d for d in decisions if d.makes_run]
    keys = {f"rule:{d.rule}" for d in acting} | {f"target:{d.target}" for d in acting if d.target}
    report: list[dict] = []
    created_queued: list[int] = []
    all_runs: set[int] = set()
    with runtime.ledger.intake() as tx:
        tx.lock(keys)
        event_id = tx.add_event(source="alertmanager", summary=summary, body=body)
        judge_ = _Judge(tx, decisions, truncated)
        for d in decisions:
            outcome, reason, run_id, escalation_id = d.outcome, d.reason, None, None
            if d.makes_run and tx.existing_run(d.dedup_key):
                run = tx.add_run(event_id, _alert_run(d, "skipped", d.reason))
                outcome, run_id = "repeat", run.id
            elif d.outcome == "skip":
                run_id = tx.add_run(event_id, _alert_run(d, "skipped", d.reason)).id
            elif d.outcome == "act":
                verdict = judge_.decide(d)
                outcome, reason = verdict.verdict, verdict.reason
                if verdict.verdict == "act":
                    run_id = tx.add_run(event_id, _alert_run(d, "queued", reason)).id
                    created_queued.append(run_id)
                else:
                    if verdict.verdict == "dry_run":
                        reason = f"dry run: would {d.playbook} {d.target or ''}".rstrip()
                    run_id = tx.add_run(event_id, _alert_run(d, "skipped", reason)).id
                if verdict.verdict == "escalate":
                    escalation_id = tx.add_run(event_id, _escalation(d, reason, verdict.storm, len(alerts))).id
                    created_queued.append(escalation_id)
            if run_id:
                all_runs.add(run_id)
            if escalation_id:
                all_runs.add(escalation_id)
            metrics.ALERT_DECISIONS.labels(outcome).inc()
            if run_id and outcome in ("skip", "dry_run", "escalate"):
                # A skip is a run that ended at birth: count it with the finished ones.
                metrics.RUNS_FINISHED.labels("alert", d.playbook or "", "skipped").inc()
            report.append(
                {
                    "fingerprint": d.alert.fingerprint,
                    "alertname": d.alert.name,
                    "outcome": outcome,
                    "reason": reason,
                    "rule": d.rule,
                    "target": d.target,
                    "run_id": run_id,
                    "escalation_run_id": escalation_id,
                }
            )
        resolved_runs = []
        for alert in alerts:
            if alert.status == "resolved":
                resolved_runs += tx.resolve_alert_runs(alert.fingerprint, alert.starts_at)
    for alert in alerts:
        metrics.ALERTS_RECEIVED.labels(alert.status).inc()
    enqueued = enqueue_runs(app, runtime.ledger, created_queued)
    for run_id in resolved_runs:
        request_report(app, run_id)
    return AlertIntake(event_id, report, sorted(all_runs), enqueued, resolved_runs)
