"""POST /hooks/alertmanager: Alertmanager's webhook (payload version 4).

Alertmanager retries 5xx and not 4xx, so: 202 only once the event is in
the ledger; 503 when the ledger cannot take it (it will come again); 400
with the reason for a body it sent wrong (sending again would not help);
401 for a bad token, with nothing in the body to help a guesser.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Literal

from flask import Blueprint, g, jsonify, request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from webhooks.app import edge
from webhooks.auth import bearer_token, token_matches
from webhooks.batching import IntakeTimeout
from webhooks.errors import error, read_body
from worker.adapters.ledger import LedgerUnavailable
from worker.decide import Alert
from worker.tasks.intake import AlertNotification, AlertsCommitted

bp = Blueprint("alertmanager", __name__)
log = logging.getLogger("opsfleet.web")

# RFC 3339 as Alertmanager writes it (nanoseconds, Z or an offset).
_RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"


class _Payload(BaseModel):
    # strict: a number where a string belongs is an error, not coerced.
    # extra allowed: a newer Alertmanager may add fields.
    model_config = ConfigDict(strict=True, extra="allow")


def _real_time(text: str) -> str:
    """The pattern admits 2026-13-45T99:99:99Z; the calendar does not."""
    head, _, rest = text.partition(".")
    zone = "+00:00" if text.endswith("Z") else text[-6:]
    try:
        datetime.fromisoformat((head.rstrip("Z") if not rest else head) + zone)
    except ValueError:
        raise ValueError(f"{text!r} is not a real time") from None
    return text


class AlertmanagerAlert(_Payload):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: Annotated[str, AfterValidator(_real_time)] = Field(pattern=_RFC3339)
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = Field(pattern=r"^[A-Za-z0-9]{1,64}$")


class AlertmanagerPayload(_Payload):
    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: str
    groupKey: str = Field(max_length=10_000)
    truncatedAlerts: int = Field(default=0, ge=0)
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[AlertmanagerAlert] = Field(min_length=1)


def text_problem(data) -> str | None:
    """Strings PostgreSQL cannot store and no sender means: NUL, unpaired surrogates.
    Iterative: the depth is whatever the JSON parser accepted."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            if "\x00" in node:
                return "a string holds a NUL character"
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds an unpaired UTF-16 surrogate"
    return None


def _no_constant(name: str):
    # Python's json reads NaN and Infinity; JSON (RFC 8259) has no such numbers.
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    # Python refuses to convert more than 4,300 digits, with advice meant for programmers.
    if len(text.lstrip("-")) > 4300:
        raise ValueError(f"a number has {len(text.lstrip('-'))} digits (at most 4300 accepted)")
    return int(text)


def parse_json_body(body: bytes):
    """(data, None) or (None, reason): UTF-8 JSON that a ledger can store."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"body is not UTF-8 (byte {err.start})"
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int)
    except ValueError as err:
        return None, f"body is not JSON: {err}"
    except RecursionError:
        return None, "body is not JSON opsfleet accepts: nested too deeply"
    problem = text_problem(data)
    return (None, f"body is not acceptable: {problem}") if problem else (data, None)


def _problems(err: ValidationError) -> list[str]:
    out = []
    for item in err.errors()[:20]:
        where = ".".join(str(p) for p in item["loc"]) or "(body)"
        out.append(f"{where}: {item['msg']}")
    return out


@bp.post("/hooks/alertmanager")
def receive():
    state = edge()
    if not token_matches(bearer_token(request), state.loaded.secrets.get("ALERTMANAGER_TOKEN")):
        return error(401, "unauthorized")
    body = read_body()
    data, problem = parse_json_body(body)
    if problem:
        return error(400, problem)
    if isinstance(data, dict) and "version" in data and data["version"] != "4":
        got = json.dumps(data["version"])[:20]
        if not isinstance(data["version"], str):
            return error(400, f'version must be the string "4" (Alertmanager\'s webhook payload version), not {got}')
        return error(400, f'unsupported Alertmanager payload version {got}: opsfleet reads "4"')
    try:
        payload = AlertmanagerPayload.model_validate(data)
    except ValidationError as err:
        return error(400, "not an Alertmanager version 4 payload", problems=_problems(err))

    g.group_key = payload.groupKey[:200]  # for the request log line
    alerts = [Alert(a.status, a.labels, a.fingerprint, a.startsAt) for a in payload.alerts]
    summary = f"{payload.status} group {payload.groupKey}: {len(alerts)} alerts" + (
        f", {payload.truncatedAlerts} truncated" if payload.truncatedAlerts else ""
    )
    try:
        state.ensure_schema()
        # Committed with the notifications that arrive with it (webhooks.batching).
        intake = state.alert_intake.submit(
            AlertNotification(alerts, payload.truncatedAlerts, summary, body.decode("utf-8")), arrived=g.started
        )
    except LedgerUnavailable:
        response = error(503, "ledger unavailable: not recorded, send again")
        response.headers["Retry-After"] = "5"
        return response
    except (IntakeTimeout, AlertsCommitted) as err:
        log.warning("alert notification answered 503: %s", err)
        response = error(503, f"{err}: send again (a resend is a repeat, never a second action)")
        response.headers["Retry-After"] = "5"
        return response
    response = jsonify(
        {
            "event_id": intake.event_id,
            "runs": intake.run_ids,
            "enqueued": intake.enqueued,
            "resolved_runs": intake.resolved_runs,
            "truncated_alerts": payload.truncatedAlerts,
            "alerts": intake.decisions,
        }
    )
    response.status_code = 202
    return response
