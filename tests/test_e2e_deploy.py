"""Deploys end to end on a real fleet: gunicorn (2 workers) and a Celery worker and
beat as processes, Redis broker, PostgreSQL ledger, the private dockerd, and GitHub's
API as a local recorder. A signed push goes over HTTP; everything after is the fleet's.
Issue 8, fault 3 for deploys: a worker SIGKILLed in each step of a two-service deploy, and
between the two services of an environment's first deploy (a fleet of its own)."""

from __future__ import annotations

import signal
import uuid

import pytest
import requests

from tests.support.deploy import SHA, TAG, build_images, httpd_command, new_repository, remove_images, signed_push
from tests.support.fleet import Fleet
from tests.support.github_recorder import GitHubRecorder
from tests.support.servers import TEST_DOCKER_HOST, free_port, shared_postgres_database
from worker.adapters.ledger import Ledger
from worker.tasks.playbooks import PLAYBOOKS

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


# Where the worker is SIGKILLed (the hold file names a step, or `recreate.app1`: inside recreate,
# app1 recreated and app2 not yet), then: what the two services serve at the kill, what both
# serve once the dead run has ended, and whether the sweeper's repair run (a deploy of what ran
# before) put them there. "live": the release live before; "new": the killed deploy's.
DEPLOY_KILLS = {
    # Before anything is stopped: the stack stays on live. From validate on, the dead run holds
    # deploy:prod, and the next deploy takes it over (its holder's run has ended).
    "lock": (["live", "live"], "live", False),
    "validate": (["live", "live"], "live", False),
    "backup": (["live", "live"], "live", False),
    "pull": (["live", "live"], "live", False),
    "recreate": (["live", "live"], "live", False),  # at its start: before its release row and any container
    # After the release row (status deploying): the stack may be on new, partly or wholly, so the
    # sweeper records a repair, which puts live back on both and gates it. Also after a passed
    # health gate: new was never recorded live, so the live release is what must run.
    "recreate.app1": (["new", "live"], "live", True),
    "health": (["new", "new"], "live", True),
    "record": (["new", "new"], "live", True),
    # new is recorded live and the lock released; only the image cleanup was left. The run fails
    # (every run whose worker died in a step does: no step runs twice), and GitHub is told so,
    # but new is the live release and runs on both: nothing to repair.
    "prune_images": (["new", "new"], "new", False),
}
BEFORE_DOCKER = ["lock", "validate", "backup", "pull", "recreate"]


def test_every_deploy_step_has_its_kill():
    assert {held.split(".")[0] for held in DEPLOY_KILLS} == {s.name for s in PLAYBOOKS["deploy"]}
    assert set(BEFORE_DOCKER) == {held for held, (at_kill, _, _) in DEPLOY_KILLS.items() if at_kill == ["live"] * 2}


def _two_services_config(names: list[str], ports: list[int]) -> dict:
    """Two services of one image: a deploy that stopped between them would show two versions."""
    config = _config(names[0], ports[0])
    config["services"] = {
        f"app{i}": {"container": name, "health_url": f"http://127.0.0.1:{port}/health"}
        for i, (name, port) in enumerate(zip(names, ports, strict=True), start=1)
    }
    config["deploy"]["environments"]["prod"]["services"] = list(config["services"])
    config["deploy"]["lock_wait_seconds"] = 2
    # A 3 s lease, renewed while a step runs: the sweeper notices the dead worker quickly.
    # (A failed gate rolls back and gates again in one step: 2 × (3 s + 2 × 1 s) must fit.)
    config["worker"] = {
        "step_soft_timeout_seconds": 15,
        "step_hard_timeout_seconds": 16,
        "queue_grace_seconds": 5,
        "lease_seconds": 3,
    }
    return config


