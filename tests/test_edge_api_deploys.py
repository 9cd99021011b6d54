"""POST /api/deploys and /api/rollbacks in-process (SQLite ledger, filesystem broker):
the same deliberate deploys as the CLI, recorded then enqueued; the token is required."""

from __future__ import annotations

import pytest

from webhooks import create_app
from worker.adapters.ledger import NewRun
from worker.config import parse_config

TOKEN = "api-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHA = "a" * 40
CONFIG = {
    "services": {"api": {"container": "shop-api"}},
    "deploy": {
        "environments": {
            "prod": {"branch": "main", "services": ["api"], "image": "shop/api", "tag_template": "main-{short_sha}"}
        }
    },
}


@pytest.fixture
def make(tmp_path):
    def build(**environ):
        env = {"ALERTMANAGER_TOKEN": "am-token", "OPSFLEET_API_TOKEN": TOKEN, **environ}
        loaded = parse_config(
            {**CONFIG, "fleet": {"data_dir": str(tmp_path)}},
            source="t",
            base_dir=tmp_path,
            environ={k: v for k, v in env.items() if v},
        )
        app = create_app(loaded=loaded)
        return app, app.test_client(), app.extensions["opsfleet"].ledger

    return build


def queue_files(app) -> int:
    folder = app.extensions["opsfleet"].loaded.data_dir / "broker" / "queue"
    return sum(1 for p in folder.glob("*") if p.is_file())


def test_post_deploy_records_a_manual_deploy_run_and_enqueues_it(make):
    app, client, ledger = make()
    answer = client.post("/api/deploys", json={"environment": "prod", "sha": SHA}, headers=AUTH)
    assert answer.status_code == 202, answer.json
    run = ledger.get_run(answer.json["run_id"])
    assert (run["trigger"], run["triggered_by"], run["playbook"], run["target"]) == ("manual", "api", "deploy", "prod")
    assert run["params"]["images"] == {"api": "shop/api:main-aaaaaaa"} and answer.json["enqueued"] is True
    assert queue_files(app) == 1


def test_an_idempotency_key_makes_a_retried_post_the_same_run(make):
    app, client, _ = make()
    headers = {**AUTH, "Idempotency-Key": "deploy-42"}
    first = client.post("/api/deploys", json={"environment": "prod", "sha": SHA}, headers=headers)
    again = client.post("/api/deploys", json={"environment": "prod", "sha": SHA}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json == {"run_id": first.json["run_id"], "enqueued": False, "repeat": True}
    assert queue_files(app) == 1


@pytest.mark.parametrize(
    ("case", "path", "body", "headers", "status", "message"),
    [
        ("no bearer", "/api/deploys", {"environment": "prod", "sha": SHA}, {}, 401, "unauthorized"),
        (
            "wrong bearer",
            "/api/deploys",
            {"environment": "prod", "sha": SHA},
            {"Authorization": "Bearer x"},
            401,
            "unauthorized",
        ),
        (
            "unknown environment",
            "/api/deploys",
            {"environment": "nope", "sha": SHA},
            AUTH,
            400,
            "environment must name a configured environment (prod)",
        ),
        (
            "short sha",
            "/api/deploys",
            {"environment": "prod", "sha": "abc"},
            AUTH,
            400,
            "sha must be a full commit sha",
        ),
        ("not an object", "/api/deploys", [1], AUTH, 400, "body must be a JSON object"),
        (
            "bad idempotency key",
            "/api/deploys",
            {"environment": "prod", "sha": SHA},
            {**AUTH, "Idempotency-Key": "a b"},
            400,
            "Idempotency-Key",
        ),
        (
            "nothing to roll back to",
            "/api/rollbacks",
            {"environment": "prod"},
            AUTH,
            409,
            "prod: no earlier release to roll back to",
        ),
        (
            "release not a number",
            "/api/rollbacks",
            {"environment": "prod", "release": "1"},
            AUTH,
            400,
            "release must be a release id",
        ),
    ],
)
def test_refusals(make, case, path, body, headers, status, message):
    app, client, ledger = make()
    answer = client.post(path, json=body, headers=headers)
    assert answer.status_code == status, (case, answer.json)
    assert message in answer.json["error"], case
    assert queue_files(app) == 0 and ledger.list_runs() == []


def test_without_a_configured_token_posts_are_forbidden_even_from_loopback(make):
    app, client, _ = make(OPSFLEET_API_TOKEN="")
    answer = client.post("/api/deploys", json={"environment": "prod", "sha": SHA})
    assert answer.status_code == 403 and "OPSFLEET_API_TOKEN" in answer.json["error"]
    assert client.get("/api/runs").status_code == 200  # reading from loopback stays allowed


def test_post_rollback_deploys_the_release_live_before_the_current(make):
    app, client, ledger = make()
    run_ids = []
    for sha in ("a", "b"):
        run_id = (
            ledger.record_event(
                source="t",
                summary="",
                body="",
                new_runs=[NewRun(trigger="github", playbook="deploy", target="prod", params={})],
            )
            .runs[0]
            .id
        )
        ledger.start_release(
            environment="prod",
            sha=sha * 40,
            ref="main",
            images={"api": f"shop/api:{sha}"},
            previous_images={},
            run_id=run_id,
            order=(1, 1),
        )
        ledger.make_current(run_id)
        run_ids.append(run_id)
    answer = client.post("/api/rollbacks", json={"environment": "prod"}, headers=AUTH)
    assert answer.status_code == 202, answer.json
    params = ledger.get_run(answer.json["run_id"])["params"]
    assert (params["sha"], params["images"]) == ("a" * 40, {"api": "shop/api:a"})
    release_b = ledger.release_of_run(run_ids[1])["id"]
    explicit = client.post("/api/rollbacks", json={"environment": "prod", "release": release_b}, headers=AUTH)
    assert ledger.get_run(explicit.json["run_id"])["params"]["rollback_to"] == release_b
