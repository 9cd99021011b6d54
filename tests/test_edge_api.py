"""GET /api/runs: bearer token when OPSFLEET_API_TOKEN is set, loopback only when not."""

from __future__ import annotations

import pytest

from webhooks import create_app
from worker.adapters.ledger import NewRun
from worker.config import parse_config


@pytest.fixture
def make_client(tmp_path):
    def make(**environ):
        env = {"ALERTMANAGER_TOKEN": "am", **environ}
        loaded = parse_config({"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ=env)
        app = create_app(loaded=loaded)
        ledger = app.extensions["opsfleet"].ledger
        for key in ("a", "b"):
            ledger.record_event(
                source="api",
                summary="",
                body="",
                new_runs=[
                    NewRun(
                        trigger="manual", triggered_by="alice", playbook="restart_service", target="api", dedup_key=key
                    )
                ],
            )
        return app.test_client()

    return make


def test_without_token_only_loopback_may_read(make_client):
    client = make_client()
    assert client.get("/api/runs").status_code == 200
    far = client.get("/api/runs", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert far.status_code == 403 and "OPSFLEET_API_TOKEN" in far.json["error"]
    assert client.get("/api/runs", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200


def test_with_token_a_bearer_is_required_from_anywhere(make_client):
    client = make_client(OPSFLEET_API_TOKEN="s3cret")
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer nope"}).json == {"error": "unauthorized"}
    ok = client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert ok.status_code == 200 and len(ok.json["runs"]) == 2


def test_runs_filters_and_one_run(make_client):
    client = make_client()
    runs = client.get("/api/runs?status=queued&trigger=manual&limit=1").json["runs"]
    assert len(runs) == 1 and runs[0]["id"] == 2 and runs[0]["triggered_by"] == "alice"
    one = client.get("/api/runs/1").json
    assert one["id"] == 1 and one["steps"] == [] and one["created_at"].endswith("Z")
    assert client.get("/api/runs/999").status_code == 404
    assert client.get("/api/runs/99999999999999999999999").status_code == 404
    assert client.get("/api/runs?target=a%00b").status_code == 400
    assert client.get("/api/runs?status=bogus").status_code == 400
    assert client.get("/api/runs?limit=x").status_code == 400
    assert client.get("/api/runs?limit=0").status_code == 400


def test_health_endpoints(make_client):
    client = make_client()
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"ledger": "ok", "alert_intake": "ok", "broker": "ok"}


def test_readyz_is_503_naming_the_broker_when_redis_is_not_there(make_client):
    from tests.support.servers import free_port

    client = make_client(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json == {
        "status": "not ready",
        "checks": {"ledger": "ok", "alert_intake": "ok", "broker": "unavailable"},
    }
