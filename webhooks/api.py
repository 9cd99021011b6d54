"""The read API over the ledger: GET /api/runs, GET /api/runs/<id>.

With OPSFLEET_API_TOKEN set, a bearer token is required; without it the API
answers loopback clients only, so a fresh install exposes nothing.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from webhooks.app import edge
from webhooks.auth import bearer_token, is_loopback, token_matches
from webhooks.errors import error
from worker.adapters.ledger import RUN_STATUSES, TRIGGERS, LedgerUnavailable, jsonable

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
