"""Per-process handles on the outside world, built lazily from the configuration.

Lazily, because Celery forks its children after importing the app: a
database connection or Docker socket opened in the parent would be shared
by every child. The Docker and Slack adapters are imported lazily too: a
command that needs neither starts without their SDKs.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from worker.adapters.ledger import Ledger, ledger_url
from worker.config import LoadedConfig

if TYPE_CHECKING:
    from worker.adapters.docker import DockerAdapter
    from worker.adapters.slack import SlackAdapter


class Runtime:
    def __init__(self, loaded: LoadedConfig):
        self.loaded = loaded
        self.config = loaded.config
        self.secrets = loaded.secrets
        self._pid = os.getpid()
        self._handles: dict[str, object] = {}

    def _handle(self, name: str, build):
        if os.getpid() != self._pid:
            # Forked: never use the parent's connections.
            self._pid = os.getpid()
            self._handles = {}
        if name not in self._handles:
            self._handles[name] = build()
        return self._handles[name]

    @property
    def ledger(self) -> Ledger:
        return self._handle(
            "ledger", lambda: Ledger(ledger_url(self.secrets.get("DATABASE_URL"), self.loaded.data_dir))
        )

    @property
    def docker(self) -> DockerAdapter:
        from worker.adapters.docker import DockerAdapter

        return self._handle(
            "docker", lambda: DockerAdapter(self.secrets.get("DOCKER_HOST"), self.config.docker.timeout_seconds)
        )

    @property
    def slack(self) -> SlackAdapter | None:
        """None when SLACK_BOT_TOKEN is unset: reports are then recorded as not sent."""
        token = self.secrets.get("SLACK_BOT_TOKEN")
        if not token:
            return None
        from worker.adapters.slack import SlackAdapter

        return self._handle(
            "slack", lambda: SlackAdapter(token, self.secrets.get("SLACK_API_URL"), self.config.slack.timeout_seconds)
        )

    @property
    def worker_name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"
