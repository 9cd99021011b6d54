"""Runs the rotate_logs playbook's real steps in-process, as a worker would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.servers import TEST_DOCKER_HOST
from worker.adapters.ledger import utcnow
from worker.config import parse_config
from worker.runtime import Runtime
from worker.tasks.playbooks import PLAYBOOKS
from worker.tasks.steps import StepContext


def make_ctx(tmp_path: Path, sets: dict[str, Any], services: dict | None = None, target: str = "all") -> StepContext:
    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path / "data")}, "rotation": {"sets": sets}, "services": services or {}},
        source="test",
        base_dir=tmp_path,
        environ={"DOCKER_HOST": TEST_DOCKER_HOST},
    )
    return StepContext(Runtime(loaded), {"id": 0, "target": target, "params": {}, "started_at": utcnow()})


def run_rotation(ctx: StepContext, **params: Any) -> str:
    ctx = StepContext(ctx.runtime, {**ctx.run, "params": params})
    return "\n".join(step.fn(ctx) for step in PLAYBOOKS["rotate_logs"])
