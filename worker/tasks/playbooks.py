"""Every playbook by name: an ordered tuple of steps."""

from __future__ import annotations

from worker.tasks import remediate, rotate
from worker.tasks.steps import Step

PLAYBOOKS: dict[str, tuple[Step, ...]] = {
    **remediate.PLAYBOOKS,
    **rotate.PLAYBOOKS,
}
