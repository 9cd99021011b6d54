"""Push-triggered deploys on the private dockerd: a signed push at the edge
(in-process Flask), the deploy run executed step by step through the same
tasks a worker runs (execute_inline), real containers, real HTTP health checks
(images and pushes: tests/support/deploy.py). GitHub's API is a local recorder.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import requests
import yaml

from tests.support.deploy import SHA, TAG, build_images, httpd_command, new_repository, remove_images, signed_push
from tests.support.github_recorder import GitHubRecorder
from tests.support.registry import Registry
from tests.support.servers import TEST_DOCKER_HOST, free_port
from webhooks import create_app
from worker.adapters.ledger import utcnow
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import execute_inline

SECRET = "gh-deploy-secret-7"
# Debian's docker-registry behind htpasswd serves the module's images (started by `images`):
# every deploy pulls its tag from it with credentials from the environment, as in production.
REGISTRY = Registry()
REPO = f"{REGISTRY.host}/shop/app-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def images(dockerd):
    with REGISTRY:
        built = build_images(dockerd, REPO)
        try:
            for reference in built:
                REGISTRY.push(dockerd, reference)
            yield built
        finally:
            remove_images(dockerd, built)


@pytest.fixture(autouse=True)
def tags_only_in_the_registry(request, dockerd):
    """Before each test on the module's images, only v1 (what runs before a deploy) is
    local: a deploy must pull its tag from the registry."""
    if "images" in request.fixturenames:
        for name in ("a", "b", "c", "e"):
            try:
                dockerd.api.remove_image(f"{REPO}:{TAG[name]}", force=True, noprune=True)
            except Exception:
                pass  # not here


def registry_credentials() -> tuple[dict, dict]:
    """(deploy.registries, environment) for the module's registry."""
    auth = {REGISTRY.host: {"username": REGISTRY.user, "password": "${REGISTRY_PASSWORD}"}}
    return auth, {"REGISTRY_PASSWORD": REGISTRY.password}


@pytest.fixture
def github():
    with GitHubRecorder() as recorder:
        yield recorder


@pytest.fixture
def stack(tmp_path, dockerd, images, github):
    """One service `app` (busybox httpd on a free port) in environment `prod`, on repo:v1."""
    yield from make_stack(tmp_path, dockerd, github, REPO, prune=False)


def make_stack(
    tmp_path,
    dockerd,
    github,
    repo: str,
    prune: bool,
    environment: dict | None = None,
    port: int | None = None,
    deploy_extra: dict | None = None,
    environ_extra: dict | None = None,
    **sections,
):
    """The stack; `environment` adds keys to deploy.environments.prod, `deploy_extra` to deploy,
    `environ_extra` to the environment, `sections` top-level sections."""
    port = port or free_port()
    name = f"opsfleet-deploy-{uuid.uuid4().hex[:8]}"
    command = httpd_command(port)

    def start(tag="v1"):
        if repo == REPO and tag != "v1":  # only v1 is kept local between tests
            dockerd.images.pull(repo, tag, auth_config=REGISTRY.auth)
        return dockerd.containers.run(
            f"{repo}:{tag}",
            command,
            name=name,
            detach=True,
            network_mode="host",
            labels={"com.docker.compose.service": "app"},
        )

    registries, registry_environ = registry_credentials()
    raw = {
        "fleet": {"data_dir": str(tmp_path / "data"), "public_url": "http://opsfleet.test"},
        "services": {"app": {"container": name, "health_url": f"http://127.0.0.1:{port}/health"}},
        "deploy": {
            "lock_wait_seconds": 2,
            "registries": registries,
            **(deploy_extra or {}),
            "environments": {
                "prod": {
                    "branch": "master",
                    "services": ["app"],
                    "image": repo,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 1,
                    "min_free_bytes": 1024,
                    # The module's tests share locally built tags no registry can serve again.
                    "prune_images": prune,
                    **(environment or {}),
                },
            },
        },
        **sections,
    }
    environ = {
        "ALERTMANAGER_TOKEN": "am-token-xyz",
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "GITHUB_TOKEN": github.token,
        "GITHUB_API_URL": github.base_url,
        **registry_environ,
        **(environ_extra or {}),
    }
    loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=environ)
    web = create_app(loaded=loaded)
    worker = create_celery(loaded)

    class Stack:
        pass

    s = Stack()
    s.name, s.port, s.start, s.loaded = name, port, start, loaded
    s.client, s.app, s.ledger = web.test_client(), worker, worker.opsfleet.ledger
    try:
        yield s
    finally:
        for c in dockerd.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)


def push(stack, commit: str, pushed_at: int, delivery: str | None = None):
    data, headers = signed_push(SECRET, commit, pushed_at, delivery)
    answer = stack.client.post("/hooks/github", data=data, headers=headers)
    assert answer.status_code in (200, 202), answer.json
    return answer


def serving(stack) -> str:
    return requests.get(f"http://127.0.0.1:{stack.port}/version", timeout=5).text


def image_of(dockerd, stack) -> str:
    return dockerd.containers.get(stack.name).attrs["Config"]["Image"]


def deploy(stack, commit: str, pushed_at: int) -> dict:
    [run_id] = push(stack, commit, pushed_at).json["runs"]
    return execute_inline(stack.app, run_id)


def test_a_signed_push_deploys_the_new_tag_and_health_passes(stack, dockerd):
    stack.start()
    assert serving(stack) == "v1"
    run = deploy(stack, "a", 1000)
    assert run["status"] == "succeeded", run
    assert [s["name"] for s in run["steps"]] == [
        "lock",
        "validate",
        "backup",
        "pull",
        "recreate",
        "health",
        "record",
        "prune_images",
    ]
    assert image_of(dockerd, stack) == f"{REPO}:{TAG['a']}" and serving(stack) == "a"
    container = dockerd.containers.get(stack.name)
    assert container.labels["com.docker.compose.service"] == "app"  # same configuration, new image
    [release] = stack.ledger.list_releases("prod")
    assert (release["sha"], release["status"], release["current"]) == (SHA["a"], "live", True)
    assert release["previous_images"] == {"app": f"{REPO}:v1"}
    assert stack.ledger.get_lock("deploy:prod") is None


def rollbacks(kind: str, outcome: str = "succeeded") -> float:
    from worker.adapters import metrics

    return metrics.ROLLBACKS.labels("prod", kind, outcome)._value.get()


def test_a_tag_whose_health_fails_rolls_back_and_the_previous_version_serves(stack, dockerd):
    stack.start()
    assert deploy(stack, "a", 1000)["status"] == "succeeded"
    before = rollbacks("automatic")
    run = deploy(stack, "c", 2000)
    assert run["status"] == "rolled_back", run
    assert rollbacks("automatic") == before + 1
    assert "health gate failed" in run["reason"] and "rolled back" in run["reason"]
    assert image_of(dockerd, stack) == f"{REPO}:{TAG['a']}" and serving(stack) == "a"
    current = stack.ledger.current_release("prod")
    assert current["sha"] == SHA["a"]
    assert stack.ledger.release_of_run(run["id"])["status"] == "rolled_back"
    assert stack.ledger.get_lock("deploy:prod") is None


def test_a_failed_rollback_ends_rollback_failed_and_escalates(stack, dockerd):
    stack.start(TAG["e"])  # the version running now is unhealthy too
    run = deploy(stack, "c", 1000)
    assert run["status"] == "rollback_failed", run
    escalations = [r for r in stack.ledger.list_runs() if r["playbook"] == "escalate"]
    assert len(escalations) == 1 and escalations[0]["status"] == "queued"
    assert "rollback failed" in escalations[0]["params"]["reason"]
    assert stack.ledger.get_lock("deploy:prod") is None


