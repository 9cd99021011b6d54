"""Remediation safety through the real edge and ledger (SQLite and PostgreSQL):
repeats, resolves, locks, caps, storms and cooldowns, each decided once.

No worker runs here: a queued run is a target "being worked on", and a fix
is simulated by finishing the run in the ledger.
"""

from __future__ import annotations

import json

import pytest

from webhooks import create_app
from worker.config import parse_config

TOKEN = "safety-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def payload(*alerts: dict, truncated: int = 0, status: str = "firing") -> bytes:
    return json.dumps(
        {
            "version": "4",
            "status": status,
            "receiver": "fleet",
            "groupKey": "{}:{}",
            "truncatedAlerts": truncated,
            "groupLabels": {},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "",
            "alerts": list(alerts),
        }
    ).encode()


def alert(
    service: str,
    fingerprint: str,
    starts_at: str = "2026-12-03T10:00:00Z",
    status: str = "firing",
    alertname: str = "ServiceDown",
) -> dict:
    return {
        "status": status,
        "labels": {"alertname": alertname, "service": service},
        "annotations": {},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "",
        "fingerprint": fingerprint,
    }


def config(**rule_overrides) -> dict:
    services = {f"svc-{i}": {"container": f"svc-{i}"} for i in range(40)}
    return {
        "services": {"api": {"container": "shop-api"}, **services},
        "remediation": {
            "defaults": {
                "cooldown_seconds": 0,
                "cap": {"max_actions": 3, "window_seconds": 3600},
                "storm": {"max_targets": 10, "window_seconds": 300},
            },
            "rules": [
                {
                    "name": "down",
                    "match": ['alertname="ServiceDown"'],
                    "playbook": "restart_service",
                    "target": {"service_label": "service"},
                    **rule_overrides,
                },
            ],
        },
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def edge(request, tmp_path):
    """make(config) -> (client, ledger); each call is a fresh app (a restarted web) on the same ledger."""
    from tests.support.servers import shared_postgres_database

    with shared_postgres_database() if request.param == "postgresql" else _nothing() as url:
        environ = {"ALERTMANAGER_TOKEN": TOKEN, **({"DATABASE_URL": url} if url else {})}

        def make(raw: dict):
            loaded = parse_config(
                {**raw, "fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ=environ
            )
            app = create_app(loaded=loaded)
            return app.test_client(), app.extensions["opsfleet"].ledger

        yield make


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def post(client, body: bytes) -> dict:
    answer = client.post("/hooks/alertmanager", data=body, headers=AUTH)
    assert answer.status_code == 202, answer.json
    return answer.json


def fix(ledger, run_id: int) -> None:
    """What a worker does to a run that succeeds."""
    assert ledger.claim_run(run_id, "test-worker", 60)
    assert ledger.finish_run(run_id, "succeeded")


def outcomes(answer: dict) -> list[str]:
    return [a["outcome"] for a in answer["alerts"]]


def test_five_alerts_for_a_target_being_worked_on_make_one_run(edge):
    client, ledger = edge(config())
    answers = [post(client, payload(alert("api", f"{i:016x}"))) for i in range(5)]
    assert [outcomes(a)[0] for a in answers] == ["act", "skip", "skip", "skip", "skip"]
    first_run = answers[0]["alerts"][0]["run_id"]
    for answer in answers[1:]:
        run = ledger.get_run(answer["alerts"][0]["run_id"])
        assert run["status"] == "skipped" and run["reason"] == f"locked: run {first_run} is working on this target"
    assert len(ledger.list_runs(status="queued")) == 1


def test_same_target_twice_in_one_group_acts_once(edge):
    client, ledger = edge(config())
    answer = post(client, payload(alert("api", "00000000000000a1"), alert("api", "00000000000000a2")))
    assert outcomes(answer) == ["act", "skip"]
    assert answer["alerts"][1]["reason"] == f"locked: run {answer['alerts'][0]['run_id']} is working on this target"


def test_firing_then_resolved_is_one_action_and_marks_the_run_resolved(edge):
    client, ledger = edge(config())
    fired = post(client, payload(alert("api", "00000000000000b1")))
    again = post(client, payload(alert("api", "00000000000000b1")))  # group_interval resend
    resolved = post(client, payload(alert("api", "00000000000000b1", status="resolved"), status="resolved"))
    run_id = fired["alerts"][0]["run_id"]
    assert outcomes(again) == ["repeat"] and outcomes(resolved) == ["ignore"]
    assert resolved["resolved_runs"] == [run_id]
    run = ledger.get_run(run_id)
    assert run["resolved_at"] is not None and run["repeats"] == 1
    assert len(ledger.list_runs()) == 1


def test_group_with_a_resolved_alert_acts_only_for_the_firing_ones(edge):
    client, ledger = edge(config())
    answer = post(
        client, payload(alert("svc-1", "00000000000000c1"), alert("svc-2", "00000000000000c2", status="resolved"))
    )
    assert outcomes(answer) == ["act", "ignore"]
    assert [r["target"] for r in ledger.list_runs()] == ["svc-1"]


def test_alert_that_keeps_coming_back_stops_at_the_cap_then_escalates_once(edge):
    client, ledger = edge(config())
    seen = []
    for i in range(6):
        answer = post(client, payload(alert("api", "00000000000000d1", starts_at=f"2026-12-03T10:0{i}:00Z")))
        seen.append(outcomes(answer)[0])
        if seen[-1] == "act":
            fix(ledger, answer["alerts"][0]["run_id"])
        if seen[-1] == "escalate":
            escalation = ledger.get_run(answer["alerts"][0]["escalation_run_id"])
    assert seen == ["act", "act", "act", "escalate", "skip", "skip"]
    assert (escalation["playbook"], escalation["status"], escalation["target"]) == ("escalate", "queued", "api")
    assert escalation["params"]["reason"].startswith("cap reached: 3 actions within 1h")
    assert len(ledger.list_runs(status="queued")) == 1  # only the escalation waits to run


def test_forty_targets_in_one_group_trip_the_storm_breaker(edge):
    client, ledger = edge(config())
    answer = post(client, payload(*(alert(f"svc-{i}", f"{i:016x}") for i in range(40))))
    assert outcomes(answer) == ["escalate"] + ["skip"] * 39
    assert all(a["reason"].startswith("storm: 40 targets") for a in answer["alerts"])
    queued = ledger.list_runs(status="queued")
    assert len(queued) == 1 and queued[0]["playbook"] == "escalate" and queued[0]["target"] is None
    assert queued[0]["params"]["storm"] is True
    assert queued[0]["params"]["alert"].startswith(
        "ServiceDown firing for 40 targets in this notification: svc-0, svc-1"
    )
    # The storm goes on: more alerts for the rule, no action and no second escalation.
    later = post(client, payload(alert("svc-0", "00000000000000e0", starts_at="2026-12-03T10:01:00Z")))
    assert outcomes(later) == ["skip"] and len(ledger.list_runs(status="queued")) == 1


def test_truncated_alerts_count_towards_the_storm(edge):
    client, _ = edge(config())
    small = post(client, payload(alert("svc-1", "00000000000000f1"), alert("svc-2", "00000000000000f2"), truncated=5))
    assert outcomes(small) == ["act", "act"]  # 2 + 5 truncated = 7, under 10
    big = post(client, payload(alert("svc-3", "00000000000000f3"), alert("svc-4", "00000000000000f4"), truncated=9))
    assert outcomes(big) == ["escalate", "skip"]  # 4 seen + 9 truncated = 13


def test_cooldown_survives_a_restart_of_the_web(edge):
    raw = config(cooldown_seconds=600)
    client, ledger = edge(raw)
    first = post(client, payload(alert("api", "0000000000000011")))
    fix(ledger, first["alerts"][0]["run_id"])
    restarted, _ = edge(raw)  # a new app, new connections: only the ledger remembers
    second = post(restarted, payload(alert("api", "0000000000000011", starts_at="2026-12-03T10:05:00Z")))
    assert outcomes(second) == ["skip"] and second["alerts"][0]["reason"].startswith("cooldown: acted 0s ago")


def test_dry_run_records_what_it_would_do(edge):
    client, ledger = edge(config(dry_run=True))
    answer = post(client, payload(alert("api", "0000000000000021")))
    run = ledger.get_run(answer["alerts"][0]["run_id"])
    assert (run["status"], run["reason"]) == ("skipped", "dry run: would restart_service api")
    assert answer["enqueued"] == []


def test_a_firing_skipped_while_locked_acts_on_a_resend_once_the_lock_is_gone(edge):
    client, ledger = edge(config())
    first = post(client, payload(alert("api", "0000000000000031")))
    locked = post(client, payload(alert("api", "0000000000000032")))
    assert outcomes(locked) == ["skip"]
    again = post(client, payload(alert("api", "0000000000000032")))  # group_interval resend, still locked
    assert outcomes(again) == ["skip"] and again["alerts"][0]["run_id"] == locked["alerts"][0]["run_id"]
    fix(ledger, first["alerts"][0]["run_id"])
    resend = post(client, payload(alert("api", "0000000000000032")))
    assert outcomes(resend) == ["act"] and resend["enqueued"] == [locked["alerts"][0]["run_id"]]
    run = ledger.get_run(locked["alerts"][0]["run_id"])
    assert (run["status"], run["reason"], run["repeats"]) == ("queued", "rule matched", 2)
    assert outcomes(post(client, payload(alert("api", "0000000000000032")))) == ["repeat"]  # acted: now final


def test_a_firing_skipped_in_cooldown_acts_on_a_resend_after_the_cooldown(edge):
    from datetime import timedelta

    import sqlalchemy as sa

    from worker.adapters.ledger import runs

    client, ledger = edge(config(cooldown_seconds=600))
    first = post(client, payload(alert("api", "0000000000000041")))
    fix(ledger, first["alerts"][0]["run_id"])
    cooling = post(client, payload(alert("api", "0000000000000041", starts_at="2026-12-03T10:10:00Z")))
    assert outcomes(cooling) == ["skip"] and cooling["alerts"][0]["reason"].startswith("cooldown:")
    # Ten minutes pass: move the first action back in time.
    first_id = first["alerts"][0]["run_id"]
    earlier = ledger.get_run(first_id)["created_at"] - timedelta(seconds=601)
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.id == first_id).values(created_at=earlier))
    resend = post(client, payload(alert("api", "0000000000000041", starts_at="2026-12-03T10:10:00Z")))
    assert outcomes(resend) == ["act"] and resend["alerts"][0]["run_id"] == cooling["alerts"][0]["run_id"]


