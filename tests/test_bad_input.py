"""Bad input, made by Hypothesis from real payloads: every mutation below breaks a field
the edge must check (dropped, retyped, wrapped, NUL in it, the body truncated, bytes that
are not UTF-8, the body over the limit), so every one is answered 4xx with a reason, never
5xx; none is recorded in the ledger or enqueued; no secret reaches the logs.

Three endpoints, real fixtures: Alertmanager's webhook (firing-group-3.json), GitHub's
(push, deployment and workflow_run, each signed, so the payload is what is tested, not the
signature) and the API's POST /api/deploys.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webhooks import create_app
from worker.config import parse_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AM_TOKEN = "am-secret-token-3f9a"
GH_SECRET = "gh-secret-8c1d"
API_TOKEN = "api-secret-token-77e2"
SECRETS = (AM_TOKEN, GH_SECRET, API_TOKEN)
LIMIT = 64 * 1024  # web.max_body_bytes here: oversized bodies stay cheap to build

CONFIG = {
    "web": {"max_body_bytes": LIMIT},
    "services": {"api": {"container": "shop-api"}, "web": {"container": "shop-web"}, "app": {"container": "a"}},
    "remediation": {
        "rules": [
            {
                "name": "any",
                "match": ['alertname=~".+"'],
                "playbook": "restart_service",
                "target": {"service_label": "service"},
            }
        ]
    },
    "deploy": {
        "environments": {
            "production": {"branch": "master", "services": ["api"], "image": "shop/app"},
            "staging": {"branch": "main", "workflow": "CI", "services": ["web"], "image": "shop/app"},
            "preview": {"deployments": True, "services": ["app"], "image": "shop/app"},
        }
    },
}

ALERTMANAGER = json.loads((FIXTURES / "alertmanager" / "firing-group-3.json").read_bytes())
GITHUB = {
    "push": json.loads((FIXTURES / "github" / "push.with-new-branch.json").read_bytes()),
    "deployment": json.loads((FIXTURES / "github" / "deployment.json").read_bytes()),
    "workflow_run": json.loads((FIXTURES / "github" / "workflow_run.completed.json").read_bytes()),
}
API_DEPLOY = {"environment": "production", "sha": "a" * 40, "tag": "v1.2.3"}

# Fields each endpoint must check, and the JSON type each must have.
AM_FIELDS = {
    ("version",): str, ("status",): str, ("receiver",): str, ("groupKey",): str, ("alerts",): list,
    ("truncatedAlerts",): int, ("groupLabels",): dict, ("commonLabels",): dict,
    ("alerts", 0, "status"): str, ("alerts", 0, "labels"): dict, ("alerts", 0, "startsAt"): str,
    ("alerts", 0, "fingerprint"): str, ("alerts", 0, "annotations"): dict, ("alerts", 0, "endsAt"): str,
    ("alerts", 1, "labels", "alertname"): str, ("alerts", 2, "fingerprint"): str,
}  # fmt: skip
GH_FIELDS = {
    "push": {("ref",): str, ("after",): str},
    "deployment": {("deployment",): dict},
    "workflow_run": {("workflow_run",): dict},
}
API_FIELDS = {("environment",): str, ("sha",): str}
# Of those, the ones a payload must have (the others may be left out, not mistyped).
REQUIRED = {
    ("version",), ("status",), ("receiver",), ("groupKey",), ("alerts",), ("alerts", 0, "status"),
    ("alerts", 0, "labels"), ("alerts", 0, "startsAt"), ("alerts", 0, "fingerprint"), ("alerts", 2, "fingerprint"),
    ("ref",), ("after",), ("deployment",), ("workflow_run",), ("environment",), ("sha",),
}  # fmt: skip

WRONG = {
    str: st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    int: st.one_of(st.text(max_size=5), st.floats(allow_nan=False).filter(lambda f: f != int(f) if f == f and abs(f) < 1e300 else True), st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    list: st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    dict: st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2)),
}  # fmt: skip

# Strings a hostile sender might try, set into a field the edge checks, then broken by the mutation.
HOSTILE = st.sampled_from(
    ["$(reboot)", "`id`", "; rm -rf /", "../../etc/passwd", "<!channel>", "<@U0123>", "\u202e", "🔥" * 50, "A" * 2000]
)


def _set(payload, path, value):
    holder = payload
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value


def _drop(payload, path):
    holder = payload
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]


@st.composite
def broken(draw, payload: dict, fields: dict) -> bytes:
    """A body that must be refused: one of the mutations, of a field the edge checks."""
    data = copy.deepcopy(payload)
    how = draw(st.sampled_from(["drop", "retype", "wrap", "nul", "truncate", "not utf-8", "oversize"]))
    path = draw(st.sampled_from(sorted(fields, key=str)))
    kind = fields[path]
    if how == "drop" and path in REQUIRED:
        _drop(data, path)
    elif how in ("retype", "drop"):
        _set(data, path, draw(WRONG[kind]))
    elif how == "wrap":
        holder = data
        for key in path:
            holder = holder[key]
        wrappers = {dict: [[holder]], list: [{"0": holder}]}.get(kind, [[holder], {"value": holder}])
        _set(data, path, draw(st.sampled_from(wrappers)))  # nested wrongly: the type changes
    elif how == "nul":
        text = draw(HOSTILE)
        cut = draw(st.integers(0, len(text)))
        _set(data, ("alerts", 0, "labels", "service") if "alerts" in data else path, text[:cut] + "\x00" + text[cut:])
    body = json.dumps(data).encode()
    if how == "truncate":
        return body[: draw(st.integers(0, len(body) - 1))]
    if how == "not utf-8":
        at = draw(st.integers(0, len(body)))
        return (
            body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) + body[at:]
        )
    if how == "oversize":
        return body[:-1] + b', "padding": "' + b"x" * LIMIT + b'"}'
    return body


class Edge:
    """One app on the embedded stack (SQLite ledger, file broker), its logs captured."""

    def __init__(self, folder: Path):
        environ = {"ALERTMANAGER_TOKEN": AM_TOKEN, "GITHUB_WEBHOOK_SECRET": GH_SECRET, "OPSFLEET_API_TOKEN": API_TOKEN}
        loaded = parse_config(
            {**CONFIG, "fleet": {"data_dir": str(folder)}}, source="t", base_dir=folder, environ=environ
        )
        self.loaded = loaded
        self.app = create_app(loaded=loaded)
        self.client = self.app.test_client()
        self.ledger = self.app.extensions["opsfleet"].ledger
        self.log = io.StringIO()
        self.handler = logging.StreamHandler(self.log)
        self.handler.setLevel(logging.DEBUG)
        logging.getLogger().addHandler(self.handler)
        self.answers: dict[int, int] = {}

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)

    def refused(self, path: str, body: bytes, headers: dict) -> None:
        answer = self.client.post(path, data=body, headers={"Content-Type": "application/json", **headers})
        self.answers[answer.status_code] = self.answers.get(answer.status_code, 0) + 1
        assert 400 <= answer.status_code < 500, (answer.status_code, body[:300], answer.get_data(as_text=True)[:300])
        assert answer.is_json and answer.json.get("error"), answer.get_data(as_text=True)[:300]  # a reason
        assert self.ledger.count_events() == 0, body[:300]
        queue = self.loaded.data_dir / "broker" / "queue"
        assert not queue.exists() or not any(p.is_file() for p in queue.iterdir())

    def check_logs(self) -> None:
        text = self.log.getvalue()
        for secret in SECRETS:
            assert secret not in text
        assert "sha256=" not in text  # no signature header either


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    made = Edge(tmp_path_factory.mktemp("bad-input"))
    made.ledger.migrate()
    yield made
    made.check_logs()
    made.close()


EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@EXAMPLES
@given(body=broken(ALERTMANAGER, AM_FIELDS))
def test_alertmanager_refuses_every_broken_payload_and_keeps_nothing(edge, body):
    edge.refused("/hooks/alertmanager", body, {"Authorization": f"Bearer {AM_TOKEN}"})


@EXAMPLES
@given(event=st.sampled_from(sorted(GITHUB)), data=st.data())
def test_github_refuses_every_broken_signed_payload_and_keeps_nothing(edge, event, data):
    body = data.draw(broken(GITHUB[event], GH_FIELDS[event]))
    signature = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
    delivery = hashlib.sha1(body).hexdigest()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": signature}
    edge.refused("/hooks/github", body, headers)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(body=broken(API_DEPLOY, API_FIELDS))
def test_the_api_refuses_every_broken_deploy_request_and_keeps_nothing(edge, body):
    edge.refused("/api/deploys", body, {"Authorization": f"Bearer {API_TOKEN}"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.one_of(
        # Hypothesis also tries the module's own string constants: never the real token itself.
        st.text(max_size=40).filter(lambda t: t.strip() != AM_TOKEN and "\n" not in t and "\r" not in t),
        st.sampled_from([AM_TOKEN[:-1], AM_TOKEN + "x", AM_TOKEN.upper(), "Bearer"]),
    )
)
def test_wrong_tokens_are_refused_before_the_body_is_read(edge, token):
    body = json.dumps(ALERTMANAGER).encode()
    header = f"Bearer {token}".encode("utf-8", "replace").decode("latin-1")
    answer = edge.client.post("/hooks/alertmanager", data=body, headers={"Authorization": header})
    assert answer.status_code == 401 and answer.json == {"error": "unauthorized"}
    assert edge.ledger.count_events() == 0


def test_the_corpus_is_big_and_reaches_every_kind_of_refusal(edge):
    # Runs after the property tests above (file order): 150 + 150 + 100 broken bodies.
    assert sum(edge.answers.values()) >= 400, edge.answers
    assert {400, 413} <= set(edge.answers), edge.answers
