"""A real fleet for end-to-end tests: gunicorn, a Celery worker and beat as processes.

Each process logs to its own file in the test's folder; a failing wait shows
the tails of all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import requests
import yaml

from .servers import free_port, log_tail, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-alertmanager-token"


class Fleet:
    def __init__(self, folder: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = TOKEN
        config = {
            **config,
            "fleet": {"data_dir": str(folder / "data"), **config.get("fleet", {})},
            "broker": {"key_prefix": f"opsfleet-test-{uuid.uuid4().hex[:10]}:", **config.get("broker", {})},
        }
        self.key_prefix = config["broker"]["key_prefix"]
        # Two web processes unless the configuration says otherwise (bench/alert_storm --web-workers).
        self.web_workers = int(config.get("web", {}).get("workers", 2))
        self.config_path = folder / "opsfleet.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "SLACK_BOT_TOKEN")},
            "OPSFLEET_CONFIG": str(self.config_path),
            "ALERTMANAGER_TOKEN": TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
            "PYTHONPATH": str(REPO),
            "LOG_LEVEL": "INFO",
            **(env or {}),
        }
        (folder / "metrics").mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def argv(self, name: str) -> list[str]:
        celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
        if name == "web":
            return [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:opsfleet.gunicorn_conf",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.web_workers),
                "webhooks:create_app()",
            ]
        if name == "worker" or (name.startswith("worker") and name[6:].isdigit()):  # worker, worker2, ...
            return [
                *celery,
                "worker",
                "--concurrency",
                "2",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"e2e-{uuid.uuid4().hex[:6]}@%h",
            ]
        if name.startswith("worker@"):  # a host's worker: opsfleet worker --host NAME
            host = name.split("@", 1)[1]
            return [sys.executable, "-m", "opsfleet.cli", "worker", "--host", host, "--concurrency", "1"]
        if name == "beat" or (name.startswith("beat") and name[4:].isdigit()):  # beat, beat2, ...
            return [*celery, "beat", "--loglevel", "INFO", "--schedule", str(self.folder / f"{name}-schedule")]
        raise ValueError(name)

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, *names: str, wait_ready: bool = True) -> Fleet:
        """Start processes (default web, worker, beat); wait for web's /healthz and each worker's
        "ready." line (an INFO line: pass wait_ready=False under LOG_LEVEL=WARNING)."""
        began: dict[str, int] = {}  # each log's length before this start: "ready." must come after it
        for name in names or ("web", "worker", "beat"):
            began[name] = self.log(name).stat().st_size if self.log(name).exists() else 0
            handle = open(self.log(name), "ab")
            self.procs[name] = subprocess.Popen(
                self.argv(name),
                env=self.env,
                cwd=str(self.folder),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            handle.close()
        if "web" in self.procs and (not names or "web" in names):
            self.wait(lambda: requests.get(f"{self.url}/healthz", timeout=2).ok, 30, "web /healthz")
        for name in [n for n in self.procs if wait_ready and n.startswith("worker") and (not names or n in names)]:
            self.wait(lambda n=name: b"ready." in self.log(n).read_bytes()[began.get(n, 0) :], 60, f"{name} ready")
        return self

    def stop(self, *names: str, sig: int = signal.SIGTERM) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, children too
                proc.wait(10)
            else:
                stop_process(proc, sig, timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{log_tail(p, 40)}" for p in sorted(self.folder.glob("*.log")))

    def wait(self, predicate, timeout: float, what: str):
        try:
            return wait_for(predicate, timeout, 0.2, what)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.logs()}") from None

    # -- talking to it ---------------------------------------------------------

    def post_alerts(self, body: bytes | dict, token: str | None = None) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(
            f"{self.url}/hooks/alertmanager",
            data=data,
            headers={"Authorization": f"Bearer {token or self.token}", "Content-Type": "application/json"},
            timeout=10,
        )

    def api(self, path: str) -> Any:
        answer = requests.get(f"{self.url}/api{path}", timeout=5)
        answer.raise_for_status()
        return answer.json()

    def runs(self) -> list[dict]:
        return self.api("/runs?limit=500")["runs"]

    def wait_run(self, run_id: int, statuses=("succeeded", "failed", "skipped"), timeout: float = 60) -> dict:
        def finished():
            run = self.api(f"/runs/{run_id}")
            return run if run["status"] in statuses else None

        return self.wait(finished, timeout, f"run {run_id} to reach {statuses}")

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=5).text

    def close(self) -> None:
        self.stop()
        self._forget_broker_keys()

    def _forget_broker_keys(self) -> None:
        """The shared Redis keeps nothing of this fleet (its keys all carry its prefix)."""
        url = self.env.get("REDIS_URL")
        if not url:
            return
        import redis

        try:
            client = redis.Redis.from_url(url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except redis.RedisError:
            pass  # a test that stopped its own Redis: nothing of ours is on the shared one

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def service_down(fingerprint: str, service: str = "api", starts_at: str = "2026-12-03T11:00:00Z") -> bytes:
    """One firing ServiceDown alert for `service`, as Alertmanager's v4 webhook body."""
    return json.dumps(
        {
            "version": "4",
            "status": "firing",
            "receiver": "fleet",
            "groupKey": "{}:{}",
            "truncatedAlerts": 0,
            "groupLabels": {},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "ServiceDown", "service": service},
                    "annotations": {},
                    "startsAt": starts_at,
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "",
                    "fingerprint": fingerprint,
                }
            ],
        }
    ).encode()