def test_a_rule_that_escalates_pages_with_the_alert(edge):
    raw = config()
    raw["remediation"]["rules"].insert(
        0, {"name": "db-down", "match": ['alertname="DatabaseConnectionFailure"'], "playbook": "escalate"}
    )
    client, ledger = edge(raw)
    answer = post(client, payload(alert("api", "0000000000000051", alertname="DatabaseConnectionFailure")))
    run = ledger.get_run(answer["alerts"][0]["run_id"])
    assert (run["playbook"], run["status"], run["target"]) == ("escalate", "queued", None)
    assert run["params"]["reason"] == "DatabaseConnectionFailure matched rule db-down"
    assert run["params"]["alert"].startswith(
        "DatabaseConnectionFailure firing since 2026-12-03T10:00:00Z (service=api)"
    )


def notification(*alerts: dict, truncated: int = 0):
    from worker.decide import Alert
    from worker.tasks.intake import AlertNotification

    parsed = [Alert(a["status"], a["labels"], a["fingerprint"], a["startsAt"]) for a in alerts]
    return AlertNotification(parsed, truncated, f"{len(parsed)} alerts", payload(*alerts, truncated=truncated).decode())


def test_notifications_committed_together_are_decided_as_if_one_after_another(edge):
    """The group commit (webhooks.batching) hands several notifications to one transaction."""
    from worker.tasks.intake import accept_alert_batch

    client, ledger = edge(config())
    celery = client.application.extensions["opsfleet"].celery
    first, twin, other, resolved = accept_alert_batch(
        celery,
        [
            notification(alert("api", "00000000000000g1")),
            notification(alert("api", "00000000000000g1")),  # the HA peer's copy
            notification(alert("api", "00000000000000g2")),
            notification(alert("api", "00000000000000g1", status="resolved")),
        ],
    )
    run_id = first.decisions[0]["run_id"]
    assert [i.decisions[0]["outcome"] for i in (first, twin, other, resolved)] == ["act", "repeat", "skip", "ignore"]
    assert twin.decisions[0]["run_id"] == run_id and first.enqueued == [run_id] and twin.enqueued == []
    # Decided before that run had an id; named once it has one, in the answer and the ledger.
    assert other.decisions[0]["reason"] == f"locked: run {run_id} is working on this target"
    assert ledger.get_run(other.decisions[0]["run_id"])["reason"] == other.decisions[0]["reason"]
    assert resolved.resolved_runs == [run_id] and first.resolved_runs == []
    assert len({i.event_id for i in (first, twin, other, resolved)}) == 4
    run = ledger.get_run(run_id)
    assert run["repeats"] == 1 and run["resolved_at"] is not None
    assert len(ledger.list_runs()) == 2


