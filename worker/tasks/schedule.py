"""Scheduled work enters the ledger like any event: beat sends `trigger`, which
records one run per (playbook, target, slot) and enqueues it.

The slot is the scheduled time floored to `slot_seconds`, and it is part of
the run's dedup key: two beats (or a beat restarted mid-slot) sending the
same job make one run, not two.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from celery import shared_task

from worker.adapters.ledger import NewRun, utcnow
from worker.tasks.playbooks import GATES, PLAYBOOKS
from worker.tasks.runs import enqueue_runs


def slot_of(moment: datetime, slot_seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % slot_seconds, UTC)


@shared_task(name="opsfleet.schedule.trigger", bind=True, acks_late=True)
def trigger(self, playbook: str, target: str, params: dict | None = None, slot_seconds: int = 60) -> dict:
    if playbook not in PLAYBOOKS:
        raise ValueError(f'beat_schedule names unknown playbook "{playbook}"')
    runtime = self.app.opsfleet
    gate = GATES.get(playbook)
    idle = gate(runtime, target, params or {}) if gate else None
    if idle:
        return {"run_id": None, "created": False, "enqueued": False, "idle": idle}
    slot = slot_of(utcnow(), slot_seconds)
    new = NewRun(
        trigger="schedule",
        playbook=playbook,
        target=target,
        params=params or {},
        summary=f"scheduled {playbook} {target} for {slot:%Y-%m-%d %H:%M} UTC",
        dedup_key=f"schedule:{playbook}:{target}:{slot:%Y%m%dT%H%M%S}",
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
