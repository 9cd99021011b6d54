"""The shipped monitoring configuration is valid for the real tools."""

import shutil
import subprocess
from pathlib import Path

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


def test_alertmanager_config_passes_amtool(tmp_path):
    amtool = shutil.which("amtool")
    assert amtool, "amtool (Debian prometheus-alertmanager) is missing: run bash scripts/services.sh"
    # amtool checks that credentials_file exists; give it one at the configured path's name.
    config = (COMPOSE / "alertmanager.yml").read_text()
    token = tmp_path / "opsfleet-token"
    token.write_text("t\n")
    checked = tmp_path / "alertmanager.yml"
    checked.write_text(config.replace("/etc/alertmanager/opsfleet-token", str(token)))
    done = subprocess.run([amtool, "check-config", str(checked)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_prometheus_config_passes_promtool_with_its_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian prometheus) is missing: run bash scripts/services.sh"
    done = subprocess.run([promtool, "check", "config", str(COMPOSE / "prometheus.yml")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alert_rules.yml" in done.stdout  # the rule file was found and checked too


def test_prometheus_scrapes_opsfleet_the_fleet_node_and_postgres_exporters():
    import yaml

    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    # The alert rules select on these job names.
    assert {"opsfleet", "govpropai-backend", "govpropai-postgres", "node-exporter"} <= jobs
    assert config["rule_files"] == ["alert_rules.yml"]


def _route(labels: list[str]) -> str:
    amtool = shutil.which("amtool")
    assert amtool, "amtool (Debian prometheus-alertmanager) is missing: run bash scripts/services.sh"
    done = subprocess.run([amtool, "config", "routes", "test", f"--config.file={COMPOSE / 'alertmanager.yml'}", *labels],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_alertmanager_routes_opsfleets_own_alerts_to_a_person_and_the_stacks_to_opsfleet():
    assert _route(["alertname=OpsfleetWorkerDown", "component=opsfleet", "severity=critical"]) == "oncall"
    assert _route(["alertname=OpsfleetEscalation", "severity=critical"]) == "oncall"
    assert _route(["alertname=DiskSpaceLow", "severity=warning"]) == "opsfleet"
