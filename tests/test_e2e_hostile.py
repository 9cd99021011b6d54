"""Issue 8, bad input: valid payloads whose values are hostile travel through whole runs safely.

Real processes (gunicorn, a Celery worker and beat), the private dockerd, the Slack and
GitHub recorders; bodies are the real fixtures (tests/fixtures, the same files as
../shared/fixtures) with their label, annotation, branch, pusher and commit-message values
replaced by shell text, path traversal, Slack mention syntax, HTML, unicode tricks, forged
log lines and strings as long as the edge's body limit (web.max_body_bytes) allows.

Each run goes all the way (a container restarted, a person paged, a commit deployed, or the
push recorded as ignored), and then: the API and the ledger hold every string exactly; the
status page escapes them; every message Slack got carries them escaped, so none is a live
mention or link; GitHub's statuses keep to its 140-character description; no log holds a
control character that could forge a line; no shell ran (the MARKER file does not exist)
and no file was read or written where a path in a payload pointed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import uuid
from pathlib import Path

import markupsafe
import pytest
import requests
import sqlalchemy as sa

from tests.support.deploy import SHA, TAG, build_images, httpd_command, new_repository, remove_images
from tests.support.fleet import REPO, Fleet
from tests.support.github_recorder import GitHubRecorder
from tests.support.servers import TEST_DOCKER_HOST, free_port
from worker.adapters.ledger import Ledger, events, ledger_url
from worker.adapters.slack import escape

pytestmark = pytest.mark.slow

FIXTURES = REPO / "tests" / "fixtures"
LIMIT = 1024 * 1024  # web.max_body_bytes' default: the edge answers 413 past it
PUBLIC = "http://opsfleet.test"
MENTION = "<!subteam^SONCALL>"  # escalation.slack_mention: the one mention opsfleet may make, from its config
SECRET = "e2e-hostile-github-secret"
SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")
ENDED = ("succeeded", "failed", "skipped", "superseded", "rolled_back", "rollback_failed")
PASSWD = "root:x:0:0"  # the first line of /etc/passwd: never in anything opsfleet sends or shows

# Every place a line may end, for a reader that splits lines as Python's str.splitlines does.
LINE_BREAK = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# In a JSON log line nothing but printable text: JSON's own escapes for the rest.
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class Hostile:
    """The hostile strings of one test: shell text that would create `marker`, paths that
    point outside (each naming `stem`, so a file written anywhere is found), mention syntax,
    HTML, unicode tricks and forged log lines (each starting with `forged`)."""

    def __init__(self, tmp_path: Path):
        self.stem = f"hostile-{uuid.uuid4().hex[:8]}"
        self.marker = tmp_path / f"MARKER-{self.stem}"
        self.outside = tmp_path / "outside" / self.stem  # an absolute path; its folder does not exist
        self.forged = f"FORGED-{self.stem}"
        m = self.marker
        self.shell = {
            "sh_subst": f"$(touch {m})",
            "sh_backtick": f"`touch {m}`",
            "sh_semicolon": f"; touch {m} #",
            "sh_pipe": f"| touch {m}",
            "sh_and": f"&& touch {m}",
            "sh_newline": f"x\ntouch {m}\n",
        }
        self.paths = {
            "path_etc": "../../etc/passwd",
            "path_tmp": f"../../../tmp/{self.stem}",
            "path_abs": str(self.outside),
            "path_abs_etc": "/etc/passwd",
        }
        self.mentions = {
            "m_channel": "<!channel>",
            "m_here": "<!here>",
            "m_everyone": "<!everyone>",
            "m_user": "<@U024BE7LH>",
            "m_chan": "<#C024BE7LR>",
            "m_group": "<!subteam^S123>",
            "m_at": "@channel @here @everyone",
            "m_link": "<http://evil.example|click>",
            "m_amp": "a & b < c > d &amp; &lt;!channel&gt;",
            "html": "<script>alert(1)</script>\"'><img src=x onerror=alert(1)>",
        }
        self.unicode = {
            "u_rtl": "abc\u202egnp.exe\u202c",
            "u_zwj": "\U0001f469\u200d\U0001f4bb",
            "u_combining": "e\u0301\u0302\u0303\u0304",
            "u_emoji": "\U0001f525\U0001f4a5\U0001f6a8",
            "u_bom": "\ufeffbom",
            "u_ansi": "\x1b[31mred\x1b[0m\x07\x08",
        }
        f = self.forged
        self.forges = {
            "f_lf": f"ok\n{f} ERROR opsfleet.web forged line",
            "f_cr": f"ok\r{f} ERROR opsfleet.web forged line",
            "f_crlf": f"ok\r\n{f} ERROR opsfleet.web forged line",
            "f_nel": f"ok\x85{f} ERROR opsfleet.web forged line",
            "f_ls": f"ok\u2028{f} ERROR opsfleet.web forged line",
            "f_ps": f"ok\u2029{f} ERROR opsfleet.web forged line",
        }

    @property
    def all(self) -> dict[str, str]:
        return {**self.shell, **self.paths, **self.mentions, **self.unicode, **self.forges}

    def one(self) -> str:
        """All of them in one string."""
        return " ".join(self.all.values())

    def assert_nothing_ran_or_escaped(self, tmp_path: Path) -> None:
        assert not self.marker.exists(), "a shell ran a payload's text"
        assert not self.outside.parent.exists(), "a payload's absolute path was written"
        for where in (Path("/tmp") / self.stem, (tmp_path / self.paths["path_tmp"]).resolve()):
            assert not where.exists(), f"a payload's relative path was written: {where}"
        named = [p for p in tmp_path.rglob("*") if self.stem in p.name]
        assert named == [], named


# -- payloads ------------------------------------------------------------------------


def alert(fingerprint: str, labels: dict, annotations: dict | None = None) -> dict:
    """One alert as Alertmanager sent it (firing-single.json) with these labels and annotations."""
    body = json.loads((FIXTURES / "alertmanager" / "firing-single.json").read_bytes())
    [one] = body["alerts"]
    return {**one, "labels": labels, "annotations": annotations or {}, "fingerprint": fingerprint}


def notification(alerts: list[dict], group_key: str) -> dict:
    body = json.loads((FIXTURES / "alertmanager" / "firing-single.json").read_bytes())
    return {**body, "alerts": alerts, "groupKey": group_key, "commonLabels": {}, "commonAnnotations": {}}


def fingerprint() -> str:
    return uuid.uuid4().hex[:16]


def exactly(size: int, build, prefix: str) -> tuple[bytes, str]:
    """build(value) -> body bytes, with value = prefix + padding such that the body is `size` bytes."""
    pad = size - len(build(prefix))
    value = prefix + "A" * pad
    body = build(value)
    assert len(body) == size, (len(body), size)
    return body, value


def push(commit: str, pushed_at: int, *, ref: str = "refs/heads/master", message: str = "", pusher: str = "") -> dict:
    """GitHub's example push (push.with-new-branch.json) of SHA[commit] to `ref`, its
    head commit's message `message`, pushed (and written) by `pusher`."""
    payload = json.loads((FIXTURES / "github" / "push.with-new-branch.json").read_bytes())
    payload["ref"] = ref
    payload["after"] = payload["head_commit"]["id"] = SHA[commit]
    payload["repository"]["pushed_at"] = pushed_at
    if message:
        payload["head_commit"]["message"] = message
    if pusher:
        payload["pusher"]["name"] = payload["head_commit"]["author"]["name"] = pusher
    return payload


