"""Issue 8, fault 6: two Celery beats and three workers running at once, for real (Redis
broker, PostgreSQL ledger): a scheduled job still runs once per slot. The job here is the
log rotation check every 10 s, with a log that is always due (a writer keeps it over its
max_size), so every slot that passes should hold exactly one run, run by one worker."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest

from tests.support.fleet import Fleet

pytestmark = pytest.mark.slow
SLOT = 10  # rotation.check_interval_seconds: the trigger's slot


def test_two_beats_and_three_workers_run_each_scheduled_slot_once(tmp_path, shared_pg_url):
    log = tmp_path / "app.log"
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            with open(log, "a") as out:  # opens for each line: rename is safe for it
                out.write(f"{n:08d} " + "x" * 200 + "\n")
            n += 1
            time.sleep(0.05)

    config = {
        "logging": {"files": False},
        "rotation": {
            "check_interval_seconds": SLOT,
            "sets": {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": "1K", "keep": 100}},
        },
    }
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": shared_pg_url}
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with Fleet(tmp_path, config, env).start("web", "worker", "worker2", "worker3", "beat", "beat2") as fleet:
            time.sleep(SLOT * 4 + 3)
            fleet.stop("beat", "beat2")
            runs = [r for r in fleet.runs() if r["playbook"] == "rotate_logs"]
            for r in runs:
                fleet.wait_run(r["id"], timeout=60)
            runs = [fleet.api(f"/runs/{r['id']}") for r in runs]
    finally:
        stop.set()
        thread.join(5)
    slots = [int(datetime.fromisoformat(r["created_at"]).timestamp()) // SLOT for r in runs]
    assert len(slots) == len(set(slots)), f"two runs in one slot: {sorted(slots)}"
    # Four slots or more passed; two beats each firing every slot leave none without its run
    # (one may fall at a slot's edge: beat's timer is not exact).
    assert len(runs) >= 3 and max(slots) - min(slots) + 1 - len(slots) <= 1, sorted(slots)
    assert all(r["status"] == "succeeded" for r in runs), [(r["id"], r["status"], r["reason"]) for r in runs]
    assert all(r["trigger"] == "schedule" for r in runs)
