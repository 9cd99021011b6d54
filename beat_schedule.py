"""The schedule, and only the schedule: what Celery beat sends, and when.

The jobs themselves live in worker/tasks/; each entry names a task and its
cadence from the configuration. Playbook runs go through
`opsfleet.schedule.trigger` (playbook, target, params, slot_seconds): one run
per slot, however many beats send it.
"""

from __future__ import annotations

from datetime import timedelta

from celery.schedules import crontab

from worker.config import Config


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
    if config.rotation.sets or config.logging.files:
        # Check every log set's size and age triggers (opsfleet's own logs are
        # one); a check with nothing due records no run.
        every = config.rotation.check_interval_seconds
        schedule["rotate-logs"] = {
            "task": "opsfleet.schedule.trigger",
            "schedule": timedelta(seconds=every),
            "args": ("rotate_logs", "all", {}, every),
            "options": {"expires": every},
        }
    hour, minute = (int(part) for part in config.cleanup.at.split(":"))
    schedule["cleanup"] = {
        # Daily: images, old rotated logs, old ledger runs, backup retention.
        "task": "opsfleet.schedule.trigger",
        "schedule": crontab(hour=hour, minute=minute),
        "args": ("cleanup", "all", {}, 86400),
        "options": {"expires": 3600},
    }
    return schedule
