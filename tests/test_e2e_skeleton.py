"""The walking skeleton, end to end, with every part real:

a real Alertmanager posts its own webhook → gunicorn verifies and commits →
a Celery worker restarts a real container on a private dockerd → the ledger
has the run and its steps, Slack (a local recorder) has the thread, /metrics
counts it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.support.fleet import REPO, Fleet, metric_value, service_down
from tests.support.servers import TEST_DOCKER_HOST, free_port, log_tail, stop_process, wait_for

# A body a real Alertmanager sent (tests/fixtures/alertmanager/README.md).
FIXTURES = REPO / "tests" / "fixtures" / "alertmanager"

pytestmark = pytest.mark.slow
SLACK_TOKEN = "xoxb-e2e-token"
# A shell that exits on SIGTERM, so a restart takes milliseconds, not the stop timeout.
SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")


def started_at(container) -> str:
    container.reload()
    return container.attrs["State"]["StartedAt"]


def fleet_config(container_name: str) -> dict:
    return {
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 2},
        "slack": {"channel": "#ops-e2e"},
        "services": {"api": {"container": container_name}},
        "remediation": {
            "defaults": {"cooldown_seconds": 0},
            "rules": [
                {
                    "name": "service-down",
                    "match": ['alertname="ServiceDown"'],
                    "playbook": "restart_service",
                    "target": {"service_label": "service"},
                    "params": {"stop_timeout_seconds": 2, "verify_timeout_seconds": 20},
                }
            ],
        },
    }


@pytest.fixture
def api_container(make_container):
    return make_container(f"e2e-api-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)


def assert_run_reported(run: dict, slack, fleet_metrics: str) -> None:
    assert run["status"] == "succeeded", run
    assert [(s["name"], s["status"]) for s in run["steps"]] == [
        ("locate", "succeeded"),
        ("restart", "succeeded"),
        ("verify", "succeeded"),
    ]

    # One thread: a parent, one reply per step, the parent updated to the final status.
    def complete():
        threads = slack.threads()
        if len(threads) != 1:
            return None
        [thread] = threads.values()
        updates = thread["updates"]
        return thread if len(thread["replies"]) == 3 and updates and "succeeded" in updates[-1]["text"] else None

    thread = wait_for(complete, 30, what="Slack thread with 3 replies and a final update")
    assert f"Run #{run['id']}" in thread["parent"]["text"]
    assert metric_value(fleet_metrics, "opsfleet_runs_total", playbook="restart_service", status="succeeded") == 1
    # Alert-to-action latency: the webhook's commit to the worker starting the run.
    assert (
        metric_value(
            fleet_metrics, "opsfleet_run_start_latency_seconds_count", trigger="alert", playbook="restart_service"
        )
        == 1
    )


def test_real_alertmanager_restarts_real_container_redis_postgres(
    tmp_path, api_container, make_alertmanager, slack, shared_pg_url
):
    before = started_at(api_container)
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": shared_pg_url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "SLACK_BOT_TOKEN": slack.token,
        "SLACK_API_URL": slack.base_url,
    }
    with Fleet(tmp_path, fleet_config(api_container.name), env).start() as fleet:
        am = make_alertmanager(f"{fleet.url}/hooks/alertmanager", token=fleet.token)
        am.fire({"alertname": "ServiceDown", "service": "api", "severity": "critical"})

        runs = fleet.wait(lambda: fleet.runs() or None, 30, "Alertmanager's webhook to create a run")
        assert len(runs) == 1 and runs[0]["trigger"] == "alert" and runs[0]["target"] == "api"
        run = fleet.wait_run(runs[0]["id"])
        assert started_at(api_container) != before, "the container was not restarted"
        assert_run_reported(run, slack, fleet.metrics())
        # Alertmanager's own POST reached the edge with its token and was counted.
        assert metric_value(fleet.metrics(), "opsfleet_webhook_requests_total", source="alertmanager", code="202") >= 1
    # No secret in anything the fleet logged: process output, JSON lines, the errors file.
    logs = [fleet.log(name) for name in ("web", "worker", "beat")] + sorted((tmp_path / "data" / "logs").glob("*"))
    assert len(logs) >= 4  # and opsfleet-errors.jsonl when something failed
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in (fleet.token, slack.token):
            assert secret not in text, f"{secret[:4]}… in {path.name}"


def test_opsfleet_run_on_embedded_defaults(tmp_path, api_container, make_container, make_alertmanager, slack):
    """`opsfleet run` as a user starts it: no Redis, no PostgreSQL."""
    import yaml

    bystander = make_container(f"e2e-bystander-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)
    bystander_started = started_at(bystander)
    before = started_at(api_container)
    port = free_port()
    config = {**fleet_config(api_container.name), "fleet": {"data_dir": str(tmp_path / "data")}}
    (tmp_path / "opsfleet.yaml").write_text(yaml.safe_dump(config))
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "ALERTMANAGER_TOKEN", "PROMETHEUS_MULTIPROC_DIR", "OPSFLEET_CONFIG")
    }
    env.update(
        DOCKER_HOST=TEST_DOCKER_HOST, SLACK_BOT_TOKEN=slack.token, SLACK_API_URL=slack.base_url, PYTHONPATH=str(REPO)
    )
    log = tmp_path / "opsfleet-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsfleet.cli", "run", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/readyz", timeout=2).ok, 60, what=f"opsfleet run ready\n{log_tail(log)}")
        token = (tmp_path / "data" / "alertmanager-token").read_text().strip()
        assert (tmp_path / "data" / "alertmanager-token").stat().st_mode & 0o777 == 0o600
        assert token in log.read_text(), "the generated token is printed once"
        assert f"POST {base}/hooks/alertmanager" in log.read_text()

        # The token is required even though it was generated.
        refused = requests.post(f"{base}/hooks/alertmanager", data=b"{}", timeout=5)
        assert refused.status_code == 401

        am = make_alertmanager(f"{base}/hooks/alertmanager", token=token)
        am.fire({"alertname": "ServiceDown", "service": "api"})
        # Hostile label values: a shell command and a real container's name not
        # in the configuration. Neither may reach Docker or a shell.
        am.fire({"alertname": "ServiceDown", "service": "api; touch /tmp/opsfleet-pwned #"})
        am.fire({"alertname": "ServiceDown", "service": bystander.name})

        def three_runs():
            runs = requests.get(f"{base}/api/runs", timeout=5).json()["runs"]
            return runs if len(runs) == 3 else None

        runs = wait_for(three_runs, 30, what=f"three runs\n{log_tail(log)}")
        acted = [r for r in runs if r["status"] != "skipped"]
        skipped = [r for r in runs if r["status"] == "skipped"]
        assert len(acted) == 1 and len(skipped) == 2
        assert all("no configured service" in r["reason"] and r["target"] is None for r in skipped)

        def finished():
            run = requests.get(f"{base}/api/runs/{acted[0]['id']}", timeout=5).json()
            return run if run["status"] in ("succeeded", "failed") else None

        run = wait_for(finished, 60, what=f"run to finish\n{log_tail(log)}")
        assert started_at(api_container) != before
        assert started_at(bystander) == bystander_started, "a container named by a label was touched"
        assert not __import__("os").path.exists("/tmp/opsfleet-pwned")
        assert_run_reported(run, slack, requests.get(f"{base}/metrics", timeout=5).text)

        # The CLI reads the same ledger.
        listed = subprocess.run(
            [sys.executable, "-m", "opsfleet.cli", "runs"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0 and "succeeded" in listed.stdout and "restart_service" in listed.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        finally:
            stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0, log_tail(log)
    assert "opsfleet stopped" in log.read_text()


def test_a_message_redis_lost_after_it_was_enqueued_is_sent_again_from_the_ledger(
    tmp_path, api_container, shared_pg_url
):
    """The edge commits and enqueues; Redis (no AOF) then dies with the message in it. The
    ledger still has the run queued: once Redis is back, the sweeper sends it again, once."""
    from tests.support.servers import PrivateRedis

    before = started_at(api_container)
    with PrivateRedis(appendonly=False) as redis_server:
        env = {"REDIS_URL": redis_server.url, "DATABASE_URL": shared_pg_url, "DOCKER_HOST": TEST_DOCKER_HOST}
        with Fleet(tmp_path, fleet_config(api_container.name), env).start("web") as fleet:
            alert = json.loads((FIXTURES / "firing-single.json").read_text())
            alert["alerts"][0]["labels"] = {"alertname": "ServiceDown", "service": "api"}
            answer = fleet.post_alerts(alert)
            assert answer.status_code == 202, answer.text
            [run_id] = answer.json()["runs"]
            assert answer.json()["enqueued"] == [run_id]  # the broker took it...
            redis_server.stop()  # ...and lost it: nothing on disk
            redis_server.start()
            assert fleet.api(f"/runs/{run_id}")["status"] == "queued"
            fleet.start("worker", "beat")
            run = fleet.wait_run(run_id, timeout=90)
            assert run["status"] == "succeeded", run
            assert started_at(api_container) != before
            time.sleep(4)  # several more sweeps: nothing more happens
            assert len(fleet.runs()) == 1
            assert [s["name"] for s in fleet.api(f"/runs/{run_id}")["steps"]] == ["locate", "restart", "verify"]
            assert metric_value(fleet.metrics(), "opsfleet_sweeper_actions_total", action="requeued") >= 1


def test_sweeper_enqueues_what_was_committed_while_redis_was_down(
    tmp_path, api_container, private_redis, shared_pg_url
):
    before = started_at(api_container)
    env = {"REDIS_URL": private_redis.url, "DATABASE_URL": shared_pg_url, "DOCKER_HOST": TEST_DOCKER_HOST}
    with Fleet(tmp_path, fleet_config(api_container.name), env).start() as fleet:
        private_redis.stop()
        alert = service_down("0123456789abcdef", starts_at="2026-12-03T18:44:29.678702744Z")
        began = time.monotonic()
        answer = fleet.post_alerts(alert)
        assert answer.status_code == 202, answer.text
        assert time.monotonic() - began < 8, "the edge must answer fast with the broker down"
        assert answer.json()["enqueued"] == []
        [run_id] = answer.json()["runs"]
        assert fleet.api(f"/runs/{run_id}")["status"] == "queued"

        private_redis.start()
        run = fleet.wait_run(run_id, timeout=90)
        assert run["status"] == "succeeded", run
        assert started_at(api_container) != before
        time.sleep(3)  # several more sweeps: nothing more happens
        assert len(fleet.runs()) == 1
        assert len(fleet.api(f"/runs/{run_id}")["steps"]) == 3
        assert metric_value(fleet.metrics(), "opsfleet_sweeper_actions_total", action="requeued") >= 1


def test_worker_killed_inside_a_step_fails_the_run_once_and_frees_the_target(tmp_path, api_container, shared_pg_url):
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    hold = hold_dir / "hold-restart_service-restart"
    hold.touch()
    config = fleet_config(api_container.name)
    # A 3 s lease, renewed while a step runs: the sweeper notices the dead worker quickly.
    config["worker"] = {
        "step_soft_timeout_seconds": 6,
        "step_hard_timeout_seconds": 7,
        "queue_grace_seconds": 5,
        "lease_seconds": 3,
    }
    config["remediation"]["rules"][0]["params"] = {"stop_timeout_seconds": 2, "verify_timeout_seconds": 5}
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": shared_pg_url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
    }
    before = started_at(api_container)
    with Fleet(tmp_path, config, env).start() as fleet:
        [run_id] = fleet.post_alerts(service_down("00000000000000aa", starts_at="2026-12-03T10:00:00Z")).json()["runs"]
        fleet.wait(lambda: (hold_dir / f"held-{run_id}-restart").exists(), 30, "the worker to hold inside restart")
        fleet.stop("worker", sig=signal.SIGKILL)
        hold.unlink()
        # The sweeper is a task: a worker (here the restarted one) runs it.
        fleet.start("worker")
        run = fleet.wait_run(run_id, statuses=("failed",), timeout=40)
        assert "lease expired" in run["reason"] or "worker lost" in run["reason"]
        assert [s["status"] for s in run["steps"]] == ["succeeded", "failed"]
        assert started_at(api_container) == before, "the held restart must not have happened"

        [next_id] = fleet.post_alerts(service_down("00000000000000aa", starts_at="2026-12-03T10:05:00Z")).json()["runs"]
        assert next_id != run_id
        assert fleet.wait_run(next_id)["status"] == "succeeded"
        assert started_at(api_container) != before
        assert fleet.api(f"/runs/{run_id}")["status"] == "failed"  # ended once, stays ended


def test_opsfleet_run_killed_takes_web_worker_and_beat_with_it(tmp_path):
    import os

    import psutil

    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "OPSFLEET_CONFIG")
    }
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsfleet.cli", "run", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    children = []
    try:
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok,
            60,
            what=f"opsfleet run ready\n{log_tail(log)}",
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        proc.kill()  # as when an SSH session drops: no chance to stop its children
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        stop_process(proc, signal.SIGKILL)
        for child in children:  # a failed run of this test leaves nothing behind
            with contextlib.suppress(psutil.Error):
                child.kill()


def opsfleet_run_env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell would hand it to `opsfleet run` on embedded defaults."""
    import os

    unset = ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "OPSFLEET_CONFIG", "SLACK_BOT_TOKEN")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, "PYTHONPATH": str(REPO), **extra}


