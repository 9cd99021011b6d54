"""opsfleet's Dockerfile builds on a base made here without a registry
(scripts/make-base-image.sh: debootstrap + docker import) and the image runs
opsfleet, offline: wheels built on this machine, no network in the build.

The base image is made by scripts/services.sh (once per test dockerd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import START_HINT, TEST_DOCKER_HOST, docker_client

REPO = Path(__file__).resolve().parent.parent
BASE = "opsfleet-base:bookworm"
# What the Dockerfile COPYs; the build context holds these and wheels/ only.
SOURCES = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "beat_schedule.py",
    "opsfleet",
    "worker",
    "webhooks",
)

pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_HOST": TEST_DOCKER_HOST, "DOCKER_BUILDKIT": "0"}  # no buildx plugin here
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    client = docker_client()
    try:
        client.images.get(BASE)
    except Exception:
        pytest.fail(
            f"base image {BASE} is missing from {TEST_DOCKER_HOST}: {START_HINT} (it runs scripts/make-base-image.sh)"
        )
    context = tmp_path_factory.mktemp("image-context")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, context / name)
    # Offline: opsfleet and every dependency as a wheel from this machine's package index.
    # The image's Python is Debian 12's 3.11.2: redis needs async-timeout below 3.11.3, a
    # marker this machine's Python may not take, so it is fetched by name.
    wheels = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            "wheels",
            ".",
            "async-timeout>=4.0.3",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wheels.returncode == 0, wheels.stdout + wheels.stderr
    tag = f"opsfleet-test/app:{os.getpid()}"
    built = docker("build", "--network", "none", "--build-arg", f"BASE={BASE}", "-t", tag, str(context))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield tag
    docker("rmi", "-f", tag)


def run_in(image: str, *command: str) -> subprocess.CompletedProcess:
    return docker("run", "--rm", "--network", "none", image, *command, timeout=120)


def test_the_image_runs_opsfleet_help(image):
    done = run_in(image, "opsfleet", "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    for command in ("run", "worker", "config", "backup", "restore", "deploy", "rotate-logs"):
        assert f"  {command}" in done.stdout, done.stdout


def test_the_image_holds_what_web_worker_and_beat_run(image):
    # The compose file's commands: gunicorn for web, celery for worker and beat; the
    # status page's templates as package data; pg_dump and zstd for backups; not root.
    script = (
        # dbm.gnu: beat's schedule is one file, which the compose file's beat health check stats.
        "import gunicorn, celery, dbm.gnu, webhooks, worker.celery_factory, beat_schedule, importlib.resources as r; "
        "assert r.files('webhooks').joinpath('templates/pages/runs.html').is_file(); print('ok')"
    )
    done = run_in(image, "python3", "-c", script)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    tools = run_in(image, "sh", "-c", "pg_dump --version && zstd --version && id -u")
    assert tools.returncode == 0, tools.stderr
    assert "pg_dump (PostgreSQL)" in tools.stdout and tools.stdout.split()[-1] == "10001"


def test_the_image_checks_the_example_configuration_at_its_config_path(image):
    example = REPO / "opsfleet.example.yaml"
    done = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{example}:/etc/opsfleet/opsfleet.yaml:ro",
        image,
        "opsfleet",
        "config",
        "check",
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration OK (/etc/opsfleet/opsfleet.yaml)" in done.stderr
