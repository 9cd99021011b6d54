from worker.config import RULE_PLAYBOOKS
from worker.tasks.playbooks import PLAYBOOKS


def test_every_rule_playbook_exists_with_steps():
    for name in RULE_PLAYBOOKS:
        assert PLAYBOOKS.get(name), f"config allows playbook {name} but none is registered"


def test_step_names_are_unique_within_a_playbook():
    for name, steps in PLAYBOOKS.items():
        names = [s.name for s in steps]
        assert len(names) == len(set(names)), name


def test_the_module_table_names_every_playbook_of_every_module_and_no_other():
    import importlib
    import pkgutil

    import worker.tasks
    from worker.tasks.playbooks import PLAYBOOK_MODULES

    defined = {}
    for info in pkgutil.iter_modules(worker.tasks.__path__, "worker.tasks."):
        own = getattr(importlib.import_module(info.name), "PLAYBOOKS", None)
        if isinstance(own, dict):  # not the registry, which some modules import
            for name in own:
                defined[name] = info.name
    assert defined == PLAYBOOK_MODULES


def test_unknown_playbooks_are_absent_not_imported():
    from worker.tasks.playbooks import gate

    assert "no_such_playbook" not in PLAYBOOKS
    assert PLAYBOOKS.get("no_such_playbook") is None
    assert gate("no_such_playbook") is None
    assert gate("rotate_logs") is not None  # rotation's scheduled runs skip when nothing is due


def test_a_command_running_one_playbook_loads_only_that_playbooks_module(tmp_path):
    # `opsfleet rotate-logs` starts in well under a second because it does not import
    # the deploy engine, backups, psycopg: each playbook's module loads on first use.
    import os
    import subprocess
    import sys

    log = tmp_path / "app.log"
    log.write_text("a line\n")
    conf = tmp_path / "opsfleet.yaml"
    conf.write_text(
        f"fleet: {{data_dir: {tmp_path / 'data'}}}\nlogging: {{files: false}}\n"
        f"rotation: {{sets: {{app: {{paths: [{log}], mode: copytruncate, writer_appends: true, max_size: 1M}}}}}}\n"
    )
    probe = (
        "import sys\n"
        "from opsfleet.cli import cli\n"
        "try:\n"
        f"    cli(['--config', {str(conf)!r}, 'rotate-logs', '--force'])\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split("\n")[-2].split())
    assert "worker.tasks.rotate" in loaded
    assert not loaded & {"worker.tasks.deploy", "worker.tasks.backup", "worker.tasks.restore", "psycopg"}
