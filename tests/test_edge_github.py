"""POST /hooks/github in-process, on GitHub's published example payloads, signed
with the test secret. Embedded defaults (SQLite ledger, filesystem broker), so
the broker's content can be counted: refused input leaves nothing anywhere."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from webhooks import create_app
from worker.config import parse_config

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "github"
SECRET = "gh-test-secret-42"
CONFIG = {
    "services": {"api": {"container": "shop-api"}, "web": {"container": "shop-web"}},
    "deploy": {
        "environments": {
            "production": {
                "branch": "master",
                "services": ["api", "web"],
                "image": "shop/app",
                "images": {"web": "shop/web"},
                "tag_template": "main-{short_sha}",
                "repository": "Codertocat/Hello-World",
            },
        }
    },
}


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sign(data: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def headers(data: bytes, event: str = "push", delivery: str = "d-1", **extra) -> dict:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sign(data),
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/abc",
        **extra,
    }


@pytest.fixture
def edge(tmp_path):
    def make(environ=None, config=None):
        env = {"ALERTMANAGER_TOKEN": "am-token-xyz", "GITHUB_WEBHOOK_SECRET": SECRET, **(environ or {})}
        raw = {**(config or CONFIG), "fleet": {"data_dir": str(tmp_path / "data")}}
        loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=env)
        app = create_app(loaded=loaded)
        return app, app.test_client(), loaded

    return make


def broker_messages(loaded) -> int:
    folder = loaded.data_dir / "broker" / "queue"
    return sum(1 for p in folder.glob("*") if p.is_file()) if folder.exists() else 0


def ledger_of(app):
    return app.extensions["opsfleet"].ledger


def test_signed_push_to_the_branch_records_and_enqueues_one_deploy(edge):
    app, client, loaded = edge()
    data = body("push.with-new-branch.json")
    answer = client.post("/hooks/github", data=data, headers=headers(data, delivery="abc-1"))
    assert answer.status_code == 202, answer.json
    [run_id] = answer.json["runs"]
    assert answer.json["enqueued"] == [run_id]
    run = ledger_of(app).get_run(run_id)
    assert (run["trigger"], run["playbook"], run["target"], run["status"]) == (
        "github",
        "deploy",
        "production",
        "queued",
    )
    assert run["params"]["sha"] == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    assert run["params"]["images"] == {"api": "shop/app:main-6113728", "web": "shop/web:main-6113728"}
    assert run["params"]["order"] == [1557933657.0, 1557933565.0]
    assert run["triggered_by"] == "Codertocat"
    assert broker_messages(loaded) == 1


def test_the_same_delivery_twice_is_one_deploy(edge):
    app, client, loaded = edge()
    data = body("push.with-new-branch.json")
    first = client.post("/hooks/github", data=data, headers=headers(data, delivery="same-1"))
    again = client.post("/hooks/github", data=data, headers=headers(data, delivery="same-1"))
    assert first.status_code == 202 and again.status_code == 200
    assert again.json["runs"] == first.json["runs"] and again.json["redelivery"] is True
    assert again.json["enqueued"] == []
    assert broker_messages(loaded) == 1
    assert ledger_of(app).count_events("github") == 1
    # A new delivery of the same push is a new event (GitHub's "redeliver" keeps the id; a new push does not).
    third = client.post("/hooks/github", data=data, headers=headers(data, delivery="other-2"))
    assert third.status_code == 202 and third.json["runs"] != first.json["runs"]


def test_ping_answers_200(edge):
    _, client, loaded = edge()
    data = body("ping.json")
    answer = client.post("/hooks/github", data=data, headers=headers(data, event="ping"))
    assert answer.status_code == 200 and answer.json["pong"] is True
    assert broker_messages(loaded) == 0


@pytest.mark.parametrize(
    ("fixture", "event", "reason"),
    [
        ("push.json", "push", "ref deleted: refs/tags/simple-tag"),
        ("push.with-organization.json", "push", "ref deleted: refs/tags/simple-tag"),
        (
            "deployment.json",
            "deployment",
            "environment 'production' does not take deployments (deploy.environments.<name>.deployments)",
        ),
        ("workflow_run.completed.json", "workflow_run", "production: takes no workflow runs"),
        (
            "workflow_run.requested.json",
            "workflow_run",
            "workflow run requested, conclusion None: only completed successful runs deploy",
        ),
        ("deployment_status.json", "deployment_status", "event deployment_status does not trigger anything"),
    ],
)
def test_ignored_events_are_recorded_with_their_reason(edge, fixture, event, reason):
    app, client, loaded = edge()
    data = body(fixture)
    answer = client.post("/hooks/github", data=data, headers=headers(data, event=event, delivery=f"i-{fixture}"))
    assert answer.status_code == 202, answer.json
    assert answer.json["runs"] == [] and answer.json["ignored"] == reason
    assert ledger_of(app).count_events("github") == 1
    assert broker_messages(loaded) == 0


def test_push_to_another_branch_is_ignored_with_the_reason(edge):
    app, client, loaded = edge()
    payload = json.loads(body("push.with-new-branch.json"))
    payload["ref"] = "refs/heads/feature/x"
    data = json.dumps(payload).encode()
    answer = client.post("/hooks/github", data=data, headers=headers(data))
    assert answer.status_code == 202
    assert answer.json["ignored"] == "production: refs/heads/feature/x is not branch master"
    assert broker_messages(loaded) == 0


def test_push_of_another_repository_is_ignored(edge):
    _, client, loaded = edge()
    payload = json.loads(body("push.with-new-branch.json"))
    payload["repository"]["full_name"] = "mallory/fork"
    data = json.dumps(payload).encode()
    answer = client.post("/hooks/github", data=data, headers=headers(data))
    assert answer.status_code == 202 and "mallory/fork is not Codertocat/Hello-World" in answer.json["ignored"]
    assert broker_messages(loaded) == 0


def test_v_tag_deploys_to_an_environment_that_takes_tags(edge):
    config = {
        "services": {"api": {"container": "a"}},
        "deploy": {
            "environments": {"prod": {"tags": True, "services": ["api"], "image": "shop/api", "tag_template": "{tag}"}}
        },
    }
    app, client, _ = edge(config=config)
    payload = json.loads(body("push.with-new-branch.json"))
    for ref, expect in (("refs/tags/v1.2.0", 202), ("refs/tags/nightly", 202)):
        payload["ref"] = ref
        data = json.dumps(payload).encode()
        answer = client.post("/hooks/github", data=data, headers=headers(data, delivery=ref.replace("/", "-")))
        assert answer.status_code == expect
        if ref.endswith("v1.2.0"):
            [run_id] = answer.json["runs"]
            assert ledger_of(app).get_run(run_id)["params"]["images"] == {"api": "shop/api:v1.2.0"}
        else:
            assert answer.json["runs"] == [] and "is not v* tags" in answer.json["ignored"]


def _unsigned(data):
    h = headers(data)
    del h["X-Hub-Signature-256"]
    return h


@pytest.mark.parametrize(
    ("case", "make_headers"),
    [
        ("no signature", _unsigned),
        ("wrong secret", lambda d: {**headers(d), "X-Hub-Signature-256": sign(d, "not-the-secret")}),
        ("sha1 form", lambda d: {**headers(d), "X-Hub-Signature-256": "sha1=" + hashlib.sha1(d).hexdigest()}),
        ("signature of other bytes", lambda d: {**headers(d), "X-Hub-Signature-256": sign(d + b" ")}),
        ("upper-case hex", lambda d: {**headers(d), "X-Hub-Signature-256": sign(d).upper()}),
        ("empty", lambda d: {**headers(d), "X-Hub-Signature-256": ""}),
    ],
)
def test_bad_signatures_are_401_and_leave_nothing(edge, case, make_headers):
    app, client, loaded = edge()
    data = body("push.with-new-branch.json")
    answer = client.post("/hooks/github", data=data, headers=make_headers(data))
    assert answer.status_code == 401, case
    assert answer.json == {"error": "unauthorized"}
    assert ledger_of(app).count_events() == 0 and broker_messages(loaded) == 0


def test_without_a_configured_secret_every_delivery_is_401(edge):
    app, client, loaded = edge(environ={"GITHUB_WEBHOOK_SECRET": ""})
    data = body("push.with-new-branch.json")
    assert client.post("/hooks/github", data=data, headers=headers(data)).status_code == 401


@pytest.mark.parametrize(
    ("case", "data", "extra", "status", "message"),
    [
        ("not JSON", b"{nope", {}, 400, "body is not JSON"),
        ("not UTF-8", b'{"a": "\xff"}', {}, 400, "body is not UTF-8"),
        ("a JSON list", b"[1, 2]", {}, 400, "body is not a JSON object"),
        ("NUL in a string", b'{"ref": "a\\u0000b"}', {}, 400, "NUL"),
        ("no delivery id", None, {"X-GitHub-Delivery": ""}, 400, "X-GitHub-Delivery"),
        ("delivery id with spaces", None, {"X-GitHub-Delivery": "a b"}, 400, "X-GitHub-Delivery"),
        ("no event", None, {"X-GitHub-Event": ""}, 400, "X-GitHub-Event"),
        ("push without ref", b'{"after": "x"}', {}, 400, "malformed push payload: ref and after must be strings"),
        ("push with a non-sha after", b'{"ref": "refs/heads/master", "after": "HEAD"}', {}, 202, "not a commit sha"),
        (
            "repository not owner/name",
            body("push.with-new-branch.json").replace(b'"Codertocat/Hello-World"', b'"Codertocat/../../orgs/x"'),
            {},
            400,
            "is not owner/name",
        ),
        # GitHub's other content type: its webhook settings offer it; say which to choose
        (
            "form-encoded",
            b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmaster%22%7D",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "set its Content type to application/json",
        ),
    ],
)
def test_bad_input_table(edge, case, data, extra, status, message):
    app, client, loaded = edge()
    data = body("push.with-new-branch.json") if data is None else data
    answer = client.post(
        "/hooks/github", data=data, headers={**headers(data, delivery=f"bad-{abs(hash(case))}"), **extra}
    )
    assert answer.status_code == status, (case, answer.json)
    text = answer.json.get("error") or answer.json.get("ignored")
    assert message in text, (case, text)
    assert broker_messages(loaded) == 0


def test_body_over_the_limit_is_413(edge):
    config = {**CONFIG, "web": {"max_body_bytes": 2048}}
    _, client, _ = edge(config=config)
    data = body("push.with-new-branch.json")
    assert len(data) > 2048
    assert client.post("/hooks/github", data=data, headers=headers(data)).status_code == 413


def test_ledger_down_is_503_and_a_broker_down_leaves_the_run_for_the_sweeper(edge, tmp_path):
    app, client, loaded = edge()
    data = body("push.with-new-branch.json")
    state = app.extensions["opsfleet"]

    class Down:
        def __getattr__(self, name):
            from worker.adapters.ledger import LedgerUnavailable

            def fail(*a, **k):
                raise LedgerUnavailable("down")

            return fail

    real = state.celery.opsfleet.ledger
    state.celery.opsfleet._handles["ledger"] = Down()
    try:
        answer = client.post("/hooks/github", data=data, headers=headers(data, delivery="down-1"))
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    finally:
        state.celery.opsfleet._handles["ledger"] = real

    def refuse(*a, **k):
        raise ConnectionError("broker down")

    state.celery.send_task = refuse
    answer = client.post("/hooks/github", data=data, headers=headers(data, delivery="down-1"))
    assert answer.status_code == 202 and answer.json["enqueued"] == []
    [run_id] = answer.json["runs"]
    run = real.get_run(run_id)
    assert run["status"] == "queued" and run["enqueued_at"] is None  # the sweeper sends it
    assert broker_messages(loaded) == 0


DEPLOYMENTS_CONFIG = {
    "services": {"api": {"container": "shop-api"}},
    "deploy": {
        "environments": {
            "production": {"deployments": True, "services": ["api"], "image": "shop/api", "tag_template": "{sha}"}
        }
    },
}


def test_a_deployment_event_deploys_its_sha_and_reports_on_that_deployment(edge):
    from tests.support.github_recorder import GitHubRecorder
    from worker.adapters.github import GitHubAdapter
    from worker.tasks.report_github import report_deploy

    app, client, loaded = edge(config=DEPLOYMENTS_CONFIG)
    data = body("deployment.json")
    answer = client.post("/hooks/github", data=data, headers=headers(data, event="deployment", delivery="dep-1"))
    assert answer.status_code == 202, answer.json
    [run_id] = answer.json["runs"]
    run = ledger_of(app).get_run(run_id)
    assert run["params"]["images"] == {"api": "shop/api:f95f852bd8fca8fcc58a9a2d6c842781e32a215e"}
    assert run["params"]["github_deployment_id"] == 145988746
    assert run["triggered_by"] == "Codertocat"
    with GitHubRecorder() as github:
        github.deployments[145988746] = {"id": 145988746, "repository": "Codertocat/Hello-World", "statuses": []}
        runtime = app.extensions["opsfleet"].celery.opsfleet
        posted = report_deploy(runtime, GitHubAdapter(github.token, github.base_url, 5), run_id)
        assert posted == ["queued"] and github.states(145988746) == ["queued"]
        assert len(github.deployments) == 1  # none created: GitHub's own deployment is reported on


def test_a_deployment_opsfleet_created_is_not_deployed_again(edge):
    _, client, loaded = edge(config=DEPLOYMENTS_CONFIG)
    payload = json.loads(body("deployment.json"))
    payload["deployment"]["payload"] = {"opsfleet_run": 12}
    data = json.dumps(payload).encode()
    answer = client.post("/hooks/github", data=data, headers=headers(data, event="deployment", delivery="echo-1"))
    assert answer.status_code == 202
    assert answer.json["ignored"] == "created by opsfleet (run 12): not deployed again"
    assert broker_messages(loaded) == 0


def test_a_superseded_deploy_ends_inactive_on_github_whatever_was_reported_before(edge):
    from tests.support.github_recorder import GitHubRecorder
    from worker.adapters.github import GitHubAdapter
    from worker.tasks.report_github import report_deploy

    app, client, _ = edge()
    data = body("push.with-new-branch.json")
    [run_id] = client.post("/hooks/github", data=data, headers=headers(data, delivery="sup-1")).json["runs"]
    ledger = ledger_of(app)
    runtime = app.extensions["opsfleet"].celery.opsfleet
    with GitHubRecorder() as github:
        adapter = GitHubAdapter(github.token, github.base_url, 5)
        assert ledger.claim_run(run_id, "w", 60)
        assert report_deploy(runtime, adapter, run_id) == ["queued", "in_progress"]
        ledger.finish_run(run_id, "superseded", "superseded by run 9, a newer push")
        assert report_deploy(runtime, adapter, run_id) == ["inactive"]
        [deployment] = github.deployments.values()
        assert github.states(deployment["id"]) == ["queued", "in_progress", "inactive"]
        assert deployment["statuses"][-1]["description"] == f"#{run_id} superseded: superseded by run 9, a newer push"


def test_a_successful_workflow_run_deploys_and_a_push_to_its_branch_waits_for_it(edge):
    config = {
        "services": {"api": {"container": "a"}},
        "deploy": {
            "environments": {
                "production": {
                    "branch": "master",
                    "workflow": ".github/workflows/test.yml",
                    "services": ["api"],
                    "image": "shop/api",
                    "tag_template": "{branch}-{short_sha}",
                }
            }
        },
    }
    app, client, loaded = edge(config=config)
    data = body("workflow_run.completed.json")
    answer = client.post("/hooks/github", data=data, headers=headers(data, event="workflow_run", delivery="wr-1"))
    assert answer.status_code == 202, answer.json
    [run_id] = answer.json["runs"]
    run = ledger_of(app).get_run(run_id)
    assert run["params"]["images"] == {"api": "shop/api:master-3484a3f"}
    assert run["params"]["order"] == [1601915604.0, 1601915527.0]  # the run's created_at, then the commit's time
    data = body("push.with-new-branch.json")
    answer = client.post("/hooks/github", data=data, headers=headers(data, delivery="wr-push"))
    assert answer.status_code == 202
    assert answer.json["ignored"] == "production: waits for workflow .github/workflows/test.yml to pass on master"
    assert broker_messages(loaded) == 1


def test_every_deploy_outcome_is_exported_at_zero_from_the_start(edge):
    # OpsfleetDeployFailed uses increase(): a series born at 1 would hide the first failure.
    app, client, loaded = edge()
    exposed = client.get("/metrics").get_data(as_text=True)
    for outcome in ("succeeded", "rolled_back", "rollback_failed", "superseded", "failed"):
        assert f'opsfleet_deploys_total{{environment="production",outcome="{outcome}"}} 0.0' in exposed


RETYPED = [None, "x", 5, [1], {"a": 1}, True]


def _mutants():
    """Every top-level field, and every field of the objects the deciders read, of GitHub's
    example payloads set to each wrong type in turn (signed: only a trusted sender gets here)."""
    examples = {
        "push": "push.with-new-branch.json",
        "workflow_run": "workflow_run.completed.json",
        "deployment": "deployment.json",
    }
    for event, fixture in examples.items():
        payload = json.loads(body(fixture))
        paths = [(k,) for k in payload]
        for outer in ("repository", "head_commit", "workflow_run", "deployment", "pusher", "sender"):
            if isinstance(payload.get(outer), dict):
                paths += [(outer, inner) for inner in payload[outer]]
        for path in paths:
            for value in RETYPED:
                yield event, path, value


def test_signed_payloads_with_retyped_fields_are_answered_4xx_or_accepted_never_5xx(edge):
    import copy

    config = {
        **CONFIG,
        "deploy": {
            "environments": {
                **CONFIG["deploy"]["environments"],
                "staging": {"branch": "main", "workflow": "CI", "services": ["web2"], "image": "shop/app"},
                "preview": {"deployments": True, "services": ["api2"], "image": "shop/app"},
            }
        },
        "services": {**CONFIG["services"], "web2": {"container": "w2"}, "api2": {"container": "a2"}},
    }
    app, client, loaded = edge(config=config)
    answered = {}
    cases = list(_mutants())
    assert len(cases) > 500
    for n, (event, path, value) in enumerate(cases):
        payload = copy.deepcopy(
            json.loads(
                body(
                    {
                        "push": "push.with-new-branch.json",
                        "workflow_run": "workflow_run.completed.json",
                        "deployment": "deployment.json",
                    }[event]
                )
            )
        )
        holder = payload
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value
        data = json.dumps(payload).encode()
        answer = client.post("/hooks/github", data=data, headers=headers(data, event=event, delivery=f"m-{n}"))
        answered.setdefault(answer.status_code, []).append((event, path, value))
        assert answer.status_code < 500, (event, path, value, answer.get_data(as_text=True))
        if answer.status_code == 400:
            assert answer.json["error"], (event, path)  # with the reason
    assert 400 in answered
    data = body("push.with-new-branch.json").replace(b'"repository": {', b'"repository": "x", "_was": {', 1)
    answer = client.post("/hooks/github", data=data, headers=headers(data, delivery="typed-1"))
    assert answer.status_code == 400
    assert answer.json["error"] == "malformed push payload: repository must be an object, not str"