def test_a_tag_that_cannot_be_pulled_stops_nothing(stack, dockerd):
    before = stack.start()
    before.reload()
    run = deploy(stack, "d", 1000)
    assert run["status"] == "failed", run
    assert run["steps"][-1]["name"] == "pull" and "nothing was stopped" in run["reason"]
    after = dockerd.containers.get(stack.name)
    assert after.id == before.id and after.status == "running"
    assert after.attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
    assert serving(stack) == "v1"
    assert stack.ledger.list_releases("prod") == []
    assert stack.ledger.get_lock("deploy:prod") is None


def test_the_same_delivery_twice_is_one_deploy(stack, dockerd):
    stack.start()
    first = push(stack, "a", 1000, delivery="dup-1")
    again = push(stack, "a", 1000, delivery="dup-1")
    assert again.status_code == 200 and again.json["runs"] == first.json["runs"]
    assert execute_inline(stack.app, first.json["runs"][0])["status"] == "succeeded"
    assert len(stack.ledger.list_releases("prod")) == 1
    assert len([r for r in stack.ledger.list_runs() if r["playbook"] == "deploy"]) == 1


def test_a_then_b_waiting_together_only_b_runs(stack, dockerd):
    stack.start()
    [a] = push(stack, "a", 1000).json["runs"]
    [b] = push(stack, "b", 1001).json["runs"]
    run_a = execute_inline(stack.app, a)
    assert run_a["status"] == "superseded" and f"run {b}" in run_a["reason"]
    assert execute_inline(stack.app, b)["status"] == "succeeded"
    assert serving(stack) == "b"


def test_b_then_a_out_of_order_leaves_b_live(stack, dockerd):
    stack.start()
    assert deploy(stack, "b", 1001)["status"] == "succeeded"
    run_a = deploy(stack, "a", 1000)  # older push, delivered later
    assert run_a["status"] == "superseded" and "was pushed after" in run_a["reason"]
    assert serving(stack) == "b" and stack.ledger.current_release("prod")["sha"] == SHA["b"]


def test_a_then_b_in_sequence_leaves_b_live(stack, dockerd):
    stack.start()
    assert deploy(stack, "a", 1000)["status"] == "succeeded"
    assert deploy(stack, "b", 1001)["status"] == "succeeded"
    assert serving(stack) == "b"
    releases = stack.ledger.list_releases("prod")
    assert [(r["sha"][0], r["current"]) for r in releases] == [("b", True), ("a", False)]


def _holder_run(stack, status="running") -> int:
    from worker.adapters.ledger import NewRun

    run_id = (
        stack.ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[
                NewRun(
                    trigger="manual",
                    triggered_by="test",
                    playbook="deploy",
                    target="other-env",
                    params={"sha": "f" * 40, "order": [0, 0], "images": {}},
                )
            ],
        )
        .runs[0]
        .id
    )
    stack.ledger.claim_run(run_id, "test-worker", 600)
    assert stack.ledger.acquire_lock("deploy:prod", f"run:{run_id}", 600)
    if status != "running":
        stack.ledger.finish_run(run_id, status, "worker lost: the step lease expired")
    return run_id


def test_a_deploy_kept_waiting_goes_back_to_the_queue_then_runs_once_the_lock_is_free(stack, dockerd):
    from worker.tasks.runs import execute_inline

    before = stack.start()
    holder = _holder_run(stack)
    run = deploy(stack, "a", 1000)  # deploy.lock_wait_seconds: 2, then back to the queue
    assert run["status"] == "queued" and run["steps"] == [], run
    assert run["reason"].startswith(f"waiting for deploy:prod, held by run:{holder}")
    assert dockerd.containers.get(stack.name).id == before.id and serving(stack) == "v1"
    assert stack.ledger.get_lock("deploy:prod")["holder"] == f"run:{holder}"  # not ours to release
    assert run["id"] in stack.ledger.runs_to_enqueue(utcnow())  # the sweeper will send it again

    # The other deploy ends; the sweeper's resend starts this one from its lock step.
    stack.ledger.release_lock("deploy:prod", f"run:{holder}")
    stack.ledger.finish_run(holder, "succeeded", "")
    ended = execute_inline(stack.app, run["id"])
    assert ended["status"] == "succeeded", ended
    assert [s["name"] for s in ended["steps"]][0] == "lock" and serving(stack) == "a"


def test_a_deploy_waiting_longer_than_max_wait_fails_touching_nothing(tmp_path, dockerd, images, github):
    making = make_stack(tmp_path, dockerd, github, REPO, prune=False, deploy_extra={"max_wait_seconds": 1})
    stack = next(making)
    try:
        before = stack.start()
        holder = _holder_run(stack)
        run = deploy(stack, "a", 1000)
        assert run["status"] == "failed" and run["steps"][-1]["name"] == "lock", run
        assert f"held by run:{holder}; waited" in run["reason"] and "deploy.max_wait_seconds (1s)" in run["reason"]
        assert dockerd.containers.get(stack.name).id == before.id and serving(stack) == "v1"
        assert stack.ledger.get_lock("deploy:prod")["holder"] == f"run:{holder}"
    finally:
        making.close()


def test_the_lock_of_a_run_that_died_is_taken_over_and_the_deploy_proceeds(stack, dockerd):
    stack.start()
    holder = _holder_run(stack, status="failed")  # its worker was killed; the sweeper failed the run
    run = deploy(stack, "a", 1000)
    assert run["status"] == "succeeded", run
    assert f"taken over from run:{holder}, which had ended" in run["steps"][0]["output"]
    assert serving(stack) == "a" and stack.ledger.get_lock("deploy:prod") is None


def test_cleanup_protects_the_current_release_and_its_rollback_targets(stack, dockerd):
    from worker.tasks.cleanup import protected_images
    from worker.tasks.steps import StepContext

    stack.start()
    for commit, at in (("a", 1000), ("b", 1001)):
        assert deploy(stack, commit, at)["status"] == "succeeded"
    assert deploy(stack, "c", 1002)["status"] == "rolled_back"  # never live: not a rollback target
    protected = protected_images(StepContext(stack.app.opsfleet, {"id": 0, "params": {}}))
    assert {f"{REPO}:{TAG['a']}", f"{REPO}:{TAG['b']}"} <= protected
    assert f"{REPO}:{TAG['c']}" not in protected


def test_a_live_release_prunes_its_environments_images_beyond_the_rollback_targets(tmp_path, dockerd, github):
    repo = new_repository()  # its own tags: this test removes some
    built = build_images(dockerd, repo)
    making = make_stack(tmp_path, dockerd, github, repo, prune=True)
    stack = next(making)
    try:
        stack.start()
        other = f"{new_repository()}:keep"  # another repository: never looked at
        dockerd.images.get(f"{repo}:v1").tag(other)
        ran = deploy(stack, "a", 1000)
        assert ran["status"] == "succeeded"
        output = {s["name"]: s["output"] for s in ran["steps"]}["prune_images"]
        tags = {t for i in dockerd.images.list(name=repo) for t in i.tags if t.startswith(f"{repo}:")}
        # Live (a) and the image it replaced (v1) stay; b, c, e go (a registry would serve them again).
        assert tags == {f"{repo}:{TAG['a']}", f"{repo}:v1"}, (tags, output)
        assert "removed 3 images" in output and f"remove {repo}:{TAG['b']}" in output
        assert dockerd.images.get(other)
    finally:
        remove_images(dockerd, [other])
        making.close()  # removes the stack's container
        remove_images(dockerd, built)


