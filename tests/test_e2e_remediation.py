"""Remediation under Alertmanager's real delivery contract, end to end:
retries while opsfleet is down, an HA pair sending twice, concurrent posts
to several web processes, and steps pinned to a host's worker."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.fleet import Fleet, service_down
from tests.support.servers import TEST_DOCKER_HOST

pytestmark = pytest.mark.slow
SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")


def started_at(container) -> str:
    container.reload()
    return container.attrs["State"]["StartedAt"]


def config(container_name: str, host: str | None = None) -> dict:
    api = {"container": container_name, **({"host": host} if host else {})}
    return {
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 5},
        "services": {"api": api, "web": {"container": f"{container_name}-web-not-running"}},
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
    return make_container(f"e2e-rem-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)


@pytest.fixture
def pg_env(shared_pg_url):
    return {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": shared_pg_url, "DOCKER_HOST": TEST_DOCKER_HOST}


def test_alertmanager_retrying_while_opsfleet_is_down_gives_one_action(
    tmp_path, api_container, pg_env, make_alertmanager
):
    before = started_at(api_container)
    fleet = Fleet(tmp_path, config(api_container.name), pg_env)
    with fleet:
        am = make_alertmanager(f"{fleet.url}/hooks/alertmanager", token=fleet.token, group_interval="2s")
        am.fire({"alertname": "ServiceDown", "service": "api"})
        time.sleep(4)  # Alertmanager tries, gets connection refused, backs off and retries
        fleet.start()
        runs = fleet.wait(lambda: fleet.runs() or None, 60, "Alertmanager's retry to arrive")
        run = fleet.wait_run(runs[0]["id"])
        assert run["status"] == "succeeded"
        time.sleep(6)  # further group_interval flushes
        assert len(fleet.runs()) == 1
        assert started_at(api_container) != before


def test_ha_pair_delivering_twice_gives_one_action(tmp_path, api_container, pg_env, make_alertmanager):
    with Fleet(tmp_path, config(api_container.name), pg_env).start() as fleet:
        pair = [make_alertmanager(f"{fleet.url}/hooks/alertmanager", token=fleet.token) for _ in range(2)]
        starts = "2026-12-03T09:00:00.123456789Z"
        for am in pair:  # Prometheus sends every alert to both members of the pair
            am.post_alerts([{"labels": {"alertname": "ServiceDown", "service": "api"}, "startsAt": starts}])

        def repeated():
            runs = fleet.runs()
            return runs if runs and runs[0]["repeats"] >= 1 else None

        [run] = fleet.wait(repeated, 30, "both members' notifications")
        assert fleet.wait_run(run["id"])["status"] == "succeeded"
        assert len(fleet.runs()) == 1


def test_concurrent_posts_to_several_web_processes_decide_once(tmp_path, api_container, pg_env):
    # Two gunicorn workers, no Celery worker: runs stay queued, so every
    # decision after the first sees the target busy.
    with Fleet(tmp_path, config(api_container.name), pg_env).start("web") as fleet:
        with ThreadPoolExecutor(16) as pool:
            same = list(pool.map(lambda _: fleet.post_alerts(service_down("00000000000000aa")), range(16)))
        assert {a.status_code for a in same} == {202}
        assert len({a.json()["runs"][0] for a in same}) == 1
        assert sorted(a.json()["alerts"][0]["outcome"] for a in same) == ["act"] + ["repeat"] * 15

        with ThreadPoolExecutor(10) as pool:
            distinct = list(pool.map(lambda i: fleet.post_alerts(service_down(f"{i + 1:016x}")), range(10)))
        outcomes = sorted(a.json()["alerts"][0]["outcome"] for a in distinct)
        assert outcomes == ["skip"] * 10  # the first alert's run still holds the target
        assert len([r for r in fleet.runs() if r["status"] == "queued"]) == 1


def test_a_storm_posted_concurrently_to_several_web_processes_trips_the_breaker_once(tmp_path, api_container, pg_env):
    """Twelve services down at once, each in its own notification, posted together to two
    gunicorn workers: the storm breaker counts them under one rule lock, so no more than
    max_targets act and exactly one escalation is recorded."""
    storm = config(api_container.name)
    storm["services"] = {f"svc{i}": {"container": f"{api_container.name}-{i}"} for i in range(12)}
    storm["remediation"]["defaults"]["storm"] = {"max_targets": 3, "window_seconds": 300}
    with Fleet(tmp_path, storm, pg_env).start("web") as fleet:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: fleet.post_alerts(service_down(f"{i + 1:016x}", f"svc{i}")), range(12)))
        assert {a.status_code for a in answers} == {202}
        outcomes = sorted(a.json()["alerts"][0]["outcome"] for a in answers)
        assert outcomes.count("act") == 3 and outcomes.count("escalate") == 1, outcomes
        assert outcomes.count("skip") == 8
        escalations = [r for r in fleet.runs() if r["playbook"] == "escalate"]
        assert len(escalations) == 1, escalations


def test_one_group_of_forty_targets_through_web_and_worker_is_one_slack_summary_and_one_page(
    tmp_path, api_container, pg_env, slack, make_alertmanager
):
    """Must-show 6 with the real processes: a monitoring glitch sends 40 services down in one
    notification. No container is touched, Slack gets the escalation's summary and its page
    and nothing else, Alertmanager gets exactly one OpsfleetEscalation."""
    import json

    import requests

    am = make_alertmanager("http://127.0.0.1:9/unused")
    storm = config(api_container.name)
    storm["services"] = {f"svc{i}": {"container": f"{api_container.name}-{i}"} for i in range(40)}
    storm["services"]["api"] = {"container": api_container.name}
    storm["remediation"]["defaults"]["storm"] = {"max_targets": 10, "window_seconds": 300}
    storm["escalation"] = {"alertmanager_url": am.url}
    env = {**pg_env, "SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.base_url}
    body = json.loads(service_down("0000000000000001"))
    first = body["alerts"][0]
    body["alerts"] = [
        {**first, "labels": {**first["labels"], "service": f"svc{i}"}, "fingerprint": f"{i + 1:016x}"}
        for i in range(40)
    ]
    before = started_at(api_container)
    with Fleet(tmp_path, storm, env).start("web", "worker") as fleet:
        answer = fleet.post_alerts(body)
        assert answer.status_code == 202, answer.text
        outcomes = [a["outcome"] for a in answer.json()["alerts"]]
        assert outcomes.count("escalate") == 1 and outcomes.count("skip") == 39 and "act" not in outcomes
        (escalation,) = [r for r in fleet.runs() if r["playbook"] == "escalate"]
        assert fleet.wait_run(escalation["id"])["status"] == "succeeded"
        fleet.wait(lambda: slack.threads(), 30, "the storm summary in Slack")
        time.sleep(3)  # the worker had time to post anything else it would have
        # Slack: the escalation run's thread (the summary: the storm, its targets) and the page
        # itself; nothing for the 39 alerts skipped, no action run.
        parents = sorted((t["parent"]["text"] for t in slack.threads().values()), key=lambda t: ":gear:" in t)
        assert len(parents) == 2, parents
        page, summary = parents
        assert ":rotating_light: opsfleet needs a person" in page and "storm" in page
        assert summary.startswith(f":gear: Run #{escalation['id']} escalate") and "40 targets" in summary
        assert "svc0" in page  # the page names the targets
        pages = [
            a
            for a in requests.get(f"{am.url}/api/v2/alerts", timeout=5).json()
            if a["labels"].get("alertname") == "OpsfleetEscalation"
        ]
        assert len(pages) == 1, pages
        assert all(r["status"] == "skipped" for r in fleet.runs() if r["playbook"] != "escalate")
    assert started_at(api_container) == before


def test_cooldown_survives_a_restart_of_the_web_and_worker_processes(tmp_path, api_container, pg_env):
    """Must-show 7 with the real processes: the restart's cooldown lives in the ledger, so a
    fresh gunicorn and Celery worker still refuse to act on the next alert for the target."""

    cooled = config(api_container.name)
    cooled["remediation"]["defaults"]["cooldown_seconds"] = 600
    fleet = Fleet(tmp_path, cooled, pg_env)
    with fleet.start("web", "worker"):
        first = fleet.post_alerts(service_down("00000000000000c1"))
        assert first.json()["alerts"][0]["outcome"] == "act"
        assert fleet.wait_run(first.json()["alerts"][0]["run_id"])["status"] == "succeeded"
        restarted = started_at(api_container)
        fleet.stop("web", "worker")
        fleet.start("web", "worker")
        again = service_down("00000000000000c1", starts_at="2026-12-03T11:20:00Z")  # it came back after the fix
        answer = fleet.post_alerts(again).json()["alerts"][0]
        assert answer["outcome"] == "skip" and answer["reason"].startswith("cooldown: acted "), answer
        time.sleep(3)  # a worker that wrongly acted would have restarted it by now
        assert started_at(api_container) == restarted
        assert [r["status"] for r in fleet.runs() if r["playbook"] == "restart_service"].count("succeeded") == 1


def test_steps_of_a_pinned_service_run_on_its_hosts_worker(tmp_path, api_container, pg_env):
    before = started_at(api_container)
    with Fleet(tmp_path, config(api_container.name, host="edge-1"), pg_env) as fleet:
        fleet.start("web", "worker", "worker@edge-1")
        [run_id] = fleet.post_alerts(service_down("00000000000000bb")).json()["runs"]
        assert fleet.wait_run(run_id)["status"] == "succeeded"
        assert started_at(api_container) != before
        host_log = fleet.log("worker@edge-1").read_text()
        main_log = fleet.log("worker").read_text()
        assert host_log.count("Task opsfleet.runs.step[") >= 3 and "opsfleet.runs.step[" not in main_log
        assert "Task opsfleet.runs.start[" in main_log


def test_chunked_body_over_the_limit_is_413_under_gunicorn(tmp_path, api_container, pg_env):
    import requests

    with Fleet(tmp_path, config(api_container.name), pg_env).start("web") as fleet:

        def chunks():
            for _ in range(40):
                yield b" " * 65536  # 2.5 MiB in all, no Content-Length

        answer = requests.post(
            f"{fleet.url}/hooks/alertmanager",
            data=chunks(),
            timeout=10,
            headers={"Authorization": f"Bearer {fleet.token}", "Content-Type": "application/json"},
        )
        assert answer.status_code == 413 and "too large" in answer.json()["error"]
        small = requests.post(
            f"{fleet.url}/hooks/alertmanager",
            data=iter([service_down("00000000000000cc")]),
            timeout=10,
            headers={"Authorization": f"Bearer {fleet.token}"},
        )
        assert small.status_code == 202


def test_the_ledger_stopped_mid_run_is_503_at_the_edge_and_the_run_finishes_once_when_it_returns(
    tmp_path, api_container, private_postgres
):
    """Issue 8, fault 2, with a private PostgreSQL cluster as the ledger: stopped while a
    worker is inside a step (held there by the test hook), the edge answers 503 (Alertmanager
    retries), the step's ledger write waits for the server, and once it is back the run
    finishes exactly once; the retried alert is then recorded once."""
    from datetime import UTC, datetime, timedelta

    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    (hold_dir / "hold-restart_service-verify").touch()
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": private_postgres.url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
    }
    before = started_at(api_container)
    with Fleet(tmp_path, config(api_container.name), env).start("web", "worker") as fleet:
        first = fleet.post_alerts(service_down("00000000000000d1")).json()["alerts"][0]
        assert first["outcome"] == "act"
        fleet.wait(lambda: (hold_dir / f"held-{first['run_id']}-verify").exists(), 60, "the verify step held")

        private_postgres.stop()
        second = service_down("00000000000000d2", starts_at="2026-12-03T11:30:00Z")
        refused = fleet.post_alerts(second)
        assert refused.status_code == 503, refused.text  # not recorded: Alertmanager sends it again
        (hold_dir / "hold-restart_service-verify").unlink()  # the step ends; its write finds no server
        time.sleep(3)
        private_postgres.start()
        back = datetime.now(UTC)

        run = fleet.wait_run(first["run_id"], timeout=90)
        assert run["status"] == "succeeded", run
        assert [s["name"] for s in run["steps"]] == ["locate", "restart", "verify"]
        assert all(s["status"] == "succeeded" for s in run["steps"])
        # Its end was written once the server was back: the write waited, it was not lost.
        assert datetime.fromisoformat(run["steps"][2]["finished_at"]) >= back - timedelta(seconds=1)
        assert started_at(api_container) != before

        again = fleet.post_alerts(second)  # Alertmanager's retry
        assert again.status_code == 202, again.text
        retried = again.json()["alerts"][0]
        assert retried["outcome"] == "act", retried
        assert fleet.wait_run(retried["run_id"], timeout=90)["status"] == "succeeded"
        runs = fleet.runs()
        assert sorted(r["id"] for r in runs) == sorted({first["run_id"], retried["run_id"]}), runs
