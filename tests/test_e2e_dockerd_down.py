"""Issue 8, fault 4: dockerd stopped during a deploy, on a real fleet (gunicorn, a Celery worker
and beat; Redis broker, PostgreSQL ledger) whose DOCKER_HOST is a private dockerd of this test,
stopped with one SIGTERM as a host's dockerd is (its containers stop with it). The deploy is
held inside a step that talks to Docker while the test stops dockerd, then let go:

- held in `recreate` (nothing recreated yet): the run fails naming Docker unreachable and
  saying opsfleet stopped nothing; no release was written, so there is nothing to roll back;
- held in `health` (both services recreated on the new image): the gate cannot see them, the
  rollback cannot reach Docker either: `rollback_failed`, an escalation, the release marked failed.

Either way the run ends within a bounded time (no worker hangs on Docker), GitHub gets the
failure, the lock is free and the worker goes on taking work (a push while Docker is still down
fails at `validate`, saying so). Once dockerd is back, a push of a newer commit deploys and both
services run its image."""

from __future__ import annotations

import re
import uuid

import pytest
import requests

from tests.support.deploy import SHA, TAG, build_images, signed_push
from tests.support.fleet import Fleet
from tests.support.github_recorder import GitHubRecorder
from tests.support.servers import PrivateDockerd, free_port
from worker.adapters.ledger import Ledger

pytestmark = pytest.mark.slow
SECRET = "e2e-github-secret"
REPO = "127.0.0.1:1/opsfleet-dockerd-down"  # no registry there: a tag not built here fails fast
ENDED = ("succeeded", "failed", "skipped", "superseded", "rolled_back", "rollback_failed")
SERVICES = ("app", "api")
STEPS = ("lock", "validate", "backup", "pull", "recreate", "health")
# A run's end after dockerd went away: the gate's 3 s, a few fast Docker errors, the queue;
# generous (2 CPUs shared with other test runs). A step hung on Docker would end at its time
# limit (worker.step_soft_timeout_seconds) with a reason that names no Docker: the test fails.
BOUND_SECONDS = 30


def serve(port: int) -> list[str]:
    """busybox httpd as a service that exits on SIGTERM (dockerd stops it at once on shutdown)."""
    return ["sh", "-c", f"httpd -f -p 127.0.0.1:{port} -h /www & trap 'kill $!; exit 0' TERM; wait"]


@pytest.fixture(scope="module")
def docker_host():
    """The private dockerd, with the deploy images (v1, a, b, c, e) built in it."""
    with PrivateDockerd() as server:
        build_images(server.client, REPO)
        yield server


def _config(names: dict[str, str], ports: dict[str, int]) -> dict:
    return {
        "fleet": {"public_url": "http://opsfleet.test"},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 5},
        "worker": {"step_soft_timeout_seconds": 20, "step_hard_timeout_seconds": 25, "lease_seconds": 6},
        "docker": {"timeout_seconds": 10},
        "services": {s: {"container": names[s], "health_url": f"http://127.0.0.1:{ports[s]}/health"} for s in SERVICES},
        "deploy": {
            "lock_wait_seconds": 2,
            "environments": {
                "prod": {
                    "branch": "master",
                    "services": list(SERVICES),
                    "image": REPO,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 2,
                    "min_free_bytes": 1024,
                    "prune_images": False,  # the module's tests share locally built tags
                }
            },
        },
    }


