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
    decisions = [
        d
        for d in decide_alerts([Alert("firing", labels, "0123456789abcdef", "2026-12-03T10:00:00Z")], config)
        if d.outcome != "ignore"
    ]
    expected = readme_table()[rule["alert"]]
    assert [d.playbook for d in decisions] == ([] if expected == "none" else [expected])
    for d in decisions:
        assert d.outcome == "act", d.reason  # the target resolves to a configured service


RULE_TESTS = REPO / "compose" / "rule-tests"


@pytest.mark.parametrize("rule", shipped_alerts(), ids=lambda r: r["alert"])
def test_each_alert_has_a_promtool_test_that_fires_and_stays_quiet(rule):
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian prometheus) is missing: run bash scripts/services.sh"
    path = RULE_TESTS / f"{rule['alert']}.yml"
    assert path.exists(), f"no promtool test for {rule['alert']}: add {path.relative_to(REPO)}"
    cases = [
        case
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == rule["alert"]
    ]
    assert any(case.get("exp_alerts") for case in cases), "no case where it fires"
    assert any(not case.get("exp_alerts") for case in cases), "no case where it stays quiet"
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def exported_metric_names(tmp_path) -> set[str]:
    """Every sample name opsfleet's /metrics can carry: the module's metrics and what
    the web reads at scrape time (here from an embedded ledger and broker folder)."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from worker.adapters import metrics
    from worker.adapters.fleet_collector import FleetCollector
    from worker.adapters.ledger import Ledger, ledger_url

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(value._type, [""])
            names |= {value._name + s for s in suffixes}
    ledger = Ledger(ledger_url(None, tmp_path))
    ledger.migrate()
    ledger.beat("w@h", 1, ["opsfleet.remediate"], 10)
    (tmp_path / "queue").mkdir()
    collector = FleetCollector(
        ledger, "filesystem://", {"data_folder_in": str(tmp_path / "queue")}, ["opsfleet.remediate"], 3600
    )
    for family in text_string_to_metric_families(metrics.scrape(collector).decode()):
        names |= {s.name for s in family.samples}
    ledger.dispose()
    return names


def test_opsfleet_alerts_use_only_metrics_opsfleet_exports(tmp_path):
    exported = exported_metric_names(tmp_path) | {"up"}
    own = [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        if group["name"] == "opsfleet.rules"
        for rule in group["rules"]
    ]
    assert own
    for rule in own:
        used = set(re.findall(r"\b((?:opsfleet|celery)_\w+|up)\b(?=\s*[{\[)]|\s*[=<>!])", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} uses {sorted(used - exported)}, which opsfleet does not export"
        assert rule["labels"]["component"] == "opsfleet", rule["alert"]


DASHBOARD = REPO / "compose" / "grafana" / "opsfleet-dashboard.json"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "time", "le", "without", "max", "min", "avg"}


def test_grafana_dashboard_loads_and_uses_only_exported_metrics(tmp_path):
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metric_names(tmp_path) | {"up"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)  # label matchers, ranges, strings
        used = {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", bare) if w not in PROMQL_WORDS}
        used -= {
            w
            for w in used
            if w
            in {
                "name",
                "queue_name",
                "playbook",
                "outcome",
                "source",
                "code",
                "kind",
                "result",
                "hostname",
                "status",
                "series",
                "environment",
                "event",
                "sha",
                "rule",
            }
        }  # grouping labels
        assert used, expr
        assert used <= exported, f"{expr}: {sorted(used - exported)} not exported by opsfleet"
