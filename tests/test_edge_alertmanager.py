"""POST /hooks/alertmanager in-process, on the real fixtures Alertmanager sent.

Embedded defaults (SQLite ledger, filesystem broker in a temp dir), so the
broker's content can be counted: bad input must leave nothing in either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from webhooks import create_app
from worker.config import ConfigError, parse_config

# Real bodies a real Alertmanager sent (copied from the team's shared fixtures; see their README).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alertmanager"
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = {
    "services": {"node-a": {"container": "node-a"}, "api": {"container": "shop-api"}},
    "remediation": {
        "rules": [
            {
                "name": "mem",
                "match": ['alertname="HighMemoryUsage"'],
                "playbook": "restart_service",
                "target": {"service": "api"},
            },
            {
                "name": "disk",
                "match": ['alertname="DiskSpaceLow"'],
                "playbook": "restart_service",
                "target": {"service_label": "instance"},
            },
            {
                "name": "down",
                "match": ['alertname="InstanceDown"'],
                "playbook": "restart_service",
                "target": {"service": "api"},
                "dry_run": True,
            },
        ]
    },
}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def edge(tmp_path):
    def make(environ=None):
        env = {"ALERTMANAGER_TOKEN": TOKEN, **(environ or {})}
        raw = {**CONFIG, "fleet": {"data_dir": str(tmp_path / "data")}}
        loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=env)
        app = create_app(loaded=loaded)
        return app, app.test_client(), loaded

    return make


def broker_messages(loaded) -> int:
    return sum(1 for p in (loaded.data_dir / "broker" / "queue").glob("*") if p.is_file())


def ledger_of(app):
    return app.extensions["opsfleet"].ledger


def test_firing_alert_is_committed_then_enqueued(edge):
    app, client, loaded = edge()
    answer = client.post("/hooks/alertmanager", data=fixture("firing-single.json"), headers=AUTH)
    assert answer.status_code == 202, answer.json
    [run_id] = answer.json["runs"]
    assert answer.json["enqueued"] == [run_id]
    run = ledger_of(app).get_run(run_id)
    assert (run["status"], run["target"], run["rule"], run["trigger"]) == ("queued", "api", "mem", "alert")
    assert run["dedup_key"] == "alert:mem:e8e9b2de89742649:2026-12-03T18:44:29.678702744Z"
    assert broker_messages(loaded) == 1


def test_repeat_of_handled_alert_is_counted_not_run_again(edge):
    app, client, loaded = edge()
    first = client.post("/hooks/alertmanager", data=fixture("firing-single.json"), headers=AUTH).json
    again = client.post("/hooks/alertmanager", data=fixture("firing-single.json"), headers=AUTH).json
    assert again["runs"] == first["runs"] and again["enqueued"] == []
    assert again["alerts"][0]["outcome"] == "repeat"
    assert ledger_of(app).get_run(first["runs"][0])["repeats"] == 1
    assert broker_messages(loaded) == 1


def test_group_label_selects_configured_service_or_records_a_skip(edge):
    app, client, _ = edge()
    answer = client.post("/hooks/alertmanager", data=fixture("firing-group-3.json"), headers=AUTH).json
    # instance is "node-a:9100" etc.: a label value, not a configured service name
    assert [(a["outcome"], a["target"]) for a in answer["alerts"]] == [("skip", None)] * 3
    skipped = [ledger_of(app).get_run(a["run_id"]) for a in answer["alerts"]]
    assert all(r["status"] == "skipped" and "no configured service" in r["reason"] for r in skipped)
    # a resend of the same group records no further runs
    again = client.post("/hooks/alertmanager", data=fixture("firing-group-3.json"), headers=AUTH).json
    assert again["runs"] == answer["runs"]


def test_resolved_alerts_never_act(edge):
    app, client, loaded = edge()
    answer = client.post("/hooks/alertmanager", data=fixture("resolved-single.json"), headers=AUTH)
    assert answer.status_code == 202 and answer.json["runs"] == []
    mixed = client.post("/hooks/alertmanager", data=fixture("firing-group-with-one-resolved.json"), headers=AUTH).json
    resolved = [a for a in mixed["alerts"] if a["outcome"] == "ignore"]
    assert len(resolved) == 1 and "resolved" in resolved[0]["reason"]


def test_truncated_group_acts_on_present_alerts_and_records_truncation(edge):
    app, client, _ = edge()
    answer = client.post("/hooks/alertmanager", data=fixture("firing-truncated-max-alerts-2.json"), headers=AUTH).json
    assert answer["truncated_alerts"] == 3
    assert [a["outcome"] for a in answer["alerts"]] == ["dry_run", "dry_run"]
    with ledger_of(app).engine.connect() as conn:
        summary = conn.exec_driver_sql("select summary from events order by id desc limit 1").scalar()
    assert "3 truncated" in summary


BAD = [
    # (headers, body, status, error contains)
    ({}, fixture("firing-single.json"), 401, "unauthorized"),
    ({"Authorization": "Bearer wrong"}, fixture("firing-single.json"), 401, "unauthorized"),
    ({"Authorization": f"Basic {TOKEN}"}, fixture("firing-single.json"), 401, "unauthorized"),
    (AUTH, b"not json", 400, "not JSON"),
    (AUTH, b"\xff\xfe\x00", 400, "not UTF-8"),
    (AUTH, fixture("firing-single.json").decode().encode("utf-16"), 400, "not UTF-8"),
    (AUTH, b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (AUTH, b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "nested too deeply"),
    (AUTH, fixture("firing-single.json").replace(b'"severity":"warning"', b'"severity":"\\ud800"'), 400, "surrogate"),
    (AUTH, fixture("firing-single.json").replace(b'"severity":"warning"', b'"severity":"a\\u0000b"'), 400, "NUL"),
    (
        AUTH,
        fixture("firing-single.json").replace(b'"version":"4"', b'"version":4'),
        400,
        'version must be the string \\"4\\"',
    ),
    (
        AUTH,
        fixture("firing-single.json").replace(
            b'"startsAt":"2026-12-03T18:44:29.678702744Z"', b'"startsAt":"2026-13-45T99:99:99Z"'
        ),
        400,
        "not a real time",
    ),
    (AUTH, b"[1, 2]", 400, "not an Alertmanager version 4 payload"),
    (
        AUTH,
        fixture("firing-single.json").replace(b'"truncatedAlerts":0', b'"truncatedAlerts":NaN'),
        400,
        "NaN is not a JSON number",
    ),
    (AUTH, b'{"version": "4", "x": -Infinity}', 400, "-Infinity is not a JSON number"),
    (AUTH, b'{"version": "4", "x": ' + b"9" * 5000 + b"}", 400, "a number has 5000 digits (at most 4300 accepted)"),
    (AUTH, b'{"version": "4", "alerts": "x"}', 400, "not an Alertmanager version 4 payload"),
    (AUTH, fixture("firing-single.json").replace(b'"version":"4"', b'"version":"3"'), 400, "unsupported"),
    (AUTH, fixture("firing-single.json").replace(b'"severity":"warning"', b'"severity":5'), 400, "labels"),
    (
        AUTH,
        fixture("firing-single.json").replace(b'"fingerprint":"e8e9b2de89742649"', b'"fingerprint":"../x"'),
        400,
        "fingerprint",
    ),
    (AUTH, fixture("firing-single.json").replace(b'"startsAt":"2026', b'"startsAt":"yesterday'), 400, "startsAt"),
    (AUTH, json.dumps({**json.loads(fixture("firing-single.json")), "alerts": []}).encode(), 400, "alerts"),
    (AUTH, b"{" + b" " * (10 * 1024 * 1024) + b"}", 413, "too large"),
]


@pytest.mark.parametrize("headers,body,status,reason", BAD)
def test_bad_input_is_refused_and_leaves_nothing(edge, headers, body, status, reason):
    app, client, loaded = edge()
    answer = client.post("/hooks/alertmanager", data=body, headers=headers)
    assert answer.status_code == status
    assert reason in json.dumps(answer.json)
    assert ledger_of(app).count_events() == 0
    assert broker_messages(loaded) == 0


def test_auth_failure_reveals_nothing(edge):
    _, client, _ = edge()
    answer = client.post("/hooks/alertmanager", data=b"x", headers={"Authorization": "Bearer wrong"})
    assert answer.json == {"error": "unauthorized"}


def test_ledger_unreachable_answers_503_so_alertmanager_retries(edge):
    from tests.support.servers import free_port

    app, client, loaded = edge({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nope"})
    answer = client.post("/hooks/alertmanager", data=fixture("firing-single.json"), headers=AUTH)
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert broker_messages(loaded) == 0
    assert client.get("/readyz").status_code == 503


def test_broker_down_still_answers_202_and_leaves_run_for_the_sweeper(edge):
    from tests.support.servers import free_port

    app, client, _ = edge({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    answer = client.post("/hooks/alertmanager", data=fixture("firing-single.json"), headers=AUTH)
    assert answer.status_code == 202 and answer.json["enqueued"] == []
    run = ledger_of(app).get_run(answer.json["runs"][0])
    assert run["status"] == "queued" and run["enqueued_at"] is None


def test_no_token_configured_refuses_to_start(tmp_path):
    loaded = parse_config({}, source="t", base_dir=tmp_path, environ={})
    with pytest.raises(ConfigError, match="ALERTMANAGER_TOKEN"):
        create_app(loaded=loaded)


def test_metrics_count_webhook_outcomes(edge):
    _, client, _ = edge()
    client.post("/hooks/alertmanager", data=b"x", headers={"Authorization": "Bearer wrong"})
    text = client.get("/metrics").data.decode()
    assert 'opsfleet_webhook_requests_total{code="401",source="alertmanager"}' in text


def test_every_alert_outcome_is_exported_from_the_start(edge):
    # OpsfleetRemediationCapReached uses increase() on the escalate outcome: a series born at 1
    # would hide the first escalation after a restart.
    _, client, _ = edge()
    text = client.get("/metrics").data.decode()
    for outcome in ("act", "dry_run", "skip", "escalate", "ignore", "repeat"):
        assert f'opsfleet_alert_decisions_total{{outcome="{outcome}"}}' in text, outcome
