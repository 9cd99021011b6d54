"""A local stand-in for GitHub's REST API (deployments and their statuses) that
records calls and can answer 502 on demand.

Answers as GitHub documents: POST /repos/{owner}/{repo}/deployments → 201 with
the deployment (`id`, `sha`, `environment`, ...); POST
/repos/{owner}/{repo}/deployments/{id}/statuses → 201 with the status; a
missing or wrong bearer token → 401; an unknown deployment → 404; a state
GitHub does not know, or a description over 140 characters → 422. On demand
(`rate_limit_next`), the primary rate limit as GitHub answers it: 403 with
`x-ratelimit-remaining: 0` and `x-ratelimit-reset` (epoch seconds), or 429 with
`retry-after`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATES = {"error", "failure", "inactive", "in_progress", "queued", "pending", "success"}
_DEPLOYMENTS = re.compile(r"^/repos/([^/]+/[^/]+)/deployments$")
_STATUSES = re.compile(r"^/repos/([^/]+/[^/]+)/deployments/(\d+)/statuses$")


@dataclass
class Call:
    path: str
    body: dict
    status: int


class GitHubRecorder:
    def __init__(self, token: str = "ghp-test-token"):
        self.token = token
        self.calls: list[Call] = []
        self.deployments: dict[int, dict] = {}
        self.fail_next: list[int] = []  # statuses to answer the next requests with (e.g. [502])
        self.rate_limit_next: list[tuple[int, int]] = []  # (403 or 429, seconds to wait) for the next requests
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def states(self, deployment_id: int) -> list[str]:
        return [s["state"] for s in self.deployments[deployment_id]["statuses"]]

    def answer(self, path: str, headers, body: dict) -> tuple[int, dict, dict]:
        """(status, body, extra response headers)."""
        with self._lock:
            if self.rate_limit_next:
                status, wait = self.rate_limit_next.pop(0)
                self.calls.append(Call(path, body, status))
                if status == 429:
                    return status, {"message": "API rate limit exceeded"}, {"retry-after": str(wait)}
                reset = str(int(time.time()) + wait)
                limited = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}
                return status, {"message": "API rate limit exceeded for user ID 1."}, limited
            if self.fail_next:
                status = self.fail_next.pop(0)
                self.calls.append(Call(path, body, status))
                return status, {"message": "Server Error"}, {}
            status, answer = self._answer(path, headers, body)
            self.calls.append(Call(path, body, status))
            return status, answer, {}

    def _answer(self, path: str, headers, body: dict) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"message": "Bad credentials"}
        if match := _DEPLOYMENTS.match(path):
            if not isinstance(body.get("ref"), str):
                return 422, {"message": "Validation Failed"}
            deployment_id = 1000 + len(self.deployments)
            self.deployments[deployment_id] = {
                "id": deployment_id,
                "sha": body["ref"],
                "ref": body["ref"],
                "repository": match.group(1),
                "environment": body.get("environment", "production"),
                "payload": body.get("payload", {}),
                "auto_merge": body.get("auto_merge"),
                "required_contexts": body.get("required_contexts"),
                "statuses": [],
            }
            shown = {k: v for k, v in self.deployments[deployment_id].items() if k != "statuses"}
            return 201, shown
        if match := _STATUSES.match(path):
            deployment = self.deployments.get(int(match.group(2)))
            if deployment is None or deployment["repository"] != match.group(1):
                return 404, {"message": "Not Found"}
            if body.get("state") not in STATES or len(body.get("description", "")) > 140:
                return 422, {"message": "Validation Failed"}
            status = {"id": len(deployment["statuses"]) + 1, **body}
            deployment["statuses"].append(status)
            return 201, status
        return 404, {"message": "Not Found"}


def _handler_for(recorder: GitHubRecorder):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                body = {}
            status, answer, extra = recorder.answer(self.path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler
