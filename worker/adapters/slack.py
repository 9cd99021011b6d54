"""Slack adapter on slack-sdk: one parent message per run, steps as thread replies.

Text that came from outside (alert labels, commit messages) goes through
`escape` so `<!channel>`, `<@U123>` and `&<>` arrive as text, never as a
mention or a link.
"""

from __future__ import annotations

from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, ServerErrorRetryHandler


class SlackError(Exception):
    """Slack refused or could not be reached. `retry_after`: the seconds a 429 asked for."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def escape(text: str) -> str:
    """Slack's documented escaping for message text: only &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class PostedMessage:
    channel: str
    ts: str


class SlackAdapter:
    def __init__(self, token: str, base_url: str | None, timeout_seconds: int, max_retries: int = 1):
        kwargs = {}
        if base_url:
            kwargs["base_url"] = base_url if base_url.endswith("/") else base_url + "/"
        self.client = WebClient(
            token=token,
            timeout=timeout_seconds,
            # One quick retry of a 5xx or a dropped connection. A 429 is not waited out here:
            # it raises SlackError with its Retry-After, and the report task retries later, so a
            # rate-limited or black-holed Slack never holds a worker process (runs need them).
            retry_handlers=[
                ServerErrorRetryHandler(max_retry_count=max_retries),
                ConnectionErrorRetryHandler(max_retry_count=max_retries),
            ],
            **kwargs,
        )

    def _call(self, what: str, fn, **kwargs) -> dict:
        try:
            return fn(**kwargs).data
        except SlackApiError as err:
            retry_after = None
            if err.response.status_code == 429:
                value = (err.response.headers or {}).get("Retry-After") or (err.response.headers or {}).get(
                    "retry-after"
                )
                retry_after = float(value) if value and str(value).strip().isdigit() else 30.0
            raise SlackError(
                f"Slack {what} failed: {err.response.get('error', err.response.status_code)}", retry_after
            ) from None
        except (SlackClientError, OSError) as err:
            raise SlackError(f"Slack {what} failed: {err}") from None

    def post(self, channel: str, text: str, blocks: list | None = None, thread_ts: str | None = None) -> PostedMessage:
        data = self._call(
            "chat.postMessage",
            self.client.chat_postMessage,
            channel=channel,
            text=text,
            blocks=blocks,
            thread_ts=thread_ts,
            unfurl_links=False,
            unfurl_media=False,
        )
        return PostedMessage(data["channel"], data["ts"])

    def update(self, channel: str, ts: str, text: str, blocks: list | None = None) -> None:
        self._call("chat.update", self.client.chat_update, channel=channel, ts=ts, text=text, blocks=blocks)