class KillStack:
    """Two services on one image, a fleet deploying them (web, worker, beat; GitHub a recorder)
    and the ledger read directly. Shared by the kill cases: each starts from whatever release
    is live (a or b, both services on it: checked first) and leaves one live, both on it."""

    def __init__(self, folder, dockerd, pg_url: str, github: GitHubRecorder):
        self.dockerd, self.github = dockerd, github
        self.prefix = f"opsfleet-e2e-kill-{uuid.uuid4().hex[:8]}"
        self.names = [f"{self.prefix}-1", f"{self.prefix}-2"]
        self.ports = [free_port()]
        while len(self.ports) < 2:
            self.ports += [p for p in [free_port()] if p not in self.ports]
        self.hold_dir = folder / "hold"
        self.hold_dir.mkdir()
        self.pushed_at = 1000
        env = {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": pg_url,
            "DOCKER_HOST": TEST_DOCKER_HOST,
            "GITHUB_WEBHOOK_SECRET": SECRET,
            "GITHUB_TOKEN": github.token,
            "GITHUB_API_URL": github.base_url,
            "OPSFLEET_TEST_HOLD_DIR": str(self.hold_dir),
        }
        self.fleet = Fleet(folder, _two_services_config(self.names, self.ports), env)
        self.ledger = Ledger(pg_url)

    def versions(self) -> list[str]:
        return [requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text for port in self.ports]

    def running_images(self) -> list[str]:
        return [self.dockerd.containers.get(name).attrs["Config"]["Image"] for name in self.names]

    def push(self, commit: str) -> int:
        self.pushed_at += 1  # each push newer than the last: none is superseded by order
        data, headers = signed_push(SECRET, commit, self.pushed_at)
        answer = requests.post(f"{self.fleet.url}/hooks/github", data=data, headers=headers, timeout=10)
        return answer.json()["runs"][0]

    def deployment_states(self, run_id: int, final: str) -> list[str] | None:
        """GitHub's statuses of the run's deployment once the last one is `final`."""
        for deployment in list(self.github.deployments.values()):
            states = self.github.states(deployment["id"])
            if deployment["payload"].get("opsfleet_run") == run_id and states[-1:] == [final]:
                return states
        return None

    def deploy_runs(self) -> int:
        return len([r for r in self.fleet.runs() if r["playbook"] == "deploy"])


