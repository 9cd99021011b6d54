"""Slack adapter on slack-sdk: one parent message per run, steps as thread replies.

Text that came from outside (alert labels, commit messages) goes through
`escape` so `<!channel>`, `<@U123>` and `&<>` arrive as text, never as a
mention or a link.
"""

from __future__ import annotations

from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)


class SlackError(Exception):
    """Slack refused or could not be reached after slack-sdk's own retries."""


def escape(text: str) -> str:
    """Slack's documented escaping for message text: only &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class PostedMessage:
    channel: str
    ts: str


class SlackAdapter:
    def __init__(self, token: str, base_url: str | None, timeout_seconds: int, max_retries: int = 3):
        kwargs = {}
        if base_url:
            kwargs["base_url"] = base_url if base_url.endswith("/") else base_url + "/"
        self.client = WebClient(
            token=token,
            timeout=timeout_seconds,
            # 429 waits Retry-After; 5xx and dropped connections retry with backoff.
            retry_handlers=[
                RateLimitErrorRetryHandler(max_retry_count=max_retries),
                ServerErrorRetryHandler(max_retry_count=max_retries),
                ConnectionErrorRetryHandler(max_retry_count=max_retries),
            ],
            **kwargs,
        )

    def _call(self, what: str, fn, **kwargs) -> dict:
        try:
            return fn(**kwargs).data
        except SlackApiError as err:
            raise SlackError(f"Slack {what} failed: {err.response.get('error', err.response.status_code)}") from None
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
