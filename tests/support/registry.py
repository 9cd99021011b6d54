"""Debian's docker-registry (distribution 2.8) on 127.0.0.1 behind htpasswd auth, for deploy tests.

The test dockerd treats 127.0.0.0/8 registries as insecure (plain HTTP) by default, so images
are pushed to it and pulled from it as from any registry, credentials required.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests
import yaml

from .servers import ServerProcess, free_port, stop_process

BINARY = "docker-registry"


class Registry(ServerProcess):
    def __init__(self, user: str = "deployer", start_timeout: float = 20):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self.dir = Path(tempfile.mkdtemp(prefix="opsfleet-registry-"))
        self.start_timeout = start_timeout
        self._log = self.dir / "registry.log"
        self._proc: subprocess.Popen | None = None

    @property
    def auth(self) -> dict:
        return {"username": self.user, "password": self.password}

    def start(self) -> Registry:
        if self._proc is not None and self._proc.poll() is None:
            return self
        for tool, package in ((BINARY, "docker-registry"), ("htpasswd", "apache2-utils")):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} ({package}) is not installed. Install it with: bash scripts/services.sh")
        htpasswd = self.dir / "htpasswd"
        made = subprocess.run(
            ["htpasswd", "-Bbn", self.user, self.password], capture_output=True, text=True, timeout=30, check=True
        )
        htpasswd.write_text(made.stdout)
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            "auth": {"htpasswd": {"realm": "opsfleet-test", "path": str(htpasswd)}},
        }
        config_file = self.dir / "config.yml"
        config_file.write_text(yaml.safe_dump(config))
        # Unauthenticated: 401 with the challenge is the answer of a registry that is up.
        return self._launch(
            [BINARY, "serve", str(config_file)],
            BINARY,
            lambda: requests.get(f"{self.url}/v2/", timeout=2).status_code == 401,
            f"docker-registry at {self.url}/v2/",
        )

    def stop(self) -> None:
        stop_process(self._proc)

    def push(self, client, reference: str) -> None:
        """Push a local image `reference` (tagged with this registry's host) with the credentials;
        errors arrive inside the push stream."""
        repository, _, tag = reference.rpartition(":")
        for message in client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=self.auth):
            if isinstance(message, dict) and message.get("error"):
                raise RuntimeError(f"push {reference} failed: {message['error']}")

    def tags(self, repository_path: str) -> list[str]:
        answer = requests.get(f"{self.url}/v2/{repository_path}/tags/list", auth=(self.user, self.password), timeout=5)
        answer.raise_for_status()
        return sorted(answer.json().get("tags") or [])
