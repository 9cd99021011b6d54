"""The status page: runs, a run's steps, backups per series, deploys per environment,
rules and what they did.

Server-rendered Jinja (autoescaped), no JavaScript, no build step. Same
access rule as /api: with OPSFLEET_API_TOKEN set, the token as a bearer or as
the basic-auth password (so a browser can log in); without it, loopback
clients only.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta

from flask import Blueprint, Response, abort, render_template, request

from webhooks.app import edge
from webhooks.auth import bearer_token, is_loopback, token_matches
from worker.adapters.ledger import RUN_STATUSES, TRIGGERS, LedgerUnavailable, utcnow

bp = Blueprint("pages", __name__, template_folder="templates")

MAX_ID = 2**31 - 1
RECENT_PER_RULE = 5
RECENT_RELEASES = 10
PAGE = 50
SINCE = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}


def basic_password(header: str) -> str | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


@bp.before_request
def _authorize():
    token = edge().loaded.secrets.get("OPSFLEET_API_TOKEN")
    if token:
        presented = bearer_token(request) or basic_password(request.headers.get("Authorization", ""))
        if not token_matches(presented, token):
            return Response(
                "Unauthorized: log in with any user name and OPSFLEET_API_TOKEN as the password.\n",
                401,
                {"WWW-Authenticate": 'Basic realm="opsfleet", charset="UTF-8"', "Content-Type": "text/plain"},
            )
    elif not is_loopback(request.remote_addr):
        return Response(
            "Forbidden: set OPSFLEET_API_TOKEN to see the status page from other hosts.\n",
            403,
            {"Content-Type": "text/plain"},
        )
    if any("\x00" in v or len(v) > 256 for v in request.args.values()):
        abort(400)
    return None


@bp.after_request
def _headers(response):
    # Nothing on these pages runs script or is framed; say so to the browser.
    response.headers.setdefault("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.app_template_filter("when")
def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("ago")
def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return age_text((utcnow() - moment).total_seconds())


def age_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _ledger_down():
    return render_template("pages/error.html", message="The ledger is not answering; try again shortly."), 503


@bp.get("/")
def runs():
    args = request.args
    status, trigger, target = args.get("status") or None, args.get("trigger") or None, args.get("target") or None
    since, before = args.get("since") or None, args.get("before") or None
    problems = []
    if status and status not in RUN_STATUSES:
        problems.append(f"unknown status {status!r}")
    if trigger and trigger not in TRIGGERS:
        problems.append(f"unknown trigger {trigger!r}")
    if since and since not in SINCE:
        problems.append(f"since must be one of {', '.join(SINCE)}")
    if before and not (before.isdigit() and 0 < int(before) <= MAX_ID):
        problems.append("before must be a run id")
    if problems:
        return render_template("pages/error.html", message="; ".join(problems)), 400
    try:
        found = edge().ledger.list_runs(
            limit=PAGE + 1,
            status=status,
            trigger=trigger,
            target=target,
            since=utcnow() - SINCE[since] if since else None,
            before_id=int(before) if before else None,
        )
    except LedgerUnavailable:
        return _ledger_down()
    chosen = {"status": status or "", "trigger": trigger or "", "target": target or "", "since": since or ""}
    older = None
    if len(found) > PAGE:
        found = found[:PAGE]
        older = {k: v for k, v in chosen.items() if v} | {"before": found[-1]["id"]}
    return render_template(
        "pages/runs.html",
        runs=found,
        statuses=RUN_STATUSES,
        triggers=TRIGGERS,
        periods=list(SINCE),
        chosen=chosen,
        older=older,
    )


@bp.get("/runs/<int:run_id>")
def run(run_id: int):
    try:
        found = edge().ledger.get_run(run_id) if run_id <= MAX_ID else None
    except LedgerUnavailable:
        return _ledger_down()
    if found is None:
        return render_template("pages/error.html", message=f"No run {run_id}."), 404
    return render_template("pages/run.html", run=found)


@bp.get("/backups")
def backups():
    from worker.adapters.backupstore import list_sets, newest_holding
    from worker.tasks.backup import MAX_AGE_HOURS

    loaded = edge().loaded
    now = utcnow()
    root = loaded.backup_root
    sets = list_sets(root) if root.is_dir() else []
    series = []
    for name, spec in sorted(loaded.config.backup.series.items()):
        newest = newest_holding(sets, name, verified_only=True)
        row = {"name": name, "kind": spec.kind, "cadence": spec.cadence, "set": None, "state": "missing"}
        if newest is not None:
            taken = newest.item_taken_at(name)
            age = (now - taken).total_seconds()
            row.update(
                set=newest.id,
                taken=taken,
                age=age_text(age),
                size=_megabytes(newest.size(name)),
                state="stale" if age > MAX_AGE_HOURS[spec.cadence] * 3600 else "fresh",
            )
        series.append(row)
    recent = [
        {
            "id": s.id,
            "taken": s.taken_at,
            "age": age_text((now - s.taken_at).total_seconds()),
            "contents": [
                {"series": n, "verified": s.verified(n), "size": _megabytes(s.size(n))} for n in sorted(s.items)
            ],
        }
        for s in sets[:20]
    ]
    return render_template("pages/backups.html", series=series, sets=recent, root=str(root))


@bp.get("/rules")
def rules():
    config = edge().loaded.config
    shown = []
    try:
        for rule in config.remediation.rules:
            shown.append({"rule": rule, "runs": edge().ledger.list_runs(limit=RECENT_PER_RULE, rule=rule.name)})
    except LedgerUnavailable:
        return _ledger_down()
    return render_template("pages/rules.html", rules=shown, mode=config.remediation.mode)


@bp.get("/deploys")
def deploys():
    config = edge().loaded.config
    shown = []
    try:
        for name, env in sorted(config.deploy.environments.items()):
            releases = edge().ledger.list_releases(name, limit=RECENT_RELEASES)
            live = edge().ledger.current_release(name)
            shown.append({"name": name, "env": env, "live": live, "releases": releases})
    except LedgerUnavailable:
        return _ledger_down()
    return render_template("pages/deploys.html", environments=shown)