def test_cleanup_after_several_deploys_keeps_every_environments_current_and_rollback_images(
    tmp_path, dockerd, images, github, slack
):
    """Two environments (prod, staging), each its own repository and service, one push
    deploying both; keep_releases 1. After a, b, then c (rolled back) and the nightly image
    cleanup with keep 0: each keeps its current release (b), its rollback target (a) and the
    images b replaced; v1, c and e go. The rolled-back deploy's Slack thread says so."""
    # In the registry: what a deploy's own prune removes, the next deploy pulls again.
    repos = {env: f"{REGISTRY.host}/shop/{env}-{uuid.uuid4().hex[:6]}" for env in ("prod", "staging")}
    built = {env: build_images(dockerd, repo) for env, repo in repos.items()}
    for refs in built.values():
        for reference in refs:
            REGISTRY.push(dockerd, reference)
    registries, registry_environ = registry_credentials()
    ports = {env: free_port() for env in repos}
    names = {env: f"opsfleet-prune-{env}-{uuid.uuid4().hex[:6]}" for env in repos}
    raw = {
        "fleet": {"data_dir": str(tmp_path / "data"), "public_url": "http://opsfleet.test"},
        "slack": {"channel": "#deploys"},
        "services": {
            f"app-{env}": {"container": names[env], "health_url": f"http://127.0.0.1:{ports[env]}/health"}
            for env in repos
        },
        "deploy": {
            "lock_wait_seconds": 2,
            "registries": registries,
            "environments": {
                env: {
                    "branch": "master",
                    "services": [f"app-{env}"],
                    "image": repo,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 1,
                    "min_free_bytes": 1024,
                    "keep_releases": 1,
                    "prune_images": True,
                }
                for env, repo in repos.items()
            },
        },
    }
    environ = {
        "ALERTMANAGER_TOKEN": "t",
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "SLACK_BOT_TOKEN": slack.token,
        "SLACK_API_URL": slack.base_url,
        **registry_environ,
    }
    loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=environ)
    client, app = create_app(loaded=loaded).test_client(), create_celery(loaded)

    def deploy_both(commit: str, at: int) -> dict:
        data, headers = signed_push(SECRET, commit, at)
        answer = client.post("/hooks/github", data=data, headers=headers)
        assert answer.status_code == 202, answer.json
        return {app.opsfleet.ledger.get_run(r)["target"]: execute_inline(app, r) for r in answer.json["runs"]}

    try:
        for env, repo in repos.items():
            dockerd.containers.run(
                f"{repo}:v1", httpd_command(ports[env]), name=names[env], detach=True, network_mode="host"
            )
        for commit, at, status in (("a", 1000, "succeeded"), ("b", 1001, "succeeded"), ("c", 1002, "rolled_back")):
            ran = deploy_both(commit, at)
            ended = {env: run["status"] for env, run in ran.items()}
            assert ended == {"prod": status, "staging": status}, [(r["status"], r["reason"]) for r in ran.values()]
        rolled_back = ran["prod"]["id"]
        from worker.tasks import cleanup
        from worker.tasks.steps import StepContext

        output = cleanup.remove_old_images(
            StepContext(app.opsfleet, {"id": 0, "params": {}, "trigger": "manual"}), list(repos.values()), keep=0
        )
        for env, repo in repos.items():
            tags = {t for i in dockerd.images.list(name=repo) for t in i.tags if t.startswith(f"{repo}:")}
            assert tags == {f"{repo}:{TAG['a']}", f"{repo}:{TAG['b']}"}, (env, tags, output)
            assert requests.get(f"http://127.0.0.1:{ports[env]}/version", timeout=5).text == "b"

        app.tasks["opsfleet.report.slack"].apply(args=(rolled_back,))
        [thread] = [
            t for t in slack.threads().values() if t["parent"] and f"Deploy #{rolled_back} " in t["parent"]["text"]
        ]
        shown = (thread["updates"] or [thread["parent"]])[-1]["text"]
        assert "*rolled_back*" in shown and "rolled back in" in shown, shown
    finally:
        for name in names.values():
            for c in dockerd.containers.list(all=True, filters={"name": name}):
                c.remove(force=True)
        for refs in built.values():
            remove_images(dockerd, refs)


def test_images_of_a_deploy_still_running_are_protected(stack):
    from worker.adapters.ledger import NewRun
    from worker.tasks.cleanup import protected_images
    from worker.tasks.steps import StepContext

    image = f"{REPO}:{TAG['e']}"
    stack.ledger.record_event(
        source="api",
        summary="",
        body="",
        new_runs=[
            NewRun(
                trigger="manual",
                triggered_by="t",
                playbook="deploy",
                target="prod",
                dedup_key="queued-deploy",
                params={"sha": SHA["e"], "images": {"app": image}},
            ),
        ],
    )
    assert image in protected_images(StepContext(stack.app.opsfleet, {"id": 0, "params": {}}))


def test_a_host_below_the_memory_floor_fails_validation_and_stops_nothing(tmp_path, dockerd, images, github):
    making = make_stack(tmp_path, dockerd, github, REPO, prune=False, environment={"min_free_memory_bytes": 2**50})
    stack = next(making)
    try:
        before = stack.start()
        run = deploy(stack, "a", 1000)
        assert run["status"] == "failed" and "below min_free_memory_bytes (1073741824 MiB)" in run["reason"], run
        assert [s["name"] for s in run["steps"]] == ["lock", "validate"]
        assert dockerd.containers.get(stack.name).id == before.id and serving(stack) == "v1"
    finally:
        making.close()


def test_deploys_pull_from_a_real_registry_with_credentials_from_the_environment(tmp_path, dockerd, github):
    from tests.support.registry import Registry

    with Registry() as registry:
        repo = f"{registry.host}/shop/app-{uuid.uuid4().hex[:6]}"
        built = build_images(dockerd, repo)
        try:
            for reference in built:
                registry.push(dockerd, reference)
            # Only v1 (running now) stays local: a deploy has to pull its tag from the registry.
            remove_images(dockerd, [r for r in built if not r.endswith(":v1")])
            assert registry.tags(repo.split("/", 1)[1]) == sorted([TAG["a"], TAG["b"], TAG["c"], TAG["e"], "v1"])

            def stack_with(password: str, folder: str):
                making = make_stack(
                    tmp_path / folder,
                    dockerd,
                    github,
                    repo,
                    prune=False,
                    deploy_extra={"registries": {registry.host: {"username": registry.user, "password": "${REG_PW}"}}},
                    environ_extra={"REG_PW": password},
                )
                return making, next(making)

            # A wrong password: the pull fails inside its stream, nothing is stopped.
            making, stack = stack_with("not-the-password", "wrong")
            try:
                before = stack.start()
                run = deploy(stack, "a", 1000)
                assert run["status"] == "failed" and "nothing was stopped" in run["reason"], run
                assert dockerd.containers.get(stack.name).id == before.id and serving(stack) == "v1"
            finally:
                making.close()

            making, stack = stack_with(registry.password, "right")
            try:
                stack.start()
                run = deploy(stack, "a", 1000)
                assert run["status"] == "succeeded", run
                assert serving(stack) == "a" and image_of(dockerd, stack) == f"{repo}:{TAG['a']}"
                assert registry.password not in json.dumps(run, default=str)  # never in the ledger
            finally:
                making.close()
        finally:
            remove_images(dockerd, built)


