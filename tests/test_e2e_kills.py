"""Issue 8, fault 3: a real worker SIGKILLed inside each step (the test hook holds the step
until the kill) of a backup, a log rotation and a remediation, on the Redis + PostgreSQL
stack. Every run ends once, in a final state; no lock outlives it (the next run of the same
job succeeds); a killed backup leaves no partial set listed (one killed after its commit, a
complete one); a killed rotation loses no line and doubles none. Deploys: test_e2e_deploy.py."""

from __future__ import annotations

import signal
import uuid

import pytest
import yaml

from tests.support.fleet import Fleet
from tests.support.servers import TEST_DOCKER_HOST
from worker.adapters.archive import iter_decompressed
from worker.adapters.backupstore import list_sets, partial_sets
from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.playbooks import PLAYBOOKS
from worker.tasks.runs import enqueue_runs

EVERY_LINE = [f"{n:06d} line" for n in range(5000)]
SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")


def producer(fleet: Fleet, env: dict):
    """The test's own handle on the fleet's ledger and broker, to record and send runs."""
    raw = yaml.safe_load(fleet.config_path.read_text())
    app = create_celery(parse_config(raw, source="t", base_dir=fleet.folder, environ={**fleet.env, **env}))
    return app


def start_run(app, playbook: str, target: str, params: dict) -> int:
    recorded = app.opsfleet.ledger.record_event(
        source="t", summary="", body="",
        new_runs=[NewRun(trigger="manual", triggered_by="kill-test", playbook=playbook, target=target, params=params)],
    )  # fmt: skip
    run_id = recorded.runs[0].id
    assert enqueue_runs(app, app.opsfleet.ledger, [run_id]) == [run_id]
    return run_id


# Every step of the three playbooks but restart_service's restart, which
# test_e2e_skeleton.py::test_worker_killed_inside_a_step_fails_the_run_once_and_frees_the_target
# covers through the web (an alert's run). The hold is at the step's start, before its work.
KILLS = [
    ("restart_service", "locate"),
    ("restart_service", "verify"),
    ("backup_set", "prepare"),
    ("backup_set", "dump"),
    ("backup_set", "verify"),
    ("backup_set", "commit"),
    ("backup_set", "retention"),
    ("rotate_logs", "rotate"),
    ("rotate_logs", "compress"),
    ("rotate_logs", "retain"),
]
COVERED_ELSEWHERE = {("restart_service", "restart")}


def test_every_step_of_the_three_playbooks_has_its_kill():
    steps = {
        (playbook, s.name) for playbook in ("restart_service", "backup_set", "rotate_logs") for s in PLAYBOOKS[playbook]
    }
    assert steps == set(KILLS) | COVERED_ELSEWHERE


