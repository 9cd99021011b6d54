"""The alert decision as a table: (alert, config) -> outcome, rule, target, reason."""

import pytest

from worker.config import parse_config
from worker.decide import Alert, decide_alerts

CONFIG = {
    "services": {"api": {"container": "shop-api"}, "web": {"container": "shop-web"}},
    "remediation": {
        "rules": [
            {
                "name": "down-by-label",
                "match": ['alertname="ServiceDown"'],
                "playbook": "restart_service",
                "target": {"service_label": "service"},
            },
            {
                "name": "mem-web",
                "match": ['alertname="HighMemoryUsage"', 'severity=~"warning|critical"'],
                "playbook": "restart_service",
                "target": {"service": "web"},
                "dry_run": True,
            },
            {
                "name": "any-critical",
                "match": ['severity="critical"'],
                "playbook": "restart_service",
                "target": {"service": "api"},
            },
        ]
    },
}


def alert(status="firing", **labels):
    return Alert(status, labels, "fp1", "2026-12-03T18:44:29.678702744Z")


def config(mode="first_match"):
    raw = {**CONFIG, "remediation": {**CONFIG["remediation"], "mode": mode}}
    return parse_config(raw, source="test", base_dir=".", environ={}).config


TABLE = [
    # alert                                                       outcome    rule            target  reason contains
    (alert(alertname="ServiceDown", service="api"), "act", "down-by-label", "api", "matched"),
    (alert("resolved", alertname="ServiceDown", service="api"), "ignore", None, None, "resolved"),
    (alert(alertname="ServiceDown", service="db"), "skip", "down-by-label", None, "names no configured service"),
    (
        alert(alertname="ServiceDown", service="api; rm -rf /"),
        "skip",
        "down-by-label",
        None,
        "names no configured service",
    ),
    (alert(alertname="ServiceDown"), "skip", "down-by-label", None, "missing"),
    (alert(alertname="HighMemoryUsage", severity="warning"), "act", "mem-web", "web", "matched"),
    (alert(alertname="HighMemoryUsage", severity="info"), "ignore", None, None, "no rule"),
    (alert(alertname="Other"), "ignore", None, None, "no rule"),
    # first match wins: ServiceDown+critical acts once, by the first rule
    (alert(alertname="ServiceDown", service="web", severity="critical"), "act", "down-by-label", "web", "matched"),
]


@pytest.mark.parametrize("incoming,outcome,rule,target,reason", TABLE)
def test_decision_table(incoming, outcome, rule, target, reason):
    [decision] = decide_alerts([incoming], config())
    assert (decision.outcome, decision.rule, decision.target) == (outcome, rule, target)
    assert reason in decision.reason


def test_all_match_mode_acts_for_every_matching_rule():
    incoming = alert(alertname="ServiceDown", service="web", severity="critical")
    decisions = decide_alerts([incoming], config("all_match"))
    assert [(d.rule, d.target) for d in decisions] == [("down-by-label", "web"), ("any-critical", "api")]
    assert len({d.dedup_key for d in decisions}) == 2


def test_rule_policy_takes_defaults_and_overrides():
    raw = {**CONFIG, "remediation": {**CONFIG["remediation"], "defaults": {"cooldown_seconds": 60}}}
    raw["remediation"]["rules"] = [
        {**raw["remediation"]["rules"][0], "cap": {"max_actions": 5, "window_seconds": 600}},
        raw["remediation"]["rules"][1],
    ]
    cfg = parse_config(raw, source="t", base_dir=".", environ={}).config
    down, mem = (
        decide_alerts([alert(alertname=n, service="api", severity="warning")], cfg)[0]
        for n in ("ServiceDown", "HighMemoryUsage")
    )
    assert (down.policy.cooldown.seconds, down.policy.cap_max_actions, down.policy.dry_run) == (60, 5, False)
    assert (mem.policy.cap_max_actions, mem.policy.storm_max_targets, mem.policy.dry_run) == (3, 10, True)


def test_dedup_key_is_rule_fingerprint_and_starts_at():
    [decision] = decide_alerts([alert(alertname="ServiceDown", service="api")], config())
    assert decision.dedup_key == "alert:down-by-label:fp1:2026-12-03T18:44:29.678702744Z"
    assert decide_alerts([alert("resolved", alertname="X")], config())[0].dedup_key is None
