"""Accepting events at the edge: decide, commit to the ledger, then enqueue.

Called by the web process inside a request; it does no work beyond that.
The order is the guarantee: the event and its runs are committed before the
edge answers 2xx, and enqueued after, so a broker that loses the message
cannot lose the run.

Notifications are accepted in batches (`accept_alert_batch`): the edge puts
the ones that arrive together into one transaction, so a storm costs a
handful of statements and one commit per batch, not per request. Within a
batch, notifications are decided in arrival order, as if they had come one
after another.

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

import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery

from worker.adapters import metrics
from worker.adapters.ledger import IntakeTx, LedgerUnavailable, NewRun, utcnow
from worker.decide import Alert, AlertDecision, decide_alerts
from worker.safety import LOCKED_BY_A_NEIGHBOUR, RuleState, TargetState, judge, reason_kind
from worker.tasks.runs import enqueue_runs, request_report


@dataclass(frozen=True)
class AlertNotification:
    """One Alertmanager notification as the edge parsed it."""

    alerts: list[Alert]
    truncated: int
    summary: str
    body: str


class AlertsCommitted(Exception):
    """The batch is in the ledger, but making its answers failed after the commit.
    Accepting its notifications again one by one would record them twice; the edge
    answers 5xx instead (Alertmanager's resend is then a repeat)."""


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
    batched queries, then kept current while the batch's alerts are decided
    in order (an action here makes the target busy for the next).

    `new` pairs each decision with its notification's place in the batch: the
    storm breaker of notification k counts the subjects the window held before
    the batch and those of notifications 0..k (its whole group, as when alone),
    never those of notifications after it."""

    def __init__(self, tx: IntakeTx, new: list[tuple[int, AlertDecision]], last_seen: dict[str, dict]):
        self.tx = tx
        targets = {d.target for _, d in new if d.target}
        self.active = tx.active_runs(targets)
        self.history: dict[tuple[str, str], dict] = {}
        self.rules: dict[str, RuleState] = {}
        # Per rule: the notification that first brought each subject new to the window, sorted.
        self.later: dict[str, list[int]] = {}
        by_rule: dict[str, list[tuple[int, AlertDecision]]] = defaultdict(list)
        for index, d in new:
            by_rule[d.rule].append((index, d))
        for rule, pairs in sorted(by_rule.items()):  # rows touched in one order (no deadlock)
            policy = pairs[0][1].policy
            since = tx.now - policy.storm_window
            subjects = {d.subject for _, d in pairs}
            first: dict[str, int] = {}
            seen = {subject for subject, at in last_seen.get(rule, {}).items() if at >= since}
            for index, d in pairs:
                if d.subject not in seen:
                    first.setdefault(d.subject, index)
            self.later[rule] = sorted(first.values())
            tx.touch_subjects(rule, subjects)
            in_window, escalated = tx.storm_window(rule, since)
            self.rules[rule] = RuleState(in_window, 0, escalated)
            found = tx.rule_history(rule, {d.target for _, d in pairs if d.target}, tx.now - policy.cap_window)
            for target, facts in found.items():
                self.history[(rule, target)] = facts

    def judge(self, d: AlertDecision, index: int, truncated: int):
        """`index`: the decision's notification in the batch; `truncated`: the alerts it left out."""
        target = TargetState()
        if d.target:
            target = TargetState(active_run=self.active.get(d.target), **self.history.get((d.rule, d.target), {}))
        rule = self.rules[d.rule]
        later = self.later[d.rule]
        in_window = rule.subjects_in_window - (len(later) - bisect_right(later, index))
        return judge(d.policy, RuleState(in_window, truncated, rule.storm_escalated), target, self.tx.now)

    def acted(self, d: AlertDecision) -> None:
        if d.target:
            self.active.setdefault(d.target, 0)  # busy from now on; its run id is not written yet

    def escalated(self, d: AlertDecision, storm: bool) -> None:
        if storm:
            state = self.rules[d.rule]
            self.rules[d.rule] = RuleState(state.subjects_in_window, 0, True)
        elif d.target:
            facts = self.history.setdefault((d.rule, d.target), {})
            facts["escalated_in_cap_window"] = True


class _RuleLocks:
    """Which rules an intake locks alone and which it shares, and what it read to decide.

    The storm breaker counts a rule's distinct subjects in its window, so an intake
    bringing a subject new to the window must count alone (exclusive lock). One whose
    subjects all fired lately changes no count: intakes like it share the lock and
    decide in parallel (a storm's alerts are mostly such re-firings).

    Sharers do not see each other's writes, so each must bring only subjects already
    in every concurrent sharer's window: "lately" is the window less SHARE_MARGIN, and
    a sharer that has not committed within SHARE_MARGIN of its start gives up
    (`check_duration`), so any sharer overlapping it started less than that after it.
    Rules with windows under twice the margin are always locked alone.
    """

    def __init__(self, tx: IntakeTx, acting: list[AlertDecision]):
        self.subjects: dict[str, set[str]] = defaultdict(set)
        self.windows: dict[str, timedelta] = {}
        for d in acting:
            if d.outcome == "act" and d.rule:
                self.subjects[d.rule].add(d.subject)
                self.windows[d.rule] = d.policy.storm_window
        self.last_seen: dict[str, dict] = {}  # rule → subject → when it last fired (within the window)
        self.alone: list[str] = []
        self.shared: list[str] = []
        for rule, subjects in self.subjects.items():
            window = self.windows[rule]
            self.last_seen[rule] = tx.subjects_last_seen(rule, subjects, tx.now - window)
            lately = tx.now - window + SHARE_MARGIN
            recent = all(self.last_seen[rule].get(subject, lately) > lately for subject in subjects)
            (self.shared if recent and window >= 2 * SHARE_MARGIN else self.alone).append(rule)

    def keys(self) -> tuple[list[str], list[str]]:
        return [f"rule:{rule}" for rule in self.alone], [f"rule:{rule}" for rule in self.shared]

    def check_duration(self, tx: IntakeTx) -> None:
        """Before commit: a sharer that took longer than SHARE_MARGIN records nothing."""
        took = utcnow() - tx.now
        if self.shared and took > SHARE_MARGIN:
            raise LedgerUnavailable(
                f"intake took {took.total_seconds():.0f} s, over the {SHARE_MARGIN.total_seconds():.0f} s "
                "a shared rule lock allows: not recorded"
            )

    def read_again(self, tx: IntakeTx) -> None:
        """Once locked alone: what intakes that held the lock before brought (a batch
        counts its notifications in order from it)."""
        for rule in self.alone:
            self.last_seen[rule] = tx.subjects_last_seen(rule, self.subjects[rule], tx.now - self.windows[rule])


SHARE_MARGIN = timedelta(seconds=30)


# A firing skipped for one of these reasons is decided again when Alertmanager
# sends it again: the lock or the cooldown may have passed since.
PASSING_SKIPS = ("locked:", "cooldown:")


@dataclass(frozen=True)
class _Reconsider:
    run_id: int
    status: str
    reason: str


# One decided alert: (decision, outcome, reason, run to write, escalation to write).
_Step = tuple[AlertDecision, str, str, "NewRun | _Reconsider | None", "NewRun | None"]


def accept_alert_batch(app: Celery, notifications: list[AlertNotification]) -> list[AlertIntake]:
    """Record and decide notifications in one transaction; then enqueue what acts.

    Returns one AlertIntake per notification, in order. Raises LedgerUnavailable
    (nothing of the batch recorded) when the ledger cannot take it.
    """
    started = time.monotonic()
    runtime = app.opsfleet
    decided = [decide_alerts(n.alerts, runtime.config) for n in notifications]
    acting_of = [[d for d in decisions if d.makes_run] for decisions in decided]
    acting = [d for ds in acting_of for d in ds]
    with runtime.ledger.intake() as tx:
        event_ids = tx.add_events("alertmanager", [(n.summary, n.body) for n in notifications])
        rules = _RuleLocks(tx, acting)
        alone, shared = rules.keys()
        # Per target: two intakes about one target never decide at once. Per rule: the storm
        # breaker counts every subject concurrent intakes bring (see _RuleLocks).
        tx.lock([f"target:{d.target}" for d in acting if d.target] + alone, shared)
        if len(notifications) > 1:
            rules.read_again(tx)
        known = tx.existing_runs(d.dedup_key for d in acting)
        waiting = {
            key: row for key, row in known.items() if row.status == "skipped" and row.reason.startswith(PASSING_SKIPS)
        }
        # Firings to decide: new to the ledger, or skipped for a reason that may
        # have passed; the first of any twins in this batch.
        fresh, seen = [], set()
        for index, firing in enumerate(acting_of):
            for d in firing:
                if (d.dedup_key not in known or d.dedup_key in waiting) and d.dedup_key not in seen:
                    fresh.append((index, d))
                    seen.add(d.dedup_key)
        fresh_ids = {id(d) for _, d in fresh}
        state = _State(tx, [(index, d) for index, d in fresh if d.outcome == "act"], rules.last_seen)

        # Decide in order; collect the runs to write in one statement.
        plans: list[list[_Step]] = []
        for index, (n, decisions, firing) in enumerate(zip(notifications, decided, acting_of, strict=True)):
            plan: list[_Step] = []
            for d in decisions:
                if not d.makes_run:
                    plan.append((d, d.outcome, d.reason, None, None))
                elif id(d) not in fresh_ids:
                    plan.append((d, "repeat", d.reason, _alert_run(d, "skipped", d.reason), None))
                elif d.outcome == "skip":
                    plan.append((d, "skip", d.reason, _alert_run(d, "skipped", d.reason), None))
                else:
                    plan.append(_decide(d, state, (index, n.truncated), waiting, firing, tx.now))
            plans.append(plan)

        new_runs = [
            (event_id, r)
            for event_id, plan in zip(event_ids, plans, strict=True)
            for _, _, _, run, esc in plan
            for r in (run, esc)
            if isinstance(r, NewRun)
        ]
        inserted = iter(tx.add_event_runs(new_runs, enqueued=True))
        recorded = []
        for plan in plans:
            for _, _, _, run, esc in plan:
                for r in (run, esc):
                    if isinstance(r, _Reconsider):
                        recorded.append(tx.reconsider_run(r.run_id, r.status, r.reason))
                    elif r is not None:
                        recorded.append(next(inserted))
        _name_the_lockers(tx, plans, recorded)
        recorded = iter(recorded)
        resolved = tx.resolve_alert_runs(
            (a.fingerprint, a.starts_at) for n in notifications for a in n.alerts if a.status == "resolved"
        )
        rules.check_duration(tx)

    try:
        return _answer(app, notifications, event_ids, plans, recorded, resolved, started)
    except Exception as err:
        raise AlertsCommitted(f"recorded, but the answer failed: {type(err).__name__}: {err}") from err


def _answer(app: Celery, notifications, event_ids, plans, recorded, resolved, started) -> list[AlertIntake]:
    """After the commit: each notification's answer, its metrics, and enqueueing what acts."""
    runtime = app.opsfleet
    results = []
    for n, event_id, plan in zip(notifications, event_ids, plans, strict=True):
        report, queued, all_runs = _report(plan, recorded)
        # A run resolved by several notifications of the batch: the first one's.
        mine = {(a.fingerprint, a.starts_at) for a in n.alerts if a.status == "resolved"}
        resolved_runs = sorted(run_id for run_id, alert in resolved.items() if alert in mine)
        for run_id in resolved_runs:
            del resolved[run_id]
        for alert in n.alerts:
            metrics.ALERTS_RECEIVED.labels(alert.status).inc()
        results.append((event_id, report, queued, all_runs, resolved_runs))

    sent = set(enqueue_runs(app, runtime.ledger, [run_id for r in results for run_id in r[2]], marked=True))
    intakes = []
    for event_id, report, queued, all_runs, resolved_runs in results:
        for run_id in resolved_runs:
            request_report(app, run_id)
        enqueued = [run_id for run_id in queued if run_id in sent]
        intakes.append(AlertIntake(event_id, report, sorted(all_runs), enqueued, resolved_runs))
    metrics.ALERT_INTAKE_BATCH.observe(len(notifications))
    metrics.ALERT_INTAKE_SECONDS.observe(time.monotonic() - started)
    return intakes


def _name_the_lockers(tx: IntakeTx, plans: list[list[_Step]], recorded: list) -> None:
    """A firing locked out by an alert decided just before it in this transaction was
    told 'an alert received with this one' (that run had no id yet). Now it has one:
    the reason names it, in the ledger and in the answer."""
    lockers: dict[str, int] = {}  # target → the run acting on it
    renamed: dict[int, str] = {}
    position = 0
    for plan in plans:
        for i, (d, outcome, reason, run, esc) in enumerate(plan):
            rec = recorded[position] if run is not None else None
            position += (run is not None) + (esc is not None)
            if rec is None or not d.target:
                continue
            if outcome == "act":
                lockers.setdefault(d.target, rec.id)
            elif (
                reason == LOCKED_BY_A_NEIGHBOUR
                and d.target in lockers
                and (rec.created or isinstance(run, _Reconsider))
            ):
                named = f"locked: run {lockers[d.target]} is working on this target"
                renamed[rec.id] = named
                plan[i] = (d, outcome, named, run, esc)
    tx.set_reasons(renamed)


def _decide(
    d: AlertDecision, state: _State, where: tuple[int, int], waiting: dict, firing: list[AlertDecision], now
) -> _Step:
    """A fresh firing that acts by its rule: the safety checks say whether it does.
    `where`: its notification's place in the batch and truncated count."""
    verdict = state.judge(d, *where)
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
        escalation = _escalation(d, reason, verdict.storm, firing, now)
    return (d, outcome, reason, run, escalation)


def _report(plan: list[_Step], recorded) -> tuple[list[dict], list[int], set[int]]:
    """What one notification's alerts came to (the edge's answer), its runs to enqueue, all its runs; counts metrics."""
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
    return report, queued, all_runs
