"""Every playbook by name: an ordered tuple of steps."""

from __future__ import annotations

from worker.tasks import backup, cleanup, deploy, escalate, remediate, restore, rotate
from worker.tasks.steps import Step

PLAYBOOKS: dict[str, tuple[Step, ...]] = {
    **remediate.PLAYBOOKS,
    **escalate.PLAYBOOKS,
    **backup.PLAYBOOKS,
    **restore.PLAYBOOKS,
    **rotate.PLAYBOOKS,
    **cleanup.PLAYBOOKS,
    **deploy.PLAYBOOKS,
}

# Optional per-playbook gates for scheduled triggers: (runtime, target, params) ->
# None to record a run, or the reason there is nothing to do (no run recorded).
GATES = {
    **rotate.GATES,
}
