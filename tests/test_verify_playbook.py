"""The `verify` step on the private dockerd and a real health URL: it re-checks the
condition (container running, Docker health, health_url 2xx), never acts, and after a
restart it fails the run when the service is still unhealthy."""

from __future__ import annotations

import uuid

import pytest

from tests.support.servers import TEST_DOCKER_HOST
from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import execute_inline

SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")


@pytest.fixture
def api(make_container):
    container = make_container(f"opsfleet-verify-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)
    container.reload()
    return container


def run_playbook(tmp_path, container, health_url: str, playbook: str) -> dict:
    loaded = parse_config(
        {
            "fleet": {"data_dir": str(tmp_path)},
            "services": {"api": {"container": container.name, "health_url": health_url}},
        },
        source="t",
        base_dir=tmp_path,
        environ={"DOCKER_HOST": TEST_DOCKER_HOST},
    )
    app = create_celery(loaded)
    app.opsfleet.ledger.migrate()
    params = {"stop_timeout_seconds": 2, "verify_timeout_seconds": 2}
    recorded = app.opsfleet.ledger.record_event(
        source="t", summary="", body="",
        new_runs=[NewRun(trigger="alert", playbook=playbook, target="api", params=params)],
    )  # fmt: skip
    return execute_inline(app, recorded.runs[0].id)


def started_at(container) -> str:
    container.reload()
    return container.attrs["State"]["StartedAt"]


def test_verify_passes_when_the_health_url_answers_2xx_and_touches_nothing(tmp_path, api, health):
    before = started_at(api)
    run = run_playbook(tmp_path, api, health.url, "verify")
    assert run["status"] == "succeeded", run
    assert f"{health.url} OK" in run["steps"][0]["output"]
    assert health.hits >= 1 and started_at(api) == before


def test_verify_fails_with_the_answer_when_the_health_url_answers_503(tmp_path, api, health):
    health.status = 503
    before = started_at(api)
    run = run_playbook(tmp_path, api, health.url, "verify")
    assert run["status"] == "failed"
    assert f"{health.url} answered 503" in run["reason"], run["reason"]
    assert started_at(api) == before  # verify never acts


def test_verify_fails_when_the_health_url_does_not_answer(tmp_path, api, health):
    url = health.url
    health.close()
    run = run_playbook(tmp_path, api, url, "verify")
    assert run["status"] == "failed" and f"{url} did not answer" in run["reason"], run["reason"]


def test_a_restart_that_leaves_the_service_unhealthy_fails_at_its_verify_step(tmp_path, api, health):
    health.status = 500
    before = started_at(api)
    run = run_playbook(tmp_path, api, health.url, "restart_service")
    assert started_at(api) != before  # it acted
    assert run["status"] == "failed"
    assert [s["status"] for s in run["steps"]] == ["succeeded", "succeeded", "failed"]
    assert run["steps"][2]["name"] == "verify" and f"{health.url} answered 500" in run["reason"]
