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
from worker.safety import RuleState, TargetState, judge, reason_kind
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
    params = decision.params
    if decision.playbook == "escalate":
        # A rule that pages: the page says which alert and why.
        params = {
            **params,
            "reason": f"{decision.alert.name} matched rule {decision.rule}",
            "alert": _summary(decision.alert),
        }
    return NewRun(
        trigger="alert",
        playbook=decision.playbook or "",
        status=status,
        reason=reason,
        rule=decision.rule,
        target=decision.target,
        params=params,
        summary=_summary(decision.alert),
        dedup_key=decision.dedup_key,
        fingerprint=decision.alert.fingerprint,
        alert_starts_at=decision.alert.starts_at,
    )


def _escalation(decision: AlertDecision, reason: str, storm: bool, firing: list[AlertDecision], now) -> NewRun:
    target = None if storm else decision.target
    what = f"storm on rule {decision.rule}" if storm else f"{decision.rule} on {decision.target}"
    window = decision.policy.storm_window if storm else decision.policy.cap_window
    bucket = int(now.timestamp() // window.total_seconds())
    return NewRun(
        trigger="alert",
        playbook="escalate",
        status="queued",
        reason=reason,
        rule=decision.rule,
        target=target,
        params={
            "reason": reason,
            "alert": _storm_text(decision, firing) if storm else _summary(decision.alert),
            "storm": storm,
            "alerts": len(firing),
        },
        summary=f"escalation: {what}: {reason}",
        # One escalation per rule (storm) or rule and target (cap) per window,
        # however many web processes decide at once.
        dedup_key=f"escalate:{decision.rule}:{target or '*storm*'}:{bucket}",
    )


def _storm_text(decision: AlertDecision, firing: list[AlertDecision]) -> str:
    subjects = sorted({d.subject for d in firing if d.rule == decision.rule})
    shown = ", ".join(subjects[:20]) + (f" and {len(subjects) - 20} more" if len(subjects) > 20 else "")
    return f"{decision.alert.name} firing for {len(subjects)} targets in this notification: {shown}"


class _State:
    """Everything the safety checks read, loaded from the ledger in a few
    batched queries, then kept current while this notification's alerts are
    decided in order (an action here makes the target busy for the next)."""

    def __init__(self, tx: IntakeTx, new: list[AlertDecision], truncated: int):
        self.tx = tx
        self.truncated = truncated
        targets = {d.target for d in new if d.target}
        self.active = tx.active_runs(targets)
        self.history: dict[tuple[str, str], dict] = {}
        self.rules: dict[str, RuleState] = {}
        by_rule: dict[str, list[AlertDecision]] = defaultdict(list)
        for d in new:
            by_rule[d.rule].append(d)
        for rule, ds in by_rule.items():
            policy = ds[0].policy
            tx.touch_subjects(rule, {d.subject for d in ds})
            since = tx.now - policy.storm_window
            self.rules[rule] = RuleState(tx.count_subjects(rule, since), truncated, tx.storm_escalated(rule, since))
            found = tx.rule_history(rule, {d.target for d in ds if d.target}, tx.now - policy.cap_window)
            for target, facts in found.items():
                self.history[(rule, target)] = facts

    def judge(self, d: AlertDecision):
        target = TargetState()
        if d.target:
            target = TargetState(active_run=self.active.get(d.target), **self.history.get((d.rule, d.target), {}))
        return judge(d.policy, self.rules[d.rule], target, self.tx.now)

    def acted(self, d: AlertDecision) -> None:
        if d.target:
            self.active.setdefault(d.target, 0)  # busy from now on; its run id is not written yet

    def escalated(self, d: AlertDecision, storm: bool) -> None:
        if storm:
            state = self.rules[d.rule]
            self.rules[d.rule] = RuleState(state.subjects_in_window, state.truncated_alerts, True)
        elif d.target:
            facts = self.history.setdefault((d.rule, d.target), {})
            facts["escalated_in_cap_window"] = True


# A firing skipped for one of these reasons is decided again when Alertmanager
# sends it again: the lock or the cooldown may have passed since.
PASSING_SKIPS = ("locked:", "cooldown:")


@dataclass(frozen=True)
class _Reconsider:
    run_id: int
    status: str
    reason: str


def accept_alerts(app: Celery, *, alerts: list[Alert], truncated: int, summary: str, body: str) -> AlertIntake:
    runtime = app.opsfleet
    decisions = decide_alerts(alerts, runtime.config)
    acting = [d for d in decisions if d.makes_run]
    with runtime.ledger.intake() as tx:
        # Per target and per rule: two intakes about one target never decide at once, and
        # the storm breaker of a rule counts every subject its concurrent intakes bring.
        tx.lock(
            [f"target:{d.target}" for d in acting if d.target]
            + [f"rule:{d.rule}" for d in acting if d.outcome == "act" and d.rule]
        )
        event_id = tx.add_event(source="alertmanager", summary=summary, body=body)
        known = tx.existing_runs(d.dedup_key for d in acting)
        waiting = {
            key: row for key, row in known.items() if row.status == "skipped" and row.reason.startswith(PASSING_SKIPS)
        }
        # Firings to decide: new to the ledger, or skipped for a reason that may
        # have passed; the first of any twins in this notification.
        fresh, seen = [], set()
        for d in acting:
            if (d.dedup_key not in known or d.dedup_key in waiting) and d.dedup_key not in seen:
                fresh.append(d)
                seen.add(d.dedup_key)
        fresh_ids = {id(d) for d in fresh}
        state = _State(tx, [d for d in fresh if d.outcome == "act"], truncated)

        # Decide in order; collect the runs to write in one statement.
        plan: list[tuple[AlertDecision, str, str, NewRun | None, NewRun | None]] = []
        for d in decisions:
            if not d.makes_run:
                plan.append((d, d.outcome, d.reason, None, None))
            elif id(d) not in fresh_ids:
                plan.append((d, "repeat", d.reason, _alert_run(d, "skipped", d.reason), None))
            elif d.outcome == "skip":
                plan.append((d, "skip", d.reason, _alert_run(d, "skipped", d.reason), None))
            else:
                verdict = state.judge(d)
                outcome, reason, escalation = verdict.verdict, verdict.reason, None
                if outcome == "act":
                    state.acted(d)
                if outcome == "dry_run":
                    reason = f"dry run: would {d.playbook} {d.target or ''}".rstrip()
                status = "queued" if outcome == "act" else "skipped"
                if d.dedup_key in waiting:
                    run = _Reconsider(waiting[d.dedup_key].id, status, reason)
                else:
                    run = _alert_run(d, status, reason)
                if outcome == "escalate":
                    state.escalated(d, verdict.storm)
                    escalation = _escalation(d, reason, verdict.storm, acting, tx.now)
                plan.append((d, outcome, reason, run, escalation))

        new_runs = [r for _, _, _, run, esc in plan for r in (run, esc) if isinstance(r, NewRun)]
        inserted = iter(tx.add_runs(event_id, new_runs, enqueued=True))
        recorded = []
        for _, _, _, run, esc in plan:
            for r in (run, esc):
                if isinstance(r, _Reconsider):
                    recorded.append(tx.reconsider_run(r.run_id, r.status, r.reason))
                elif r is not None:
                    recorded.append(next(inserted))
        recorded = iter(recorded)
        resolved_runs = tx.resolve_alert_runs((a.fingerprint, a.starts_at) for a in alerts if a.status == "resolved")

    report, queued, all_runs = [], [], set()
    for d, outcome, reason, run, escalation in plan:
        run_rec = next(recorded) if run is not None else None
        esc_rec = next(recorded) if escalation is not None else None
        reconsidered = isinstance(run, _Reconsider)
        for rec in (run_rec, esc_rec):
            if rec is None:
                continue
            all_runs.add(rec.id)
            if (rec.created or reconsidered) and rec.status == "queued":
                queued.append(rec.id)
        if run_rec is not None and not run_rec.created and not reconsidered and outcome != "repeat":
            outcome = "repeat"  # a twin decided the same alert first, in another process
        metrics.ALERT_DECISIONS.labels(outcome).inc()
        if outcome in ("skip", "escalate", "dry_run"):
            metrics.ALERT_HELD_BACK.labels(outcome, reason_kind(reason)).inc()
        if run_rec is not None and run_rec.created and outcome in ("skip", "dry_run", "escalate"):
            # A skip is a run that ended at birth: count it with the finished ones.
            metrics.RUNS_FINISHED.labels("alert", d.playbook or "", "skipped").inc()
            metrics.REMEDIATIONS.labels(d.rule or "", d.playbook or "", "skipped").inc()
        report.append(
            {
                "fingerprint": d.alert.fingerprint,
                "alertname": d.alert.name,
                "outcome": outcome,
                "reason": reason,
                "rule": d.rule,
                "target": d.target,
                "run_id": run_rec.id if run_rec else None,
                "escalation_run_id": esc_rec.id if esc_rec and esc_rec.created else None,
            }
        )
    for alert in alerts:
        metrics.ALERTS_RECEIVED.labels(alert.status).inc()
    enqueued = enqueue_runs(app, runtime.ledger, queued, marked=True)
    for run_id in resolved_runs:
        request_report(app, run_id)
    return AlertIntake(event_id, report, sorted(all_runs), enqueued, resolved_runs)
