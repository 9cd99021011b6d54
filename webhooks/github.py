"""POST /hooks/github: GitHub's webhook (push → deploy).

verify → parse → decide → commit to the ledger → enqueue → answer, as the
Alertmanager edge; no work in the request (GitHub gives up after 10 s).

- `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of the raw body with
  GITHUB_WEBHOOK_SECRET, compared in constant time. Missing, malformed or
  wrong (or no secret configured) → 401 with a body that says nothing more.
- `X-GitHub-Delivery` is the idempotency key: the event is recorded once
  (events' unique (source, dedup_key)); a redelivery → 200 with the run(s)
  recorded the first time, and nothing enqueued again.
- `ping` → 200. A `push` to an environment's branch (or a v* tag) → a
  `deploy` run per environment, 202; a `deployment` (Deployments API) for an
  environment that takes them → a `deploy` run of its sha, unless opsfleet
  created that deployment itself (GitHub echoing it); a `workflow_run` that
  completed with success, of an environment's workflow on its branch → a
  `deploy` run of its head commit (pushes to that branch then wait for it). Anything else → 202 ignored, recorded
  with the reason (so "why did my push not deploy" has an answer).
- A broker that refuses the run leaves it queued for the sweeper (202 all
  the same); a ledger that is down → 503, nothing recorded, GitHub's
  redelivery (or the operator's) works.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

from flask import Blueprint, jsonify, request

from webhooks.alertmanager import parse_json_body
from webhooks.app import edge
from webhooks.errors import error, read_body
from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable, NewRun
from worker.deploys import (
    MalformedPayload,
    decide_deployment,
    decide_push,
    decide_workflow_run,
    repository_name,
    sender_name,
)
from worker.tasks.runs import enqueue_runs

log = logging.getLogger("opsfleet.web.github")

bp = Blueprint("github", __name__)

_SIGNATURE = re.compile(r"^sha256=([0-9a-f]{64})$")
_DELIVERY = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_EVENT = re.compile(r"^[a-z_]{1,64}$")


def signature_ok(secret: str | None, body: bytes, header: str | None) -> bool:
    if not secret or not header:
        return False
    match = _SIGNATURE.match(header.strip())
    if not match:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, match.group(1))


def _unavailable():
    response = error(503, "ledger unavailable: not recorded, redeliver")
    response.headers["Retry-After"] = "5"
    return response


def _answer(status: int, **body):
    response = jsonify(body)
    response.status_code = status
    return response


@bp.post("/hooks/github")
def receive():
    state = edge()
    body = read_body()
    if not signature_ok(
        state.loaded.secrets.get("GITHUB_WEBHOOK_SECRET"), body, request.headers.get("X-Hub-Signature-256")
    ):
        if not state.loaded.secrets.get("GITHUB_WEBHOOK_SECRET"):
            log.warning("GITHUB_WEBHOOK_SECRET is not set: every GitHub delivery is refused")
        return error(401, "unauthorized")
    event = request.headers.get("X-GitHub-Event", "")
    delivery = request.headers.get("X-GitHub-Delivery", "")
    if not _EVENT.match(event):
        return error(400, "X-GitHub-Event missing or malformed")
    if not _DELIVERY.match(delivery):
        return error(400, "X-GitHub-Delivery missing or malformed")
    if request.mimetype == "application/x-www-form-urlencoded":
        return error(415, "the webhook sends form data: set its Content type to application/json in GitHub's settings")
    data, problem = parse_json_body(body)
    if problem:
        return error(400, problem)
    if not isinstance(data, dict):
        return error(400, "body is not a JSON object")
    if event == "ping":
        return _answer(200, pong=True, zen=str(data.get("zen", ""))[:200])

    deciders = {"push": decide_push, "deployment": decide_deployment, "workflow_run": decide_workflow_run}
    try:
        if event in deciders:
            decision = deciders[event](data, state.loaded.config)
            ignored = decision.ignored
        else:
            decision, ignored = None, f"event {event} does not trigger anything"
        who, repository = sender_name(data), repository_name(data)
    except MalformedPayload as err:
        return error(400, f"malformed {event} payload: {err}")
    runs = [
        NewRun(
            trigger="github",
            triggered_by=who[:128] or None,
            playbook="deploy",
            target=d.environment,
            params={
                "environment": d.environment,
                "sha": d.sha,
                "ref": d.ref,
                "tag": d.tag,
                "images": d.images,
                "order": list(d.order),
                "delivery": delivery,
                "repository": repository[:255],
                **({"github_deployment_id": d.github_deployment_id} if d.github_deployment_id else {}),
            },
            summary=f"deploy {d.sha[:7]} ({d.ref}) to {d.environment}",
            dedup_key=f"github:{delivery}:{d.environment}",
        )
        for d in (decision.deploys if decision else ())
    ]
    summary = f"{event} {delivery}: " + (", ".join(r.summary for r in runs) if runs else f"ignored: {ignored}")
    try:
        state.ensure_schema()
        recorded, created = state.ledger.record_delivery(
            source="github", dedup_key=delivery, summary=summary, body=body.decode("utf-8"), new_runs=runs
        )
    except LedgerUnavailable:
        return _unavailable()
    run_ids = [r.id for r in recorded.runs]
    if not created:
        metrics.GITHUB_DELIVERIES.labels(event, "redelivery").inc()
        return _answer(200, event_id=recorded.event_id, runs=run_ids, enqueued=[], redelivery=True)
    if not runs:
        metrics.GITHUB_DELIVERIES.labels(event, "ignored").inc()
        return _answer(202, event_id=recorded.event_id, runs=[], ignored=ignored)
    enqueued = enqueue_runs(state.celery, state.ledger, [r.id for r in recorded.runs if r.created], marked=True)
    metrics.GITHUB_DELIVERIES.labels(event, "deploy").inc()
    return _answer(202, event_id=recorded.event_id, runs=run_ids, enqueued=enqueued)
