"""beat_schedule: rotation every check interval when log sets exist, cleanup daily at cleanup.at."""

from __future__ import annotations

from pathlib import Path

import beat_schedule
from worker.config import parse_config


def test_rotation_and_cleanup_entries():
    config = parse_config(
        {
            "rotation": {
                "check_interval_seconds": 120,
                "sets": {"app": {"paths": ["/var/log/app.log"], "reopen": {"watched": True}, "every": "1d"}},
            },
            "cleanup": {"at": "04:15"},
        },
        source="t",
        base_dir=Path("."),
    ).config
    schedule = beat_schedule.build_schedule(config)
    assert schedule["rotate-logs"]["task"] == "opsfleet.schedule.trigger"
    assert schedule["rotate-logs"]["args"] == ("rotate_logs", "all", {}, 120)
    assert schedule["rotate-logs"]["schedule"].total_seconds() == 120
    assert schedule["cleanup"]["args"] == ("cleanup", "all", {}, 86400)
    cron = schedule["cleanup"]["schedule"]
    assert (cron.hour, cron.minute) == ({4}, {15})


def test_no_rotation_entry_without_log_sets_or_log_files():
    loaded = parse_config({"logging": {"files": False}}, source="t", base_dir=Path("."))
    assert "rotate-logs" not in beat_schedule.build_schedule(loaded.config)
    assert "rotate-logs" in beat_schedule.build_schedule(parse_config({}, source="t", base_dir=Path(".")).config)


def test_scheduled_rotation_runs_through_the_run_machinery(tmp_path):
    from worker.celery_factory import create_celery

    log = tmp_path / "app.log"
    log.write_bytes(b"line\n" * 1000)
    loaded = parse_config(
        {
            "fleet": {"data_dir": str(tmp_path / "data")},
            "logging": {"files": False},
            "rotation": {"sets": {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": "1K"}}},
        },
        source="t",
        base_dir=tmp_path,
        environ={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    app = create_celery(loaded)
    app.opsfleet.ledger.migrate()
    trigger = app.tasks["opsfleet.schedule.trigger"]
    sent = trigger.apply(args=("rotate_logs", "all", {}, 300)).get()
    assert sent["created"] and sent["enqueued"]
    run_id = sent["run_id"]
    app.opsfleet.ledger.claim_run(run_id, "w", 60)
    for seq in range(3):
        assert app.tasks["opsfleet.runs.step"].apply(args=(run_id, seq)).state == "SUCCESS"
    app.tasks["opsfleet.runs.finish"].apply(args=(run_id,))
    run = app.opsfleet.ledger.get_run(run_id)
    assert run["status"] == "succeeded", run
    assert [s["name"] for s in run["steps"]] == ["rotate", "compress", "retain"]
    assert "rotated " in run["steps"][0]["output"] and ".zst" in run["steps"][1]["output"]
    assert log.read_bytes() == b""
    # the next check finds nothing due: no run recorded
    assert trigger.apply(args=("rotate_logs", "all", {}, 300)).get() == {
        "run_id": None,
        "created": False,
        "enqueued": False,
        "idle": "no log file due",
    }