def start_opsfleet_run(folder: Path, env: dict[str, str], port: int) -> tuple[subprocess.Popen, Path]:
    log = folder / "opsfleet-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsfleet.cli", "run", "--port", str(port)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, log


def held_opsfleet_run(tmp_path: Path, api_container):
    """`opsfleet run` in tmp_path whose restart_service runs hold inside verify until the test
    removes `hold_dir/hold-restart_service-verify`: (proc, log, base URL, hold_dir, env)."""
    import yaml

    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    (hold_dir / "hold-restart_service-verify").touch()
    config = {**fleet_config(api_container.name), "fleet": {"data_dir": str(tmp_path / "data")}}
    (tmp_path / "opsfleet.yaml").write_text(yaml.safe_dump(config))
    env = opsfleet_run_env(DOCKER_HOST=TEST_DOCKER_HOST, OPSFLEET_TEST_HOLD_DIR=str(hold_dir), ALERTMANAGER_TOKEN="t")
    port = free_port()
    proc, log = start_opsfleet_run(tmp_path, env, port)
    return proc, log, f"http://127.0.0.1:{port}", hold_dir, env


def test_ctrl_c_while_a_step_runs_fails_that_run_and_frees_its_target(tmp_path, api_container):
    """`opsfleet run` stopped while a worker is inside a step (held there by the test hook):
    after its 30 s grace it kills the worker, and the run it was in is failed at once, saying
    why, instead of holding its target as `running` until the lease runs out."""
    proc, log, base, hold_dir, env = held_opsfleet_run(tmp_path, api_container)
    try:
        wait_for(lambda: requests.get(f"{base}/readyz", timeout=2).ok, 60, what=f"opsfleet run ready\n{log_tail(log)}")
        answer = requests.post(
            f"{base}/hooks/alertmanager", data=service_down("00000000000000cc", starts_at="2026-12-03T10:00:00Z"),
            headers={"Authorization": "Bearer t", "Content-Type": "application/json"}, timeout=10,
        )  # fmt: skip
        [run_id] = answer.json()["runs"]
        wait_for(lambda: (hold_dir / f"held-{run_id}-verify").exists(), 60, what=f"the step held\n{log_tail(log)}")
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        text = log.read_text()
        assert "worker did not stop within 30 s: killed" in text, log_tail(log)
        assert f"run {run_id} was in a step: failed" in text, log_tail(log)
        done = subprocess.run(
            [sys.executable, "-m", "opsfleet.cli", "runs", "--json", str(run_id)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        run = json.loads(done.stdout)
        assert run["status"] == "failed" and run["reason"].startswith("stopped: opsfleet run was stopped")
        assert [s["status"] for s in run["steps"]][-1] == "failed"
        # Its report waits in the embedded broker for the next worker, like every ended run's.
        queued = [json.loads(p.read_text())["headers"] for p in (tmp_path / "data" / "broker" / "queue").glob("*.msg")]
        assert {"task": "opsfleet.report.slack", "argsrepr": f"({run_id},)"} in [
            {k: h[k] for k in ("task", "argsrepr")} for h in queued
        ], queued
    finally:
        (hold_dir / "hold-restart_service-verify").unlink(missing_ok=True)
        stop_process(proc, signal.SIGKILL)


def test_a_worker_that_dies_under_opsfleet_run_is_started_again_and_its_run_failed_at_once(tmp_path, api_container):
    """`opsfleet run` on embedded defaults: the worker SIGKILLed (an OOM kill) inside a step.
    The web keeps answering, the run it was in is failed at once with the reason (not when
    its lease runs out), a new worker is started, and the next alert is acted on."""
    import psutil

    proc, log, base, hold_dir, _ = held_opsfleet_run(tmp_path, api_container)

    def post(fingerprint: str) -> int:
        answer = requests.post(
            f"{base}/hooks/alertmanager", data=service_down(fingerprint, starts_at="2026-12-03T10:00:00Z"),
            headers={"Authorization": "Bearer t", "Content-Type": "application/json"}, timeout=10,
        )  # fmt: skip
        assert answer.status_code == 202, answer.text
        return answer.json()["runs"][0]

    def workers() -> list:
        return [p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline()]

    try:
        wait_for(lambda: requests.get(f"{base}/readyz", timeout=2).ok, 60, what=f"opsfleet run ready\n{log_tail(log)}")
        run_id = post("00000000000000dd")
        wait_for(lambda: (hold_dir / f"held-{run_id}-verify").exists(), 60, what=f"the step held\n{log_tail(log)}")
        [worker] = workers()
        time.sleep(2.5)  # opsfleet run looks at the worker's processes every 2 s
        for child in [worker, *worker.children(recursive=True)]:
            child.kill()
        wait_for(lambda: "worker exited with status -9; starting it again" in log.read_text(), 30, what=log_tail(log))
        wait_for(
            lambda: (r := requests.get(f"{base}/api/runs/{run_id}", timeout=5).json())["status"] == "failed" and r,
            20, what=f"run {run_id} failed\n{log_tail(log)}",
        )  # fmt: skip
        run = requests.get(f"{base}/api/runs/{run_id}", timeout=5).json()
        assert run["reason"].startswith("stopped: worker exited with status -9"), run["reason"]
        (hold_dir / "hold-restart_service-verify").unlink()
        wait_for(lambda: len(workers()) == 1 and workers()[0].pid != worker.pid, 30, what="a new worker")
        next_id = post("00000000000000ee")
        wait_for(
            lambda: requests.get(f"{base}/api/runs/{next_id}", timeout=5).json()["status"] == "succeeded",
            90, what=f"run {next_id} done by the new worker\n{log_tail(log)}",
        )  # fmt: skip
        assert proc.poll() is None  # the fleet never stopped
    finally:
        (hold_dir / "hold-restart_service-verify").unlink(missing_ok=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            stop_process(proc, signal.SIGKILL)


def test_a_second_opsfleet_run_on_the_same_data_dir_is_refused_naming_the_first(tmp_path):
    env = opsfleet_run_env()
    port, other = free_port(), free_port()
    first, log = start_opsfleet_run(tmp_path, env, port)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok, 60, what=log_tail(log))
        second = subprocess.run(
            [sys.executable, "-m", "opsfleet.cli", "run", "--port", str(other)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"is in use by another `opsfleet run` (pid {first.pid})" in second.stderr
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).ok  # the first runs on
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(60)
        finally:
            stop_process(first, signal.SIGKILL)
