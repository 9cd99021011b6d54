"""Deploy test helpers: tagged images of a tiny HTTP service, signed GitHub pushes.

Images are built from the test busybox image: busybox httpd serving /www on a
127.0.0.1 port (network_mode host). A healthy tag serves /health; an unhealthy
one has none (404). Tags carry a registry host nobody listens on (127.0.0.1:1),
so a tag not built locally cannot be pulled, quickly.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import tarfile
import uuid
from pathlib import Path

from .servers import TEST_IMAGE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "github"
SHA = {name: (name * 40)[:40] for name in ("a", "b", "c", "d", "e")}  # a, b healthy; c, e not; d never built
TAG = {name: f"main-{sha[:7]}" for name, sha in SHA.items()}
HEALTHY = {"v1": True, "a": True, "b": True, "c": False, "e": False}


def new_repository() -> str:
    return f"127.0.0.1:1/opsfleet-deployapp-{uuid.uuid4().hex[:8]}"


def _context(files: dict[str, str]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        dockerfile = f"FROM {TEST_IMAGE}\nCOPY www /www\n".encode()
        entries = {"Dockerfile": dockerfile, **{f"www/{k}": v.encode() for k, v in files.items()}}
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def build_images(client, repository: str) -> list[str]:
    """repository:v1 and repository:main-<sha7> for a, b, c, e; each serves /version with its name."""
    built = []
    for name, healthy in HEALTHY.items():
        files = {"version": name, **({"health": "ok"} if healthy else {})}
        ref = f"{repository}:{'v1' if name == 'v1' else TAG[name]}"
        client.images.build(fileobj=_context(files), custom_context=True, tag=ref, rm=True)
        built.append(ref)
    return built


def remove_images(client, refs: list[str]) -> None:
    for ref in refs:
        try:
            client.images.remove(ref, force=True)
        except Exception:
            pass


def httpd_command(port: int) -> list[str]:
    return ["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]


def signed_push(secret: str, commit: str, pushed_at: int, delivery: str | None = None) -> tuple[bytes, dict]:
    """GitHub's example push (one commit to master), for SHA[commit] pushed at `pushed_at`: body and headers."""
    payload = json.loads((FIXTURES / "push.with-new-branch.json").read_bytes())
    payload["after"] = SHA[commit]
    payload["head_commit"]["id"] = SHA[commit]
    payload["repository"]["pushed_at"] = pushed_at
    data = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
    return data, {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "Content-Type": "application/json",
    }
