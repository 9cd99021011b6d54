"""Debian's real Prometheus, scraping given targets with given rule files, sending to an Alertmanager."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import requests
import yaml

from .servers import ServerProcess, free_port, log_tail, stop_process

BINARY = "prometheus"


class Prometheus(ServerProcess):
    def __init__(
        self,
        scrape: dict[str, list[str]],
        rule_files: list[Path],
        alertmanager_url: str | None = None,
        interval: str = "1s",
        start_timeout: float = 30,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="opsfleet-prometheus-"))
        self.start_timeout = start_timeout
        self._log = self.dir / "prometheus.log"
        self._proc: subprocess.Popen | None = None
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in scrape.items()
            ],
        }
        if alertmanager_url:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.split("://", 1)[1]]}]}]
            }
        self.config_file = self.dir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> Prometheus:
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} is not installed. Install it with: bash scripts/services.sh")
        cmd = [
            BINARY,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        return self._launch(
            cmd,
            BINARY,
            lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200,
            f"Prometheus at {self.url}/-/ready",
        )

    def stop(self) -> None:
        stop_process(self._proc)

    def query(self, expr: str) -> list[dict]:
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    def alerts(self) -> list[dict]:
        answer = requests.get(f"{self.url}/api/v1/alerts", timeout=5)
        answer.raise_for_status()
        return answer.json()["data"]["alerts"]

    def log(self) -> str:
        return log_tail(self._log)
