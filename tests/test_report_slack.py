"""Slack reports against the local recorder: one thread per run, escaping, 429, outage."""

from __future__ import annotations

import pytest

from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config

HOSTILE = "<!channel> hi <@U024BE7LH> & <https://evil.example|click> `x`"


@pytest.fixture
def reporting(tmp_path, slack):
    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}, "slack": {"channel": "#ops-test"}},
        source="t",
        base_dir=tmp_path,
        environ={"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.base_url},
    )
    app = create_celery(loaded)
    ledger = app.opsfleet.ledger
    ledger.migrate()
    run_id = (
        ledger.record_event(
            source="alertmanager",
            summary="",
            body="",
            new_runs=[
                NewRun(trigger="alert", playbook="restart_service", target="api", summary=HOSTILE, dedup_key="k")
            ],
        )
        .runs[0]
        .id
    )
    ledger.claim_run(run_id, "w", 60)
    ledger.begin_step(run_id, 0, "locate", 60)
    ledger.end_step(run_id, 0, "succeeded", "found " + HOSTILE, 60)
    ledger.finish_run(run_id, "succeeded")
    report = app.tasks["opsfleet.report.slack"]
    return app, ledger, run_id, report


def test_one_thread_per_run_and_text_is_escaped(reporting, slack):
    app, ledger, run_id, report = reporting
    assert report.apply(args=(run_id,)).get() == "delivered"
    assert report.apply(args=(run_id,)).get() == "delivered"  # again: nothing new to post
    [thread] = slack.threads().values()
    assert len(thread["replies"]) == 1
    texts = [thread["parent"]["text"], thread["replies"][0]["text"]]
    for text in texts:
        assert "<!channel>" not in text and "<@U024BE7LH>" not in text and "<https://evil" not in text
        assert "&lt;!channel&gt;" in text and "&amp;" in text
    assert ledger.get_run(run_id)["slack_ts"] == next(iter(slack.threads()))


def test_rate_limit_is_waited_out(reporting, slack):
    app, ledger, run_id, report = reporting
    slack.fail_next("chat.postMessage", times=1, status=429, retry_after=1)
    assert report.apply(args=(run_id,)).get() == "delivered"
    statuses = [c.status for c in slack.calls if c.method == "chat.postMessage"]
    assert statuses[0] == 429 and statuses.count(200) == 2  # parent (after the 429) and one reply
    assert len(slack.threads()) == 1


def test_a_429_holds_no_worker_the_retry_waits_its_retry_after_and_a_500_is_retried_at_once(reporting, slack):
    import time

    from worker.adapters.slack import SlackError

    app, ledger, run_id, report = reporting
    slack.fail_next("chat.postMessage", times=1, status=429, retry_after=20)
    began = time.monotonic()
    with pytest.raises(SlackError) as err:
        app.opsfleet.slack.post("#ops-test", "x")
    assert time.monotonic() - began < 5 and err.value.retry_after == 20  # raised, not slept through

    # The task asks Celery to retry no sooner than Slack said (a retry waits in the broker).
    asked = []
    real_retry = report.retry

    def retry(*args, **kwargs):
        asked.append(kwargs.get("countdown"))
        return real_retry(*args, **kwargs)

    report.retry = retry
    try:
        slack.fail_next("chat.postMessage", times=1, status=429, retry_after=20)
        assert report.apply(args=(run_id,)).get() == "delivered"
    finally:
        del report.retry
    assert asked and asked[0] >= 20

    slack.fail_next("chat.update", times=1, status=500)
    with ledger._tx() as conn:  # make the parent need an update
        from worker.adapters.ledger import runs

        conn.execute(runs.update().where(runs.c.id == run_id).values(reported_status="running"))
    assert report.apply(args=(run_id,)).get() == "delivered"
    updates = [c.status for c in slack.calls if c.method == "chat.update"]
    assert updates[-2:] == [500, 200]  # slack-sdk's one quick retry


def test_slack_refusing_is_retried_then_recorded_undelivered(reporting, slack):
    app, ledger, run_id, report = reporting
    slack.fail_next("chat.postMessage", times=100, error="channel_not_found")
    assert report.apply(args=(run_id,)).get() == "undelivered"
    attempts = [c for c in slack.calls if c.method == "chat.postMessage"]
    assert len(attempts) == report.max_retries + 1
    assert ledger.get_run(run_id)["slack_ts"] is None
    assert ledger.lock_report(run_id, 1), "the report lock was released"


