"""Whether a matched, new firing may act: one pure function, tested as a table.

The state it reads (what is running on the target, when the rule last acted
there, how many distinct targets the rule saw lately) comes from the ledger,
read inside the same transaction that records the verdict, with the rule and
target locked, so two web processes can never both decide to act.

Checks, in order (the first that applies decides):
1. storm: more than `storm_max_targets` distinct targets firing for the rule
   within `storm_window` (truncated alerts count too) → no action; the first
   alert of the storm escalates once, the rest are skipped.
2. locked: a run for the target is queued or running → skipped.
3. cooldown: the rule acted on the target less than `cooldown` ago → skipped.
4. cap: the rule acted `cap_max_actions` times on the target within
   `cap_window` → escalate once, then skip until the window moves on.
5. dry run → recorded, not acted.
6. act.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

Verdict = Literal["act", "dry_run", "skip", "escalate"]


@dataclass(frozen=True)
class Policy:
    cooldown: timedelta
    cap_max_actions: int
    cap_window: timedelta
    storm_max_targets: int
    storm_window: timedelta
    dry_run: bool = False


@dataclass(frozen=True)
class TargetState:
    """The rule's history on one target, and whether the target is busy."""

    active_run: int | None = None  # a queued or running run on the target, any rule (0: one being written)
    last_action_at: datetime | None = None  # this rule, this target
    actions_in_cap_window: int = 0
    escalated_in_cap_window: bool = False


@dataclass(frozen=True)
class RuleState:
    """Distinct subjects (targets, or alert fingerprints where no target) the
    rule saw within the storm window, this notification's included."""

    subjects_in_window: int = 0
    truncated_alerts: int = 0
    storm_escalated: bool = False


LOCKED_BY_A_NEIGHBOUR = "locked: an alert received with this one is working on this target"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    storm: bool = False


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def judge(policy: Policy, rule: RuleState, target: TargetState, now: datetime) -> Decision:
    seen = rule.subjects_in_window + rule.truncated_alerts
    if seen > policy.storm_max_targets:
        why = (
            f"storm: {seen} targets firing within {_human(policy.storm_window)} "
            f"(breaker at {policy.storm_max_targets}); no action"
        )
        if not rule.storm_escalated:
            return Decision("escalate", why + ", escalated", storm=True)
        return Decision("skip", why, storm=True)
    if target.active_run is not None:
        # A run id not written yet (an alert decided just before, in the same transaction) is 0;
        # the intake names that run once it is written.
        if target.active_run == 0:
            return Decision("skip", LOCKED_BY_A_NEIGHBOUR)
        return Decision("skip", f"locked: run {target.active_run} is working on this target")
    if target.last_action_at is not None and now - target.last_action_at < policy.cooldown:
        left = policy.cooldown - (now - target.last_action_at)
        return Decision("skip", f"cooldown: acted {_human(now - target.last_action_at)} ago, {_human(left)} left")
    if target.actions_in_cap_window >= policy.cap_max_actions:
        why = f"cap reached: {target.actions_in_cap_window} actions within {_human(policy.cap_window)}"
        if not target.escalated_in_cap_window:
            return Decision("escalate", why + ", escalated instead of acting")
        return Decision("skip", why + ", already escalated")
    if policy.dry_run:
        return Decision("dry_run", "dry run: would act")
    return Decision("act", "rule matched")


# Why an alert did not lead to an action, as a small fixed set (a metric label),
# read from the reason's leading words; anything else is "other".
REASON_KINDS = (
    ("storm:", "storm"),
    ("locked:", "locked"),
    ("cooldown:", "cooldown"),
    ("cap reached:", "cap"),
    ("dry run:", "dry_run"),
    ("unknown target:", "unknown_target"),
)


def reason_kind(reason: str) -> str:
    return next((kind for prefix, kind in REASON_KINDS if reason.startswith(prefix)), "other")
