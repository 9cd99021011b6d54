"""The shipped alert rules are valid Prometheus rules, and each maps through the
example configuration to the playbook the README's table says."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.config import load_config
from worker.decide import Alert, decide_alerts

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "compose" / "alert_rules.yml"


def readme_table() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Shipped alert rules", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (none|`(\w+)`[^|]*) \|", section, re.M)
    return {alert: (playbook or "none") for alert, _, playbook in rows}


def shipped_alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool():
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian prometheus) is missing: run bash scripts/services.sh"
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_lists_every_shipped_alert():
    assert sorted(readme_table()) == sorted(rule["alert"] for rule in shipped_alerts())


@pytest.mark.parametrize("rule", shipped_alerts(), ids=lambda r: r["alert"])
def test_each_alert_maps_to_the_playbook_the_readme_says(rule):
    config = load_config(REPO / "opsfleet.example.yaml", environ={}).config
    labels = {"alertname": rule["alert"], "instance": "node-a:9100", "job": "stack", **rule.get("labels", {})}
    decisions = [d for d in decide_alerts([Alert("firing", labels, "0123456789abcdef", "2026-12-03T10:00:00Z")], config)
                 if d.outcome != "ignore"]
    expected = readme_table()[rule["alert"]]
    assert [d.playbook for d in decisions] == ([] if expected == "none" else [expected])
    for d in decisions:
        assert d.outcome == "act", d.reason  # the target resolves to a configured service
