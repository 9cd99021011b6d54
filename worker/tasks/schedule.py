"""Scheduled work enters the ledger like any event: beat sends `trigger`, which
records one run per (playbook, target, slot) and enqueues it.

The slot is the scheduled time floored to `slot_seconds`, and it is part of
the run's dedup key: two beats (or a beat restarted mid-slot) sending the
same job make one run, not two. Daily and weekly jobs at a local time
(backups, the summary, the drill) take the local date in `slot_tz` as their
slot instead: a trigger delivered late into the next hour, or 02:30 happening
twice on the night clocks go back, is still that day's one run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from celery import shared_task

from worker.adapters.ledger import NewRun, utcnow
from worker.tasks.playbooks import PLAYBOOKS, gate
from worker.tasks.runs import enqueue_runs


def slot_of(moment: datetime, slot_seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % slot_seconds, UTC)


@shared_task(name="opsfleet.schedule.trigger", bind=True, acks_late=True)
def trigger(
    self, playbook: str, target: str, params: dict | None = None, slot_seconds: int = 60, slot_tz: str | None = None
) -> dict:
    if playbook not in PLAYBOOKS:
        raise ValueError(f'beat_schedule names unknown playbook "{playbook}"')
    runtime = self.app.opsfleet
    worth_a_run = gate(playbook)
    idle = worth_a_run(runtime, target, params or {}) if worth_a_run else None
    if idle:
        return {"run_id": None, "created": False, "enqueued": False, "idle": idle}
    now = utcnow()
    if slot_tz:
        day = now.astimezone(ZoneInfo(slot_tz)).date()
        summary, key = f"scheduled {playbook} {target} for {day} ({slot_tz})", f"{day:%Y%m%d}@{slot_tz}"
    else:
        slot = slot_of(now, slot_seconds)
        summary, key = f"scheduled {playbook} {target} for {slot:%Y-%m-%d %H:%M} UTC", f"{slot:%Y%m%dT%H%M%S}"
    new = NewRun(
        trigger="schedule",
        playbook=playbook,
        target=target,
        params=params or {},
        summary=summary,
        dedup_key=f"schedule:{playbook}:{target}:{key}",
    )
    recorded = runtime.ledger.record_event(
        source="schedule",
        summary=new.summary,
        body=json.dumps({"playbook": playbook, "target": target}),
        new_runs=[new],
    )
    run = recorded.runs[0]
    sent = enqueue_runs(self.app, runtime.ledger, [run.id]) if run.created else []
    return {"run_id": run.id, "created": run.created, "enqueued": bool(sent)}
