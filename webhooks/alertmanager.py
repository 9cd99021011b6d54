"""POST /hooks/alertmanager: Alertmanager's webhook (payload version 4).

Alertmanager retries 5xx and not 4xx, so: 202 only once the event is in
the ledger; 503 when the ledger cannot take it (it will come again); 400
with the reason for a body it sent wrong (sending again would not help);
401 for a bad token, with nothing in the body to help a guesser.
"""

from __future__ import annotations

import json
from typing import Literal

from flask import Blueprint, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from webhooks.app import edge
from webhooks.auth import bearer_token, token_matches
from webhooks.errors import error
from worker.adapters.ledger import LedgerUnavailable
from worker.decide import Alert
from worker.tasks.intake import accept_alerts

bp = Blueprint("alertmanager", __name__)

# RFC 3339 as Alertmanager writes it (nanoseconds, Z or an offset).
_RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"


class _Payload(BaseModel):
    # strict: a number where a string belongs is an error, not coerced.
    # extra allowed: a newer Alertmanager may add fields.
    model_config = ConfigDict(strict=True, extra="allow")


class AlertmanagerAlert(_Payload):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = Field(pattern=_RFC3339)
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
    body = request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH
    try:
        data = json.loads(body)
    except ValueError as err:
        return error(400, f"body is not JSON: {err}")
    if isinstance(data, dict) and "version" in data and data["version"] != "4":
        return error(400, f"unsupported Alertmanager payload version {str(data['version'])[:20]!r}: opsfleet reads version 4")
    try:
        payload = AlertmanagerPayload.model_validate(data)
    except ValidationError as err:
        return error(400, "not an Alertmanager version 4 payload", problems=_problems(err))

    g.group_key = payload.groupKey[:200]  # for the request log line
    alerts = [Alert(a.status, a.labels, a.fingerprint, a.startsAt) for a in payload.alerts]
    summary = (
        f"{payload.status} group {payload.groupKey}: {len(alerts)} alerts"
        + (f", {payload.truncatedAlerts} truncated" if payload.truncatedAlerts else "")
    )
    try:
        state.ensure_schema()
        intake = accept_alerts(state.celery, alerts=alerts, summary=summary, body=body.decode("utf-8"))
    except LedgerUnavailable:
        response = error(503, "ledger unavailable: not recorded, send again")
        response.headers["Retry-After"] = "5"
        return response
    response = jsonify(
        {
            "event_id": intake.event_id,
            "runs": intake.run_ids,
            "enqueued": intake.enqueued,
            "truncated_alerts": payload.truncatedAlerts,
            "alerts": intake.decisions,
        }
    )
    response.status_code = 202
    return response
