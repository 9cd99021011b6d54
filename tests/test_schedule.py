"""beat_schedule: rotation every check interval when log sets exist, cleanup daily at cleanup.at."""

from __future__ import annotations

from pathlib import Path

import beat_schedule
from worker.config import parse_config


def test_rotation_and_cleanup_entries():
    config = parse_config(
        {"rotation": {"check_interval_seconds": 120, "sets": {"app": {"paths": ["/var/log/app.log"],
                                                                     "reopen": {"watched": True}, "every": "1d"}}},
         "cleanup": {"at": "04:15"}},
        source="t", base_dir=Path("."),
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
