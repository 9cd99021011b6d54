"""recreate_service on the private dockerd: same image, same configuration, a fresh container."""

from __future__ import annotations

import uuid

from tests.support.servers import TEST_DOCKER_HOST, TEST_IMAGE
from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import execute_inline

SERVICE_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


def test_recreate_gives_a_fresh_container_with_the_same_image_and_configuration(tmp_path, dockerd):
    name = f"opsfleet-recreate-{uuid.uuid4().hex[:8]}"
    old = dockerd.containers.run(
        TEST_IMAGE,
        SERVICE_COMMAND,
        name=name,
        detach=True,
        network_mode="none",
        environment={"APP_MODE": "prod"},
        labels={"com.docker.compose.service": "api"},
        working_dir="/tmp",
    )
    try:
        loaded = parse_config(
            {"fleet": {"data_dir": str(tmp_path)}, "services": {"api": {"container": name}}},
            source="t",
            base_dir=tmp_path,
            environ={"DOCKER_HOST": TEST_DOCKER_HOST},
        )
        app = create_celery(loaded)
        app.opsfleet.ledger.migrate()
        run_id = (
            app.opsfleet.ledger.record_event(
                source="t",
                summary="",
                body="",
                new_runs=[
                    NewRun(
                        trigger="manual",
                        triggered_by="test",
                        playbook="recreate_service",
                        target="api",
                        params={"stop_timeout_seconds": 2, "verify_timeout_seconds": 10},
                    )
                ],
            )
            .runs[0]
            .id
        )
        run = execute_inline(app, run_id)
        assert run["status"] == "succeeded", run
        fresh = dockerd.containers.get(name)
        assert fresh.id != old.id and fresh.status == "running"
        assert fresh.attrs["Image"] == old.attrs["Image"]
        assert "APP_MODE=prod" in fresh.attrs["Config"]["Env"] and fresh.attrs["Config"]["WorkingDir"] == "/tmp"
        assert fresh.labels["com.docker.compose.service"] == "api"
        assert fresh.labels["opsfleet.recreated-by"] == f"opsfleet-run-{run_id}"
        assert fresh.attrs["HostConfig"]["NetworkMode"] == "none"
        assert not [c for c in dockerd.containers.list(all=True) if c.name.startswith(f"{name}.")]  # old one gone
    finally:
        for c in dockerd.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)