def post_push(fleet: Fleet, data: bytes, delivery: str | None = None) -> requests.Response:
    signature = "sha256=" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "Content-Type": "application/json",
    }
    return requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=30)


# -- what the fleet holds, shows and sends ---------------------------------------------------


def ledger_of(fleet: Fleet, env: dict) -> Ledger:
    return Ledger(ledger_url(env.get("DATABASE_URL"), fleet.folder / "data"))


def event_rows(ledger: Ledger, source: str) -> list[dict]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(events).where(events.c.source == source).order_by(events.c.id)).all()
    return [dict(r._mapping) for r in rows]


def assert_page_escapes(fleet: Fleet, path: str, texts: list[str]) -> None:
    """The status page shows each text exactly, HTML-escaped: no markup of the payload's."""
    answer = requests.get(f"{fleet.url}{path}", timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    html = answer.text
    for text in texts:
        assert str(markupsafe.escape(text)) in html, f"{path} does not show {text[:60]!r} escaped"
    assert "<script>alert" not in html and "<img src=x" not in html, f"raw markup from a payload in {path}"
    assert PASSWD not in html


# Links and the mention opsfleet itself writes: a run's page, the configured on-call group.
_OURS = re.compile(rf"<{re.escape(PUBLIC)}/runs/\d+\|[A-Za-z0-9 #]+>|{re.escape(MENTION)}")
_LOOSE_AMP = re.compile(r"&(?!amp;|lt;|gt;)")


def _texts(blocks) -> list[str]:
    """Every text in Block Kit blocks (section, context, button)."""
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    found = []
    stack = [blocks]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("text"), str):
                found.append(node["text"])
            if "url" in node:
                assert node["url"].startswith(f"{PUBLIC}/runs/"), node["url"]
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(node)
    return found


