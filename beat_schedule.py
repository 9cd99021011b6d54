"""The schedule, and only the schedule: what Celery beat sends, and when.

The jobs themselves live in worker/tasks/; each entry names a task and its
cadence from the configuration.
"""

from __future__ import annotations

from datetime import timedelta

from worker.config import Config


def build_schedule(config: Config) -> dict[str, dict]:
    sweep_every = config.sweeper.interval_seconds
    return {
        # Re-enqueue accepted runs the broker lost; fail runs whose worker died.
        "sweep-ledger": {
            "task": "opsfleet.sweeper.sweep",
            "schedule": timedelta(seconds=sweep_every),
            # A sweep that waited longer than one interval is stale: the next one covers it.
            "options": {"expires": sweep_every},
        },
    }
