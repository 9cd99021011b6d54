"""Which rules an Alertmanager notification's alerts match: one pure function.

Input is the alerts of one notification and the configuration; output is one
decision per (alert, rule). No I/O here, so the table tests in
tests/test_decide.py can show every case by eye. Whether a matched alert may
act now (lock, cooldown, cap, storm, dry run) is worker.safety's question,
asked inside the ledger transaction that records the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from worker.config import HOST_PLAYBOOKS, Config, RemediationSettings, RuleSpec
from worker.matchers import matches_all
from worker.safety import Policy

# act: matched, with a target; safety decides whether it acts now.
Outcome = Literal["act", "skip", "ignore"]


@dataclass(frozen=True)
class Alert:
    status: str  # "firing" | "resolved"
    labels: dict[str, str]
    fingerprint: str
    starts_at: str  # Alertmanager's exact text: part of the idempotency key

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")


@dataclass(frozen=True)
class AlertDecision:
    alert: Alert
    outcome: Outcome
    reason: str
    rule: str | None = None
    playbook: str | None = None
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    policy: Policy | None = None

    @property
    def subject(self) -> str:
        """What the storm breaker counts: the target, or the alert where there is none."""
        return self.target or f"alert:{self.alert.fingerprint}"

    @property
    def makes_run(self) -> bool:
        """Ignored alerts leave no run; the others are recorded as runs."""
        return self.outcome != "ignore"

    @property
    def dedup_key(self) -> str | None:
        # (rule, fingerprint, startsAt): a resend, an HA twin or a retry of the
        # same firing maps onto the same run; a new firing (new startsAt) does not.
        if not self.makes_run:
            return None
        return f"alert:{self.rule}:{self.alert.fingerprint}:{self.alert.starts_at}"


def policy_for(rule: RuleSpec, remediation: RemediationSettings) -> Policy:
    defaults = remediation.defaults
    cap = rule.cap or defaults.cap
    storm = rule.storm or defaults.storm
    cooldown = defaults.cooldown_seconds if rule.cooldown_seconds is None else rule.cooldown_seconds
    return Policy(
        cooldown=timedelta(seconds=cooldown),
        cap_max_actions=cap.max_actions,
        cap_window=timedelta(seconds=cap.window_seconds),
        storm_max_targets=storm.max_targets,
        storm_window=timedelta(seconds=storm.window_seconds),
        dry_run=rule.dry_run,
    )


def _target(rule: RuleSpec, alert: Alert, config: Config) -> tuple[str | None, str]:
    if rule.target is None:
        # escalate acts on people; the host playbooks on every log set / series.
        return ("all" if rule.playbook in HOST_PLAYBOOKS else None), ""
    if rule.target.service:
        return rule.target.service, ""
    wanted = alert.labels.get(rule.target.service_label or "")
    if wanted is None:
        return None, f'label "{rule.target.service_label}" is missing'
    if wanted not in config.services:
        # The label value is only ever a key into the configured services;
        # anything else (a container name, shell text) goes no further.
        return None, f'label "{rule.target.service_label}" names no configured service'
    return wanted, ""


def decide_alerts(alerts: list[Alert], config: Config) -> list[AlertDecision]:
    decisions: list[AlertDecision] = []
    rules = config.remediation.rules
    for alert in alerts:
        if alert.status != "firing":
            decisions.append(AlertDecision(alert, "ignore", "resolved alerts never trigger an action"))
            continue
        matched = [rule for rule in rules if matches_all(rule.matchers, alert.labels)]
        if not matched:
            decisions.append(AlertDecision(alert, "ignore", "no rule matches"))
            continue
        if config.remediation.mode == "first_match":
            matched = matched[:1]
        for rule in matched:
            target, problem = _target(rule, alert, config)
            common = dict(
                rule=rule.name,
                playbook=rule.playbook,
                target=target,
                params=dict(rule.params),
                policy=policy_for(rule, config.remediation),
            )
            if problem:
                decisions.append(AlertDecision(alert, "skip", f"unknown target: {problem}", **common))
            else:
                decisions.append(AlertDecision(alert, "act", f"rule {rule.name} matched", **common))
    return decisions
