"""The schedule, and only the schedule: what Celery beat sends, and when.

The jobs themselves live in worker/tasks/; each entry names a task and its
cadence from the configuration. Playbook runs go through
`opsfleet.schedule.trigger` (playbook, target, params, slot_seconds or slot_tz):
one run per slot, however many beats send it (jobs at a local time: one per local day).
"""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from worker.config import Config

_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


class LocalCrontab(crontab):
    """A crontab read in a named time zone (backup.timezone), whatever the
    Celery app's (UTC): 02:30 Europe/Berlin is 00:30 UTC in summer, 01:30 in
    winter. Pickles by zone name (beat's schedule file keeps entries)."""

    def __init__(self, tz_name: str, minute="*", hour="*", day_of_week="*", day_of_month="*", month_of_year="*", **kw):
        self.tz_name = tz_name
        super().__init__(minute, hour, day_of_week, day_of_month, month_of_year, **kw)

    @property
    def tz(self):
        return ZoneInfo(self.tz_name)

    def __reduce__(self):
        return (
            self.__class__,
            (self.tz_name, self._orig_minute, self._orig_hour, self._orig_day_of_week,
             self._orig_day_of_month, self._orig_month_of_year),
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<LocalCrontab {self._orig_minute} {self._orig_hour} * * {self._orig_day_of_week} ({self.tz_name})>"


def _hm(text: str) -> tuple[int, int]:
    hour, minute = text.split(":")
    return int(hour), int(minute)


def build_schedule(config: Config) -> dict[str, dict]:
    sweep_every = config.sweeper.interval_seconds
    schedule = {
        # Re-enqueue accepted runs the broker lost; fail runs whose worker died.
        "sweep-ledger": {
            "task": "opsfleet.sweeper.sweep",
            "schedule": timedelta(seconds=sweep_every),
            # A sweep that waited longer than one interval is stale: the next one covers it.
            "options": {"expires": sweep_every},
        },
    }
    # Work on the host's files and Docker daemon runs on that host's worker.
    host = {"host": config.fleet.maintenance_host} if config.fleet.maintenance_host else {}
    backup = config.backup
    if backup.series and backup.schedule.enabled:
        hour, minute = _hm(backup.schedule.at)
        # Daily at the configured local time; the run itself picks the series due
        # today (daily ones, weekly on weekly_on, monthly on monthly_on).
        schedule["backup-sets"] = {
            "task": "opsfleet.schedule.trigger",
            "schedule": LocalCrontab(backup.timezone, minute=minute, hour=hour),
            "args": ("backup_set", "all", host),
            "kwargs": {"slot_tz": backup.timezone},
            "options": {"expires": 3000},
        }
        hour, minute = _hm(backup.schedule.summary_at)
        schedule["backup-summary"] = {
            "task": "opsfleet.schedule.trigger",
            "schedule": LocalCrontab(backup.timezone, minute=minute, hour=hour),
            "args": ("backup_summary", "all"),
            "kwargs": {"slot_tz": backup.timezone},
            "options": {"expires": 3000},
        }
    if backup.series and backup.drill.enabled:
        hour, minute = _hm(backup.drill.at)
        schedule["restore-drill"] = {
            "task": "opsfleet.schedule.trigger",
            "schedule": LocalCrontab(
                backup.timezone, minute=minute, hour=hour, day_of_week=_DAYS[backup.drill.weekday]
            ),
            "args": ("restore_drill", "newest", host),
            "kwargs": {"slot_tz": backup.timezone},
            "options": {"expires": 3000},
        }
    if config.rotation.sets or config.logging.files:
        # Check every log set's size and age triggers (opsfleet's own logs are
        # one); a check with nothing due records no run.
        every = config.rotation.check_interval_seconds
        schedule["rotate-logs"] = {
            "task": "opsfleet.schedule.trigger",
            "schedule": timedelta(seconds=every),
            "args": ("rotate_logs", "all", host, every),
            "options": {"expires": every},
        }
    hour, minute = (int(part) for part in config.cleanup.at.split(":"))
    schedule["cleanup"] = {
        # Daily: images, old rotated logs, old ledger runs, backup retention.
        "task": "opsfleet.schedule.trigger",
        "schedule": crontab(hour=hour, minute=minute),
        "args": ("cleanup", "all", host, 86400),
        "options": {"expires": 3600},
    }
    return schedule
