"""The sweeper (beat, every few seconds): the ledger makes good what the broker lost.

- Runs accepted but never started (the broker was down, or dropped the
  message) are enqueued again; `start` is idempotent, so a duplicate is harmless.
- Runs whose step lease ran out (the worker died) are failed, so nothing
  stays "running" forever.
- A deploy that died after it began recreating gets a repair run that puts
  back what ran before it: the live release, or for a first deploy the images
  that ran before opsfleet (no release current then); where it cannot, a
  person is paged (worker.tasks.deploy.repair_dead_deploys, plan_repair).
- A run whose reporter died holding its report lock (the lock lapsed) is
  reported again, once: the dead worker took the report and the retries
  waiting in it along, so the Slack thread would show a state long gone.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task

from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable, utcnow
from worker.tasks.runs import enqueue_runs, request_report

log = logging.getLogger("opsfleet.sweeper")


@shared_task(name="opsfleet.sweeper.sweep", bind=True, acks_late=True)
def sweep(self) -> dict:
    # Here, not at the top: `opsfleet rotate-logs` registers this task but never sweeps,
    # and should not load the deploy engine and the Docker SDK to start.
    from worker.tasks.deploy import repair_dead_deploys

    runtime = self.app.opsfleet
    ledger = runtime.ledger
    expired = ledger.expire_leases()
    for run_id in expired:
        log.warning("run %s failed: its worker stopped answering (lease expired)", run_id)
        metrics.SWEEPER_ACTIONS.labels("expired").inc()
        # With its playbook: a deploy's GitHub deployment is told too (else it stays in_progress).
        try:
            playbook = (ledger.get_run(run_id) or {}).get("playbook")
        except LedgerUnavailable:
            playbook = "deploy"  # not known now: ask for both reports (GitHub's passes over other playbooks)
        request_report(self.app, run_id, playbook)
    repairs = repair_dead_deploys(self.app)
    if repairs:
        metrics.SWEEPER_ACTIONS.labels("repaired").inc(len(repairs))
    reports = ledger.take_lapsed_report_locks()
    for run_id, playbook in reports:
        log.warning("run %s: its reporter died holding the report lock; reporting it again", run_id)
        request_report(self.app, run_id, playbook)
    if reports:
        metrics.SWEEPER_ACTIONS.labels("reported").inc(len(reports))
    stale = utcnow() - timedelta(seconds=runtime.config.sweeper.requeue_after_seconds)
    pending = ledger.runs_to_enqueue(stale)
    sent = enqueue_runs(self.app, ledger, pending)
    if sent:
        log.info("re-enqueued runs %s from the ledger", sent)
        metrics.SWEEPER_ACTIONS.labels("requeued").inc(len(sent))
    return {"expired": expired, "requeued": sent, "repairs": repairs, "reports": [r for r, _ in reports]}
