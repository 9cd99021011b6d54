"""The backup and drill schedule: local times in backup.timezone across DST, one run per slot,
and the series due on a given local day."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest

from beat_schedule import LocalCrontab, build_schedule
from worker.config import parse_config
from worker.tasks.backup import due_series


def config(**backup):
    raw = {
        "backup": {
            "timezone": "Europe/Berlin",
            "series": {
                "db": {"kind": "database", "database_url": "postgresql://app@127.0.0.1/app"},
                "models": {"kind": "models", "path": "/data/ollama"},
                "images": {"kind": "inventory"},
            },
            **backup,
        }
    }
    return parse_config(raw, source="t", base_dir=".", environ={}).config


def test_entries_trigger_one_run_per_slot():
    entries = build_schedule(config())
    backup, drill = entries["backup-sets"], entries["restore-drill"]
    assert backup["task"] == drill["task"] == "opsfleet.schedule.trigger"
    assert backup["args"] == ("backup_set", "all", {}) and drill["args"] == ("restore_drill", "newest", {})
    assert backup["kwargs"] == drill["kwargs"] == {"slot_tz": "Europe/Berlin"}  # one run per local day
    assert "backup-sets" not in build_schedule(config(series={}))


@pytest.mark.parametrize(
    "now,last,due",
    [
        # 02:30 Europe/Berlin is 00:30 UTC in summer (CEST)...
        ("2025-07-02T00:29Z", "2025-07-01T00:30Z", False),
        ("2025-07-02T00:31Z", "2025-07-01T00:30Z", True),
        # ...and 01:30 UTC in winter (CET).
        ("2025-12-02T01:29Z", "2025-12-01T01:30Z", False),
        ("2025-12-02T01:31Z", "2025-12-01T01:30Z", True),
    ],
)
def test_backup_time_is_local(now, last, due):
    schedule = build_schedule(config())["backup-sets"]["schedule"]
    moment = datetime.fromisoformat(now.replace("Z", "+00:00"))
    fixed = LocalCrontab(schedule.tz_name, minute=30, hour=2, nowfun=lambda: moment)
    assert fixed.is_due(datetime.fromisoformat(last.replace("Z", "+00:00"))).is_due is due
    assert pickle.loads(pickle.dumps(schedule)).tz_name == "Europe/Berlin"


@pytest.mark.parametrize(
    "moment,expected",
    [
        ("2025-06-03T00:30Z", ["db"]),                    # a Tuesday
        ("2025-06-07T22:30Z", ["db", "models"]),          # Sunday 00:30 in Berlin (Saturday in UTC)
        ("2025-06-30T22:30Z", ["db", "images"]),          # 1 July 00:30 in Berlin: monthly inventory
    ],
)  # fmt: skip
def test_due_series_by_local_day(moment, expected):
    when = datetime.fromisoformat(moment.replace("Z", "+00:00")).astimezone(UTC)
    assert due_series(config(), when) == expected


def test_backup_config_errors_name_the_key():
    from worker.config import ConfigError

    cases = [
        ({"timezone": "Mars/Olympus"}, 'backup.timezone: unknown time zone "Mars/Olympus"'),
        ({"series": {"db": {"kind": "database"}}}, "backup.series.db: a database series needs database_url"),
        ({"series": {"d": {"kind": "documents"}}}, "backup.series.d: a documents series needs path"),
        ({"series": {"d": {"kind": "tape"}}}, "backup.series.d.kind:"),
        ({"retention": {"daily": -1}}, "backup.retention.daily:"),
        ({"compression": "lz4"}, "backup.compression:"),
        ({"recover_stop_order": ["ghost"]}, 'backup.recover_stop_order: unknown service "ghost"'),
        (
            {"step_timeout_seconds": 4000},
            "backup.step_timeout_seconds: must be below broker.visibility_timeout_seconds",
        ),
    ]
    for backup, expected in cases:
        with pytest.raises(ConfigError) as caught:
            parse_config({"backup": backup}, source="t", base_dir=".", environ={})
        assert any(p.startswith(expected) for p in caught.value.problems), (expected, caught.value.problems)


def test_long_backup_steps_carry_their_own_time_limits(tmp_path):
    from worker.celery_factory import create_celery
    from worker.tasks.runs import build_chain

    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}, "backup": {"step_timeout_seconds": 1800}},
        source="t", base_dir=tmp_path, environ={},
    )  # fmt: skip
    app = create_celery(loaded)
    limits = [
        (t.args[1], t.options.get("soft_time_limit"), t.options.get("time_limit"))
        for t in build_chain(app, 1, "backup_set").tasks[:-1]
    ]
    # prepare, commit and retention keep the worker's limits; dump and verify get backup.step_timeout_seconds.
    assert limits == [(0, None, None), (1, 1800, 1830), (2, 1800, 1830), (3, None, None), (4, None, None)]


def test_daily_summary_is_scheduled_at_its_local_time():
    entry = build_schedule(config(schedule={"summary_at": "07:15"}))["backup-summary"]
    assert entry["args"] == ("backup_summary", "all")
    assert (entry["schedule"]._orig_hour, entry["schedule"]._orig_minute, entry["schedule"].tz_name) == (
        7,
        15,
        "Europe/Berlin",
    )
