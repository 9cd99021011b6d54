"""GitHub REST API: deployments and deployment statuses, nothing else.

POST /repos/{owner}/{repo}/deployments answers 201 with the deployment (its
`id`); POST .../deployments/{id}/statuses answers 201. States: queued,
in_progress, success, failure, error, inactive. `description` is at most
140 characters; `log_url` links the run. Every call has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

API_VERSION = "2022-11-28"
DEFAULT_API_URL = "https://api.github.com"


class GitHubError(Exception):
    """A call failed; `retryable` for 5xx, 429, timeouts and refused connections."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


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
            retryable = answer.status_code >= 500 or answer.status_code == 429
            raise GitHubError(f"POST {path}: HTTP {answer.status_code} {answer.text[:200]}", retryable)
        try:
            return answer.json()
        except ValueError:
            raise GitHubError(f"POST {path}: 201 without a JSON body", retryable=False) from None

    def create_deployment(self, repository: str, *, ref: str, environment: str, description: str, payload: dict) -> int:
        """A deployment of `ref` (a sha): no auto-merge, no required contexts (opsfleet decided already)."""
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
        self._post(f"/repos/{repository}/deployments/{deployment_id}/statuses", body)
