"""A scheduled backup through the real fleet: beat's trigger task goes through the broker to a
real Celery worker, which runs the backup playbook's steps (each a task, the long ones with
their own time limits) against the real shared PostgreSQL; the web shows the run and scrapes
the backup metrics summed over the worker's processes."""

from __future__ import annotations

import pytest

from tests.backup_support import ROWS, fill_database, make_documents
from tests.support.fleet import Fleet, metric_value
from tests.support.servers import shared_postgres_database
from worker.adapters.backupstore import list_sets
from worker.celery_factory import create_celery
from worker.config import load_config

pytestmark = pytest.mark.slow


def test_scheduled_backup_runs_on_a_real_worker_and_is_counted(tmp_path):
    with shared_postgres_database("opsfleet_e2e_bk") as url:
        fill_database(url)
        docs = make_documents(tmp_path)
        config = {
            "sweeper": {"interval_seconds": 1},
            "backup": {
                "root": str(tmp_path / "backups"),
                "min_free_bytes": 0,
                "step_timeout_seconds": 600,
                "series": {
                    "db": {"kind": "database", "database_url": url},
                    "documents": {"kind": "documents", "path": str(docs)},
                },
            },
        }
        with Fleet(tmp_path, config, env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"}) as fleet:
            fleet.start("web", "worker")
            # What beat sends, twice (two beats): one run.
            app = create_celery(load_config(fleet.config_path, environ=fleet.env))
            for _ in range(2):
                app.send_task("opsfleet.schedule.trigger", args=("backup_set", "all"), kwargs={"slot_seconds": 3600})
            fleet.wait(lambda: fleet.runs(), 30, "the scheduled run")
            run = fleet.wait_run(fleet.runs()[0]["id"], timeout=90)
            assert run["status"] == "succeeded", (run["reason"], fleet.logs())
            assert run["trigger"] == "schedule" and run["repeats"] == 1 and len(fleet.runs()) == 1
            assert [s["name"] for s in run["steps"]] == ["prepare", "dump", "verify", "commit", "retention"]
            (only,) = list_sets(tmp_path / "backups")
            assert only.items["db"]["row_counts"] == ROWS
            text = fleet.metrics()
            assert (
                metric_value(text, "opsfleet_backup_last_success_timestamp_seconds", kind="database", series="db") > 0
            )
            # What OpsfleetBackupTooOld compares the age with: a daily series may be 26 h old.
            assert metric_value(text, "opsfleet_backup_max_age_seconds", kind="database", series="db") == 26 * 3600
            assert metric_value(text, "opsfleet_backup_verifications_total", kind="documents", result="ok") == 1
