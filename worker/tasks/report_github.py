"""Reporting a deploy run to GitHub as a deployment with statuses.

Its own task, retried with backoff: a GitHub outage never fails, delays or
rolls back a deploy, and never holds the environment lock. Any number of
report requests converge: the task posts the states the deployment lacks, in
order (queued → in_progress → success / failure / error), recording each in
the ledger once GitHub answered 201. The deployment is created for the run's
sha with `auto_merge: false`, `required_contexts: []` and the payload
`{"opsfleet_run": <id>}` (how an echo of it can be told apart). After a
success, the previous release's deployment in the environment is marked
`inactive` (opsfleet does it, rather than GitHub's auto_inactive).
"""

from __future__ import annotations

import logging

from celery import shared_task

from worker.adapters import metrics
from worker.adapters.github import GitHubAdapter, GitHubError
from worker.adapters.ledger import LedgerUnavailable
from worker.tasks.report import run_link

log = logging.getLogger("opsfleet.report.github")

MAX_RETRIES = 8

# Run status → the deployment states it implies, in the order GitHub must see them.
STATES = {
    "queued": ("queued",),
    "running": ("queued", "in_progress"),
    "succeeded": ("queued", "in_progress", "success"),
    "failed": ("queued", "in_progress", "failure"),
    "rolled_back": ("queued", "in_progress", "failure"),
    "rollback_failed": ("queued", "in_progress", "error"),
    # Superseded in the lock step: the run was claimed (running) first.
    "superseded": ("queued", "in_progress", "inactive"),
    "skipped": ("queued", "in_progress", "inactive"),
}


def _description(run: dict, state: str) -> str:
    sha = run["params"].get("sha", "")[:7]
    if state in ("queued", "in_progress"):
        return f"opsfleet run #{run['id']}: deploy {sha} to {run['target']} {state.replace('_', ' ')}"
    text = f"#{run['id']} {run['status']}: {run['reason']}".replace("\n", " ")
    return text if len(text) <= 140 else text[:139] + "…"


def report_deploy(runtime, github: GitHubAdapter, run_id: int) -> list[str]:
    """Post what GitHub lacks for this run; returns the states posted now."""
    ledger = runtime.ledger
    run = ledger.get_run(run_id)
    if run is None or run["playbook"] != "deploy" or not run["params"].get("repository"):
        return []
    repository, environment = run["params"]["repository"], run["target"]
    lock, holder = f"github-report:{run_id}", runtime.worker_name
    if not ledger.acquire_lock(lock, holder, 120):
        raise GitHubError(f"run {run_id}: another reporter is at it", retryable=True)
    try:
        known = ledger.github_deployment(run_id)
        if known is None and run["params"].get("github_deployment_id"):
            # The deploy answers a Deployments API event: report on that deployment.
            ledger.set_github_deployment(run_id, repository, int(run["params"]["github_deployment_id"]))
            known = ledger.github_deployment(run_id)
        if known is None:
            deployment_id = github.create_deployment(
                repository,
                ref=run["params"]["sha"],
                environment=environment,
                description=f"opsfleet run #{run_id}",
                payload={"opsfleet_run": run_id},
            )
            ledger.set_github_deployment(run_id, repository, deployment_id)
            known = ledger.github_deployment(run_id)
        wanted = STATES.get(run["status"], ())
        posted = []
        link = run_link(runtime.config.fleet.public_url, run_id)
        for state in [s for s in wanted if s not in known["states"]]:
            github.create_status(
                repository,
                known["deployment_id"],
                state=state,
                description=_description(run, state),
                log_url=link,
                environment=environment,
            )
            ledger.add_github_state(run_id, state)
            posted.append(state)
        if "success" in posted:
            _inactivate_previous(runtime, github, run)
        return posted
    finally:
        ledger.release_lock(lock, holder)


def _inactivate_previous(runtime, github: GitHubAdapter, run: dict) -> None:
    ledger = runtime.ledger
    for release in ledger.list_releases(run["target"], limit=20):
        if release["run_id"] == run["id"] or release["live_at"] is None:
            continue
        previous = ledger.github_deployment(release["run_id"])
        if previous and previous["states"][-1:] == ["success"]:
            github.create_status(
                previous["repository"],
                previous["deployment_id"],
                state="inactive",
                description=f"replaced by opsfleet run #{run['id']}",
                log_url=None,
                environment=run["target"],
            )
            ledger.add_github_state(release["run_id"], "inactive")
        return  # only the one that was live just before


@shared_task(name="opsfleet.report.github", bind=True, acks_late=True, max_retries=MAX_RETRIES)
def report_github(self, run_id: int) -> list[str]:
    runtime = self.app.opsfleet
    token = runtime.secrets.get("GITHUB_TOKEN")
    if not token:
        metrics.REPORTS.labels("github", "not_configured").inc()
        return []
    github = GitHubAdapter(token, runtime.secrets.get("GITHUB_API_URL"), runtime.config.slack.timeout_seconds)
    try:
        posted = report_deploy(runtime, github, run_id)
    except (GitHubError, LedgerUnavailable) as err:
        retryable = getattr(err, "retryable", True)
        if retryable and self.request.retries < MAX_RETRIES:
            metrics.REPORTS.labels("github", "retry").inc()
            backoff = min(5 * 2**self.request.retries, 300)
            # A rate limit says how long to wait: not sooner (GitHub may ban a client that hammers).
            countdown = max(backoff, getattr(err, "retry_after", None) or 0)
            raise self.retry(countdown=countdown, exc=err) from None
        metrics.REPORTS.labels("github", "failed").inc()
        log.warning("run %s: GitHub report given up: %s", run_id, err)
        return []
    if posted:
        metrics.REPORTS.labels("github", "sent").inc()
    return posted
