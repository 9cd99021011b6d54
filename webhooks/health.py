"""Liveness, readiness and the metrics scrape."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from webhooks.app import edge
from worker.adapters import metrics
from worker.adapters.ledger import LedgerUnavailable

bp = Blueprint("health", __name__)
log = logging.getLogger("opsfleet.web")


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    state = edge()
    checks = {}
    try:
        state.ensure_schema()
        state.ledger.ping()
        checks["ledger"] = "ok"
    except LedgerUnavailable as err:
        log.warning("readyz: %s", err)
        checks["ledger"] = "unavailable"
    # The ledger may answer a ping while the alert intake's commit is stuck (a lock held elsewhere).
    stalled = state.alert_intake.stalled_for() if state.alert_intake else None
    checks["alert_intake"] = "ok" if stalled is None else f"commit stuck for {stalled:.0f} s"
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as err:  # kombu raises several kinds; any means not ready
        log.warning("readyz: broker unavailable: %s: %s", err.__class__.__name__, err)
        checks["broker"] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ready" if ready else "not ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
def scrape():
    # Task metrics from every process, plus worker liveness and queue lengths read now.
    return Response(metrics.scrape(edge().fleet_collector()), headers={"Content-Type": metrics.CONTENT_TYPE})
