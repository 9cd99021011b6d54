"""Rotation of a log written by a container (bind-mounted folder), on the real test dockerd:
rename + SIGHUP through the Docker adapter, and copytruncate with the container paused."""

from __future__ import annotations

import contextlib
import uuid

from tests.support.logcheck import audit
from tests.support.rotation import make_ctx, run_rotation
from tests.support.servers import TEST_IMAGE, wait_for

LINES = 60_000
PAD = "x" * 60
# busybox sh: one printf per line to fd 3, opened with >> (O_APPEND); on HUP, reopen.
SCRIPT = (
    "i=0; exec 3>>/logs/app.log; trap 'exec 3>>/logs/app.log' HUP; "
    f"while [ $i -lt {LINES} ]; do printf '%09d {PAD}\\n' $i >&3; i=$((i+1)); done; "
    "touch /logs/done; sleep 3600"
)


@contextlib.contextmanager
def writer_container(dockerd, folder):
    name = f"opsfleet-rot-{uuid.uuid4().hex[:8]}"
    container = dockerd.containers.run(
        TEST_IMAGE,
        ["sh", "-c", SCRIPT],
        name=name,
        detach=True,
        network_mode="none",
        volumes={str(folder): {"bind": "/logs", "mode": "rw"}},
    )
    try:
        yield name
    finally:
        container.remove(force=True)


def _rotate_until_done(ctx, folder) -> list[str]:
    outputs = []
    wait_for(lambda: (folder / "app.log").exists(), 30, what="container writer started")
    while not (folder / "done").exists():
        outputs.append(run_rotation(ctx, force=True))
    outputs.append(run_rotation(ctx, force=True))
    return outputs


def test_rename_and_signal_the_container(dockerd, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    with writer_container(dockerd, folder) as name:
        ctx = make_ctx(
            tmp_path,
            {
                "app": {
                    "paths": [str(folder / "app.log")],
                    "max_size": "1G",
                    "keep": 100,
                    "reopen": {"service": "web", "signal": "HUP"},
                }
            },
            services={"web": {"container": name}},
        )
        outputs = _rotate_until_done(ctx, folder)
    result = audit(folder / "app.log", LINES)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled)
    assert len(result.files) >= 3, result.files
    assert any(f"sent SIGHUP to container {name}" in o for o in outputs)
    assert any("writer let go of" in o for o in outputs)


def test_copytruncate_pauses_the_container(dockerd, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    with writer_container(dockerd, folder) as name:
        ctx = make_ctx(
            tmp_path,
            {
                "app": {
                    "paths": [str(folder / "app.log")],
                    "mode": "copytruncate",
                    "writer_appends": True,
                    "pause_service": "web",
                    "max_size": "1G",
                    "keep": 100,
                    "compress": "gzip",
                }
            },
            services={"web": {"container": name}},
        )
        outputs = _rotate_until_done(ctx, folder)
        assert dockerd.containers.get(name).status == "running"  # unpaused
    result = audit(folder / "app.log", LINES)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled)
    assert len(result.files) >= 3, result.files
    assert any("writer paused" in o and f"container {name}" in o for o in outputs), outputs
