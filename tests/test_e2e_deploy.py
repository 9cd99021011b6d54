"""Deploys end to end on a real fleet: gunicorn (2 workers) and a Celery worker and
beat as processes, Redis broker, PostgreSQL ledger, the private dockerd, and GitHub's
API as a local recorder. A signed push goes over HTTP; everything after is the fleet's."""

from __future__ import annotations

import signal
import uuid

import pytest
import requests

from tests.support.deploy import SHA, TAG, build_images, httpd_command, new_repository, remove_images, signed_push
from tests.support.fleet import Fleet
from tests.support.github_recorder import GitHubRecorder
from tests.support.servers import TEST_DOCKER_HOST, free_port

pytestmark = pytest.mark.slow
SECRET = "e2e-github-secret"
REPO = new_repository()
ENDED = ("succeeded", "failed", "skipped", "superseded", "rolled_back", "rollback_failed")


@pytest.fixture(scope="module")
def images(dockerd):
    built = build_images(dockerd, REPO)
    yield built
    remove_images(dockerd, built)


def _config(name: str, port: int) -> dict:
    return {
        "fleet": {"public_url": "http://opsfleet.test"},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 5},
        "services": {"app": {"container": name, "health_url": f"http://127.0.0.1:{port}/health"}},
        "deploy": {
            "environments": {
                "prod": {
                    "branch": "master",
                    "services": ["app"],
                    "image": REPO,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 1,
                    "min_free_bytes": 1024,
                    # The module's deploys share locally built tags no registry can serve again.
                    "prune_images": False,
                }
            }
        },
    }


def test_signed_pushes_deploy_roll_back_and_report_to_github(tmp_path, dockerd, images, shared_pg_url):
    port = free_port()
    name = f"opsfleet-e2e-deploy-{uuid.uuid4().hex[:8]}"
    dockerd.containers.run(f"{REPO}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
    config = _config(name, port)
    with GitHubRecorder() as github:
        env = {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": shared_pg_url,
            "DOCKER_HOST": TEST_DOCKER_HOST,
            "GITHUB_WEBHOOK_SECRET": SECRET,
            "GITHUB_TOKEN": github.token,
            "GITHUB_API_URL": github.base_url,
        }
        try:
            with Fleet(tmp_path, config, env).start() as fleet:

                def post(commit, pushed_at, delivery=None):
                    data, headers = signed_push(SECRET, commit, pushed_at, delivery)
                    return requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10)

                def serving():
                    return requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text

                # A signed push deploys; the same delivery again is the same run.
                first = post("a", 1000, delivery="e2e-delivery-1")
                assert first.status_code == 202, first.text
                again = post("a", 1000, delivery="e2e-delivery-1")
                assert again.status_code == 200 and again.json()["runs"] == first.json()["runs"]
                [run_a] = first.json()["runs"]
                assert fleet.wait_run(run_a, ENDED)["status"] == "succeeded"
                assert serving() == "a"
                assert dockerd.containers.get(name).attrs["Config"]["Image"] == f"{REPO}:{TAG['a']}"

                # An unhealthy tag rolls back; the previous version serves again.
                [run_c] = post("c", 1001).json()["runs"]
                ended = fleet.wait_run(run_c, ENDED, timeout=90)
                assert ended["status"] == "rolled_back", ended
                assert serving() == "a"

                # No signature: 401, nothing recorded.
                data, headers = signed_push(SECRET, "b", 1002)
                del headers["X-Hub-Signature-256"]
                assert (
                    requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10).status_code
                    == 401
                )

                # GitHub saw both deployments through (reports are retried tasks of their own).
                def reported():
                    by_sha = {d["sha"]: github.states(d["id"]) for d in github.deployments.values()}
                    return (
                        by_sha
                        if by_sha.get(SHA["c"], [])[-1:] == ["failure"] and by_sha.get(SHA["a"], [])[-1:] == ["success"]
                        else None
                    )

                by_sha = fleet.wait(reported, 30, "GitHub statuses for both deploys")
                assert by_sha == {
                    SHA["a"]: ["queued", "in_progress", "success"],
                    SHA["c"]: ["queued", "in_progress", "failure"],
                }
                deploy_runs = [r for r in fleet.runs() if r["playbook"] == "deploy"]
                assert len(deploy_runs) == 2
                exposed = fleet.metrics()
                assert f'opsfleet_release_info{{environment="prod",sha="{SHA["a"]}"}} 1.0' in exposed
                assert 'opsfleet_deploys_total{environment="prod",outcome="succeeded"} 1.0' in exposed
                assert 'opsfleet_deploys_total{environment="prod",outcome="rolled_back"} 1.0' in exposed
                assert 'opsfleet_github_deliveries_total{event="push",outcome="redelivery"} 1.0' in exposed
        finally:
            for c in dockerd.containers.list(all=True, filters={"name": name}):
                c.remove(force=True)


