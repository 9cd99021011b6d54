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
import threading
import time

import redis
from celery import chain, shared_task
from celery.canvas import Signature
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable
from worker.celery_factory import host_queue
from worker.config import HOST_PLAYBOOKS
from worker.logs import run_context
from worker.tasks.playbooks import PLAYBOOKS
from worker.tasks.steps import StepContext, StepEnded, StepFailed, StepRequeued, StepSkipped, hold_if_asked

log = logging.getLogger("opsfleet.runs")

# Ledger outages during a step: retry the write this often before giving up
# (the lease then expires and the sweeper records the failure).
LEDGER_WRITE_TRIES = 6

# What sending to a broker that is down raises (kombu wraps most in OperationalError).
BROKER_ERRORS = (OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# A run's next step (or `finish`) is sent by the worker that ran the step before. With the
# broker down then (Redis restarting), that worker waits about 30 s for it to come back (a
# minute at most where each try also waits out a connect timeout: inside the quick tasks'
# 60 s soft limit), instead of giving up at once and leaving the run `running` until its
# lease lapses and the sweeper fails it, the rest of its action never taken. A first step
# the broker refuses sends the run back to the queue (start_run). The edge keeps its short
# wait: what it could not send, the sweeper sends from the ledger.
CHAIN_PUBLISH_RETRY = {"max_retries": 15, "interval_start": 1, "interval_step": 1, "interval_max": 2}


def build_chain(app, run_id: int, playbook: str, queue: str | None = None) -> Signature:
    """The chain for a run: one task per step, then finish. Pure, so tests can inspect it.

    `queue` routes the steps to one host's worker; None keeps the default route.
    """
    steps = PLAYBOOKS[playbook]
    config = app.opsfleet.config
    options = {"retry": True, "retry_policy": CHAIN_PUBLISH_RETRY}
    if queue:
        options |= {"queue": queue, "routing_key": queue}

    def one(seq: int, step) -> Signature:
        sig = app.signature("opsfleet.runs.step", args=(run_id, seq), immutable=True, **options)
        if step.timeout:  # a long step (a dump) carries its own limits
            sig = sig.set(soft_time_limit=step.soft_limit(config), time_limit=step.hard_limit(config))
        return sig

    # Immutable: a step's return value is not its successor's argument; the
    # ledger carries everything between steps.
    return chain(
        *(one(seq, step) for seq, step in enumerate(steps)),
        app.signature(
            "opsfleet.runs.finish", args=(run_id,), immutable=True, retry=True, retry_policy=CHAIN_PUBLISH_RETRY
        ),
    )


def queue_for_run(config, run: dict) -> str | None:
    """A run's steps go to the queue of the host its target is pinned to, if any; host
    playbooks (free disk, rotate logs, back up) to fleet.maintenance_host's, whoever asked.
    Escalations never wait for a host: they page people, also when that host's worker is down."""
    if run.get("playbook") == "escalate":
        return None
    host = run["params"].get("host")
    if not host and run.get("playbook") in HOST_PLAYBOOKS:
        host = config.fleet.maintenance_host
    if not host and run["target"] in config.services:
        host = config.services[run["target"]].host
    return host_queue(host) if host else None


def _step_lease(app) -> float:
    """A run's lease between its steps, while the next one waits in the queue (nobody renews
    it then): a step's hard limit plus the queue's grace. Inside a step, LeaseKeeper renews it."""
    config = app.opsfleet.config
    return config.worker.step_hard_timeout_seconds + config.worker.queue_grace_seconds


class LeaseKeeper:
    """While a step runs, renew its run's lease every third of `seconds`, from a thread: a
    live worker keeps a long step (a backup) for as long as it runs, a dead one (SIGKILL,
    OOM, its host gone; the thread dies with it) loses the run within `seconds` and the
    sweeper fails it. A ledger that does not answer is tried again at the next beat."""

    def __init__(self, ledger, run_id: int, worker: str, seconds: float):
        self.ledger, self.run_id, self.worker, self.seconds = ledger, run_id, worker, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{run_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.ledger.renew_lease(self.run_id, self.worker, self.seconds):
                    return  # the run ended or another worker holds it: nothing to keep
            except LedgerUnavailable:
                continue

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def request_report(app, run_id: int, playbook: str | None = None) -> None:
    """Reports are their own tasks: a Slack (or GitHub) outage never fails or delays a run.
    Deploy runs are reported to GitHub too."""
    tasks = ["opsfleet.report.slack"] + (["opsfleet.report.github"] if playbook == "deploy" else [])
    for task in tasks:
        try:
            app.send_task(task, args=(run_id,))
        except Exception as err:  # broker down: the run goes on; the next report catches up
            log.warning("run %s: could not enqueue its report (%s): %s", run_id, task, err)


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
    if _ledger_write(ledger.finish_run, run["id"], status, app.opsfleet.loaded.redact(reason)):
        metrics.RUNS_FINISHED.labels(run["trigger"], run["playbook"], status).inc()
        if run["trigger"] == "alert":
            metrics.REMEDIATIONS.labels(run.get("rule") or "", run["playbook"], status).inc()
        if run.get("started_at"):
            ended = ledger.get_run(run["id"])
            metrics.RUN_DURATION.labels(run["playbook"]).observe(
                (ended["finished_at"] - run["started_at"]).total_seconds()
            )
    request_report(app, run["id"], run["playbook"])


@shared_task(name="opsfleet.runs.start", bind=True, acks_late=True, max_retries=None)
def start_run(self, run_id: int) -> None:
    runtime = self.app.opsfleet
    try:
        run = runtime.ledger.claim_run(run_id, runtime.worker_name, _step_lease(self.app))
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if run is None:
        return  # already claimed, finished, or skipped: a duplicate message
    if run.get("created_at") and run.get("started_at"):
        metrics.RUN_START_LATENCY.labels(run["trigger"], run["playbook"]).observe(
            max(0.0, (run["started_at"] - run["created_at"]).total_seconds())
        )
    if run["playbook"] not in PLAYBOOKS:
        end_run(self.app, run, "failed", f'unknown playbook "{run["playbook"]}"')
        return
    request_report(self.app, run_id, run["playbook"])
    try:
        build_chain(self.app, run_id, run["playbook"], queue_for_run(runtime.config, run)).apply_async()
    except BROKER_ERRORS as err:
        # The broker went away between the claim and the first step's message: no step ran,
        # so the run goes back to queued and the sweeper sends it again once the broker is
        # back (left running, it would hold its target until the lease lapsed, then fail).
        _ledger_write(runtime.ledger.requeue_run, run_id, f"broker unavailable at start: {err}")
        log.warning("run %s back in the queue: the broker refused its first step: %s", run_id, err)
        raise Ignore() from None


@shared_task(name="opsfleet.runs.step", bind=True, acks_late=True, max_retries=None)
def run_step(self, run_id: int, seq: int) -> None:
    runtime = self.app.opsfleet
    ledger = runtime.ledger
    try:
        run = ledger.get_run(run_id)
        if run is None:
            raise Ignore()
        step = PLAYBOOKS[run["playbook"]][seq]
        lease = runtime.config.worker.lease_seconds
        verdict = ledger.begin_step(run_id, seq, step.name, lease, runtime.worker_name)
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if verdict == "not_running":
        raise Ignore()  # the run ended (failed by the sweeper, or finished): stop the chain
    if verdict == "done":
        return  # a redelivery of a step that completed: let the chain go on
    if verdict == "interrupted":
        # The step a dead worker began ends with the run, not left `running` beside it.
        _ledger_write(ledger.end_step, run_id, seq, "failed", "worker lost during this step; not run twice", 0)
        end_run(self.app, run, "failed", f"worker lost during step {step.name}; not run twice")
        raise Ignore()

    began = time.monotonic()
    status, output, ended = "succeeded", "", None
    try:
        # Every line the step logs carries the run id; the run stays this worker's while it runs.
        with run_context(run_id), LeaseKeeper(ledger, run_id, runtime.worker_name, lease):
            hold_if_asked(run["playbook"], step.name, run_id)
            output = step.fn(StepContext(runtime, run))
    except StepFailed as err:
        status, output = "failed", str(err)
    except StepSkipped as err:
        status, output = "skipped", str(err)
    except StepRequeued as err:
        _ledger_write(ledger.requeue_run, run_id, runtime.loaded.redact(str(err)))
        log.info("run %s back in the queue: %s", run_id, err, extra={"run_id": run_id})
        request_report(self.app, run_id, run["playbook"])
        raise Ignore() from None
    except StepEnded as err:
        status, output, ended = err.step_status, str(err), err
    except SoftTimeLimitExceeded:
        status, output = "failed", f"timed out after {time.monotonic() - began:.0f}s"
    except Exception as err:  # a bug or an unexpected outside error: the stack goes to the log only
        log.exception("run %s step %s crashed", run_id, step.name, extra={"run_id": run_id})
        status, output = "failed", f"unexpected {err.__class__.__name__}: {err} (stack trace in the worker log)"

    output = runtime.loaded.redact(output)  # step output goes to the ledger, the API and Slack
    _ledger_write(ledger.end_step, run_id, seq, status, output, _step_lease(self.app))
    metrics.STEPS_FINISHED.labels(run["playbook"], step.name, status).inc()
    if ended is not None:
        end_run(self.app, run, ended.status, output.splitlines()[0] if output else ended.status)
        raise Ignore()
    if status == "skipped":
        end_run(self.app, run, "skipped", output)
        raise Ignore()
    if status == "failed" and not step.carry_on:
        end_run(self.app, run, "failed", _failed_reason(step.name, output))
        raise Ignore()
    request_report(self.app, run_id, run["playbook"])


def _failed_reason(step_name: str, output: str) -> str:
    return f"step {step_name} failed: {output.splitlines()[0] if output else ''}"


@shared_task(name="opsfleet.runs.finish", bind=True, acks_late=True, max_retries=None)
def finish_run(self, run_id: int) -> None:
    try:
        run = self.app.opsfleet.ledger.get_run(run_id)
    except LedgerUnavailable as err:
        raise self.retry(countdown=5, exc=err) from None
    if run is None or run["status"] != "running":
        return
    failed = [step for step in run["steps"] if step["status"] == "failed"]  # steps that carry on
    if failed:
        also = f" (and {', '.join(s['name'] for s in failed[1:])})" if len(failed) > 1 else ""
        end_run(self.app, run, "failed", _failed_reason(failed[0]["name"], failed[0]["output"] or "") + also)
        return
    count = len(run["steps"])
    end_run(self.app, run, "succeeded", f"{count} step{'' if count == 1 else 's'} succeeded")


def execute_inline(app, run_id: int, on_step=None) -> dict:
    """Run a recorded run here and now, step by step through the same tasks a
    worker runs (for `opsfleet backup run`, `opsfleet restore`): the ledger
    records it exactly as if a worker had. Returns the finished run."""
    runtime = app.opsfleet
    run = runtime.ledger.claim_run(run_id, runtime.worker_name, _step_lease(app))
    if run is None:
        # Someone else claimed it (the sweeper may enqueue a fresh queued run to a
        # worker): follow it to its end instead of running it twice.
        while (current := runtime.ledger.get_run(run_id))["status"] in ("queued", "running"):
            time.sleep(1)
        return current
    steps = PLAYBOOKS.get(run["playbook"])
    if steps is None:
        end_run(app, run, "failed", f'unknown playbook "{run["playbook"]}"')
        return runtime.ledger.get_run(run_id)
    for seq in range(len(steps)):
        if on_step is not None:
            on_step(seq, steps[seq].name, None)
        app.tasks["opsfleet.runs.step"].apply(args=(run_id, seq))
        current = runtime.ledger.get_run(run_id)
        if on_step is not None and len(current["steps"]) > seq:
            on_step(seq, steps[seq].name, current["steps"][seq])
        if current["status"] != "running":
            return current
    app.tasks["opsfleet.runs.finish"].apply(args=(run_id,))
    return runtime.ledger.get_run(run_id)


def enqueue_runs(app, ledger, run_ids: list[int], marked: bool = False) -> list[int]:
    """Send `start` for each run; return those the broker took.

    The ledger already holds the runs, so a broker that is down loses nothing:
    the sweeper sends them later. `start` is idempotent, so sending twice is safe.
    `marked`: the runs were recorded as enqueued already (one write fewer on the
    edge's hot path); those the broker refuses are unmarked for the sweeper.
    """
    sent = []
    for run_id in run_ids:
        try:
            app.send_task("opsfleet.runs.start", args=(run_id,))
        except Exception as err:
            log.warning("broker refused run %s (the sweeper will enqueue it): %s", run_id, err)
            break
        sent.append(run_id)
    try:
        if marked:
            ledger.clear_enqueued(run_ids[len(sent) :])
        elif sent:
            ledger.mark_enqueued(sent)
    except LedgerUnavailable as err:
        log.warning("could not record what the broker took (harmless: the sweeper re-sends): %s", err)
    return sent
