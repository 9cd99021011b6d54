"""Every playbook by name: an ordered tuple of steps."""

from __future__ import annotations

from worker.tasks import backup, escalate, remediate, restore
from worker.tasks.steps import Step

PLAYBOOKS: dict[str, tuple[Step, ...]] = {
    **remediate.PLAYBOOKS,
    **escalate.PLAYBOOKS,
    **backup.PLAYBOOKS,
    **restore.PLAYBOOKS,
}