def test_each_notification_of_a_batch_brings_its_own_truncated_count_to_the_storm_breaker(edge):
    from worker.tasks.intake import accept_alert_batch

    client, _ = edge(config())
    celery = client.application.extensions["opsfleet"].celery
    small, big = accept_alert_batch(
        celery,
        [
            notification(alert("svc-1", "00000000000000h1")),
            notification(alert("svc-2", "00000000000000h2"), truncated=9),
        ],
    )
    # Both subjects are in the rule's window; only the second adds 9 truncated: 2 + 9 > 10.
    assert small.decisions[0]["outcome"] == "act" and big.decisions[0]["outcome"] == "escalate"


def test_concurrent_requests_for_one_target_act_once_and_all_get_their_answer(edge):
    """Request threads of one web process (gunicorn gthread) post at once: one action, the rest locked."""
    import threading

    client, ledger = edge(config())
    app = client.application
    answers = []

    def one(i):
        answers.append(
            app.test_client().post("/hooks/alertmanager", data=payload(alert("api", f"{i:016x}")), headers=AUTH)
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [202] * 8
    assert sorted(outcomes(a.json)[0] for a in answers) == ["act"] + ["skip"] * 7
    assert len(ledger.list_runs(status="queued")) == 1 and len(ledger.list_runs()) == 8


def test_the_storm_breaker_counts_a_batch_in_order_as_when_its_notifications_came_one_by_one(edge):
    from worker.tasks.intake import accept_alert_batch

    client, ledger = edge(config())
    celery = client.application.extensions["opsfleet"].celery
    earlier = post(client, payload(alert("svc-0", "00000000000000j0")))  # in the window before the batch
    batch = accept_alert_batch(celery, [notification(alert(f"svc-{i}", f"{i:016x}")) for i in range(12)])
    # svc-0 again is a new firing of a subject the window holds: 1, then svc-1..svc-9 make 10, svc-10 the 11th.
    assert [i.decisions[0]["outcome"] for i in batch] == ["skip"] + ["act"] * 9 + ["escalate", "skip"]
    assert batch[0].decisions[0]["reason"] == f"locked: run {earlier['alerts'][0]['run_id']} is working on this target"
    assert len(ledger.list_runs(status="queued")) == 11  # the first action, nine more and one escalation


def test_intakes_of_subjects_that_fired_lately_share_the_rule_lock_and_a_new_subject_waits(tmp_path):
    """PostgreSQL: the storm breaker's rule lock is exclusive only for an intake that brings a
    subject new to the window; re-firings (a storm's bulk) decide in parallel."""
    import threading

    from tests.support.servers import shared_postgres_database
    from worker.tasks.intake import accept_alert_batch

    with shared_postgres_database() as url:
        environ = {"ALERTMANAGER_TOKEN": TOKEN, "DATABASE_URL": url}
        loaded = parse_config(
            {**config(), "fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ=environ
        )
        app = create_app(loaded=loaded)
        celery, ledger = app.extensions["opsfleet"].celery, app.extensions["opsfleet"].ledger
        assert outcomes(post(app.test_client(), payload(alert("svc-1", "00000000000000k1")))) == ["act"]

        def accept_in_thread(service, fingerprint):
            done = threading.Event()
            thread = threading.Thread(
                target=lambda: (accept_alert_batch(celery, [notification(alert(service, fingerprint))]), done.set())
            )
            thread.start()
            return done

        with ledger.intake() as holder:
            holder.lock([], ["rule:down"])  # another web process deciding re-firings of the rule
            refiring = accept_in_thread("svc-1", "00000000000000k2")
            assert refiring.wait(10), "a re-firing waited for a shared rule lock"
            new_subject = accept_in_thread("svc-2", "00000000000000k3")
            assert not new_subject.wait(1), "a subject new to the window did not wait to count alone"
        assert new_subject.wait(10)
        runs = sorted((r["target"], r["status"]) for r in ledger.list_runs())
        assert runs == [("svc-1", "queued"), ("svc-1", "skipped"), ("svc-2", "queued")]  # the re-firing: locked


def test_a_storm_on_a_rule_that_pages_is_escalated_once_like_any_other(edge):
    """The rule's own runs are escalations without a target too; the storm's is still told apart."""
    raw = config()
    raw["remediation"]["defaults"]["storm"] = {"max_targets": 3, "window_seconds": 300}
    raw["remediation"]["rules"].insert(
        0, {"name": "db-down", "match": ['alertname="DatabaseConnectionFailure"'], "playbook": "escalate"}
    )
    client, ledger = edge(raw)

    def db_alert(fingerprint):
        return alert("api", fingerprint, alertname="DatabaseConnectionFailure")

    assert outcomes(post(client, payload(db_alert("00000000000000m1"), db_alert("00000000000000m2")))) == ["act"] * 2
    storm = post(client, payload(*(db_alert(f"00000000000000n{i}") for i in range(3))))
    assert outcomes(storm) == ["escalate", "skip", "skip"]
    summary = ledger.get_run(storm["alerts"][0]["escalation_run_id"])
    assert summary["params"]["storm"] is True and summary["target"] is None


def test_a_failure_after_the_commit_answers_503_and_the_resend_is_a_repeat(edge, monkeypatch):
    """The notification is in the ledger; accepting it again one by one would record it twice."""
    from worker.tasks import intake

    client, ledger = edge(config())

    def broker_exploded(*args, **kwargs):
        raise OSError("metrics folder unwritable")

    monkeypatch.setattr(intake, "enqueue_runs", broker_exploded)
    body = payload(alert("api", "00000000000000p1"))
    failed = client.post("/hooks/alertmanager", data=body, headers=AUTH)
    assert failed.status_code == 503 and "recorded, but the answer failed" in failed.json["error"]
    monkeypatch.undo()
    assert outcomes(post(client, body)) == ["repeat"]
    [run] = ledger.list_runs()
    assert run["repeats"] == 1


def test_an_intake_that_waits_too_long_for_a_lock_gives_up(tmp_path, monkeypatch, caplog):
    """PostgreSQL: a lock held elsewhere (a stuck transaction of another web process) ends the
    intake at INTAKE_LOCK_TIMEOUT, not never; the edge answers 503 and the committer goes on."""
    import sqlalchemy as sa

    from tests.support.servers import shared_postgres_database
    from worker.adapters import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "INTAKE_LOCK_TIMEOUT", "200ms")
    with shared_postgres_database() as url:
        environ = {"ALERTMANAGER_TOKEN": TOKEN, "DATABASE_URL": url}
        raw = {**config(), "fleet": {"data_dir": str(tmp_path)}}
        app = create_app(loaded=parse_config(raw, source="t", base_dir=tmp_path, environ=environ))
        ledger = app.extensions["opsfleet"].ledger
        client = app.test_client()
        with ledger.intake() as holder:
            holder.lock(["target:api"])
            stuck = client.post("/hooks/alertmanager", data=payload(alert("api", "00000000000000q1")), headers=AUTH)
            assert stuck.status_code == 503 and stuck.headers["Retry-After"] == "5"
            assert "not recorded, each answered 503" in caplog.text and "lock timeout" in caplog.text
        assert outcomes(post(client, payload(alert("api", "00000000000000q1")))) == ["act"]
        with ledger._tx() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 1  # the stuck one left nothing
