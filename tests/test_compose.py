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
    slack_url = tmp_path / "slack-webhook-url"
    slack_url.write_text("https://hooks.slack.com/services/T0/B0/x\n")
    checked.write_text(
        config.replace("/etc/alertmanager/opsfleet-token", str(token)).replace(
            "/etc/alertmanager/slack-webhook-url", str(slack_url)
        )
    )
    done = subprocess.run([amtool, "check-config", str(checked)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_prometheus_config_passes_promtool_with_its_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian prometheus) is missing: run bash scripts/services.sh"
    done = subprocess.run(
        [promtool, "check", "config", str(COMPOSE / "prometheus.yml")], capture_output=True, text=True, timeout=30
    )
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
    done = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={COMPOSE / 'alertmanager.yml'}", *labels],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_alertmanager_routes_opsfleets_own_alerts_to_a_person_and_the_stacks_to_opsfleet():
    assert _route(["alertname=OpsfleetWorkerDown", "component=opsfleet", "severity=critical"]) == "oncall"
    assert _route(["alertname=OpsfleetEscalation", "severity=critical"]) == "oncall"
    assert _route(["alertname=DiskSpaceLow", "severity=warning"]) == "opsfleet"


def compose_config(tmp_path) -> dict:
    import yaml

    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian docker-compose) is missing: run bash scripts/services.sh"
    done = subprocess.run(
        [tool, "-f", str(COMPOSE / "docker-compose.yml"), "--env-file", str(COMPOSE / ".env.example"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return yaml.safe_load(done.stdout)


def test_docker_compose_file_is_valid_and_has_the_whole_stack(tmp_path):
    config = compose_config(tmp_path)
    services = config["services"]
    assert set(services) == {"redis", "postgres", "web", "worker", "beat", "prometheus", "alertmanager"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
    assert set(config["volumes"]) >= {"redis-data", "postgres-data", "opsfleet-data", "backups", "prometheus-data"}
    # Only the worker touches Docker.
    socket = "/var/run/docker.sock:/var/run/docker.sock"
    assert [n for n, s in services.items() if any(socket in str(v) for v in s.get("volumes", []))] == ["worker"]
    # One image for web, worker and beat; one metrics folder and PID namespace between them.
    opsfleet = {n: services[n] for n in ("web", "worker", "beat")}
    assert len({s["image"] for s in opsfleet.values()}) == 1
    assert services["worker"]["pid"] == services["beat"]["pid"] == "service:web"
    assert all(s["environment"]["PROMETHEUS_MULTIPROC_DIR"] == "/data/metrics" for s in opsfleet.values())
    assert "opsfleet-web" in services["web"]["networks"]["default"]["aliases"]  # alertmanager.yml's URL
    # Prometheus gets its config and the rule file where prometheus.yml looks for it.
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert any(m.endswith("/etc/prometheus/alert_rules.yml:ro") for m in mounts), mounts
    assert all(s["depends_on"]["postgres"]["condition"] == "service_healthy" for s in opsfleet.values())


def test_dockerfile_copies_what_exists_and_runs_what_the_procfile_runs():
    repo = COMPOSE.parent
    dockerfile = (repo / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if any(c in source for c in "*?["):
                    continue  # a pattern: optional by design (wheel[s] for offline builds)
                assert (repo / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    web = next(line for line in (repo / "Procfile").read_text().splitlines() if line.startswith("web:"))
    assert "opsfleet.gunicorn_conf" in web and "opsfleet.gunicorn_conf" in dockerfile
    env_example = (COMPOSE / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in env_example and "ALERTMANAGER_TOKEN=" in env_example


def test_ci_workflow_tests_before_it_builds_and_pushes_the_image():
    import yaml

    workflow = yaml.safe_load((COMPOSE.parent / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"push", "pull_request"} and triggers["push"]["tags"] == ["v*"]
    jobs = workflow["jobs"]
    assert set(jobs["image"]["needs"]) == {"test", "audit"} and jobs["image"]["if"] == "github.event_name == 'push'"
    assert jobs["test"]["needs"] == "lint"
    assert {"postgres", "redis"} <= set(jobs["test"]["services"])
    runs = " ".join(step.get("run", "") for job in jobs.values() for step in job["steps"])
    assert "scripts/services.sh" in runs and "scripts/dev test" in runs and "--cov" in runs and "pip-audit" in runs
    assert "ruff check" in runs
    uploads = [s for s in jobs["test"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert any(s.get("if") == "failure()" for s in uploads)
    for script in ("scripts/services.sh", "scripts/dev"):
        assert (COMPOSE.parent / script).exists()
