"""Running a run: claim it, run its playbook's steps as a Celery chain, finish it.

Every task here first asks the ledger whether its work is still to do, so a
redelivered or duplicated message does nothing:
- `start` claims queued → running for exactly one caller, then sends the chain;
- `step` runs one step unless it already ran; a step found half-done (its
  worker died inside it) fails the run rather than running twice;
- `finish` marks the run succeeded.
A failed step ends the run and stops the chain (Ignore), so nothing after it runs.
"""

from __future__ import annotations

import logging
import time
import traceback

from celery import chain, shared_task
from celery.canvas import Signature
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable
from worker.logs import run_context
from worker.tasks.playbooks import PLAYBOOKS
from worker.tasks.steps import StepContext, StepFailed, hold_if_asked

log = logging.getLogger("opsfleet.runs")

# Ledger outages during a step: retry the write this often before giving up
# (the lease then expires and the sweeper records the failure).
LEDGER_WRITE_TRIES = 6


def build_chain(app, run_id: int, playbook: str) -> Signature:
    """The chain for a run: one task per step, then finish. Pure, so tests can inspect it."""
    steps = PLAYBOOKS[playbook]
    # Immutable: a step's return value is not its successor's argument; the
    # ledger carries everything between steps.
    return chain(
        *(app.signature("opsfleet.runs.step", args=(run_id, seq), immutable=True) for seq in range(len(steps))),
        app.signature("opsfleet.runs.finish", args=(run_id,), immutable=True),
    )


def _step_lease(app) -> float:
    worker = app.opsfleet.config.worker
    return worker.step_hard_timeout_seconds + worker.queue_grace_seconds


def request_report(app, run_id: int) -> None:
    """Reports are their own tasks: a Slack outage never fails or delays a run."""
    try:
        app.send_task("opsfleet.report.slack", args=(run_id,))
    except Exception as err:  # broker down: the run goes on; the next report catches up
        log.warning("run %s: could not enqueue its Slack report: %s", run_id, err)


def _ledger_write(fn, *args):
    for attempt in range(LEDGER_WRITE_TRIES):
        try:
            return fn(*args)
        except LedgerUnavailable:
            if attempt == LEDGER_WRITE_TRIES - 1:
                raise
            time.sleep(min(2**attempt, 10))


def end_run(app, run: dict, status: str, reason: str = "") -> None:
    ledger = app.opsfleet.ledger
    if _ledger_write(ledger.finish_run, run["id"], status, reason):
        metrics.RUNS_FINISHED.labels(run["trigger"], run["playbook"], status).inc()
        if run.get("started_at"):
            ended = ledger.get_run(run["id"])
            metrics.RUN_DURATION.labels(run["playbook"]).observe(
                (ended["finished_at"] - run["started_at"]).total_seconds()
            )
    request_report(app, run["id"])


@shared_task(name="opsfleet.runs.start", bind=True, acks_late=True, max_retries=None)
def start_run(self, run_id: int) -> None:
    runtime = self.app.opsfleet
    try:
        run = runtime.ledger.claim_run(run_id, runtime.worker_name, _step_lease(self.app))
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if run is None:
        return  # already claimed, finished, or skipped: a duplicate message
    if run["playbook"] not in PLAYBOOKS:
        end_run(self.app, run, "failed", f'unknown playbook "{run["playbook"]}"')
        return
    request_report(self.app, run_id)
    build_chain(self.app, run_id, run["playbook"]).apply_async()


