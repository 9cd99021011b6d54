"""The escalate playbook: page a person, by two independent paths.

1. `alertmanager`: post an `OpsfleetEscalation` alert to Alertmanager's API,
   so the team's usual paging route fires even when Slack is down.
2. `page_slack`: a Slack message mentioning the on-call group, with the
   alert and what opsfleet already tried.
Alertmanager goes first: a Slack failure then cannot keep the page from
reaching the pager.
"""

from __future__ import annotations

import time
from datetime import timedelta

import requests

from worker.adapters.ledger import utcnow
from worker.adapters.slack import SlackError, escape
from worker.tasks.report import run_link
from worker.tasks.steps import Step, StepContext, StepFailed

ALERTNAME = "OpsfleetEscalation"


def _tried(ctx: StepContext) -> list[str]:
    """Earlier runs of the same rule on the same target: what was tried."""
    run = ctx.run
    if not run["target"]:
        return []
    recent = ctx.runtime.ledger.list_runs(target=run["target"], limit=20)
    return [
        f"run #{r['id']} {r['playbook']}: {r['status']}" + (f" ({r['reason'][:80]})" if r["reason"] else "")
        for r in recent
        # Skipped runs tried nothing.
        if r["rule"] == run["rule"] and r["playbook"] != "escalate" and r["status"] != "skipped"
    ][:5]


def _run_link(ctx: StepContext) -> str:
    return run_link(ctx.config.fleet.public_url, ctx.run["id"]) or ""


def notify_alertmanager(ctx: StepContext) -> str:
    settings = ctx.config.escalation
    if not settings.alertmanager_url:
        return "escalation.alertmanager_url is not configured: Slack is the only path"
    now = utcnow()
    labels = {
        **settings.alertmanager_labels,
        "alertname": ALERTNAME,
        "rule": ctx.run["rule"] or "",
        "target": ctx.run["target"] or "",
        "opsfleet_run": str(ctx.run["id"]),
    }
    annotations = {
        "summary": f"opsfleet escalates: {ctx.params.get('reason', ctx.run['reason'])}",
        "description": "\n".join([ctx.params.get("alert", ""), *_tried(ctx)]),
    }
    alert = {
        "labels": {k: v for k, v in labels.items() if v},
        "annotations": annotations,
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(seconds=settings.escalation_ttl_seconds)).isoformat(),
        "generatorURL": _run_link(ctx),
    }
    url = settings.alertmanager_url.rstrip("/") + "/api/v2/alerts"
    last = ""
    for attempt in range(3):
        try:
            answer = requests.post(url, json=[alert], timeout=settings.timeout_seconds)
            if answer.ok:
                return f"posted {ALERTNAME} to {settings.alertmanager_url} (HTTP {answer.status_code})"
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            if answer.status_code < 500:
                break  # Alertmanager refused the alert itself: retrying will not help
        except requests.RequestException as err:
            last = f"{err.__class__.__name__}: {err}"
        time.sleep(2**attempt)
    raise StepFailed(f"Alertmanager at {settings.alertmanager_url} did not take the escalation: {last}")


def page_slack(ctx: StepContext) -> str:
    slack = ctx.runtime.slack
    if slack is None:
        if not ctx.config.escalation.alertmanager_url:
            # An escalation that reached nobody must not read as done.
            raise StepFailed(
                "nobody was paged: neither escalation.alertmanager_url nor SLACK_BOT_TOKEN is set; set one of them"
            )
        return "SLACK_BOT_TOKEN is not set: no Slack page"
    settings = ctx.config.escalation
    lines = [
        # The mention comes from the configuration, never from the alert.
        f"{settings.slack_mention} :rotating_light: opsfleet needs a person: "
        f"{escape(ctx.params.get('reason', ctx.run['reason']))}",
        escape(ctx.params.get("alert", "")),
    ]
    tried = _tried(ctx)
    if tried:
        lines.append("Tried: " + escape("; ".join(tried)))
    link = _run_link(ctx)
    if link:
        lines.append(f"<{link}|escalation run #{ctx.run['id']}>")
    try:
        try:
            posted = slack.post(ctx.config.slack.channel, "\n".join(lines))
        except SlackError as err:
            if not err.retry_after or err.retry_after > 30:
                raise
            time.sleep(err.retry_after)  # a page is worth a short wait for Slack's rate limit
            posted = slack.post(ctx.config.slack.channel, "\n".join(lines))
    except SlackError as err:
        if settings.alertmanager_url:
            # The step before posted the page to Alertmanager (or the run would have stopped there):
            # a person is paged; the Slack copy is what failed.
            return f"Slack page failed ({err}); the page reached Alertmanager, whose route pages on-call"
        raise StepFailed(f"{err}; nobody was paged") from None
    return f"paged {settings.slack_mention} in {posted.channel} (ts {posted.ts})"


PLAYBOOKS = {
    "escalate": (
        Step("alertmanager", notify_alertmanager),
        Step("page_slack", page_slack),
    ),
}