def test_no_token_means_no_report(tmp_path):
    loaded = parse_config({"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ={})
    app = create_celery(loaded)
    assert app.tasks["opsfleet.report.slack"].apply(args=(1,)).get() == "slack not configured"


def test_resolved_alert_closes_the_thread_with_the_time_it_took(reporting, slack):
    app, ledger, run_id, report = reporting
    assert report.apply(args=(run_id,)).get() == "delivered"
    with ledger.intake() as tx:
        # the alert behind the run resolves (as the edge marks it)
        from worker.adapters.ledger import runs

        tx.conn.execute(runs.update().where(runs.c.id == run_id).values(fingerprint="f", alert_starts_at="s"))
        assert tx.resolve_alert_runs([("f", "s")]) == {run_id: ("f", "s")}
    assert report.apply(args=(run_id,)).get() == "delivered"
    [thread] = slack.threads().values()
    assert thread["replies"][-1]["text"].startswith(":large_green_circle: resolved after ")
    assert "resolved after" in thread["updates"][-1]["text"]
    assert report.apply(args=(run_id,)).get() == "delivered"
    assert len(slack.threads()[next(iter(slack.threads()))]["replies"]) == 2  # said once


def test_skipped_runs_are_not_posted(tmp_path, slack):
    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}},
        source="t",
        base_dir=tmp_path,
        environ={"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.base_url},
    )
    app = create_celery(loaded)
    app.opsfleet.ledger.migrate()
    run_id = (
        app.opsfleet.ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[NewRun(trigger="alert", playbook="restart_service", status="skipped", reason="locked: run 1")],
        )
        .runs[0]
        .id
    )
    assert app.tasks["opsfleet.report.slack"].apply(args=(run_id,)).get() == "skipped runs are not posted"
    assert slack.calls == []


def test_a_reporter_killed_holding_the_report_lock_is_reported_again_by_the_sweeper_once(reporting, slack, tmp_path):
    """Found by bench/soak: a worker SIGKILLed while it reported a run took the report along (and
    the retries of later reports, waiting in it for the lock): the run's Slack thread said
    "running" long after it had ended. The dead reporter's lock lapses (it lasts the report task's
    hard limit); the sweeper then asks for the report again, once."""
    import json

    app, ledger, run_id, report = reporting
    sweep = app.tasks["opsfleet.sweeper.sweep"]
    assert ledger.lock_report(run_id, seconds=-1)  # taken by a reporter that died: lapsed
    busy = (
        ledger.record_event(
            source="t", summary="", body="", new_runs=[NewRun(trigger="manual", playbook="verify", target="api")]
        )
        .runs[0]
        .id
    )
    assert ledger.lock_report(busy, seconds=150)  # a live reporter's: left alone

    swept = sweep.apply().get()
    queue = tmp_path / "broker" / "queue"
    sent = [json.loads(p.read_text())["headers"] for p in queue.iterdir()]
    assert [h["argsrepr"] for h in sent if h["task"] == "opsfleet.report.slack"] == [f"({run_id},)"]
    assert swept["reports"] == [run_id]
    assert sweep.apply().get()["reports"] == []  # once
    assert not ledger.lock_report(busy, seconds=150)

    assert report.apply(args=(run_id,)).get() == "delivered"
    [thread] = slack.threads().values()
    assert "*succeeded*" in thread["parent"]["text"]
    assert ledger.get_run(run_id)["reported_status"] == "succeeded"


def test_only_lapsed_report_locks_are_taken_and_each_once(ledger):
    made = ledger.record_event(
        source="t",
        summary="",
        body="",
        new_runs=[NewRun(trigger="manual", playbook=p, target="api") for p in ("verify", "deploy", "verify")],
    )
    lapsed, live, free = (r.id for r in made.runs)
    assert ledger.lock_report(lapsed, seconds=-1) and ledger.lock_report(live, seconds=150)
    assert ledger.take_lapsed_report_locks() == [(lapsed, "verify")]
    assert ledger.take_lapsed_report_locks() == []
    assert ledger.lock_report(lapsed, seconds=150), "its lock was cleared"
    assert not ledger.lock_report(live, seconds=150)
    assert ledger.lock_report(free, seconds=150)