class ComposeStack:
    """The team's compose file (db, and app depending on it; busybox httpd on host ports), an
    opsfleet environment deploying both from it, and docker-compose v1 to look at the result."""

    def __init__(self, tmp_path, dockerd, github):
        import subprocess

        self.tmp_path, self.dockerd = tmp_path, dockerd
        self.ports = {"app": free_port(), "db": free_port()}
        self.project = f"opsfleet-compose-{uuid.uuid4().hex[:6]}"
        folder = tmp_path / self.project  # compose's default project name: plain `docker-compose -f FILE` finds it
        (folder / "conf").mkdir(parents=True)
        (folder / "conf" / "app.ini").write_text("mode=prod\n")
        (folder / ".env").write_text(f"APP_IMAGE={REPO}\n")  # compose's own variables file
        (folder / "app.env").write_text("FROM_ENV_FILE=1\n")
        self.file = folder / "docker-compose.yml"

        def healthcheck(port):
            url = f"http://127.0.0.1:{port}/health"
            return {"test": ["CMD", "wget", "-q", "-O", "/dev/null", url], "interval": "1s", "retries": 2}

        self.file.write_text(
            yaml.safe_dump(
                {
                    "version": "3.8",
                    "services": {
                        "app": {
                            "image": "${APP_IMAGE}:v1",
                            "command": httpd_command(self.ports["app"]),
                            "network_mode": "host",
                            "env_file": "app.env",
                            "environment": ["ROLE=app", "GREETING"],
                            "volumes": ["./conf:/conf:ro", "cache:/cache"],
                            "labels": {"team": "shop"},
                            "restart": "unless-stopped",
                            "healthcheck": healthcheck(self.ports["app"]),
                            "depends_on": {"db": {"condition": "service_healthy"}},
                        },
                        "db": {
                            "image": "${APP_IMAGE}:v1",
                            "command": " ".join(httpd_command(self.ports["db"])),
                            "network_mode": "host",
                            "environment": {"ROLE": "db"},
                            "healthcheck": healthcheck(self.ports["db"]),
                        },
                    },
                    "volumes": {"cache": None},
                }
            )
        )
        self.env = {**os.environ, "DOCKER_HOST": TEST_DOCKER_HOST}
        self._run = subprocess.run
        registries, registry_environ = registry_credentials()
        raw = {
            "fleet": {"data_dir": str(tmp_path / "data")},
            "services": {
                name: {
                    "compose_project": self.project,
                    "compose_service": name,
                    "health_url": f"http://127.0.0.1:{port}/health",
                }
                for name, port in self.ports.items()
            },
            "deploy": {
                "lock_wait_seconds": 2,
                "registries": registries,
                "environments": {
                    "prod": {
                        "branch": "master",
                        "services": ["app", "db"],  # app listed first: the compose file says db first
                        "tag_template": "main-{short_sha}",  # no image: the compose file names the repository
                        "compose_file": str(self.file),
                        "health": {"passes": 2, "interval_seconds": 0.3, "timeout_seconds": 8},
                        "stop_timeout_seconds": 1,
                        "min_free_bytes": 1024,
                        "prune_images": False,
                    }
                },
            },
        }
        environ = {
            "ALERTMANAGER_TOKEN": "t",
            "GITHUB_WEBHOOK_SECRET": SECRET,
            "DOCKER_HOST": TEST_DOCKER_HOST,
            **registry_environ,
        }
        self.loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=environ)
        self.client, self.app = create_app(loaded=self.loaded).test_client(), create_celery(self.loaded)
        self.ledger = self.app.opsfleet.ledger

    def compose(self, *args) -> str:
        done = self._run(
            ["docker-compose", "-f", str(self.file), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def serving(self) -> dict:
        return {
            name: requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text for name, port in self.ports.items()
        }

    def containers(self) -> dict:
        found = self.dockerd.containers.list(all=True, filters={"label": f"com.docker.compose.project={self.project}"})
        return {c.labels["com.docker.compose.service"]: c for c in found}

    def close(self):
        self.compose("down", "-v", "-t", "0")


@pytest.fixture
def compose_stack(tmp_path, dockerd, images, github, monkeypatch):
    monkeypatch.setenv("GREETING", "hello from the worker's environment")
    stack = ComposeStack(tmp_path, dockerd, github)
    try:
        yield stack
    finally:
        stack.close()


def test_a_stack_docker_compose_started_is_recreated_from_its_compose_file_dependencies_first(compose_stack):
    stack = compose_stack
    stack.compose("up", "-d")
    before = {name: c.id for name, c in stack.containers().items()}
    assert stack.serving() == {"app": "v1", "db": "v1"}

    run = deploy(stack, "a", 1000)
    assert run["status"] == "succeeded", run
    recreated = {s["name"]: s["output"] for s in run["steps"]}["recreate"].splitlines()
    assert [line.split(":")[0] for line in recreated] == ["db", "db", "app"]  # db, db healthy, then app
    assert stack.serving() == {"app": "a", "db": "a"}
    containers = stack.containers()
    for name, container in containers.items():
        assert container.id != before[name] and container.name == f"{stack.project}_{name}_1"
        assert container.attrs["Config"]["Image"] == f"{REPO}:{TAG['a']}"
    # The compose file's definition, not only the image: env file, environment, volumes, labels, restart, health.
    app = containers["app"].attrs
    env = set(app["Config"]["Env"])
    assert {"FROM_ENV_FILE=1", "ROLE=app", "GREETING=hello from the worker's environment"} <= env
    mounts = {m["Destination"]: m for m in app["Mounts"]}
    assert mounts["/conf"]["Type"] == "bind" and mounts["/conf"]["RW"] is False
    assert mounts["/cache"]["Name"] == f"{stack.project}_cache"
    assert app["Config"]["Labels"]["team"] == "shop"
    assert app["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert app["Config"]["Healthcheck"]["Test"][:2] == ["CMD", "wget"]
    assert containers["db"].attrs["Config"]["Cmd"] == httpd_command(stack.ports["db"])
    # docker-compose still knows the stack: same names and labels, new image.
    listed = stack.compose("ps")
    assert listed.count(" Up ") == 2 and f"{stack.project}_app_1" in listed
    assert set(stack.compose("ps", "-q").split()) == {c.id for c in containers.values()}

    # A tag whose health fails: back to a, in the same order, from the same file.
    run = deploy(stack, "c", 2000)
    assert run["status"] == "rolled_back", run
    assert stack.serving() == {"app": "a", "db": "a"}
    assert stack.compose("ps").count(" Up ") == 2


def test_a_fresh_stack_is_created_from_the_compose_file_and_a_failed_first_deploy_leaves_none(
    tmp_path, dockerd, images, github, monkeypatch
):
    monkeypatch.setenv("GREETING", "hi")
    stack = ComposeStack(tmp_path / "good", dockerd, github)
    try:
        assert stack.containers() == {}
        run = deploy(stack, "a", 1000)
        assert run["status"] == "succeeded", run
        steps = {s["name"]: s["output"] for s in run["steps"]}
        assert "no container yet; created as" in steps["validate"]
        assert [line.split(":")[0] for line in steps["recreate"].splitlines()] == ["db", "db", "app"]
        assert "db: healthy (its dependents wait for it)" in steps["recreate"]  # condition: service_healthy
        assert "created on" in steps["recreate"] and stack.serving() == {"app": "a", "db": "a"}
        assert stack.ledger.release_of_run(run["id"])["previous_images"] == {"app": "", "db": ""}
        assert stack.compose("ps").count(" Up ") == 2
        # The next deploy recreates both (new containers, same names).
        ids = {c.id for c in stack.containers().values()}
        assert deploy(stack, "b", 1001)["status"] == "succeeded" and stack.serving() == {"app": "b", "db": "b"}
        assert ids.isdisjoint(c.id for c in stack.containers().values())
    finally:
        stack.close()

    stack = ComposeStack(tmp_path / "bad", dockerd, github)
    try:
        run = deploy(stack, "c", 1000)
        assert run["status"] == "rolled_back", run
        # db (c) never became healthy, so app, which waits for it, was never made.
        assert "db is unhealthy after 8s; its dependents (depends_on: service_healthy)" in run["reason"], run
        assert run["reason"].endswith("app removed, db removed"), run["reason"]
        assert "nothing to gate" in run["steps"][-1]["output"]
        assert stack.containers() == {} and stack.compose("ps", "-q").split() == []
        assert stack.ledger.current_release("prod") is None
    finally:
        stack.close()


def test_a_compose_file_that_cannot_be_applied_fails_validation_touching_nothing(compose_stack):
    stack = compose_stack
    stack.compose("up", "-d")
    before = {name: c.id for name, c in stack.containers().items()}
    text = stack.file.read_text()
    stack.file.write_text(text.replace("network_mode: host", "network_mode: host\n    ulimits: {nofile: 1024}", 1))
    run = deploy(stack, "a", 1000)
    assert run["status"] == "failed" and run["steps"][-1]["name"] == "validate", run
    assert "ulimits not applied by opsfleet's deploy" in run["reason"]
    assert {name: c.id for name, c in stack.containers().items()} == before
    assert stack.ledger.get_lock("deploy:prod") is None


def test_each_step_renews_the_environment_lock_and_a_lapsed_lock_stops_the_deploy(stack, dockerd):
    from datetime import timedelta

    from worker.tasks import deploy as deploy_steps
    from worker.tasks.steps import StepContext, StepFailed

    stack.start()
    [run_id] = push(stack, "a", 1000).json["runs"]
    stack.ledger.claim_run(run_id, "test-worker", 600)
    ctx = StepContext(stack.app.opsfleet, stack.ledger.get_run(run_id))
    assert stack.ledger.acquire_lock("deploy:prod", f"run:{run_id}", 30)  # about to lapse
    deploy_steps.backup(ctx)
    lock = stack.ledger.get_lock("deploy:prod")
    config = stack.loaded.config
    # Long enough for the longest step (a pre-deploy backup may outlast lock_ttl_seconds).
    assert lock["expires_at"] - utcnow() > timedelta(seconds=config.backup.step_timeout_seconds)
    # Lapsed and taken by another deploy: this one stops before touching anything.
    stack.ledger.release_lock("deploy:prod", f"run:{run_id}")
    assert stack.ledger.acquire_lock("deploy:prod", "run:999999", 600)
    with pytest.raises(StepFailed, match=r"deploy:prod lapsed and is held by run:999999 now: .* before its pull step"):
        deploy_steps.pull(ctx)
    assert stack.ledger.get_lock("deploy:prod")["holder"] == "run:999999"  # not released by the loser


def test_a_tag_that_names_a_branch_is_pulled_again_because_it_may_have_moved(tmp_path, dockerd, images, github):
    """tag_template {branch}: the tag "master" is pushed again for every commit. The local copy
    is stale after the next push; the deploy pulls it anyway and runs the new image."""
    moving = f"{REPO}:master"
    making = make_stack(tmp_path, dockerd, github, REPO, prune=False, environment={"tag_template": "{branch}"})
    stack = next(making)
    try:
        stack.start()
        for commit, at in (("a", 1000), ("b", 1001)):
            dockerd.images.pull(REPO, TAG[commit], auth_config=REGISTRY.auth)
            dockerd.images.get(f"{REPO}:{TAG[commit]}").tag(moving)
            REGISTRY.push(dockerd, moving)  # CI pushed this commit as :master
            if commit == "b":
                dockerd.images.get(f"{REPO}:{TAG['a']}").tag(moving)  # here, :master is still a's
            run = deploy(stack, commit, at)
            assert run["status"] == "succeeded", run
            assert "pulled: its tag may move" in {s["name"]: s["output"] for s in run["steps"]}["pull"]
            assert serving(stack) == commit
    finally:
        making.close()
        remove_images(dockerd, [moving])


def test_what_a_dead_deploy_left_half_way_is_repaired_before_the_next_one(stack, dockerd):
    """A worker killed inside recreate leaves the original stopped and renamed: the next
    deploy's validate step puts it back (or removes it, when the new container was made)."""
    original = stack.start()
    original.stop(timeout=0)
    original.rename(f"{stack.name}.opsfleet-run-7-deploy-app-old")
    run = deploy(stack, "a", 1000)
    assert run["status"] == "succeeded", run
    assert "put back" in {s["name"]: s["output"] for s in run["steps"]}["validate"]
    assert serving(stack) == "a" and dockerd.containers.list(all=True, filters={"name": f"{stack.name}."}) == []
    # A leftover beside a live container (the new one was made before the worker died): removed.
    stray = dockerd.containers.create(f"{REPO}:v1", ["true"], name=f"{stack.name}.opsfleet-run-8-deploy-app-old")
    run = deploy(stack, "b", 1001)
    assert run["status"] == "succeeded" and f"removed {stray.name}" in run["steps"][1]["output"], run
    assert dockerd.containers.list(all=True, filters={"name": f"{stack.name}."}) == []


def test_a_deploy_that_died_after_recreating_is_rolled_back_by_the_sweeper(stack, dockerd):
    from worker.tasks import deploy as deploy_steps
    from worker.tasks.steps import StepContext

    stack.start()
    assert deploy(stack, "a", 1000)["status"] == "succeeded"
    [dead] = push(stack, "b", 1001).json["runs"]
    stack.ledger.claim_run(dead, "test-worker", 600)
    ctx = StepContext(stack.app.opsfleet, stack.ledger.get_run(dead))
    for step in (deploy_steps.lock, deploy_steps.validate, deploy_steps.pull, deploy_steps.recreate):
        step(ctx)
    assert serving(stack) == "b"  # b runs, never gated: then the worker died
    stack.ledger.finish_run(dead, "failed", "worker lost: the step lease expired before the step finished")

    before = rollbacks("repair")
    swept = stack.app.tasks["opsfleet.sweeper.sweep"].apply().result
    [repair] = swept["repairs"]
    assert stack.app.tasks["opsfleet.sweeper.sweep"].apply().result["repairs"] == []  # once
    assert stack.ledger.release_of_run(dead)["status"] == "failed"
    run = execute_inline(stack.app, repair)
    assert run["status"] == "succeeded", run
    assert run["triggered_by"] == f"opsfleet (repair of run {dead})" and rollbacks("repair") == before + 1
    assert serving(stack) == "a" and stack.ledger.current_release("prod")["sha"] == SHA["a"]
    # The repair is ordered as the release it put back: a newer push still deploys after it.
    assert deploy(stack, "b", 1002)["status"] == "succeeded" and serving(stack) == "b"


def _dies_after_recreating(stack, commit: str, pushed_at: int) -> int:
    """A pushed deploy run up to and through its recreate step here, then ended as the sweeper
    ends a run whose worker died (its release still `deploying`)."""
    from worker.tasks import deploy as deploy_steps
    from worker.tasks.steps import StepContext

    [dead] = push(stack, commit, pushed_at).json["runs"]
    stack.ledger.claim_run(dead, "test-worker", 600)
    ctx = StepContext(stack.app.opsfleet, stack.ledger.get_run(dead))
    for step in (deploy_steps.lock, deploy_steps.validate, deploy_steps.pull, deploy_steps.recreate):
        step(ctx)
    stack.ledger.finish_run(dead, "failed", "worker lost: the step lease expired before the step finished")
    return dead


def _sweep(stack) -> dict:
    return stack.app.tasks["opsfleet.sweeper.sweep"].apply().result


def _escalations(stack) -> list[dict]:
    return [r for r in stack.ledger.list_runs() if r["playbook"] == "escalate"]


def test_a_first_deploy_that_died_after_recreating_is_put_back_on_what_ran_before_opsfleet(stack, dockerd):
    stack.start()  # v1: what ran before opsfleet's first deploy
    dead = _dies_after_recreating(stack, "b", 1000)
    assert serving(stack) == "b" and stack.ledger.current_release("prod") is None

    before = rollbacks("repair")
    [repair] = _sweep(stack)["repairs"]
    assert _sweep(stack)["repairs"] == []  # once
    assert stack.ledger.release_of_run(dead)["status"] == "failed"
    run = execute_inline(stack.app, repair)
    assert run["status"] == "succeeded", run
    assert run["triggered_by"] == f"opsfleet (repair of run {dead})" and rollbacks("repair") == before + 1
    assert "what ran before it" in run["summary"] and "no release goes live" in run["summary"]
    record = {s["name"]: s["output"] for s in run["steps"]}["record"]
    assert record == f"prod is back on what ran before opsfleet's first deploy: app on {REPO}:v1; no release is current"
    assert serving(stack) == "v1" and image_of(dockerd, stack) == f"{REPO}:v1"
    # Nothing opsfleet deployed is live: no release current, none a rollback target; no page.
    assert stack.ledger.current_release("prod") is None
    assert stack.ledger.release_of_run(repair)["status"] == "restored"
    assert [r["live_at"] for r in stack.ledger.list_releases("prod")] == [None, None]
    assert _escalations(stack) == [] and stack.ledger.get_lock("deploy:prod") is None
    assert dockerd.containers.list(all=True, filters={"name": f"{stack.name}."}) == []

    # The next push deploys as a first deploy: its rollback target is v1 again.
    run = deploy(stack, "b", 1001)
    assert run["status"] == "succeeded" and serving(stack) == "b", run
    assert stack.ledger.current_release("prod")["previous_images"] == {"app": f"{REPO}:v1"}


def test_a_repair_overtaken_by_a_newer_release_is_superseded_touching_nothing(stack, dockerd):
    stack.start()
    dead = _dies_after_recreating(stack, "a", 1000)
    [repair] = _sweep(stack)["repairs"]
    # A newer push goes live before the repair runs (it took over the dead run's lock).
    assert deploy(stack, "b", 1001)["status"] == "succeeded" and serving(stack) == "b"
    container = dockerd.containers.get(stack.name).id
    run = execute_inline(stack.app, repair)
    assert run["status"] == "superseded", run
    assert f"went live after run {dead} died; nothing left to repair" in run["reason"]
    assert serving(stack) == "b" and dockerd.containers.get(stack.name).id == container
    assert stack.ledger.current_release("prod")["sha"] == SHA["b"] and _escalations(stack) == []


def test_a_repair_whose_image_is_gone_fails_and_pages(stack, dockerd):
    """The image a first deploy's repair must put back is on no host and in no registry any
    more: the repair cannot be done. It fails in pull, touching nothing, and pages."""
    gone = f"{REPO}:pre-opsfleet-{uuid.uuid4().hex[:6]}"
    dockerd.images.get(f"{REPO}:v1").tag(gone)
    dockerd.containers.run(gone, httpd_command(stack.port), name=stack.name, detach=True, network_mode="host")
    dead = _dies_after_recreating(stack, "a", 1000)
    dockerd.api.remove_image(gone, noprune=True)  # the tag only (v1 has the same image)
    [repair] = _sweep(stack)["repairs"]
    run = execute_inline(stack.app, repair)
    assert run["status"] == "failed" and run["steps"][-1]["name"] == "pull", run
    assert serving(stack) == "a"  # the repair stopped nothing
    [page] = _escalations(stack)
    reason = page["params"]["reason"]
    assert reason.startswith(f"repair of run {dead} in prod failed in pull: app: ") and gone in reason, reason
    assert reason.endswith(f"may run two versions (to put back by hand: app on {gone})"), reason
    assert stack.ledger.current_release("prod") is None and stack.ledger.get_lock("deploy:prod") is None
    assert _sweep(stack)["repairs"] == []  # a failed repair is paged, not repaired again


def test_a_repair_whose_health_gate_fails_is_not_rolled_back_to_the_half_done_stack_and_pages(stack, dockerd):
    """What ran before a repair is the dead deploy's half-done stack: a repair that fails its
    gate stays on what it put back (one version) and pages, with both sets of images."""
    stack.start(TAG["e"])  # what ran before opsfleet is unhealthy by now
    dead = _dies_after_recreating(stack, "a", 1000)
    [repair] = _sweep(stack)["repairs"]
    before = rollbacks("repair", "failed")
    run = execute_inline(stack.app, repair)
    assert run["status"] == "rollback_failed", run
    assert "a repair is not rolled back" in run["reason"] and rollbacks("repair", "failed") == before + 1
    assert serving(stack) == "e"  # not back on a
    assert stack.ledger.release_of_run(repair)["status"] == "failed" and stack.ledger.current_release("prod") is None
    [page] = _escalations(stack)
    reason = page["params"]["reason"]
    assert reason.startswith(f"repair of run {dead} in prod: health gate failed"), reason
    assert f"half-done deploy of run {dead}: app on {REPO}:{TAG['a']}" in reason, reason
    assert reason.endswith(f"to put back by hand: app on {REPO}:{TAG['e']}"), reason
    assert _sweep(stack)["repairs"] == [] and stack.ledger.get_lock("deploy:prod") is None


def test_a_dead_first_deploy_that_created_services_afresh_is_not_repaired_and_pages(
    tmp_path, dockerd, images, github, monkeypatch
):
    """A first deploy from a compose file onto no containers (every previous image ""): there
    is no version to put back; the sweeper records no repair, marks the release failed, pages."""
    monkeypatch.setenv("GREETING", "hi")
    stack = ComposeStack(tmp_path, dockerd, github)
    try:
        dead = _dies_after_recreating(stack, "a", 1000)
        assert stack.ledger.release_of_run(dead)["previous_images"] == {"app": "", "db": ""}
        assert _sweep(stack)["repairs"] == []
        assert stack.ledger.release_of_run(dead)["status"] == "failed"
        [page] = _escalations(stack)
        reason = page["params"]["reason"]
        assert reason.startswith(f"deploy run {dead} died while deploying {SHA['a'][:7]} to prod, its first deploy"), (
            reason
        )
        assert "app, db had no container before it" in reason and "push again" in reason, reason
        assert page["rule"] == "deploy:prod" and page["params"]["alert"] == f"deploy run #{dead}"
        assert _sweep(stack)["repairs"] == [] and len(_escalations(stack)) == 1  # once
        # The next push puts the stack right.
        assert deploy(stack, "b", 1001)["status"] == "succeeded" and stack.serving() == {"app": "b", "db": "b"}
    finally:
        stack.close()


def _release(previous: dict, run_id: int = 7, sha: str = SHA["b"]) -> dict:
    return {"run_id": run_id, "environment": "prod", "sha": sha, "previous_images": previous}


LIVE = {"id": 3, "sha": SHA["a"], "ref": "master", "pushed_at": 100.0, "committed_at": 90.0}


@pytest.mark.parametrize(
    "dead, params, live, configured, expected",
    [
        # A release live: what ran before the dead deploy, ordered as the live release.
        (
            _release({"app": "r:a"}),
            {"sha": SHA["b"]},
            LIVE,
            True,
            {"sha": SHA["a"], "ref": "master", "images": {"app": "r:a"}, "order": [100.0, 90.0], "live_release": 3},
        ),
        # A first deploy: the images before opsfleet, ordered before any push, no release going live.
        (
            _release({"app": "r:v1", "db": "r:v1"}),
            {"sha": SHA["b"]},
            None,
            True,
            {
                "sha": "",
                "ref": "",
                "images": {"app": "r:v1", "db": "r:v1"},
                "order": [0, 0],
                "live_release": None,
                "goes_live": False,
            },
        ),
        # A first deploy onto a service that had no container: no repair, a page.
        (_release({"app": "r:v1", "db": ""}), {"sha": SHA["b"]}, None, True, "page"),
        (_release({}), {"sha": SHA["b"]}, None, True, "page"),
        # A service new beside a live release: the live repair, as before ("" is removed by nothing).
        (
            _release({"app": "r:a", "db": ""}),
            {},
            LIVE,
            True,
            {"sha": SHA["a"], "images": {"app": "r:a", "db": ""}, "live_release": 3},
        ),
        # A dead repair: the same repair again (its target, not the half-done stack it found).
        (
            _release({"app": "r:b"}, run_id=9, sha=""),
            {"repair_of": 7, "sha": "", "images": {"app": "r:v1"}, "goes_live": False, "live_release": None},
            None,
            True,
            {"repair_of": 9, "images": {"app": "r:v1"}, "goes_live": False, "live_release": None},
        ),
        # An environment no longer configured: no repair, a warning (nothing can deploy it).
        (_release({"app": "r:a"}), {}, LIVE, False, "warn"),
    ],
)
def test_which_dead_deploy_gets_which_repair(dead, params, live, configured, expected):
    from worker.tasks.deploy import plan_repair

    plan = plan_repair(dead, params, live, configured)
    if isinstance(expected, str):
        assert plan.params is None and plan.page == (expected == "page"), plan
        return
    assert not plan.page and plan.params["repair_of"] == expected.get("repair_of", dead["run_id"])
    assert {k: plan.params.get(k) for k in expected} == expected, plan.params


def test_registry_of_an_image_reference():
    from worker.tasks.deploy import registry_of

    assert registry_of("registry.local:5000/shop/api:1") == "registry.local:5000"
    assert registry_of("127.0.0.1:5000/api") == "127.0.0.1:5000"
    assert registry_of("localhost/api:2") == "localhost"
    assert registry_of("ghcr.io/org/api:3") == "ghcr.io"
    assert registry_of("shop/api:1") is None and registry_of("busybox") is None


@pytest.mark.parametrize(
    "check,status,reason",
    [
        ({"name": "version", "url": "http://127.0.0.1:{port}/version"}, "succeeded", None),
        (
            {"name": "still-v1", "url": "http://127.0.0.1:{port}/version", "expect_text": "v1"},
            "rolled_back",
            "check still-v1: http://127.0.0.1:{port}/version answered without 'v1'",
        ),
        (
            {"name": "admin", "url": "http://127.0.0.1:{port}/admin", "expect_status": 200},
            "rollback_failed",  # the previous release fails it too
            "check admin: http://127.0.0.1:{port}/admin answered 404, expected 200",
        ),
    ],
)
def test_business_checks_run_after_the_health_gate(tmp_path, dockerd, images, github, check, status, reason):
    port = free_port()
    check = {**check, "url": check["url"].format(port=port)}
    making = make_stack(tmp_path, dockerd, github, REPO, prune=False, environment={"checks": [check]}, port=port)
    stack = next(making)
    try:
        stack.start()
        run = deploy(stack, "a", 1000)
        assert run["status"] == status, run
        health = {s["name"]: s["output"] for s in run["steps"]}["health"]
        if reason is None:
            assert "check version: 200" in health and serving(stack) == "a"
        else:
            assert reason.format(port=port) in run["reason"]
            if status == "rolled_back":
                assert serving(stack) == "v1" and "check still-v1: 200, has 'v1'" in health
    finally:
        making.close()


def test_a_migrating_deploy_backs_up_first_and_its_rollback_restores_the_database(
    tmp_path, dockerd, images, github, shared_pg_url, monkeypatch
):
    import psycopg

    from worker.adapters.backupstore import list_sets
    from worker.tasks import deploy as deploy_tasks
    from worker.tasks.steps import Step

    with psycopg.connect(shared_pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int primary key, total int)")
        conn.execute("INSERT INTO orders SELECT g, g * 10 FROM generate_series(1, 3) g")
        dbname = conn.info.dbname
    backups = tmp_path / "backups"
    making = make_stack(
        tmp_path,
        dockerd,
        github,
        REPO,
        prune=False,
        environment={"backup": ["db"], "migrating": True},
        backup={
            "root": str(backups),
            "min_free_bytes": 0,
            "series": {"db": {"kind": "database", "database_url": shared_pg_url}},
        },
    )
    stack = next(making)

    # The new release migrates the database as it starts (here: as the recreate step ends).
    def recreate_and_migrate(ctx):
        output = deploy_tasks.recreate(ctx)
        with psycopg.connect(shared_pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE orders ADD COLUMN migrated bool")
            conn.execute("DELETE FROM orders WHERE id = 1")
        return output

    own = deploy_tasks.PLAYBOOKS  # the registry reads the module's own table at each lookup
    steps = tuple(Step(s.name, recreate_and_migrate) if s.name == "recreate" else s for s in own["deploy"])
    monkeypatch.setitem(own, "deploy", steps)
    try:
        stack.start()
        run = deploy(stack, "c", 1000)  # c never gets healthy: rolled back
        assert run["status"] == "rolled_back", run
        outputs = {s["name"]: s["output"] for s in run["steps"]}
        assert "committed" in outputs["backup"]
        assert "database restored from pre-deploy set" in outputs["health"] and "rolled back in" in outputs["health"]
        assert serving(stack) == "v1"
        with psycopg.connect(shared_pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT id, total FROM orders ORDER BY id").fetchall()
            columns = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'orders' ORDER BY 1"
                )
            ]
        assert rows == [(1, 10), (2, 20), (3, 30)] and columns == ["id", "total"]  # as before the deploy
        [taken] = [s for s in list_sets(backups) if s.manifest.get("run_id") == run["id"]]
        assert taken.verified("db") and taken.items["db"]["row_counts"] == {"public.orders": 3}
    finally:
        making.close()
        with psycopg.connect(shared_pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            # The migrated database the restore kept aside (<db>_before_<run>), and any restore leftovers.
            for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{dbname}\\_%",)):
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_a_deploy_with_a_backup_that_cannot_be_taken_stops_nothing(tmp_path, dockerd, images, github):
    making = make_stack(
        tmp_path,
        dockerd,
        github,
        REPO,
        prune=False,
        environment={"backup": ["db"]},
        backup={
            "root": str(tmp_path / "backups"),
            "min_free_bytes": 0,
            "series": {"db": {"kind": "database", "database_url": "postgresql://postgres@127.0.0.1:1/nothing"}},
        },
    )
    stack = next(making)
    try:
        before = stack.start()
        run = deploy(stack, "a", 1000)
        assert run["status"] == "failed" and "pre-deploy backup failed" in run["reason"], run
        assert [s["name"] for s in run["steps"]][-1] == "backup"
        assert dockerd.containers.get(stack.name).id == before.id and serving(stack) == "v1"
        assert not list((tmp_path / "backups").glob("*"))  # no partial set left
        assert stack.ledger.get_lock("deploy:prod") is None
    finally:
        making.close()


def report(stack, run_id):
    return stack.app.tasks["opsfleet.report.github"].apply(args=(run_id,)).get()


def test_github_sees_queued_in_progress_success_and_the_previous_deployment_goes_inactive(stack, github):
    stack.start()
    first = deploy(stack, "a", 1000)
    assert report(stack, first["id"]) == ["queued", "in_progress", "success"]
    assert report(stack, first["id"]) == []  # converged: nothing posted twice
    [dep_a] = github.deployments.values()
    assert (dep_a["sha"], dep_a["repository"], dep_a["environment"]) == (SHA["a"], "Codertocat/Hello-World", "prod")
    assert dep_a["auto_merge"] is False and dep_a["required_contexts"] == []
    assert dep_a["payload"] == {"opsfleet_run": first["id"]}
    success = dep_a["statuses"][-1]
    assert success["log_url"] == f"http://opsfleet.test/runs/{first['id']}" and len(success["description"]) <= 140

    second = deploy(stack, "b", 1001)
    assert report(stack, second["id"]) == ["queued", "in_progress", "success"]
    assert github.states(dep_a["id"]) == ["queued", "in_progress", "success", "inactive"]


def test_github_sees_failure_after_a_rollback(stack, github):
    stack.start()
    run = deploy(stack, "c", 1000)
    assert run["status"] == "rolled_back"
    assert report(stack, run["id"]) == ["queued", "in_progress", "failure"]
    [dep] = github.deployments.values()
    description = dep["statuses"][-1]["description"]
    assert description.startswith(f"#{run['id']} rolled_back: health gate failed") and len(description) <= 140


def test_a_502_from_github_is_retried_without_a_second_deployment(stack, github):
    from worker.adapters.github import GitHubAdapter, GitHubError
    from worker.tasks.report_github import report_deploy

    stack.start()
    run = deploy(stack, "a", 1000)
    adapter = GitHubAdapter(github.token, github.base_url, 5)
    github.fail_next = [502]  # the deployment's creation
    with pytest.raises(GitHubError) as err:
        report_deploy(stack.app.opsfleet, adapter, run["id"])
    assert err.value.retryable
    posted = report_deploy(stack.app.opsfleet, adapter, run["id"])
    assert posted == ["queued", "in_progress", "success"] and len(github.deployments) == 1
    # A 502 in the middle of the statuses: the retry posts only what is missing.
    second = deploy(stack, "b", 1001)
    github.fail_next = []
    original = github._answer
    answers = iter([None, None, 502])  # deployment, queued, then in_progress fails

    def flaky(path, headers, body):
        if next(answers, None) == 502:
            return 502, {"message": "Server Error"}
        return original(path, headers, body)

    github._answer = flaky
    with pytest.raises(GitHubError):
        report_deploy(stack.app.opsfleet, adapter, second["id"])
    github._answer = original
    assert report_deploy(stack.app.opsfleet, adapter, second["id"]) == ["in_progress", "success"]
    dep_b = max(github.deployments)
    assert github.states(dep_b) == ["queued", "in_progress", "success"]


def test_the_report_task_retries_a_502(stack, github):
    stack.start()
    run = deploy(stack, "a", 1000)
    github.fail_next = [502]
    # Run eagerly, Celery's retry runs the task again at once (a worker waits the countdown).
    assert report(stack, run["id"]) == ["queued", "in_progress", "success"]
    assert [c.status for c in github.calls] == [502, 201, 201, 201, 201]
    assert len(github.deployments) == 1


@pytest.mark.parametrize("status", [403, 429])
def test_githubs_rate_limit_is_waited_out_and_the_report_converges(stack, github, status):
    from worker.adapters.github import GitHubAdapter, GitHubError
    from worker.tasks.report_github import report_deploy

    stack.start()
    run = deploy(stack, "a", 1000)
    github.rate_limit_next = [(status, 30)]
    adapter = GitHubAdapter(github.token, github.base_url, 5)
    with pytest.raises(GitHubError) as err:
        report_deploy(stack.app.opsfleet, adapter, run["id"])
    assert err.value.retryable and 28 <= err.value.retry_after <= 31  # what GitHub asked, not our backoff
    assert report(stack, run["id"]) == ["queued", "in_progress", "success"]  # the task, retried
    assert len(github.deployments) == 1


def test_cli_deploy_releases_and_rollback(stack, dockerd, tmp_path):
    import yaml
    from click.testing import CliRunner

    from opsfleet.cli import cli

    stack.start()
    assert deploy(stack, "a", 1000)["status"] == "succeeded"
    config_file = tmp_path / "opsfleet.yaml"
    raw = stack.loaded.config.model_dump(mode="json", exclude_defaults=True)
    raw["deploy"]["registries"], registry_environ = registry_credentials()
    config_file.write_text(yaml.safe_dump(raw))
    env = {"DOCKER_HOST": TEST_DOCKER_HOST, "GITHUB_TOKEN": "", "GITHUB_API_URL": "", **registry_environ}
    runner = CliRunner()

    def opsfleet(*args):
        return runner.invoke(cli, ["--config", str(config_file), *args], env=env, catch_exceptions=False)

    result = opsfleet("deploy", "--env", "prod", "--ref", SHA["b"])
    assert result.exit_code == 0, result.output
    assert serving(stack) == "b"
    result = opsfleet("releases", "--env", "prod")
    assert result.exit_code == 0 and result.output.splitlines()[1].split()[1:5] == ["prod", SHA["b"][:7], "live", "*"]
    before = rollbacks("manual")
    result = opsfleet("rollback", "--env", "prod")  # to a, the release live before b
    assert result.exit_code == 0, result.output
    assert rollbacks("manual") == before + 1
    assert serving(stack) == "a" and stack.ledger.current_release("prod")["sha"] == SHA["a"]
    # Deliberate: the CLI may put an older commit live, which a webhook never does.
    assert opsfleet("deploy", "--env", "prod", "--ref", "nothex").exit_code == 2
    assert opsfleet("rollback", "--env", "nope").exit_code == 2
    unknown = opsfleet("releases", "--env", "nope")
    assert unknown.exit_code == 2 and "no environment 'nope' is configured; configured: prod" in unknown.output
    result = opsfleet("releases", "--env", "prod", "--json")
    assert [r["sha"][0] for r in json.loads(result.output)] == ["a", "b", "a"]


def test_a_recreate_that_fails_half_way_puts_the_original_back(stack, dockerd):
    """The new container cannot be created (its image is missing: the pull step is skipped
    here to get that far): the original, already stopped and renamed, is put back."""
    from worker.adapters.ledger import NewRun

    before = stack.start()
    run_id = (
        stack.ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[
                NewRun(
                    trigger="manual",
                    triggered_by="test",
                    playbook="deploy",
                    target="prod",
                    params={"sha": SHA["d"], "ref": "", "images": {"app": f"{REPO}:{TAG['d']}"}, "order": [1, 1]},
                )
            ],
        )
        .runs[0]
        .id
    )
    assert stack.ledger.claim_run(run_id, "test", 600)
    step = stack.app.tasks["opsfleet.runs.step"]
    for seq in (0, 1, 2, 4):  # lock, validate, backup, (no pull), recreate
        step.apply(args=(run_id, seq))
    run = stack.ledger.get_run(run_id)
    assert run["status"] == "rolled_back", run
    assert "recreate failed" in run["reason"]
    after = dockerd.containers.get(stack.name)
    assert after.id == before.id and after.status == "running" and serving(stack) == "v1"
    assert not [c for c in dockerd.containers.list(all=True) if c.name.startswith(f"{stack.name}.")]
    assert stack.ledger.get_lock("deploy:prod") is None


def test_a_deploy_arriving_while_another_runs_waits_for_it_then_goes_live(stack, dockerd, tmp_path, monkeypatch):
    import threading
    import time

    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    monkeypatch.setenv("OPSFLEET_TEST_HOLD_DIR", str(hold_dir))
    (hold_dir / "hold-deploy-health").touch()  # A stops inside its health step
    stack.start()
    [a] = push(stack, "a", 1000).json["runs"]
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", execute_inline(stack.app, a)))
    first.start()
    deadline = time.monotonic() + 20
    while not (hold_dir / f"held-{a}-health").exists():
        assert time.monotonic() < deadline, "A never reached its health step"
        time.sleep(0.05)
    (hold_dir / "hold-deploy-health").unlink()  # B will not stop there
    [older] = push(stack, "e", 999).json["runs"]  # an older push than A, while A runs
    assert execute_inline(stack.app, older)["status"] == "superseded"
    (hold_dir / "hold-deploy-health").touch()
    [b] = push(stack, "b", 1001).json["runs"]
    second = threading.Thread(target=lambda: results.setdefault("b", execute_inline(stack.app, b)))
    second.start()
    while not stack.ledger.get_run(b)["steps"]:
        assert time.monotonic() < deadline, "B never started its lock step"
        time.sleep(0.05)
    time.sleep(0.5)
    assert stack.ledger.get_run(b)["steps"][0]["status"] == "running"  # B waits for the lock
    (hold_dir / "hold-deploy-health").unlink()
    first.join(30)
    second.join(30)
    assert results["a"]["status"] == "succeeded", results["a"]
    assert results["b"]["status"] == "succeeded", results["b"]
    assert f"after waiting for run:{a}" in results["b"]["steps"][0]["output"]
    assert serving(stack) == "b" and stack.ledger.current_release("prod")["sha"] == SHA["b"]
