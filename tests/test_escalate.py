"""The escalate playbook against a real Alertmanager and the Slack recorder:
the page reaches Alertmanager even when Slack is down."""

from __future__ import annotations

import pytest
import requests

from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config


@pytest.fixture
def escalation(tmp_path, slack, make_alertmanager):
    am = make_alertmanager("http://127.0.0.1:9/unused")  # its own receiver is not under test here
    loaded = parse_config(
        {
            "fleet": {"data_dir": str(tmp_path), "public_url": "https://ops.example.com"},
            "slack": {"channel": "#ops"},
            "escalation": {"slack_mention": "<!subteam^S0123>", "alertmanager_url": am.url},
        },
        source="t",
        base_dir=tmp_path,
        environ={"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.base_url},
    )
    app = create_celery(loaded)
    app.conf.task_always_eager = True  # the chain runs here, synchronously
    ledger = app.opsfleet.ledger
    ledger.migrate()
    for status in ("succeeded", "failed"):  # what was tried before
        tried = (
            ledger.record_event(
                source="t",
                summary="",
                body="",
                new_runs=[
                    NewRun(trigger="alert", playbook="restart_service", rule="down", target="api", dedup_key=status)
                ],
            )
            .runs[0]
            .id
        )
        ledger.claim_run(tried, "w", 60)
        ledger.finish_run(tried, status, "verify failed" if status == "failed" else "")
    run_id = (
        ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[
                NewRun(
                    trigger="alert",
                    playbook="escalate",
                    rule="down",
                    target="api",
                    params={"reason": "cap reached: 3 actions within 1h", "alert": "ServiceDown <!channel> on api"},
                )
            ],
        )
        .runs[0]
        .id
    )
    return app, ledger, run_id, am


def am_escalations(am) -> list[dict]:
    alerts = requests.get(f"{am.url}/api/v2/alerts", timeout=5).json()
    return [a for a in alerts if a["labels"].get("alertname") == "OpsfleetEscalation"]


def test_escalation_pages_alertmanager_and_slack(escalation, slack):
    app, ledger, run_id, am = escalation
    app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
    run = ledger.get_run(run_id)
    assert run["status"] == "succeeded", run
    [posted] = am_escalations(am)
    assert posted["labels"]["rule"] == "down" and posted["labels"]["target"] == "api"
    assert posted["labels"]["severity"] == "critical" and posted["labels"]["opsfleet_run"] == str(run_id)
    assert "run #" in posted["annotations"]["description"]  # what was tried
    assert posted["generatorURL"] == f"https://ops.example.com/runs/{run_id}"  # the run on the status page
    [page] = [c for c in slack.calls if c.method == "chat.postMessage"]
    text = page.params["text"]
    assert text.startswith("<!subteam^S0123>")
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text  # the alert's text is escaped
    assert "restart_service: failed" in text
    assert f"<https://ops.example.com/runs/{run_id}|escalation run #{run_id}>" in text


def test_slack_down_still_reaches_alertmanager(escalation, slack):
    app, ledger, run_id, am = escalation
    slack.fail_next("chat.postMessage", times=50, error="channel_not_found")
    app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
    run = ledger.get_run(run_id)
    # The page reached a person through Alertmanager: the escalation did its job, and says Slack failed.
    assert [(s["name"], s["status"]) for s in run["steps"]] == [
        ("alertmanager", "succeeded"),
        ("page_slack", "succeeded"),
    ]
    assert run["status"] == "succeeded"
    assert "Slack page failed" in run["steps"][1]["output"] and "channel_not_found" in run["steps"][1]["output"]
    assert len(am_escalations(am)) == 1


def test_an_escalation_with_no_path_to_a_person_fails(tmp_path):
    loaded = parse_config({"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ={})
    app = create_celery(loaded)
    app.conf.task_always_eager = True
    ledger = app.opsfleet.ledger
    ledger.migrate()
    new = NewRun(trigger="alert", playbook="escalate", rule="down", target="api", params={"reason": "cap reached"})
    run_id = ledger.record_event(source="t", summary="", body="", new_runs=[new]).runs[0].id
    app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
    run = ledger.get_run(run_id)
    assert [(s["name"], s["status"]) for s in run["steps"]] == [("alertmanager", "succeeded"), ("page_slack", "failed")]
    assert run["status"] == "failed" and "nobody was paged" in run["reason"]