def test_worker_killed_mid_deploy_fails_the_run_and_the_next_deploy_proceeds(tmp_path, dockerd, images, shared_pg_url):
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    hold = hold_dir / "hold-deploy-recreate"
    hold.touch()
    port = free_port()
    name = f"opsfleet-e2e-deploy-{uuid.uuid4().hex[:8]}"
    before = dockerd.containers.run(f"{REPO}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
    config = _config(name, port)
    # A 3 s lease, renewed while a step runs: the sweeper notices the dead worker quickly.
    config["worker"] = {
        "step_soft_timeout_seconds": 10,
        "step_hard_timeout_seconds": 11,
        "queue_grace_seconds": 5,
        "lease_seconds": 3,
    }
    config["deploy"]["lock_wait_seconds"] = 2
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": shared_pg_url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
    }
    try:
        with Fleet(tmp_path, config, env).start() as fleet:
            data, headers = signed_push(SECRET, "a", 1000)
            [run_id] = requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10).json()["runs"]
            fleet.wait(
                lambda: (hold_dir / f"held-{run_id}-recreate").exists(), 30, "the worker to hold inside recreate"
            )
            fleet.stop("worker", sig=signal.SIGKILL)
            hold.unlink()
            fleet.start("worker")  # the sweeper is a task: a worker runs it
            run = fleet.wait_run(run_id, statuses=("failed",), timeout=60)
            assert "lease expired" in run["reason"] or "worker lost" in run["reason"]
            assert dockerd.containers.get(name).id == before.id  # held before touching Docker

            # The dead run still holds deploy:prod until its TTL; the next deploy takes it over.
            data, headers = signed_push(SECRET, "b", 1001)
            [next_id] = requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10).json()[
                "runs"
            ]
            ended = fleet.wait_run(next_id, ENDED, timeout=60)
            assert ended["status"] == "succeeded", ended
            assert f"taken over from run:{run_id}, which had ended" in ended["steps"][0]["output"]
            assert requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text == "b"
            assert fleet.api(f"/runs/{run_id}")["status"] == "failed"
    finally:
        for c in dockerd.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)


def test_worker_killed_after_recreating_leaves_no_half_deploy(tmp_path, dockerd, images, shared_pg_url):
    """SIGKILL inside the health step: b's container runs, ungated. The sweeper fails the dead
    run and records its repair, which puts a (the live release) back through the gate."""
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    port = free_port()
    name = f"opsfleet-e2e-deploy-{uuid.uuid4().hex[:8]}"
    dockerd.containers.run(f"{REPO}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
    config = _config(name, port)
    config["worker"] = {
        "step_soft_timeout_seconds": 10,
        "step_hard_timeout_seconds": 11,
        "queue_grace_seconds": 5,
        "lease_seconds": 3,
    }
    config["deploy"]["lock_wait_seconds"] = 2
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": shared_pg_url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
    }

    def version() -> str:
        return requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text

    def push(commit: str, at: int) -> int:
        data, headers = signed_push(SECRET, commit, at)
        return requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10).json()["runs"][0]

    try:
        with Fleet(tmp_path, config, env).start() as fleet:
            assert fleet.wait_run(push("a", 1000), ENDED, timeout=60)["status"] == "succeeded"
            hold = hold_dir / "hold-deploy-health"
            hold.touch()
            dead = push("b", 1001)
            fleet.wait(lambda: (hold_dir / f"held-{dead}-health").exists(), 30, "the worker to hold inside health")
            assert version() == "b"  # recreated, not yet gated
            fleet.stop("worker", sig=signal.SIGKILL)
            hold.unlink()
            fleet.start("worker")
            assert fleet.wait_run(dead, statuses=("failed",), timeout=60)["status"] == "failed"

            def repair():
                found = [r for r in fleet.runs() if r["triggered_by"] == f"opsfleet (repair of run {dead})"]
                return found[0] if found and found[0]["status"] in ENDED else None

            run = fleet.wait(repair, 90, "the repair of the dead deploy")
            assert run["status"] == "succeeded", run
            assert version() == "a"
            assert len([r for r in fleet.runs() if r["playbook"] == "deploy"]) == 3  # a, dead b, repair: once
            assert fleet.wait_run(push("b", 1002), ENDED, timeout=60)["status"] == "succeeded" and version() == "b"
    finally:
        for c in dockerd.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)