def assert_inert(text: str) -> None:
    """Slack text in which nothing from outside is a mention or a link: past opsfleet's own
    links and mention, no < or >, and every & starts &amp; &lt; or &gt; (Slack's escaping)."""
    rest = _OURS.sub("", text)
    assert "<" not in rest and ">" not in rest, f"live Slack markup in {rest[:300]!r}"
    loose = [m.start() for m in _LOOSE_AMP.finditer(rest)]
    if len(text) == 3000:  # a section block's limit: its text was cut, maybe inside an entity
        loose = [i for i in loose if i < len(rest) - 4]
    assert not loose, f"unescaped & in {rest[max(0, loose[0] - 40) : loose[0] + 40]!r}"
    assert PASSWD not in text


def slack_messages(slack) -> list[dict]:
    """Every message Slack took (posts and updates), each checked to be inert."""
    messages = [c.params for c in slack.calls if c.ok and c.method in ("chat.postMessage", "chat.update")]
    for params in messages:
        assert not params.get("link_names") and params.get("parse") in (None, "none"), params.keys()
        assert_inert(params["text"])
        for text in _texts(params.get("blocks") or []):
            assert_inert(text)
    return messages


def assert_logs_clean(folder: Path, hostile: Hostile) -> None:
    """No log line begins with a payload's text (however lines are split), the JSON lines
    parse and hold no raw control character, and no payload's path was read into them."""
    console = sorted(folder.glob("*.log"))
    json_logs = sorted((folder / "data" / "logs").glob("*.jsonl"))
    assert console and json_logs, (console, json_logs)
    for path in console + json_logs:
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(re.escape(hostile.forged), text):
            before = text[match.start() - 1]
            assert before not in LINE_BREAK, (
                f"{path.name}: a payload forged a log line: {text[match.start() - 80 : match.end() + 20]!r}"
            )
        assert PASSWD not in text, f"{path.name} holds /etc/passwd"
    for path in json_logs:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], 1):
            raw = RAW_CONTROL.search(line)
            assert raw is None, (
                f"{path.name}:{n}: raw {raw.group()!r} in {line[max(0, raw.start() - 80) : raw.end() + 40]!r}"
            )
            json.loads(line)


# -- the stacks -------------------------------------------------------------------------------


