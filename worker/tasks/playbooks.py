"""Every playbook by name: an ordered tuple of steps.

A playbook's module is imported when the playbook is first looked up, not when
this module is: a command that runs one playbook here (`opsfleet rotate-logs`)
starts without loading the Docker SDK, psycopg and the deploy engine it will
not call. Workers load them all at start (`load_all`), before forking.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from worker.tasks.steps import Step

# Playbook name → the module whose PLAYBOOKS defines it (tests check this table
# against every module's PLAYBOOKS, both ways).
PLAYBOOK_MODULES: dict[str, str] = {
    "restart_service": "worker.tasks.remediate",
    "recreate_service": "worker.tasks.remediate",
    "verify": "worker.tasks.remediate",
    "free_disk": "worker.tasks.remediate",
    "run_backup": "worker.tasks.remediate",
    "escalate": "worker.tasks.escalate",
    "backup_set": "worker.tasks.backup",
    "backup_summary": "worker.tasks.backup",
    "restore": "worker.tasks.restore",
    "restore_drill": "worker.tasks.restore",
    "recover": "worker.tasks.restore",
    "rotate_logs": "worker.tasks.rotate",
    "cleanup": "worker.tasks.cleanup",
    "deploy": "worker.tasks.deploy",
}


class Playbooks(Mapping[str, tuple[Step, ...]]):
    """A read-only mapping that imports a playbook's module on first lookup."""

    def __getitem__(self, name: str) -> tuple[Step, ...]:
        return importlib.import_module(PLAYBOOK_MODULES[name]).PLAYBOOKS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(PLAYBOOK_MODULES)

    def __len__(self) -> int:
        return len(PLAYBOOK_MODULES)


PLAYBOOKS = Playbooks()


def gate(playbook: str) -> Callable | None:
    """A scheduled trigger's gate for this playbook, if its module defines one:
    (runtime, target, params) -> None to record a run, or the reason there is
    nothing to do (no run recorded)."""
    module = PLAYBOOK_MODULES.get(playbook)
    if module is None:
        return None
    return getattr(importlib.import_module(module), "GATES", {}).get(playbook)


def load_all() -> None:
    """Import every playbook's module now (a worker, before it forks its children)."""
    for module in sorted(set(PLAYBOOK_MODULES.values())):
        importlib.import_module(module)
