"""The run machinery's tasks, executed in-process: duplicates and redeliveries do nothing."""

from __future__ import annotations

import pytest

from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import build_chain


@pytest.fixture
def engine(tmp_path):
    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}, "services": {"api": {"container": "never-touched"}}},
        source="t",
        base_dir=tmp_path,
        # Any Docker call would fail loudly: nothing here may reach Docker.
        environ={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    app = create_celery(loaded)
    ledger = app.opsfleet.ledger
    ledger.migrate()
    run_id = (
        ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[NewRun(trigger="alert", playbook="restart_service", target="api", dedup_key="k")],
        )
        .runs[0]
        .id
    )
    queue = tmp_path / "broker" / "queue"
    return app, ledger, run_id, lambda: sorted(p.name for p in queue.iterdir())


def test_chain_is_one_task_per_step_then_finish(engine):
    app, _, run_id, _ = engine
    chained = build_chain(app, run_id, "restart_service")
    assert [(t.task, tuple(t.args)) for t in chained.tasks] == [
        ("opsfleet.runs.step", (run_id, 0)),
        ("opsfleet.runs.step", (run_id, 1)),
        ("opsfleet.runs.step", (run_id, 2)),
        ("opsfleet.runs.finish", (run_id,)),
    ]
    assert all(t.immutable for t in chained.tasks)


def test_duplicate_start_sends_nothing(engine):
    app, ledger, run_id, messages = engine
    ledger.claim_run(run_id, "someone-else", 60)
    app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
    assert messages() == []


def test_step_redelivered_after_run_finished_does_nothing(engine):
    app, ledger, run_id, _ = engine
    ledger.claim_run(run_id, "w", 60)
    ledger.finish_run(run_id, "failed", "sweeper: lease expired")
    result = app.tasks["opsfleet.runs.step"].apply(args=(run_id, 1))
    assert result.state == "IGNORED"
    run = ledger.get_run(run_id)
    assert run["steps"] == [] and run["reason"] == "sweeper: lease expired"


def test_step_found_half_done_fails_the_run_instead_of_running_twice(engine):
    app, ledger, run_id, _ = engine
    ledger.claim_run(run_id, "w", 60)
    assert ledger.begin_step(run_id, 0, "locate", 60) == "start"  # then the worker died
    result = app.tasks["opsfleet.runs.step"].apply(args=(run_id, 0))
    assert result.state == "IGNORED"
    run = ledger.get_run(run_id)
    assert run["status"] == "failed" and "worker lost during step locate" in run["reason"]
    [step] = run["steps"]  # ended with the run, not left running
    assert step["status"] == "failed" and step["finished_at"] and "not run twice" in step["output"]


def test_failing_step_ends_the_run_with_the_reason(engine):
    app, ledger, run_id, _ = engine
    ledger.claim_run(run_id, "w", 60)
    result = app.tasks["opsfleet.runs.step"].apply(args=(run_id, 0))
    assert result.state == "IGNORED"  # the chain stops here
    run = ledger.get_run(run_id)
    assert run["status"] == "failed" and run["reason"].startswith("step locate failed: cannot reach Docker")
    assert run["steps"][0]["status"] == "failed"


def test_scheduled_trigger_makes_one_run_per_slot_however_many_beats(engine):
    app, ledger, _, messages = engine
    trigger = app.tasks["opsfleet.schedule.trigger"]
    first = trigger.apply(args=("restart_service", "api"), kwargs={"slot_seconds": 3600}).get()
    second = trigger.apply(args=("restart_service", "api"), kwargs={"slot_seconds": 3600}).get()
    assert first["created"] and first["enqueued"]
    assert second == {"run_id": first["run_id"], "created": False, "enqueued": False}
    run = ledger.get_run(first["run_id"])
    assert run["trigger"] == "schedule" and run["dedup_key"].startswith("schedule:restart_service:api:")
    assert len(messages()) == 1


def test_scheduled_trigger_refuses_unknown_playbook(engine):
    app, *_ = engine
    result = app.tasks["opsfleet.schedule.trigger"].apply(args=("nope", "x"))
    assert result.state == "FAILURE" and "unknown playbook" in str(result.result)


def test_scheduled_host_work_and_pinned_services_route_to_the_hosts_queue(tmp_path):
    import beat_schedule
    from worker.tasks.runs import queue_for_run

    raw = {
        "fleet": {"data_dir": str(tmp_path), "maintenance_host": "db-1"},
        "services": {"api": {"container": "a", "host": "edge-1"}, "web": {"container": "w"}},
        "backup": {"root": str(tmp_path / "b"), "series": {"docs": {"kind": "documents", "path": str(tmp_path)}}},
    }
    config = parse_config(raw, source="t", base_dir=tmp_path, environ={}).config
    schedule = beat_schedule.build_schedule(config)
    for job in ("backup-sets", "restore-drill", "cleanup"):
        assert schedule[job]["args"][2] == {"host": "db-1"}, job
    assert queue_for_run(config, {"params": {"host": "db-1"}, "target": "all"}) == "opsfleet.host.db-1"
    assert queue_for_run(config, {"params": {}, "target": "api"}) == "opsfleet.host.edge-1"
    assert queue_for_run(config, {"params": {}, "target": "web"}) is None
    # An alert's free_disk (target all) goes to the maintenance host, like the scheduled one.
    assert queue_for_run(config, {"playbook": "free_disk", "params": {}, "target": "all"}) == "opsfleet.host.db-1"
    # A cap's escalation about a pinned service pages from any worker: its host's may be the one down.
    assert queue_for_run(config, {"playbook": "escalate", "params": {}, "target": "api"}) is None