@pytest.fixture(params=["redis+postgresql", "embedded"])
def stack(request) -> dict:
    if request.param == "embedded":
        return {}  # no REDIS_URL, no DATABASE_URL: the embedded broker and SQLite ledger
    return {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": request.getfixturevalue("shared_pg_url")}


def _alert_config(container: str) -> dict:
    return {
        "fleet": {"public_url": PUBLIC},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 5},
        "slack": {"channel": "#ops-hostile"},
        "escalation": {"slack_mention": MENTION},
        "services": {"api": {"container": container}},
        "remediation": {
            "defaults": {
                "cooldown_seconds": 0,
                "cap": {"max_actions": 50, "window_seconds": 3600},
                "storm": {"max_targets": 100, "window_seconds": 300},
            },
            "rules": [
                {
                    "name": "service-down",
                    "match": ['alertname="ServiceDown"'],
                    "playbook": "restart_service",
                    "target": {"service_label": "service"},
                    "params": {"stop_timeout_seconds": 2, "verify_timeout_seconds": 20},
                },
                {"name": "needs-person", "match": ['alertname="NeedsPerson"'], "playbook": "escalate"},
            ],
        },
        # Pushes to other branches are recorded as ignored: no image is ever needed here.
        "deploy": {
            "environments": {"prod": {"branch": "master", "services": ["api"], "image": "127.0.0.1:1/opsfleet-hostile"}}
        },
    }


def _started_at(container) -> str:
    container.reload()
    return container.attrs["State"]["StartedAt"]


def _reported(fleet: Fleet, run_id: int) -> dict | None:
    """The run once it ended and Slack has all of it: the parent at its final status, every step."""
    run = fleet.api(f"/runs/{run_id}")
    if run["status"] not in ENDED or run["reported_status"] != run["status"]:
        return None
    return run if all(s["reported"] for s in run["steps"]) else None


