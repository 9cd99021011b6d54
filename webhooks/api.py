"""The API over the ledger: GET /api/runs, GET /api/runs/<id>; POST /api/deploys
and POST /api/rollbacks (deliberate deploys, as `opsfleet deploy` / `rollback`).

With OPSFLEET_API_TOKEN set, a bearer token is required; without it the API
answers loopback clients only, so a fresh install exposes nothing. The POST
endpoints need the token whatever the client: they change production.
An `Idempotency-Key` header makes a retried POST land on the same run.
"""

from __future__ import annotations

import re
import time

from flask import Blueprint, jsonify, request

from webhooks.app import edge
from webhooks.auth import bearer_token, is_loopback, token_matches
from webhooks.errors import error, read_body
from worker.adapters.ledger import RUN_STATUSES, TRIGGERS, LedgerUnavailable, NewRun, jsonable
from worker.deploys import manual_deploy_params, rollback_params, rollback_target

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_ID = 2**31 - 1  # the ledger's integer ids


@bp.before_request
def _authorize():
    token = edge().loaded.secrets.get("OPSFLEET_API_TOKEN")
    if token:
        if not token_matches(bearer_token(request), token):
            return error(401, "unauthorized")
    elif not is_loopback(request.remote_addr):
        return error(403, "forbidden: set OPSFLEET_API_TOKEN to use the API from other hosts")
    if any("\x00" in v or len(v) > 256 for v in request.args.values()):
        return error(400, "query parameters must be under 256 characters, without NUL")
    return None


@bp.get("/runs")
def list_runs():
    args = request.args
    try:
        limit = int(args.get("limit", 50))
    except ValueError:
        return error(400, "limit must be a whole number")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    status, trigger = args.get("status"), args.get("trigger")
    if status and status not in RUN_STATUSES:
        return error(400, f"status must be one of {', '.join(RUN_STATUSES)}")
    if trigger and trigger not in TRIGGERS:
        return error(400, f"trigger must be one of {', '.join(TRIGGERS)}")
    try:
        runs = edge().ledger.list_runs(limit=limit, status=status, trigger=trigger, target=args.get("target"))
    except LedgerUnavailable:
        return error(503, "ledger unavailable")
    return jsonify({"runs": jsonable(runs)})


@bp.get("/runs/<int:run_id>")
def get_run(run_id: int):
    if run_id > MAX_ID:
        return error(404, f"no run {run_id}")
    try:
        run = edge().ledger.get_run(run_id)
    except LedgerUnavailable:
        return error(503, "ledger unavailable")
    if run is None:
        return error(404, f"no run {run_id}")
    return jsonify(jsonable(run))


_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _deploy_request():
    """(environment name, its config, JSON body) or an error answer."""
    if not edge().loaded.secrets.get("OPSFLEET_API_TOKEN"):
        return None, error(403, "forbidden: POST needs OPSFLEET_API_TOKEN set (and sent as a bearer token)")
    from webhooks.alertmanager import parse_json_body

    data, problem = parse_json_body(read_body())
    if problem or not isinstance(data, dict):
        return None, error(400, problem or "body must be a JSON object")
    name = data.get("environment")
    env = edge().loaded.config.deploy.environments.get(name) if isinstance(name, str) else None
    if env is None:
        known = ", ".join(sorted(edge().loaded.config.deploy.environments)) or "none configured"
        return None, error(400, f"environment must name a configured environment ({known})")
    return (name, env, data), None


def _record_and_enqueue(name: str, params: dict, what: str):
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.match(key):
        return error(400, "Idempotency-Key: 1 to 100 of A-Z a-z 0-9 . _ : -")
    run = NewRun(
        trigger="manual",
        triggered_by="api",
        playbook="deploy",
        target=name,
        params=params,
        summary=f"{what} {params['sha'][:7]} to {name} (API)",
    )
    state = edge()
    try:
        state.ensure_schema()
        if key:
            recorded, created = state.ledger.record_delivery(
                source="api", dedup_key=key, summary=run.summary, body="", new_runs=[run]
            )
        else:
            recorded, created = (
                state.ledger.record_event(source="api", summary=run.summary, body="", new_runs=[run]),
                True,
            )
    except LedgerUnavailable:
        return error(503, "ledger unavailable")
    from worker.tasks.runs import enqueue_runs

    run_id = recorded.runs[0].id
    if not created:
        return jsonify({"run_id": run_id, "enqueued": False, "repeat": True}), 200
    enqueued = enqueue_runs(state.celery, state.ledger, [run_id], marked=False)
    return jsonify({"run_id": run_id, "enqueued": bool(enqueued)}), 202


@bp.post("/deploys")
def post_deploy():
    found, problem = _deploy_request()
    if problem:
        return problem
    name, env, data = found
    sha, tag = data.get("sha"), data.get("tag", "")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
        return error(400, "sha must be a full commit sha (40 lower-case hex digits)")
    if not isinstance(tag, str) or len(tag) > 128:
        return error(400, "tag must be a string (the git tag, for a tag_template with {tag})")
    return _record_and_enqueue(name, manual_deploy_params(name, env, sha, tag, time.time()), "deploy")


@bp.post("/rollbacks")
def post_rollback():
    found, problem = _deploy_request()
    if problem:
        return problem
    name, _, data = found
    release_id = data.get("release")
    if release_id is not None and (not isinstance(release_id, int) or isinstance(release_id, bool)):
        return error(400, "release must be a release id (a whole number)")
    try:
        target, why = rollback_target(edge().ledger.list_releases(name, limit=500), release_id)
    except LedgerUnavailable:
        return error(503, "ledger unavailable")
    if target is None:
        return error(409, f"{name}: {why}")
    return _record_and_enqueue(name, rollback_params(name, target, time.time()), "rollback to")