@pytest.fixture(scope="module")
def kill_stack(tmp_path_factory, dockerd, images):
    with shared_postgres_database() as pg_url, GitHubRecorder() as github:
        stack = KillStack(tmp_path_factory.mktemp("deploy-kills"), dockerd, pg_url, github)
        try:
            for name, port in zip(stack.names, stack.ports, strict=True):
                dockerd.containers.run(f"{REPO}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
            stack.fleet.start()
            assert stack.fleet.wait_run(stack.push("a"), ENDED, timeout=60)["status"] == "succeeded"
            yield stack
        finally:
            stack.fleet.close()
            stack.ledger.dispose()
            for c in dockerd.containers.list(all=True, filters={"name": stack.prefix}):
                c.remove(force=True)


@pytest.mark.parametrize("held", BEFORE_DOCKER)
def test_worker_killed_mid_deploy_fails_the_run_and_the_next_deploy_proceeds(kill_stack, held):
    """SIGKILL in a step before any container is touched: the sweeper fails the run, both
    services stay on the live release, and the next deploy takes over the lock the dead run
    held (from validate on)."""
    _kill_a_deploy(kill_stack, held)


@pytest.mark.parametrize("held", [held for held in DEPLOY_KILLS if held not in BEFORE_DOCKER])
def test_worker_killed_after_recreating_leaves_no_half_deploy(kill_stack, held):
    """SIGKILL between the two services' recreations, in the health gate, or before recording a
    gated release: the sweeper fails the dead run and records its repair, which puts the live
    release back on both. In prune_images the new release is live already, on both. Never two
    versions once the dead run has ended."""
    _kill_a_deploy(kill_stack, held)


def _kill_a_deploy(stack: KillStack, held: str) -> None:
    fleet, ledger = stack.fleet, stack.ledger
    step = held.split(".")[0]
    at_kill, settles, repaired = DEPLOY_KILLS[held]
    # The case's start: a release live (a or b), both services on it; the killed deploy is the other.
    live = next(c for c in ("a", "b") if SHA[c] == ledger.current_release("prod")["sha"])
    other = {"a": "b", "b": "a"}
    commit = {"live": live, "new": other[live]}
    at_kill, settles_on = [commit[v] for v in at_kill], commit[settles]
    assert stack.versions() == [live, live]
    before = [stack.dockerd.containers.get(name).id for name in stack.names]
    runs_before = stack.deploy_runs()

    hold = stack.hold_dir / f"hold-deploy-{held}"
    hold.touch()
    try:
        dead = stack.push(commit["new"])
        fleet.wait(lambda: (stack.hold_dir / f"held-{dead}-{held}").exists(), 30, f"the worker to hold in {held}")
        assert stack.versions() == at_kill  # where the kill lands (recreate.app1: two versions live)
        fleet.stop("worker", sig=signal.SIGKILL)
    finally:
        hold.unlink()
        if "worker" not in fleet.procs:
            fleet.start("worker")  # the sweeper is a task: a worker runs it

    run = fleet.wait_run(dead, statuses=("failed",), timeout=60)
    assert "lease expired" in run["reason"] or "worker lost" in run["reason"], run["reason"]
    steps = [s.name for s in PLAYBOOKS["deploy"]]
    done = steps[: steps.index(step)]
    assert [(s["name"], s["status"]) for s in run["steps"]] == [(n, "succeeded") for n in done] + [
        (step, "failed")
    ]  # nothing after the killed step, nothing twice
    if repaired:

        def repair():
            found = [r for r in fleet.runs() if r["triggered_by"] == f"opsfleet (repair of run {dead})"]
            return fleet.api(f"/runs/{found[0]['id']}") if found and found[0]["status"] in ENDED else None

        fixed = fleet.wait(repair, 90, "the repair of the dead deploy")
        assert fixed["status"] == "succeeded", fixed
        assert f"taken over from run:{dead}, which had ended" in fixed["steps"][0]["output"]

    # One version on both services: the one the ledger has live; no original left renamed.
    assert stack.versions() == [settles_on, settles_on]
    assert stack.running_images() == [f"{REPO}:{TAG[settles_on]}"] * 2
    assert ledger.current_release("prod")["sha"] == SHA[settles_on]
    for name in stack.names:
        assert stack.dockerd.containers.list(all=True, filters={"name": f"{name}."}) == []
    if held in BEFORE_DOCKER:
        assert [stack.dockerd.containers.get(name).id for name in stack.names] == before  # Docker untouched
    # GitHub hears the dead run's end: a final state, not in_progress for ever.
    told = fleet.wait(lambda: stack.deployment_states(dead, "failure"), 30, "GitHub told of the dead run")
    assert told == ["queued", "in_progress", "failure"]

    # Nothing held: the next deploy goes through, both services on it.
    following = other[settles_on]
    next_id = stack.push(following)
    ended = fleet.wait_run(next_id, ENDED, timeout=60)
    assert ended["status"] == "succeeded", ended
    took_over = held in BEFORE_DOCKER[1:]  # the dead run's lock, with no repair to take it first
    assert (f"taken over from run:{dead}, which had ended" in ended["steps"][0]["output"]) == took_over
    assert stack.versions() == [following, following]
    assert stack.running_images() == [f"{REPO}:{TAG[following]}"] * 2
    assert ledger.current_release("prod")["sha"] == SHA[following]
    assert ledger.get_lock("deploy:prod") is None
    assert fleet.wait(lambda: stack.deployment_states(next_id, "success"), 30, "GitHub told of the next deploy")
    # The dead one, its repair (once), the next one.
    assert stack.deploy_runs() - runs_before == (3 if repaired else 2)
    assert fleet.api(f"/runs/{dead}")["status"] == "failed"  # ended once, stays ended


def test_worker_killed_between_the_services_of_a_first_deploy_puts_back_what_ran_before(tmp_path, dockerd, images):
    """The environment's first opsfleet deploy (nothing live; both services on v1, started by
    hand), its worker SIGKILLed between the two services' recreations: app1 on the new image,
    app2 on v1. The sweeper fails the run and records its repair, which puts v1 back on both
    and gates it, making no release current: nothing opsfleet deployed went live. The next
    push deploys as a first deploy, its rollback target v1 again. A fleet of its own: the
    module's always has a release live."""
    with shared_postgres_database() as pg_url, GitHubRecorder() as github:
        stack = KillStack(tmp_path, dockerd, pg_url, github)
        fleet, ledger = stack.fleet, stack.ledger
        try:
            for name, port in zip(stack.names, stack.ports, strict=True):
                dockerd.containers.run(f"{REPO}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
            fleet.start()
            hold = stack.hold_dir / "hold-deploy-recreate.app1"
            hold.touch()
            try:
                dead = stack.push("a")
                fleet.wait(lambda: (stack.hold_dir / f"held-{dead}-recreate.app1").exists(), 30, "the hold")
                assert stack.versions() == ["a", "v1"]  # two versions, and nothing live before
                assert ledger.current_release("prod") is None
                fleet.stop("worker", sig=signal.SIGKILL)
            finally:
                hold.unlink()
                if "worker" not in fleet.procs:
                    fleet.start("worker")

            assert "worker lost" in fleet.wait_run(dead, statuses=("failed",), timeout=60)["reason"]

            def repair():
                found = [r for r in fleet.runs() if r["triggered_by"] == f"opsfleet (repair of run {dead})"]
                return found if found and all(r["status"] in ENDED for r in found) else None

            [fixed] = fleet.wait(repair, 90, "the repair of the dead first deploy")
            fixed = fleet.api(f"/runs/{fixed['id']}")
            assert fixed["status"] == "succeeded", fixed
            assert f"taken over from run:{dead}, which had ended" in fixed["steps"][0]["output"]
            assert "no release is current" in fixed["steps"][-2]["output"]  # record
            assert stack.versions() == ["v1", "v1"]
            assert stack.running_images() == [f"{REPO}:v1"] * 2
            for name in stack.names:
                assert dockerd.containers.list(all=True, filters={"name": f"{name}."}) == []  # no `-old` left
            assert ledger.current_release("prod") is None
            assert ledger.release_of_run(dead)["status"] == "failed"
            assert ledger.get_lock("deploy:prod") is None
            # GitHub hears the dead run's end; the repair is no push and has no deployment of its own.
            told = fleet.wait(lambda: stack.deployment_states(dead, "failure"), 30, "GitHub told of the dead run")
            assert told == ["queued", "in_progress", "failure"]
            assert [d for d in github.deployments.values() if d["payload"].get("opsfleet_run") == fixed["id"]] == []

            # The next push: a first deploy again, on both services, rolling back to v1 if it must.
            following = stack.push("b")
            ended = fleet.wait_run(following, ENDED, timeout=60)
            assert ended["status"] == "succeeded", ended
            assert stack.versions() == ["b", "b"]
            assert stack.running_images() == [f"{REPO}:{TAG['b']}"] * 2
            live = ledger.current_release("prod")
            assert live["sha"] == SHA["b"] and live["previous_images"] == {"app1": f"{REPO}:v1", "app2": f"{REPO}:v1"}
            assert stack.deploy_runs() == 3  # the dead one, its repair (once), the next one
            assert [r for r in fleet.runs() if r["playbook"] == "escalate"] == []  # repaired: nobody paged
        finally:
            fleet.close()
            ledger.dispose()
            for c in dockerd.containers.list(all=True, filters={"name": stack.prefix}):
                c.remove(force=True)
