"""What a playbook step is, and the test-only hook that holds one.

Steps are plain functions run by the generic step task in worker.tasks.runs;
the playbook modules (remediate, and later backup, deploy) define them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import Config
from worker.runtime import Runtime

HOLD_DIR_ENV = "OPSFLEET_TEST_HOLD_DIR"


class StepFailed(Exception):
    """The step did not achieve its aim; the message is for the on-call engineer."""


class StepEnded(Exception):
    """The step ends the run with a final status of its own (`superseded`,
    `rolled_back`, `rollback_failed`); no later step runs. The step itself is
    recorded as `step_status` with the message as its output."""

    def __init__(self, status: str, message: str, step_status: str = "failed"):
        super().__init__(message)
        self.status = status
        self.step_status = step_status


class StepRequeued(Exception):
    """Not now (say, a lock held by a longer run): the run goes back to `queued` with this
    message as its reason, its steps forgotten; the sweeper sends it again after
    sweeper.requeue_after_seconds, and it starts from its first step."""


class StepSkipped(Exception):
    """There is nothing for this run to do (say, another run holds the lock):
    the run ends as `skipped` with this reason, and no later step runs."""


@dataclass(frozen=True)
class StepContext:
    runtime: Runtime
    run: dict[str, Any]

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def params(self) -> dict[str, Any]:
        return self.run["params"]


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[StepContext], str]
    # Steps that may run longer than worker.step_*_timeout_seconds (a dump)
    # give their own soft limit, from the configuration.
    timeout: Callable[[Config], int] | None = None
    # Housekeeping whose steps do not depend on each other (rotate, compress, retain): a
    # failure is recorded, the later steps still run, and the run ends failed naming it.
    carry_on: bool = False

    def soft_limit(self, config: Config) -> int:
        return self.timeout(config) if self.timeout else config.worker.step_soft_timeout_seconds

    def hard_limit(self, config: Config) -> int:
        if self.timeout:
            return self.timeout(config) + 30
        return config.worker.step_hard_timeout_seconds


def hold_if_asked(playbook: str, step: str, run_id: int) -> None:
    """Fault tests only: while `<dir>/hold-<playbook>-<step>` exists, wait inside
    the step, having said so in `<dir>/held-<run_id>-<step>`, so a test can kill
    the worker at a known point. Inert unless OPSFLEET_TEST_HOLD_DIR is set. Called at each
    step's start; a deploy's recreate calls it again after each service (step `recreate.<service>`)."""
    folder = os.environ.get(HOLD_DIR_ENV)
    if not folder:
        return
    hold = Path(folder) / f"hold-{playbook}-{step}"
    if not hold.exists():
        return
    (Path(folder) / f"held-{run_id}-{step}").touch()
    while hold.exists():
        time.sleep(0.05)
