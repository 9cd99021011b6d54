"""Must show 3: cleanup against the real test dockerd keeps the current release (a running
container's image), the rollback target (protected by the deploy job's provider) and the
newest `keep`, removes the rest and the dangling images, and says how much came back."""

from __future__ import annotations

import contextlib
import os
import uuid

import docker
import pytest

from tests.support.servers import TEST_DOCKER_HOST, TEST_IMAGE
from worker.adapters.ledger import utcnow
from worker.config import parse_config
from worker.runtime import Runtime
from worker.tasks import cleanup
from worker.tasks.playbooks import PLAYBOOKS
from worker.tasks.steps import StepContext


@pytest.fixture
def images(dockerd, tmp_path):
    """Six versions of a unique repository (each with its own 64 KiB layer), oldest first."""
    repo = f"opsfleet-cleanup-{uuid.uuid4().hex[:8]}/api"
    made = []

    def build(tag: str | None):
        folder = tmp_path / f"ctx-{len(made)}"
        folder.mkdir()
        (folder / "payload.bin").write_bytes(os.urandom(64 * 1024))
        (folder / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY payload.bin /payload.bin\n")
        image, _ = dockerd.images.build(path=str(folder), tag=f"{repo}:{tag}" if tag else f"{repo}-scratch:1", rm=True)
        made.append(image.id)
        return image

    versions = {f"v{n}": build(f"v{n}").id for n in range(1, 7)}
    dangling = build(None).id
    build(None)  # the same tag again (another repository): the previous image is now dangling
    yield repo, versions, dangling
    for image_id in made:
        with contextlib.suppress(docker.errors.APIError):
            dockerd.images.remove(image_id, force=True)


def _ctx(tmp_path, config: dict, **params) -> StepContext:
    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path / "data")}, **config},
        source="test",
        base_dir=tmp_path,
        environ={"DOCKER_HOST": TEST_DOCKER_HOST},
    )
    runtime = Runtime(loaded)
    runtime.ledger.migrate()
    return StepContext(runtime, {"id": 1, "target": "all", "params": params, "started_at": utcnow()})


def test_cleanup_keeps_current_and_rollback_images_and_removes_the_rest(
    dockerd, images, make_container, tmp_path, monkeypatch
):
    repo, versions, dangling = images
    name = f"opsfleet-cleanup-api-{uuid.uuid4().hex[:6]}"
    # The current release after a rollback: v4 runs. v2 is the rollback target the deploy job protects.
    current = dockerd.containers.run(f"{repo}:v4", ["sleep", "3600"], name=name, detach=True, network_mode="none")
    try:
        monkeypatch.setattr(cleanup, "PROTECTED_IMAGE_PROVIDERS", [lambda ctx: {f"{repo}:v2"}])
        config = {"services": {"api": {"container": name}}, "cleanup": {"images": {"keep": 2, "services": ["api"]}}}

        dry = _ctx(tmp_path, config, dry_run=True)
        plan = cleanup.old_images(dry)
        assert f"{repo}: remove {repo}:v3: #4 newest, beyond keep=2" in plan
        assert f"{repo}: keep {repo}:v4: used by container {name}" in plan
        assert f"{repo}: keep {repo}:v2: protected ({repo}:v2)" in plan
        assert "would remove 2 images" in plan
        assert f"would remove dangling {dangling[:19]}" in cleanup.dangling_images(dry)
        assert {t for i in dockerd.images.list(repo) for t in i.tags} >= {f"{repo}:v{n}" for n in range(1, 7)}

        from tests.support.fleet import metric_value
        from worker.adapters import metrics

        def counted(name: str, kind: str) -> float:
            return metric_value(metrics.scrape().decode(), name, kind=kind)

        before = {k: counted("opsfleet_cleanup_removed_total", k) for k in ("image", "dangling_image")}
        reclaimed_before = counted("opsfleet_cleanup_reclaimed_bytes_total", "image")
        ctx = _ctx(tmp_path, config)
        outputs = {step.name: step.fn(ctx) for step in PLAYBOOKS["cleanup"]}
    finally:
        current.remove(force=True)
    assert counted("opsfleet_cleanup_removed_total", "image") == before["image"] + 2
    assert counted("opsfleet_cleanup_removed_total", "dangling_image") >= before["dangling_image"] + 1
    assert counted("opsfleet_cleanup_reclaimed_bytes_total", "image") >= reclaimed_before + 2 * 64 * 1024

    left = {t for i in dockerd.images.list(repo) for t in i.tags}
    assert left == {f"{repo}:v2", f"{repo}:v4", f"{repo}:v5", f"{repo}:v6"}
    for gone in ("v1", "v3"):
        with pytest.raises(docker.errors.ImageNotFound):
            dockerd.images.get(versions[gone])
    with pytest.raises(docker.errors.ImageNotFound):
        dockerd.images.get(dangling)
    # each step says what it removed and how much came back (two 64 KiB layers at least)
    assert "removed 2 images, reclaimed" in outputs["old_images"]
    reclaimed = int(outputs["old_images"].rsplit("reclaimed ", 1)[1].split(" B")[0])
    assert reclaimed >= 2 * 64 * 1024
    assert "removed dangling" in outputs["dangling_images"]
    assert outputs["backups"] == "backup retention: no backup series configured"
    assert outputs["old_runs"].startswith("removed 0 runs")


def test_cleanup_command_dry_run_then_real(dockerd, images, tmp_path):
    import subprocess
    import sys

    import yaml

    repo, versions, _ = images
    path = tmp_path / "opsfleet.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "fleet": {"data_dir": str(tmp_path / "data")},
                "cleanup": {"images": {"keep": 4, "repositories": [repo], "dangling": False}},
            }
        )
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DOCKER_HOST": TEST_DOCKER_HOST,
    }

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "opsfleet.cli", "--config", str(path), "cleanup", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    dry = cli("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"remove {repo}:v2: #5 newest, beyond keep=4" in dry.stdout and "would remove 2 images" in dry.stdout
    assert dockerd.images.get(versions["v1"])  # still there
    real = cli()
    assert real.returncode == 0, real.stdout + real.stderr
    assert "run 1 succeeded" in real.stdout and "removed 2 images, reclaimed" in real.stdout
    assert {t for i in dockerd.images.list(repo) for t in i.tags} == {f"{repo}:v{n}" for n in range(3, 7)}
