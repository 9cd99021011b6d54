"""Reporting a run to Slack: one parent message, updated in place; steps as replies;
"resolved" when the alert behind it resolves.

The task posts whatever the thread lacks, so any number of report requests
for a run converge on one complete thread. A per-run report lock keeps two
reporters from both posting a parent.
"""

from __future__ import annotations

import logging

from celery import shared_task

from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable
from worker.adapters.slack import SlackError, escape

log = logging.getLogger("opsfleet.report")

STATUS_ICON = {
    "queued": ":hourglass:",
    "running": ":gear:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "skipped": ":fast_forward:",
    "superseded": ":fast_forward:",
    "rolled_back": ":leftwards_arrow_with_hook:",
    "rollback_failed": ":rotating_light:",
}


def run_link(public_url: str | None, run_id: int) -> str | None:
    """The run's page on the status page (steps and output, for people)."""
    return f"{public_url.rstrip('/')}/runs/{run_id}" if public_url else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def resolution_text(run: dict) -> str:
    return f":large_green_circle: resolved after {_duration((run['resolved_at'] - run['created_at']).total_seconds())}"


def shown_state(run: dict) -> str:
    """What the parent message shows; it is updated whenever this changes."""
    return run["status"] + (":resolved" if run["resolved_at"] else "")


def parent_text(run: dict, public_url: str | None) -> str:
    icon = STATUS_ICON.get(run["status"], "")
    params = run.get("params") or {}
    if run["playbook"] == "deploy" and params.get("sha"):
        # A deploy reads as one: which commit, from which ref, to which environment, asked by whom.
        ref = f" ({escape(str(params.get('ref') or ''))})" if params.get("ref") else ""
        head = (
            f"{icon} Deploy #{run['id']} of `{escape(str(params['sha'])[:7])}`{ref} to "
            f"{escape(run['target'] or '-')}: *{run['status']}*"
        )
        if run.get("triggered_by"):
            head += f" · by {escape(str(run['triggered_by']))}"
    else:
        head = f"{icon} Run #{run['id']} {run['playbook']} on {escape(run['target'] or '-')}: *{run['status']}*"
    lines = [head]
    if run["summary"]:
        lines.append(escape(run["summary"]))
    if run["reason"] and run["status"] not in ("queued", "running"):
        lines.append(escape(run["reason"]))
    if run["resolved_at"]:
        lines.append(resolution_text(run))
    link = run_link(public_url, run["id"])
    if link:
        lines.append(f"<{link}|run details>")
    return "\n".join(lines)


def _section(text: str) -> dict:
    # A section's text is at most 3000 characters.
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def parent_blocks(run: dict, public_url: str | None) -> list[dict]:
    """Block Kit for the parent message: the same escaped text (also the
    notification fallback), and a button to the run's page when public_url is set."""
    text = parent_text(run, public_url)
    link = run_link(public_url, run["id"])
    head, *rest = text.split("\n")
    if link:
        rest = [line for line in rest if not line.startswith(f"<{link}|")]
    blocks = [_section(head)]
    if rest:
        blocks.append(_section("\n".join(rest)))
    context = [
        {"type": "mrkdwn", "text": f"{run['trigger']}{' · rule ' + escape(run['rule']) if run.get('rule') else ''}"}
    ]
    blocks.append({"type": "context", "elements": context})
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": f"Run #{run['id']}"},
                        "url": link,
                        "action_id": "open_run",
                    },
                ],
            }
        )
    return blocks


def step_blocks(step: dict) -> list[dict]:
    return [_section(step_text(step))]


def step_text(step: dict) -> str:
    icon = STATUS_ICON.get(step["status"], "")
    output = escape(step["output"][:2500])
    return f"{icon} step `{step['name']}` {step['status']}" + (f"\n```{output}```" if output else "")


@shared_task(name="opsfleet.report.slack", bind=True, acks_late=True, max_retries=8)
def report_slack(self, run_id: int) -> str:
    runtime = self.app.opsfleet
    slack = runtime.slack
    if slack is None:
        metrics.REPORTS.labels("slack", "not_configured").inc()
        return "slack not configured"
    ledger = runtime.ledger
    try:
        if not ledger.lock_report(run_id, seconds=150):
            raise self.retry(countdown=2)
    except LedgerUnavailable as err:
        raise self.retry(countdown=10, exc=err) from None
    try:
        run = ledger.get_run(run_id)
        if run is None:
            return "no such run"
        if run["status"] == "skipped" and not run["slack_ts"]:
            # Skips (repeats, locks, cooldowns, a storm's alerts) stay in the
            # ledger: in Slack they would be the noise opsfleet exists to cut.
            return "skipped runs are not posted"
        channel = runtime.config.slack.channel
        public_url = runtime.config.fleet.public_url
        text = parent_text(run, public_url)
        if not run["slack_ts"]:
            posted = slack.post(channel, text, blocks=parent_blocks(run, public_url))
            ledger.set_slack_thread(run_id, posted.channel, posted.ts)
            run.update(slack_channel=posted.channel, slack_ts=posted.ts, reported_status=shown_state(run))
            ledger.set_reported_status(run_id, shown_state(run))
        for step in run["steps"]:
            if step["reported"] or step["status"] == "running":
                continue
            slack.post(run["slack_channel"], step_text(step), blocks=step_blocks(step), thread_ts=run["slack_ts"])
            ledger.mark_step_reported(step["id"])
        if run["resolved_at"] and not run["resolution_reported"]:
            slack.post(run["slack_channel"], resolution_text(run), thread_ts=run["slack_ts"])
            ledger.mark_resolution_reported(run_id)
        if run["reported_status"] != shown_state(run):
            slack.update(run["slack_channel"], run["slack_ts"], text, blocks=parent_blocks(run, public_url))
            ledger.set_reported_status(run_id, shown_state(run))
        metrics.REPORTS.labels("slack", "delivered").inc()
        return "delivered"
    except SlackError as err:
        # Try again later (never sooner than a 429's Retry-After), then give up with the
        # failure recorded in metrics and the log. The retry waits in the broker, not in a
        # worker process. What was posted stays posted: the next try adds only what is missing.
        if self.request.retries >= self.max_retries:
            metrics.REPORTS.labels("slack", "undelivered").inc()
            log.error("run %s: Slack report undelivered: %s", run_id, err)
            return "undelivered"
        metrics.REPORTS.labels("slack", "retry").inc()
        countdown = max(min(5 * 2**self.request.retries, 300), err.retry_after or 0)
        raise self.retry(countdown=countdown, exc=err) from None
    finally:
        try:
            ledger.unlock_report(run_id)
        except LedgerUnavailable:
            pass  # the lock expires by itself
