"""GitHub REST API: deployments and deployment statuses, nothing else.

POST /repos/{owner}/{repo}/deployments answers 201 with the deployment (its
`id`); POST .../deployments/{id}/statuses answers 201. States: queued,
in_progress, success, failure, error, inactive. `description` is at most
140 characters; `log_url` links the run. Every call has a timeout.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import requests

API_VERSION = "2022-11-28"
# owner/name as GitHub allows them (a login: letters, digits, hyphens; a repository also
# dots and underscores, never "." or ".."): the only repository text that goes into a URL path.
REPOSITORY_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/(?!\.\.?$)[A-Za-z0-9._-]{1,100}")
DEFAULT_API_URL = "https://api.github.com"


class GitHubError(Exception):
    """A call failed; `retryable` for 5xx, rate limits, timeouts and refused connections.
    `retry_after`: seconds GitHub asked us to wait (a rate limit), when it said."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def rate_limit_wait(status: int, headers, body: str, now: float) -> float | None:
    """How long a rate-limited answer asks us to wait, as GitHub documents it: a 403 or 429
    with `retry-after` (seconds), or with `x-ratelimit-remaining: 0` (until `x-ratelimit-reset`,
    epoch seconds), or a secondary-rate-limit message (at least a minute). None: not a rate limit."""
    if status not in (403, 429):
        return None
    retry_after = headers.get("retry-after")
    if retry_after and retry_after.strip().isdigit():
        return float(retry_after)
    if headers.get("x-ratelimit-remaining") == "0":
        reset = headers.get("x-ratelimit-reset", "")
        return max(1.0, float(reset) - now) if reset.strip().isdigit() else 60.0
    if status == 429 or "secondary rate limit" in body.lower():
        return 60.0
    return None


@dataclass
class GitHubAdapter:
    token: str
    api_url: str | None = None
    timeout_seconds: float = 10

    def _post(self, path: str, body: dict) -> dict:
        url = (self.api_url or DEFAULT_API_URL).rstrip("/") + path
        try:
            answer = requests.post(
                url,
                json=body,
                timeout=self.timeout_seconds,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Accept": "application/vnd.github+json",
                    "X-GitHub-Api-Version": API_VERSION,
                    "User-Agent": "opsfleet",
                },
            )
        except requests.RequestException as err:
            raise GitHubError(f"POST {path}: {err.__class__.__name__}", retryable=True) from None
        if answer.status_code != 201:
            wait = rate_limit_wait(answer.status_code, answer.headers, answer.text, time.time())
            retryable = answer.status_code >= 500 or wait is not None
            raise GitHubError(f"POST {path}: HTTP {answer.status_code} {answer.text[:200]}", retryable, wait)
        try:
            return answer.json()
        except ValueError:
            raise GitHubError(f"POST {path}: 201 without a JSON body", retryable=False) from None

    def create_deployment(self, repository: str, *, ref: str, environment: str, description: str, payload: dict) -> int:
        """A deployment of `ref` (a sha): no auto-merge, no required contexts (opsfleet decided already)."""
        _check_repository(repository)
        created = self._post(
            f"/repos/{repository}/deployments",
            {
                "ref": ref,
                "environment": environment,
                "description": description[:140],
                "payload": payload,
                "auto_merge": False,
                "required_contexts": [],
                "production_environment": environment == "production",
            },
        )
        if not isinstance(created.get("id"), int):
            raise GitHubError(f"deployment of {ref}: 201 without an id", retryable=False)
        return created["id"]

    def create_status(
        self,
        repository: str,
        deployment_id: int,
        *,
        state: str,
        description: str,
        log_url: str | None,
        environment: str,
    ) -> None:
        body = {"state": state, "description": description[:140], "environment": environment, "auto_inactive": False}
        if log_url:
            body["log_url"] = log_url
        _check_repository(repository)
        self._post(f"/repos/{repository}/deployments/{deployment_id}/statuses", body)


def _check_repository(repository: str) -> None:
    if not REPOSITORY_NAME.fullmatch(repository):
        raise GitHubError(f"repository {repository[:100]!r} is not owner/name: nothing sent", retryable=False)
