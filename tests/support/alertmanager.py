"""Debian's real prometheus-alertmanager, routed to one webhook, for end-to-end alert tests.

The routing mirrors /work/shared/fixtures/alertmanager/alertmanager-used.yml (where the captured
webhook bodies came from): group_by alertname, short group_wait/group_interval, send_resolved and
a bearer token.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
import yaml

from .servers import ServerProcess, free_port, stop_process

BINARY = "prometheus-alertmanager"


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Alertmanager(ServerProcess):
    def __init__(
        self,
        webhook_url: str,
        token: str = "test-token",
        group_wait: str = "1s",
        group_interval: str = "3s",
        repeat_interval: str = "1h",
        max_alerts: int = 0,
        start_timeout: float = 20,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="opsfleet-alertmanager-"))
        self.config_file = self.dir / "alertmanager.yml"
        self.start_timeout = start_timeout
        self._log = self.dir / "alertmanager.log"
        self._proc: subprocess.Popen | None = None
        # Last posted alert per label set, so resolve() re-posts it whole as Prometheus does
        # (a re-post replaces the stored alert, annotations included).
        self._alerts: dict[tuple, dict] = {}
        webhook = {
            "url": webhook_url,
            "send_resolved": True,
            "max_alerts": max_alerts,
            "http_config": {"authorization": {"credentials": token}},
        }
        config = {
            "route": {
                "receiver": "fleet",  # the name in the captured fixtures (shared/fixtures/alertmanager)
                "group_by": ["alertname"],
                "group_wait": group_wait,
                "group_interval": group_interval,
                "repeat_interval": repeat_interval,
            },
            "receivers": [{"name": "fleet", "webhook_configs": [webhook]}],
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> Alertmanager:
        if self._proc is not None and self._proc.poll() is None:
            return self
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} is not installed. Install it with: bash scripts/services.sh")
        cmd = [
            BINARY,
            f"--config.file={self.config_file}",
            f"--storage.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--web.external-url={self.url}",  # else externalURL in payloads is the host's name
            "--cluster.listen-address=",  # no gossip: it would bind 0.0.0.0:9094 for every instance
        ]
        return self._launch(
            cmd,
            BINARY,
            lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200,
            f"Alertmanager at {self.url}/-/ready",
        )

    def stop(self) -> None:
        stop_process(self._proc)

    def post_alerts(self, alerts: list[dict]) -> None:
        resp = requests.post(f"{self.url}/api/v2/alerts", json=alerts, timeout=5)
        resp.raise_for_status()
        for alert in alerts:
            self._alerts[tuple(sorted(alert["labels"].items()))] = alert

    def fire(self, labels: dict, annotations: dict | None = None, starts_at: datetime | None = None) -> dict:
        alert = {"labels": dict(labels), "annotations": dict(annotations or {})}
        if starts_at is not None:
            alert["startsAt"] = _rfc3339(starts_at)
        self.post_alerts([alert])
        return alert

    def resolve(self, labels: dict) -> dict:
        """Re-posts the alert with endsAt in the past, which is how Alertmanager learns of a resolve."""
        previous = self._alerts.get(tuple(sorted(labels.items())), {"labels": dict(labels)})
        alert = {**previous, "endsAt": _rfc3339(datetime.now(UTC) - timedelta(seconds=1))}
        self.post_alerts([alert])
        return alert
