"""The safety verdict as a table: (policy, rule state, target state, now) -> verdict, reason."""

from datetime import UTC, datetime, timedelta

import pytest

from worker.safety import Policy, RuleState, TargetState, judge

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
POLICY = Policy(
    cooldown=timedelta(minutes=5),
    cap_max_actions=3,
    cap_window=timedelta(hours=1),
    storm_max_targets=10,
    storm_window=timedelta(minutes=5),
)
DRY = Policy(**{**POLICY.__dict__, "dry_run": True})
ago = lambda **kw: NOW - timedelta(**kw)  # noqa: E731

TABLE = [
    # policy  rule state                                target state                                                  verdict     reason starts  storm
    (POLICY, RuleState(1), TargetState(), "act", "rule matched", False),
    (POLICY, RuleState(10), TargetState(), "act", "rule matched", False),
    (POLICY, RuleState(11), TargetState(), "escalate", "storm: 11 targets", True),
    (POLICY, RuleState(8, truncated_alerts=3), TargetState(), "escalate", "storm: 11 targets", True),
    (POLICY, RuleState(40, storm_escalated=True), TargetState(), "skip", "storm: 40 targets", True),
    (POLICY, RuleState(40), TargetState(active_run=7), "escalate", "storm", True),
    (POLICY, RuleState(1), TargetState(active_run=7), "skip", "locked: run 7", False),
    (
        POLICY,
        RuleState(1),
        TargetState(last_action_at=ago(minutes=2)),
        "skip",
        "cooldown: acted 2m ago, 3m left",
        False,
    ),
    (POLICY, RuleState(1), TargetState(last_action_at=ago(minutes=5)), "act", "rule matched", False),
    (
        POLICY,
        RuleState(1),
        TargetState(last_action_at=ago(minutes=30), actions_in_cap_window=2),
        "act",
        "rule matched",
        False,
    ),
    (
        POLICY,
        RuleState(1),
        TargetState(last_action_at=ago(minutes=30), actions_in_cap_window=3),
        "escalate",
        "cap reached: 3 actions within 1h",
        False,
    ),
    (
        POLICY,
        RuleState(1),
        TargetState(last_action_at=ago(minutes=30), actions_in_cap_window=3, escalated_in_cap_window=True),
        "skip",
        "cap reached",
        False,
    ),
    (DRY, RuleState(1), TargetState(), "dry_run", "dry run", False),
    (DRY, RuleState(1), TargetState(active_run=3), "skip", "locked", False),
]


@pytest.mark.parametrize("policy,rule,target,verdict,reason,storm", TABLE)
def test_safety_table(policy, rule, target, verdict, reason, storm):
    decision = judge(policy, rule, target, NOW)
    assert (decision.verdict, decision.storm) == (verdict, storm)
    assert decision.reason.startswith(reason), decision.reason


def test_lock_by_an_alert_of_the_same_notification_says_so():
    decision = judge(POLICY, RuleState(1), TargetState(active_run=0), NOW)
    assert decision.reason == "locked: an alert received with this one is working on this target"
