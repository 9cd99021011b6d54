"""A SIGKILLed worker, end to end through real monitoring: the web's /metrics says
celery_worker_up 0 once its heartbeats stop → a real Prometheus, with the shipped rule
file, fires OpsfleetWorkerDown → a real Alertmanager → opsfleet's /hooks/alertmanager,
which records the alert (no rule acts on opsfleet's own alerts)."""

from __future__ import annotations

import json
import signal

import pytest
import sqlalchemy as sa
import yaml

from tests.support.fleet import REPO, Fleet, metric_value
from tests.support.prometheus import Prometheus
from worker.adapters.ledger import Ledger, events, ledger_url

pytestmark = pytest.mark.slow


def rules_with_short_for(folder) -> list:
    """The shipped rules, OpsfleetWorkerDown's `for` cut from 1m to 2s (its timing is
    promtool's to test: compose/rule-tests/OpsfleetWorkerDown.yml)."""
    rules = yaml.safe_load((REPO / "compose" / "alert_rules.yml").read_text())
    (worker_down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "OpsfleetWorkerDown"]
    assert worker_down["for"] == "1m"
    worker_down["for"] = "2s"
    path = folder / "alert_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return [path]


def test_sigkilled_worker_reaches_opsfleet_as_a_prometheus_alert(tmp_path, make_alertmanager):
    config = {"sweeper": {"interval_seconds": 1}, "worker": {"heartbeat_interval_seconds": 0.5}}
    with Fleet(tmp_path, config).start("web", "worker") as fleet:
        am = make_alertmanager(f"{fleet.url}/hooks/alertmanager", token=fleet.token)
        with Prometheus({"opsfleet": [fleet.url.split("://", 1)[1]]}, rules_with_short_for(tmp_path), am.url) as prom:
            up = prom.query("celery_worker_up")
            fleet.wait(lambda: prom.query("celery_worker_up == 1") or None, 30, "Prometheus to scrape a live worker")
            [live] = prom.query("celery_worker_up == 1")
            hostname = live["metric"]["hostname"]
            assert prom.query('up{job="opsfleet"} == 1'), up

            fleet.stop("worker", sig=signal.SIGKILL)

            def firing():
                return [
                    a
                    for a in prom.alerts()
                    if a["labels"]["alertname"] == "OpsfleetWorkerDown" and a["state"] == "firing"
                ] or None

            [alert] = fleet.wait(firing, 30, "Prometheus to fire OpsfleetWorkerDown")
            assert alert["labels"]["hostname"] == hostname and alert["labels"]["component"] == "opsfleet"

            # Alertmanager delivers it to opsfleet's webhook, with the token; the edge records it.
            ledger = Ledger(ledger_url(None, tmp_path / "data"))

            def delivered():
                with ledger.engine.connect() as conn:
                    bodies = conn.execute(sa.select(events.c.body).where(events.c.source == "alertmanager")).scalars()
                    return [b for b in bodies if "OpsfleetWorkerDown" in b] or None

            [body] = fleet.wait(delivered, 30, "Alertmanager to post OpsfleetWorkerDown to opsfleet")
            ledger.dispose()
            payload = json.loads(body)
            assert payload["alerts"][0]["labels"]["hostname"] == hostname
            assert metric_value(fleet.metrics(), "opsfleet_alert_decisions_total", outcome="ignore") >= 1
            assert fleet.runs() == []  # opsfleet does not try to fix itself
