"""A local stand-in for Slack's Web API that records calls and can inject Slack's failures.

slack_sdk's WebClient(token=..., base_url=recorder.base_url) talks to it unchanged. WebClient
POSTs every method to base_url + method name; chat.postMessage and chat.update go as JSON
(`api_call(..., json=kwargs)`), most other methods (auth.test...) as form-encoded params.
Slack answers API errors with HTTP 200 and {"ok": false, "error": ...}; only rate limiting
(429 + Retry-After) and server trouble (5xx) use other statuses.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

TEAM_ID, USER_ID, BOT_ID = "T0123", "U0123", "B0123"
CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")


@dataclass
class Call:
    method: str
    params: dict  # query string and body merged, token removed
    headers: dict
    time: float
    status: int = 200  # what the recorder answered
    response: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))


@dataclass
class _Fault:
    times: int
    status: int
    retry_after: int
    error: str | None


class SlackRecorder:
    def __init__(self, token: str = "xoxb-test-token", channel_id: str = "C0123"):
        self.token = token
        self.channel_id = channel_id
        self.calls: list[Call] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._last_ts_us = 0
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/api/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="slack-recorder", daemon=True
        )
        self._thread.start()

    # --- test-facing API ---

    def fail_next(
        self, method: str, times: int = 1, status: int = 429, retry_after: int = 1, error: str | None = None
    ) -> None:
        """The next `times` calls of `method` fail: 429 + Retry-After, a 5xx, or (with error=...)
        HTTP 200 {"ok": false, "error": error}."""
        with self._cond:
            self._faults.setdefault(method, []).append(_Fault(times, status, retry_after, error))

    def wait_for_calls(self, n: int, timeout: float = 10, method: str | None = None) -> list[Call]:
        """Waits until at least n calls (of `method`, if given) were recorded; returns them."""

        def matching() -> list[Call]:
            return [c for c in self.calls if method is None or c.method == method]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                got = [c.method for c in self.calls]
                raise TimeoutError(f"waited {timeout} s for {n} Slack calls ({method or 'any'}); got {got}")
            return matching()

    def threads(self) -> dict[str, dict]:
        """Successful messages grouped by thread: {parent_ts: {"parent", "replies", "updates"}}."""
        threads: dict[str, dict] = {}
        thread_of: dict[str, str] = {}  # message ts -> parent ts
        with self._cond:
            calls = [c for c in self.calls if c.ok]
        for c in calls:
            if c.method == "chat.postMessage":
                ts, parent = c.response["ts"], c.params.get("thread_ts")
                entry = threads.setdefault(parent or ts, {"parent": None, "replies": [], "updates": []})
                if parent:
                    entry["replies"].append(c.params)
                else:
                    entry["parent"] = c.params
                thread_of[ts] = parent or ts
            elif c.method == "chat.update":
                parent = thread_of.get(c.params["ts"], c.params["ts"])
                threads.setdefault(parent, {"parent": None, "replies": [], "updates": []})["updates"].append(c.params)
        return threads

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SlackRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- request handling (called from server threads) ---

    def _next_ts(self) -> str:
        # Slack's ts is "seconds.microseconds" and unique per channel; keep it strictly increasing.
        self._last_ts_us = max(int(time.time() * 1_000_000), self._last_ts_us + 1)
        return f"{self._last_ts_us // 1_000_000}.{self._last_ts_us % 1_000_000:06d}"

    def _known_ts(self) -> set[str]:
        return {c.response["ts"] for c in self.calls if c.ok and c.method == "chat.postMessage"}

    def _handle(self, method: str, params: dict, headers: dict) -> tuple[int, dict, dict]:
        """Returns (status, extra headers, body) and records the call."""
        token = params.pop("token", None)
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]
        with self._cond:
            status, extra, body = self._answer(method, params, token)
            self.calls.append(Call(method, params, headers, time.time(), status, body))
            self._cond.notify_all()
        return status, extra, body

    def _answer(self, method: str, params: dict, token: str | None) -> tuple[int, dict, dict]:
        if not token:
            return 200, {}, {"ok": False, "error": "not_authed"}
        if token != self.token:
            return 200, {}, {"ok": False, "error": "invalid_auth"}
        faults = self._faults.get(method)
        if faults:
            fault = faults[0]
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
            if fault.error:
                return 200, {}, {"ok": False, "error": fault.error}
            if fault.status == 429:
                return 429, {"Retry-After": str(fault.retry_after)}, {"ok": False, "error": "ratelimited"}
            return fault.status, {}, {"ok": False, "error": "internal_error"}
        if method == "auth.test":
            return 200, {}, {
                "ok": True, "url": "https://opsfleet-test.slack.com/", "team": "opsfleet-test",
                "user": "opsfleet", "team_id": TEAM_ID, "user_id": USER_ID, "bot_id": BOT_ID,
            }  # fmt: skip
        if method in ("chat.postMessage", "chat.update"):
            return self._message(method, params)
        return 200, {}, {"ok": False, "error": "unknown_method", "req_method": method}

    def _message(self, method: str, params: dict) -> tuple[int, dict, dict]:
        channel = params.get("channel")
        if not channel:
            return 200, {}, {"ok": False, "error": "channel_not_found"}
        if not any(params.get(k) for k in ("text", "blocks", "attachments")):
            return 200, {}, {"ok": False, "error": "no_text"}
        if method == "chat.update":
            ts = params.get("ts")
            if ts not in self._known_ts():
                return 200, {}, {"ok": False, "error": "message_not_found"}
        else:
            ts = self._next_ts()
        # Slack answers with the channel's id even when it was addressed by name.
        channel_id = channel if CHANNEL_ID.match(channel) else self.channel_id
        message = {"type": "message", "user": USER_ID, "bot_id": BOT_ID, "ts": ts, "text": params.get("text", "")}
        for key in ("blocks", "attachments", "thread_ts"):
            if params.get(key):
                message[key] = params[key]
        body = {"ok": True, "channel": channel_id, "ts": ts, "message": message}
        if method == "chat.update":
            body["text"] = message["text"]
        return 200, {}, body


def _handler_for(recorder: SlackRecorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            params = dict(parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("Content-Type", "")
            if raw and content_type.startswith("application/json"):
                params.update(json.loads(raw))
            elif raw and content_type.startswith("application/x-www-form-urlencoded"):
                params.update(parse_qsl(raw.decode()))
            method = url.path.rsplit("/", 1)[-1] if url.path.startswith("/api/") else ""
            status, extra, body = recorder._handle(method, params, dict(self.headers.items()))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep pytest output clean
            pass

    return Handler