def test_hostile_alert_values_travel_through_runs_safely(tmp_path, stack, make_container, slack):
    """One notification: a ServiceDown for api whose every other label and annotation (and
    one label name) is hostile, ServiceDowns whose service label is hostile, a NeedsPerson
    that pages; then a label as long as the body limit allows, one byte over it, a NUL; and
    pushes to hostile branch names. The restart and the page happen; nothing else does."""
    h = Hostile(tmp_path)
    container = make_container(f"e2e-hostile-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)
    before = _started_at(container)
    env = {**stack, "DOCKER_HOST": TEST_DOCKER_HOST, "SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.base_url}
    env["GITHUB_WEBHOOK_SECRET"] = SECRET
    hostile_key = f"<!here>$(touch {h.marker})"
    labels = {"alertname": "ServiceDown", "service": "api", **h.all, hostile_key: "hostile label name"}
    # Short enough for a run's summary (the ledger keeps 2000 characters) to hold every label whole.
    assert sum(len(k) + len(v) + 3 for k, v in labels.items()) < 1900
    service_values = [*h.shell.values(), *h.paths.values(), "<!channel>", h.forges["f_lf"], h.unicode["u_rtl"], "api "]
    paged = {"alertname": "NeedsPerson", **h.all}
    first = notification(
        [
            alert(fingerprint(), labels, {**h.all, "summary": h.one()}),
            *(alert(fingerprint(), {"alertname": "ServiceDown", "service": v}) for v in service_values),
            alert(fingerprint(), paged, {"description": h.one()}),
        ],
        group_key='{}:{alertname="' + h.forges["f_lf"] + h.forges["f_nel"] + h.forges["f_ls"] + '"}',
    )
    with Fleet(tmp_path, _alert_config(container.name), env).start() as fleet:
        ledger = ledger_of(fleet, env)
        try:
            body = json.dumps(first).encode()
            answer = fleet.post_alerts(body)
            assert answer.status_code == 202, answer.text
            decisions = answer.json()["alerts"]
            assert [d["outcome"] for d in decisions] == ["act", *["skip"] * len(service_values), "act"], decisions
            acted_id, *skipped_ids, page_id = [d["run_id"] for d in decisions]

            # Run by run: exactly what came in, and only the configured service acted on.
            acted = fleet.wait(lambda: _reported(fleet, acted_id), 90, "the restart run to end and be reported")
            assert acted["status"] == "succeeded", acted
            assert [s["name"] for s in acted["steps"]] == ["locate", "restart", "verify"]
            assert _started_at(container) != before, "the configured container was not restarted"
            for key, value in labels.items():
                if key != "alertname":
                    assert f"{key}={value}" in acted["summary"], f"{key} lost or mangled"
            for run_id, value in zip(skipped_ids, service_values, strict=True):
                run = fleet.api(f"/runs/{run_id}")
                assert run["status"] == "skipped" and run["target"] is None and run["steps"] == [], run
                assert run["reason"] == 'unknown target: label "service" names no configured service', run
                assert run["summary"].endswith(f"(service={value})"), run["summary"]
            page = fleet.wait(lambda: _reported(fleet, page_id), 90, "the escalation to end and be reported")
            assert page["status"] == "succeeded", page
            for key, value in h.all.items():
                assert f"{key}={value}" in page["params"]["alert"]
            # The ledger keeps the notification byte for byte, annotations and all.
            [stored] = event_rows(ledger, "alertmanager")
            assert stored["body"] == body.decode()

            # A label as long as the body limit allows: accepted, acted on, kept whole in the event.
            def long_body(value: str) -> bytes:
                one = alert(fingerprint(), {"alertname": "ServiceDown", "service": "api", "long": value})
                return json.dumps(notification([one], group_key="{}:long")).encode()

            body, long_value = exactly(LIMIT, long_body, h.one())
            answer = fleet.post_alerts(body)
            assert answer.status_code == 202, answer.text[:500]
            [long_id] = answer.json()["runs"]
            long_run = fleet.wait(lambda: _reported(fleet, long_id), 90, "the long label's run to end and be reported")
            assert long_run["status"] == "succeeded", long_run["reason"]
            # The run's summary is a summary (the ledger keeps its first 2000 characters): what
            # it shows of the label is the label's start, unchanged; the event keeps all of it.
            shown = long_run["summary"].partition("(long=")[2]
            assert len(shown) > 500 and long_value.startswith(shown), long_run["summary"][:300]
            assert event_rows(ledger, "alertmanager")[-1]["body"] == body.decode()

            # One byte over: 413, nothing recorded. A NUL (PostgreSQL text refuses it) or a lone
            # surrogate (not UTF-8): 400 saying so, on either ledger.
            over, _ = exactly(LIMIT + 1, long_body, "x")
            answer = fleet.post_alerts(over)
            assert answer.status_code == 413 and "limit" in answer.json()["error"], answer.text
            nul = notification(
                [alert(fingerprint(), {"alertname": "ServiceDown", "service": "api", "x": "a\u0000b"})], "{}:nul"
            )
            answer = fleet.post_alerts(nul)
            assert answer.status_code == 400 and "NUL" in answer.json()["error"], answer.text
            lone = notification([alert(fingerprint(), {"alertname": "ServiceDown", "x": "\ud800"})], "{}:surrogate")
            answer = fleet.post_alerts(lone)
            assert answer.status_code == 400 and "surrogate" in answer.json()["error"], answer.text
            assert len(event_rows(ledger, "alertmanager")) == 2

            # Pushes to hostile branch names: recorded as ignored, the name kept exactly.
            branches = [
                *h.shell.values(),
                *h.paths.values(),
                h.mentions["m_channel"],
                h.forges["f_lf"],
                h.unicode["u_zwj"],
            ]
            bodies = []
            for n, branch in enumerate(branches):
                data = json.dumps(
                    push("a", 2000 + n, ref=f"refs/heads/{branch}", message=h.one(), pusher=h.one()[:100])
                ).encode()
                answer = post_push(fleet, data)
                assert answer.status_code == 202 and answer.json()["runs"] == [], answer.text
                assert answer.json()["ignored"] == f"prod: refs/heads/{branch} is not branch master"
                bodies.append(data.decode())
            nul_push = json.dumps(push("a", 3000, message="commit\u0000message")).encode()
            answer = post_push(fleet, nul_push)
            assert answer.status_code == 400 and "NUL" in answer.json()["error"], answer.text
            over_push, _ = exactly(LIMIT + 1, lambda v: json.dumps(push("a", 3001, message=v)).encode(), "x")
            assert post_push(fleet, over_push).status_code == 413
            stored = event_rows(ledger, "github")
            assert [e["body"] for e in stored] == bodies
            for event, branch in zip(stored, branches, strict=True):
                assert f"ignored: prod: refs/heads/{branch} is not branch master" in event["summary"]
            assert len(fleet.runs()) == 2 + len(service_values) + 1  # the answers above, nothing more

            # A URL carries line breaks too (%0A...): the request's log line stays one line.
            for brk in ("%0A", "%0D", "%0D%0A", "%C2%85", "%E2%80%A8"):
                answer = requests.post(f"{fleet.url}/hooks/alertmanager{brk}{h.forged}%20ERROR%20forged", timeout=10)
                assert answer.status_code == 404, answer.text

            # What people see: the status page escapes it, Slack got it escaped and inert.
            assert_page_escapes(fleet, f"/runs/{acted_id}", [f"{k}={v}" for k, v in labels.items() if k != "alertname"])
            assert_page_escapes(fleet, f"/runs/{skipped_ids[0]}", [f"service={service_values[0]}"])
            assert_page_escapes(fleet, f"/runs/{long_id}", [long_run["summary"]])
            assert_page_escapes(fleet, "/", [f"service={v}" for v in service_values])
            messages = slack_messages(slack)
            texts = [m["text"] for m in messages]
            for key, value in labels.items():
                if key != "alertname":
                    assert any(escape(f"{key}={value}") in t for t in texts), f"{key} not in Slack, escaped"
            pages = [t for t in texts if t.startswith(MENTION)]
            assert len(pages) == 1 and all(escape(f"{k}={v}") in pages[0] for k, v in h.all.items()), pages
            assert any(escape(long_run["summary"]) in t for t in texts)
            assert all(MENTION not in t for t in texts if t not in pages)  # the page alone mentions anyone
        finally:
            ledger.dispose()
    assert_logs_clean(tmp_path, h)
    h.assert_nothing_ran_or_escaped(tmp_path)


# -- deploys ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(dockerd):
    repository = new_repository()
    built = build_images(dockerd, repository)
    yield repository
    remove_images(dockerd, built)


def test_hostile_push_values_deploy_safely(tmp_path, dockerd, images, slack, shared_pg_url):
    """A push to the configured branch whose commit message (as long as the body limit
    allows) and pusher are hostile deploys; so does a v* tag whose name is hostile. GitHub's
    statuses, Slack, the status page and the ledger all hold them as they came, escaped
    where they are shown; a push one byte over the limit is 413."""
    h = Hostile(tmp_path)
    port = free_port()
    name = f"opsfleet-e2e-hostile-{uuid.uuid4().hex[:8]}"
    dockerd.containers.run(f"{images}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
    config = {
        "fleet": {"public_url": PUBLIC},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 5},
        "slack": {"channel": "#ops-hostile"},
        "services": {"app": {"container": name, "health_url": f"http://127.0.0.1:{port}/health"}},
        "deploy": {
            "environments": {
                "prod": {
                    "branch": "master",
                    "tags": True,
                    "services": ["app"],
                    "image": images,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 1,
                    "min_free_bytes": 1024,
                    "prune_images": False,
                }
            }
        },
    }
    # A GitHub login is at most 39 characters; the ledger keeps 128 of who triggered a run. The
    # shell text touches a name relative to the processes' folder (the test's tmp_path).
    pusher = f"<!channel> $(touch {h.stem}) \U0001f469\u200d\U0001f4bb \u202eevil\u202c ../../etc/passwd"
    assert len(pusher) <= 128
    tag_ref = f"refs/tags/v9$(touch {h.marker})`id`;|&&<!channel><@U024BE7LH>../../etc/passwd\u202e\U0001f525"
    with GitHubRecorder() as github:
        env = {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": shared_pg_url,
            "DOCKER_HOST": TEST_DOCKER_HOST,
            "GITHUB_WEBHOOK_SECRET": SECRET,
            "GITHUB_TOKEN": github.token,
            "GITHUB_API_URL": github.base_url,
            "SLACK_BOT_TOKEN": slack.token,
            "SLACK_API_URL": slack.base_url,
        }
        try:
            with Fleet(tmp_path, config, env).start() as fleet:
                ledger = ledger_of(fleet, env)
                try:
                    build = lambda v: json.dumps(push("a", 1000, message=v, pusher=pusher)).encode()  # noqa: E731
                    data, message = exactly(LIMIT, build, h.one())
                    answer = post_push(fleet, data)
                    assert answer.status_code == 202, answer.text
                    [run_a] = answer.json()["runs"]
                    run = fleet.wait(lambda: _reported(fleet, run_a), 90, "the deploy of a to end and be reported")
                    assert run["status"] == "succeeded", run
                    assert requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text == "a"
                    assert run["triggered_by"] == pusher and run["params"]["ref"] == "refs/heads/master"
                    assert event_rows(ledger, "github")[0]["body"] == data.decode()
                    assert json.loads(event_rows(ledger, "github")[0]["body"])["head_commit"]["message"] == message

                    answer = post_push(fleet, json.dumps(push("b", 1001, ref=tag_ref, pusher=pusher)).encode())
                    assert answer.status_code == 202, answer.text
                    [run_b] = answer.json()["runs"]
                    run = fleet.wait(
                        lambda: _reported(fleet, run_b), 90, "the deploy of the tag to end and be reported"
                    )
                    assert run["status"] == "succeeded", run
                    assert requests.get(f"http://127.0.0.1:{port}/version", timeout=5).text == "b"
                    assert dockerd.containers.get(name).attrs["Config"]["Image"] == f"{images}:{TAG['b']}"
                    assert (
                        run["params"]["ref"] == tag_ref
                        and run["summary"] == f"deploy {SHA['b'][:7]} ({tag_ref}) to prod"
                    )

                    over, _ = exactly(LIMIT + 1, build, "x")
                    assert post_push(fleet, over).status_code == 413
                    assert len(event_rows(ledger, "github")) == 2 and len(fleet.runs()) == 2

                    # GitHub: each deployment's statuses in order, descriptions within its 140 characters.
                    def reported():
                        by_sha = {d["sha"]: d for d in github.deployments.values()}
                        done = by_sha.get(SHA["b"], {}).get("statuses", [])[-1:]
                        return by_sha if done and done[0]["state"] == "success" else None

                    by_sha = fleet.wait(reported, 60, "GitHub statuses of both deploys")
                    assert [s["state"] for s in by_sha[SHA["b"]]["statuses"]] == ["queued", "in_progress", "success"]
                    assert fleet.wait(
                        lambda: github.states(by_sha[SHA["a"]]["id"])[-1:] == ["inactive"], 30, "a marked inactive"
                    )
                    assert all(c.status == 201 for c in github.calls), [(c.path, c.status) for c in github.calls]
                    for deployment in by_sha.values():
                        for status in deployment["statuses"]:
                            assert len(status["description"]) <= 140, status
                            assert h.stem not in status["description"] and "<" not in status["description"]

                    assert_page_escapes(fleet, f"/runs/{run_a}", [pusher])
                    assert_page_escapes(fleet, f"/runs/{run_b}", [pusher, tag_ref])
                    assert_page_escapes(fleet, "/deploys", [])
                    texts = [m["text"] for m in slack_messages(slack)]
                    assert any(escape(pusher) in t and f"Deploy #{run_a}" in t for t in texts)
                    assert any(escape(tag_ref) in t and f"Deploy #{run_b}" in t for t in texts)
                finally:
                    ledger.dispose()
        finally:
            for c in dockerd.containers.list(all=True, filters={"name": name}):
                c.remove(force=True)
    assert_logs_clean(tmp_path, h)
    h.assert_nothing_ran_or_escaped(tmp_path)
    assert not os.path.exists(f"/tmp/{h.stem}")
