from worker.config import RULE_PLAYBOOKS
from worker.tasks.playbooks import PLAYBOOKS


def test_every_rule_playbook_exists_with_steps():
    for name in RULE_PLAYBOOKS:
        assert PLAYBOOKS.get(name), f"config allows playbook {name} but none is registered"


def test_step_names_are_unique_within_a_playbook():
    for name, steps in PLAYBOOKS.items():
        names = [s.name for s in steps]
        assert len(names) == len(set(names)), name
