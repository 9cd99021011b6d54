"""Issue 8, fault 3: a real worker SIGKILLed inside a step (the test hook holds the step
until the kill) of a backup, a log rotation and a remediation, on the Redis + PostgreSQL
stack. Every run ends once, in a final state; no lock outlives it (the next run of the same
job succeeds); a killed backup leaves no set listed; a killed rotation loses no line."""

from __future__ import annotations

import signal

import pytest
import yaml

from tests.support.fleet import Fleet
from tests.support.servers import TEST_DOCKER_HOST
from worker.adapters.archive import iter_decompressed
from worker.adapters.backupstore import list_sets
from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import enqueue_runs

pytestmark = pytest.mark.slow
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


@pytest.mark.parametrize(
    "playbook, step",
    [("backup_set", "dump"), ("backup_set", "commit"), ("rotate_logs", "rotate"), ("restart_service", "verify")],
)
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
    log.write_text("".join(f"{n:06d} line\n" for n in range(5000)))
    api = make_container(f"e2e-kill-{step}-{tmp_path.name[-6:]}", command=SERVICE_COMMAND)
    config = {
        # A 3 s lease, renewed while the step runs: the sweeper notices the dead worker at once,
        # though a backup step may run for an hour.
        "worker": {"lease_seconds": 3},
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 2},
        "logging": {"files": False},
        "services": {"api": {"container": api.name}},
        "backup": {
            "root": str(tmp_path / "backups"),
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

        # Nothing held: the same job runs again, now, to success.
        again = start_run(app, playbook, target, params)
        done = fleet.wait(
            lambda: (r := ledger.get_run(again))["status"] in ("failed", "succeeded") and r or None,
            60,
            f"run {again} to end",
        )
        assert done["status"] == "succeeded", (done["reason"], [(s["name"], s["output"]) for s in done["steps"]])
        assert ledger.get_run(run_id)["status"] == "failed"  # ended once, stays ended
        if playbook == "backup_set":
            sets = list_sets(tmp_path / "backups")
            assert len(sets) == 1 and sets[0].manifest["run_id"] == again  # the killed one left none
            assert ledger.get_lock("backup:docs") is None
        if playbook == "rotate_logs":
            lines = []
            for path in sorted(tmp_path.glob("app.out*")):
                raw = b"".join(iter_decompressed(path, "zstd")) if path.suffix == ".zst" else path.read_bytes()
                lines += raw.decode().splitlines()
            assert sorted(lines) == [f"{n:06d} line" for n in range(5000)]  # none lost, none doubled