@pytest.mark.slow
@pytest.mark.parametrize("playbook, step", KILLS)
def test_a_worker_killed_inside_a_step_ends_its_run_once_and_holds_nothing(
    tmp_path, shared_pg_url, make_container, playbook, step
):
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    docs = tmp_path / "documents"
    docs.mkdir()
    for i in range(50):
        (docs / f"d{i}.txt").write_text(f"document {i}\n" * 100)
    log = tmp_path / "app.out"
    log.write_text("".join(f"{line}\n" for line in EVERY_LINE))
    backups = tmp_path / "backups"
    api = make_container(f"e2e-kill-{playbook}-{step}-{uuid.uuid4().hex[:6]}", command=SERVICE_COMMAND)

    def logged_lines() -> list[str]:
        """Every line in the live log and its rotated copies (compressed or not), sorted."""
        lines = []
        for path in sorted(tmp_path.glob("app.out*")):
            assert not path.name.endswith(".partial"), path  # a copy cut short would double lines
            raw = b"".join(iter_decompressed(path, "zstd")) if path.suffix == ".zst" else path.read_bytes()
            lines += raw.decode().splitlines()
        return sorted(lines)

    config = {
        # A 3 s lease, renewed while the step runs: the sweeper notices the dead worker at once,
        # though a backup step may run for an hour.
        "worker": {"lease_seconds": 3},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 2},
        "logging": {"files": False},
        "services": {"api": {"container": api.name}},
        "backup": {
            "root": str(backups),
            "min_free_bytes": 0,
            "series": {"docs": {"kind": "documents", "path": str(docs)}},
        },
        "rotation": {"sets": {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": "1K"}}},
    }
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": shared_pg_url,
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "OPSFLEET_TEST_HOLD_DIR": str(hold_dir),
    }
    target, params = {
        "backup_set": ("all", {}),
        "rotate_logs": ("all", {"force": True}),
        "restart_service": ("api", {"stop_timeout_seconds": 2, "verify_timeout_seconds": 5}),
    }[playbook]
    hold = hold_dir / f"hold-{playbook}-{step}"
    hold.touch()
    with Fleet(tmp_path, config, env).start("worker", "beat") as fleet:
        app = producer(fleet, env)
        ledger = app.opsfleet.ledger
        run_id = start_run(app, playbook, target, params)
        fleet.wait(lambda: (hold_dir / f"held-{run_id}-{step}").exists(), 60, f"the worker to hold inside {step}")
        fleet.stop("worker", sig=signal.SIGKILL)
        hold.unlink()
        fleet.start("worker")  # the sweeper (a task) runs on it
        final = fleet.wait(
            lambda: (r := ledger.get_run(run_id))["status"] in ("failed", "succeeded") and r or None,
            60,
            f"run {run_id} to end",
        )
        held_step = next(s for s in final["steps"] if s["name"] == step)
        assert final["status"] == "failed" and held_step["status"] == "failed", final
        assert "worker lost" in final["reason"] or "lease expired" in final["reason"], final["reason"]
        names = [s["name"] for s in final["steps"]]
        assert names[-1] == step and len(names) == len(set(names)), names  # nothing after it, nothing twice

        # What the dead run left, before the next run of the job clears anything up.
        if playbook == "restart_service":
            api.reload()
            assert api.status == "running"  # held before restart (locate) or after it (verify)
        if playbook == "backup_set":
            listed = list_sets(backups)
            lock = ledger.get_lock("backup:docs")
            if step == "retention":
                # Killed after commit: the set is complete, verified and listed, its lock released
                # (commit does both). That is right: it is a good backup, and dropping it would
                # lose one. Only this run's pruning is missing; the next run's prunes.
                assert [s.manifest["run_id"] for s in listed] == [run_id] and listed[0].verified("docs")
                assert partial_sets(backups) == [] and lock is None
            else:
                # Killed before commit: nothing listed. From dump on, the partial set prepare made
                # is on disk, unlisted, and the series' lock is the dead run's (until its TTL or the
                # next run's prepare, which removes a partial set of a run that no longer runs).
                assert listed == []
                assert [m["run_id"] for _, m in partial_sets(backups)] == ([] if step == "prepare" else [run_id])
                assert (lock or {}).get("holder") == (None if step == "prepare" else f"run:{run_id}")
        if playbook == "rotate_logs":
            assert logged_lines() == EVERY_LINE  # none lost, none doubled, whichever step was cut short

        # Nothing held: the same job runs again, now, to success.
        again = start_run(app, playbook, target, params)
        done = fleet.wait(
            lambda: (r := ledger.get_run(again))["status"] in ("failed", "succeeded") and r or None,
            60,
            f"run {again} to end",
        )
        assert done["status"] == "succeeded", (done["reason"], [(s["name"], s["output"]) for s in done["steps"]])
        assert ledger.get_run(run_id)["status"] == "failed"  # ended once, stays ended
        if playbook == "restart_service":
            api.reload()
            assert api.status == "running"
        if playbook == "backup_set":
            # The killed run's set, when it committed one, stays: retention keeps the newest
            # min_count (3) verified backups of a series whatever the rules say.
            sets = list_sets(backups)
            assert [s.manifest["run_id"] for s in sets] == ([again, run_id] if step == "retention" else [again])
            assert partial_sets(backups) == [] and ledger.get_lock("backup:docs") is None
        if playbook == "rotate_logs":
            assert logged_lines() == EVERY_LINE
            state = tmp_path / "data" / "rotation" / "app"  # the set's lock, journal and times
            assert state.is_dir() and list(state.glob("journal/*")) == []  # no rotation left half-done