@pytest.mark.parametrize("step", ["recreate", "health"])
def test_dockerd_stopped_inside_a_deploy_step_fails_the_run_and_the_next_deploy_succeeds(
    tmp_path, docker_host, shared_pg_url, slack, step
):
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    suffix = uuid.uuid4().hex[:6]
    names = {s: f"opsfleet-dd-{s}-{suffix}" for s in SERVICES}
    ports = {s: free_port() for s in SERVICES}
    ledger = Ledger(shared_pg_url)
    for s in SERVICES:
        # A restart policy, as production containers have: they come back with dockerd.
        docker_host.client.containers.run(
            f"{REPO}:v1", serve(ports[s]), name=names[s], detach=True, network_mode="host",
            restart_policy={"Name": "unless-stopped"},
        )  # fmt: skip

    def unreachable(text: str) -> bool:
        """The reason names Docker, where it is and that it cannot be reached (a worker process
        whose client was made before dockerd went says the first, a fresh one the second)."""
        url = re.escape(docker_host.url)
        return re.search(f"Docker at {url} does not answer|cannot reach Docker at {url}", text) is not None

    def version(service: str) -> str:
        return requests.get(f"http://127.0.0.1:{ports[service]}/version", timeout=5).text

    with GitHubRecorder() as github:
        env = {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": shared_pg_url,
            "DOCKER_HOST": docker_host.url,
            "GITHUB_WEBHOOK_SECRET": SECRET,
            "GITHUB_TOKEN": github.token,
            "GITHUB_API_URL": github.base_url,
            "SLACK_BOT_TOKEN": slack.token,
            "SLACK_API_URL": slack.base_url,
            "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
        }
        try:
            with Fleet(tmp_path, _config(names, ports), env).start() as fleet:

                def push(commit: str, at: int) -> int:
                    data, headers = signed_push(SECRET, commit, at)
                    answer = requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10)
                    assert answer.status_code == 202, answer.text
                    [run_id] = answer.json()["runs"]
                    return run_id

                fleet.wait(lambda: all(version(s) == "v1" for s in SERVICES), 30, "both services serving v1")

                # a is held inside the step; dockerd goes away; the step is let go.
                hold = hold_dir / f"hold-deploy-{step}"
                hold.touch()
                run_a = push("a", 1000)
                fleet.wait(lambda: (hold_dir / f"held-{run_a}-{step}").exists(), 60, f"the worker to hold in {step}")
                if step == "health":
                    assert all(version(s) == "a" for s in SERVICES)  # recreated, not yet gated
                docker_host.stop()
                hold.unlink()
                ended = fleet.wait_run(run_a, ENDED, timeout=BOUND_SECONDS)  # no worker hangs on Docker
                reason = ended["reason"]
                assert unreachable(reason), ended
                assert "unexpected" not in reason, ended  # an error the step understood, not a crash

                steps = {s["name"]: s for s in ended["steps"]}
                assert list(steps) == list(STEPS[: STEPS.index(step) + 1]), ended["steps"]
                assert all(steps[s]["status"] == "succeeded" for s in ("lock", "validate", "backup", "pull"))
                assert steps[step]["status"] == "failed"
                releases = ledger.list_releases("prod")
                if step == "recreate":
                    # Failed before the release was written: opsfleet stopped nothing (dockerd's own
                    # shutdown stopped the containers; their restart policy brings them back).
                    assert ended["status"] == "failed", ended
                    assert reason.startswith("step recreate failed: "), reason
                    assert reason.endswith("; nothing was stopped"), reason
                    assert "health" not in steps
                    assert releases == []
                    escalations = []
                else:
                    # Both services were put on a (the recreate step says so); the gate could not
                    # see them, the rollback could not reach Docker: a person is called.
                    assert ended["status"] == "rollback_failed", ended
                    assert reason.startswith("health gate failed after 3s: "), reason
                    assert "rollback failed: " in reason, reason
                    # What ran before, for the person putting it back by hand.
                    target = reason.rpartition("(rollback target: ")[2]
                    assert sorted(target.rstrip(")").split(", ")) == [f"{s} on {REPO}:v1" for s in sorted(SERVICES)]
                    for s in SERVICES:
                        assert f"{s}: " in steps["recreate"]["output"]
                        assert f"on {REPO}:{TAG['a']}" in steps["recreate"]["output"]
                    [release] = releases
                    assert release["sha"] == SHA["a"] and release["status"] == "failed", release
                    assert release["previous_images"] == {s: f"{REPO}:v1" for s in SERVICES}
                    escalations = [r for r in fleet.runs() if r["playbook"] == "escalate"]
                    assert len(escalations) == 1, escalations
                    assert "rollback failed" in escalations[0]["params"]["reason"]
                    assert unreachable(escalations[0]["params"]["reason"])
                    assert escalations[0]["params"]["reason"].endswith(f"(rollback target: {target}")

                # The worker takes other work, and the lock is free: a push while Docker is still
                # down gets past the lock and fails at validate, saying why.
                run_c = push("c", 1001)
                down = fleet.wait_run(run_c, ENDED, timeout=BOUND_SECONDS)
                assert down["status"] == "failed", down
                assert down["reason"].startswith("step validate failed: "), down
                assert unreachable(down["reason"]), down
                assert down["steps"][0]["output"].startswith("locked deploy:prod"), down["steps"][0]
                for escalation in escalations:  # the person is paged (Slack), Docker down or not
                    assert fleet.wait_run(escalation["id"], ENDED, timeout=30)["status"] == "succeeded"
                    pages = [c for c in slack.calls if c.ok and "rollback failed" in str(c.params.get("text"))]
                    assert pages and f"{REPO}:v1" in pages[0].params["text"], [c.params for c in slack.calls]

                # GitHub saw both failures: a failure (or an error, when the rollback failed too).
                final = "failure" if step == "recreate" else "error"

                def reported():
                    by_sha = {d["sha"]: github.states(d["id"]) for d in github.deployments.values()}
                    done = by_sha.get(SHA["a"], [])[-1:] == [final] and by_sha.get(SHA["c"], [])[-1:] == ["failure"]
                    return by_sha if done else None

                by_sha = fleet.wait(reported, 30, "GitHub statuses for the failed deploys")
                assert by_sha == {
                    SHA["a"]: ["queued", "in_progress", final],
                    SHA["c"]: ["queued", "in_progress", "failure"],
                }
                description = [
                    s["description"] for d in github.deployments.values() if d["sha"] == SHA["a"] for s in d["statuses"]
                ][-1]
                assert "Docker at unix://" in description, description

                # dockerd returns; its containers come back (restart policy); a newer push deploys.
                docker_host.start()
                back = "v1" if step == "recreate" else "a"
                fleet.wait(lambda: all(version(s) == back for s in SERVICES), 30, f"both services back on {back}")
                run_b = push("b", 1002)
                done = fleet.wait_run(run_b, ENDED, timeout=60)
                assert done["status"] == "succeeded", done
                assert all(version(s) == "b" for s in SERVICES)
                for s in SERVICES:
                    assert docker_host.client.containers.get(names[s]).attrs["Config"]["Image"] == f"{REPO}:{TAG['b']}"
                leftovers = [
                    c.name for c in docker_host.client.containers.list(all=True) if c.name not in names.values()
                ]
                assert leftovers == [], leftovers  # no renamed original left behind
                [current] = [r for r in ledger.list_releases("prod") if r["current"]]
                assert current["sha"] == SHA["b"]
                assert fleet.api(f"/runs/{run_a}")["status"] == ended["status"]  # ended once
        finally:
            ledger.dispose()
            docker_host.start()
            for c in docker_host.client.containers.list(all=True):
                c.remove(force=True)