@shared_task(name="opsfleet.runs.step", bind=True, acks_late=True, max_retries=None)
def run_step(self, run_id: int, seq: int) -> None:
    runtime = self.app.opsfleet
    ledger = runtime.ledger
    try:
        run = ledger.get_run(run_id)
        if run is None:
            raise Ignore()
        step = PLAYBOOKS[run["playbook"]][seq]
        verdict = ledger.begin_step(run_id, seq, step.name, _step_lease(self.app))
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if verdict == "not_running":
        raise Ignore()  # the run ended (failed by the sweeper, or finished): stop the chain
    if verdict == "done":
        return  # a redelivery of a step that completed: let the chain go on
    if verdict == "interrupted":
        end_run(self.app, run, "failed", f"worker lost during step {step.name}; not run twice")
        raise Ignore()

    began = time.monotonic()
    status, output = "succeeded", ""
    try:
        with run_context(run_id):  # every line the step logs carries the run id
            hold_if_asked(run["playbook"], step.name, run_id)
            output = step.fn(StepContext(runtime, run))
    except StepFailed as err:
        status, output = "failed", str(err)
    except SoftTimeLimitExceeded:
        status, output = "failed", f"timed out after {time.monotonic() - began:.0f}s"
    except Exception as err:  # a bug or an unexpected outside error: record it with its stack
        log.exception("run %s step %s crashed", run_id, step.name, extra={"run_id": run_id})
        status, output = "failed", f"{err.__class__.__name__}: {err}\n{traceback.format_exc()}"

    _ledger_write(ledger.end_step, run_id, seq, status, output, _step_lease(self.app))
    metrics.STEPS_FINISHED.labels(run["playbook"], step.name, status).inc()
    if status == "failed":
        end_run(self.app, run, "failed", f"step {step.name} failed: {output.splitlines()[0] if output else ''}")
        raise Ignore()
    request_report(self.app, run_id)


@shared_task(name="opsfleet.runs.finish", bind=True, acks_late=True, max_retries=None)
def finish_run(self, run_id: int) -> None:
    try:
        run = self.app.opsfleet.ledger.get_run(run_id)
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if run is None or run["status"] != "running":
        return
    end_run(self.app, run, "succeeded", f"{len(run['steps'])} steps succeeded")


def enqueue_runs(app, ledger, run_ids: list[int]) -> list[int]:
    """Send `start` for each run; return those the broker took.

    The ledger already holds the runs, so a broker that is down loses nothing:
    the sweeper sends them later. `start` is idempotent, so sending twice is safe.
    """
    sent = []
    for run_id in run_ids:
        try:
            app.send_task("opsfleet.runs.start", args=(run_id,))
        except Exception as err:
            log.warning("broker refused run %s (the sweeper will enqueue it): %s", run_id, err)
            break
        sent.append(run_id)
    if sent:
        try:
            ledger.mark_enqueued(sent)
        except LedgerUnavailable as err:
            log.warning("could not mark runs %s enqueued (harmless: start is idempotent): %s", sent, err)
    return sent


def run_inline(runtime, run_id: int) -> dict:
    """Run a recorded run's steps here and now, in this process (the CLI's
    `rotate-logs` and `cleanup`): the same claim, step records, lease and
    final status as on a worker, without the broker. Returns the ended run."""
    ledger = runtime.ledger
    run = ledger.claim_run(run_id, f"cli:{runtime.worker_name}", 3600)
    if run is None:
        return ledger.get_run(run_id)
    status, reason = "succeeded", ""
    for seq, step in enumerate(PLAYBOOKS[run["playbook"]]):
        if ledger.begin_step(run_id, seq, step.name, 3600) != "start":
            status, reason = "failed", f"step {step.name} was already started elsewhere"
            break
        began = time.monotonic()
        step_status, output = "succeeded", ""
        try:
            with run_context(run_id):
                output = step.fn(StepContext(runtime, run))
        except StepFailed as err:
            step_status, output = "failed", str(err)
        except Exception as err:  # a bug or an unexpected outside error: the stack goes to the log
            log.exception("run %s step %s crashed", run_id, step.name, extra={"run_id": run_id})
            step_status, output = "failed", f"unexpected {err.__class__.__name__}: {err} (stack trace in the log)"
        ledger.end_step(run_id, seq, step_status, output, 3600)
        metrics.STEPS_FINISHED.labels(run["playbook"], step.name, step_status).inc()
        log.info("run %s step %s %s in %.1fs", run_id, step.name, step_status, time.monotonic() - began,
                 extra={"run_id": run_id})
        if step_status == "failed":
            status, reason = "failed", f"step {step.name} failed: {output.splitlines()[0] if output else ''}"
            break
    if status == "succeeded":
        reason = f"{len(PLAYBOOKS[run['playbook']])} steps succeeded"
    if ledger.finish_run(run_id, status, reason):
        metrics.RUNS_FINISHED.labels(run["trigger"], run["playbook"], status).inc()
    return ledger.get_run(run_id)
