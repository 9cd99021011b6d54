"""The ledger's state machine on both backends (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest

from worker.adapters.ledger import Ledger, LedgerUnavailable, NewRun, PruneResult, utcnow


def new_run(key="k1", **over):
    return NewRun(trigger="alert", playbook="restart_service", target="api", dedup_key=key, **over)


def test_event_and_runs_commit_together_and_dedup(ledger):
    first = ledger.record_event(source="alertmanager", summary="s", body="{}", new_runs=[new_run()])
    again = ledger.record_event(source="alertmanager", summary="s", body="{}", new_runs=[new_run()])
    assert first.runs[0].created and not again.runs[0].created
    assert first.runs[0].id == again.runs[0].id
    run = ledger.get_run(first.runs[0].id)
    assert run["repeats"] == 1 and run["status"] == "queued"
    assert ledger.count_events("alertmanager") == 2


def test_skipped_run_is_final_with_reason(ledger):
    rec = ledger.record_event(
        source="alertmanager", summary="", body="{}", new_runs=[new_run(status="skipped", reason="unknown target")]
    )
    run = ledger.get_run(rec.runs[0].id)
    assert (run["status"], run["reason"]) == ("skipped", "unknown target")
    assert run["finished_at"] is not None
    assert ledger.claim_run(run["id"], "w", 60) is None


def test_claim_is_exclusive(ledger):
    run_id = ledger.record_event(source="a", summary="", body="", new_runs=[new_run()]).runs[0].id
    assert ledger.claim_run(run_id, "w1", 60)["status"] == "running"
    assert ledger.claim_run(run_id, "w2", 60) is None


def test_the_worker_running_a_step_holds_the_run_and_is_what_a_kill_fails(ledger):
    run_id = ledger.record_event(source="a", summary="", body="", new_runs=[new_run()]).runs[0].id
    ledger.claim_run(run_id, "host:100", 60)  # the pool child that ran `start`
    assert ledger.begin_step(run_id, 0, "locate", 60, "host:200") == "start"  # another child runs the step
    assert ledger.get_run(run_id)["worker"] == "host:200"
    assert ledger.fail_runs_of_workers(["host:100"], "killed") == []  # not the holder any more
    assert ledger.fail_runs_of_workers(["host:200"], "stopped: killed") == [run_id]
    run = ledger.get_run(run_id)
    assert (run["status"], run["reason"], run["steps"][0]["status"]) == ("failed", "stopped: killed", "failed")
    assert ledger.fail_runs_of_workers(["host:200"], "again") == []  # once


def test_step_redelivery_verdicts(ledger):
    run_id = ledger.record_event(source="a", summary="", body="", new_runs=[new_run()]).runs[0].id
    assert ledger.begin_step(run_id, 0, "locate", 60) == "not_running"  # not claimed yet
    ledger.claim_run(run_id, "w", 60)
    assert ledger.begin_step(run_id, 0, "locate", 60) == "start"
    assert ledger.begin_step(run_id, 0, "locate", 60) == "interrupted"  # died inside it
    ledger.end_step(run_id, 0, "succeeded", "x" * 10_000, 60)
    assert ledger.begin_step(run_id, 0, "locate", 60) == "done"
    step = ledger.get_run(run_id)["steps"][0]
    assert len(step["output"]) == 4000 and step["output"].endswith("x")  # excerpt keeps the tail
    assert ledger.finish_run(run_id, "succeeded") is True
    assert ledger.finish_run(run_id, "failed") is False  # already final
    assert ledger.begin_step(run_id, 1, "restart", 60) == "not_running"


def test_expired_lease_fails_run_and_open_step(ledger):
    run_id = ledger.record_event(source="a", summary="", body="", new_runs=[new_run()]).runs[0].id
    ledger.claim_run(run_id, "w", 60)
    ledger.begin_step(run_id, 0, "restart", 60)
    assert ledger.expire_leases(utcnow()) == []
    assert ledger.expire_leases(utcnow() + timedelta(seconds=61)) == [run_id]
    run = ledger.get_run(run_id)
    assert run["status"] == "failed" and "lease expired" in run["reason"]
    assert run["steps"][0]["status"] == "failed"
    assert ledger.expire_leases(utcnow() + timedelta(seconds=61)) == []


def test_runs_to_enqueue(ledger):
    ids = [
        r.id for r in ledger.record_event(source="a", summary="", body="", new_runs=[new_run("a"), new_run("b")]).runs
    ]
    assert ledger.runs_to_enqueue(utcnow()) == ids
    ledger.mark_enqueued(ids[:1])
    later = utcnow() + timedelta(seconds=1)
    assert ledger.runs_to_enqueue(utcnow() - timedelta(seconds=30)) == ids[1:]
    assert ledger.runs_to_enqueue(later) == ids  # enqueued long ago, never started


def test_report_lock(ledger):
    run_id = ledger.record_event(source="a", summary="", body="", new_runs=[new_run()]).runs[0].id
    assert ledger.lock_report(run_id, 30) is True
    assert ledger.lock_report(run_id, 30) is False
    ledger.unlock_report(run_id)
    assert ledger.lock_report(run_id, 30) is True


def _record_same_key(url, barrier, out):
    led = Ledger(url)
    barrier.wait()
    rec = led.record_event(source="a", summary="", body="", new_runs=[new_run("race")])
    out.put(rec.runs[0].created)


def test_concurrent_intake_of_one_alert_makes_one_run(ledger):
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_record_same_key, args=(ledger.url, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    created = sorted(out.get(timeout=5) for _ in procs)
    assert created == [False, False, False, True]


def test_migrate_twice_is_harmless(ledger):
    assert ledger.migrate() == ledger.migrate()


def test_unreachable_postgres_is_ledger_unavailable():
    from tests.support.servers import free_port

    led = Ledger(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    with pytest.raises(LedgerUnavailable, match="unavailable"):
        led.ping()


def test_named_lock_is_exclusive_until_it_expires(ledger):
    from datetime import timedelta

    from worker.adapters.ledger import utcnow

    t0 = utcnow()
    assert ledger.acquire_lock("backup:db", "run:1", 60, now=t0)
    assert not ledger.acquire_lock("backup:db", "run:2", 60, now=t0 + timedelta(seconds=30))
    assert ledger.acquire_lock("backup:db", "run:1", 60, now=t0 + timedelta(seconds=30))  # same holder extends
    # run:1 crashed: its lock lapses at its expiry and run:3 takes it.
    assert ledger.acquire_lock("backup:db", "run:3", 60, now=t0 + timedelta(seconds=91))
    assert not ledger.release_lock("backup:db", "run:1")
    assert ledger.get_lock("backup:db")["holder"] == "run:3"
    assert ledger.release_lock("backup:db", "run:3") and ledger.get_lock("backup:db") is None


def test_prune_runs_keeps_a_count_and_never_touches_unfinished_runs(ledger):
    from datetime import timedelta

    from worker.adapters.ledger import utcnow

    def record(n, key):
        return ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[
                NewRun(trigger="schedule", playbook="rotate_logs", target="all", dedup_key=f"{key}-{i}")
                for i in range(n)
            ],
        ).runs

    old = record(3, "old")
    for run in old[:2]:
        ledger.claim_run(run.id, "w", 60)
        ledger.begin_step(run.id, 0, "rotate", 60)
        ledger.end_step(run.id, 0, "succeeded", "ok", 60)
        ledger.finish_run(run.id, "succeeded")
    # old[2] stays queued: never pruned
    cutoff = utcnow() + timedelta(seconds=1)
    fresh = record(1, "fresh")[0]
    ledger.claim_run(fresh.id, "w", 60)

    assert ledger.prune_runs(cutoff, dry_run=True) == PruneResult(2, 2, 0)
    assert ledger.get_run(old[0].id) is not None
    assert ledger.prune_runs(cutoff) == PruneResult(2, 2, 0)  # their event still has the queued run
    assert ledger.get_run(old[0].id) is None and ledger.get_run(old[2].id)["status"] == "queued"
    assert ledger.get_run(fresh.id)["status"] == "running"
    archive = ledger.run_archive()
    assert [(a["playbook"], a["trigger"], a["status"], a["runs"]) for a in archive] == [
        ("rotate_logs", "schedule", "succeeded", 2)
    ]
    ledger.claim_run(old[2].id, "w", 60)
    ledger.finish_run(old[2].id, "failed", "x")
    assert ledger.prune_runs(utcnow() + timedelta(seconds=1)) == PruneResult(1, 0, 1)  # and now its event goes
    assert ledger.prune_runs(utcnow() + timedelta(seconds=1)) == PruneResult(0, 0, 0)


def test_an_older_ledger_is_upgraded_once_in_order(ledger, monkeypatch):
    """The upgrade path a schema change after release takes: a ledger at the current version
    gets each later upgrade once, in order, recorded; a second start changes nothing."""
    import sqlalchemy as sa

    from worker.adapters import ledger as ledger_module

    base = ledger_module.SCHEMA_VERSION
    assert ledger.migrate() == base
    applied = []

    def add_note_column(conn, dialect):
        applied.append(base + 1)
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN upgrade_note VARCHAR(20) DEFAULT 'v2'"))

    def fill_it(conn, dialect):
        applied.append(base + 2)
        conn.execute(sa.text("UPDATE runs SET upgrade_note = 'v3'"))

    run_id = ledger.record_event(source="t", summary="", body="", new_runs=[new_run()]).runs[0].id
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", base + 2)
    monkeypatch.setattr(
        ledger_module, "UPGRADES", [*ledger_module.UPGRADES, (base + 2, fill_it), (base + 1, add_note_column)]
    )
    try:
        assert ledger.migrate() == base + 2 and applied == [base + 1, base + 2]
        assert ledger.migrate() == base + 2 and applied == [base + 1, base + 2]  # once
        with ledger._tx() as conn:
            assert conn.execute(sa.text("SELECT upgrade_note FROM runs WHERE id = :i"), {"i": run_id}).scalar() == "v3"
            versions = conn.execute(sa.text("SELECT version FROM opsfleet_schema ORDER BY version")).scalars().all()
        assert versions == [base, base + 1, base + 2]
        monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", base + 1)
        with pytest.raises(LedgerUnavailable, match="newer than this opsfleet"):
            ledger.migrate()  # an older opsfleet refuses a newer ledger
    finally:
        with ledger._tx() as conn:
            conn.execute(sa.text("ALTER TABLE runs DROP COLUMN upgrade_note"))
            conn.execute(sa.text(f"DELETE FROM opsfleet_schema WHERE version > {base}"))


def test_a_version_1_ledger_gets_the_safety_checks_indexes(ledger):
    import sqlalchemy as sa

    ledger.migrate()
    with ledger._tx() as conn:  # what a ledger made by the first release looks like
        conn.execute(sa.text("DROP INDEX runs_storm_escalations"))
        conn.execute(sa.text("DROP INDEX runs_alert_actions"))
        conn.execute(sa.text("UPDATE opsfleet_schema SET version = 1"))
    assert ledger.migrate() == 2
    indexes = {index["name"] for index in sa.inspect(ledger.engine).get_indexes("runs")}
    assert {"runs_storm_escalations", "runs_alert_actions"} <= indexes


def test_a_subject_s_last_firing_never_moves_back_in_time(ledger):
    """An intake that began earlier may commit later: it must not take a subject out of the
    storm window that a later intake put it in."""
    now = utcnow()
    with ledger.intake() as tx:
        tx.now = now
        tx.touch_subjects("down", ["svc-1"])
    with ledger.intake() as tx:
        tx.now = now - timedelta(minutes=10)  # began long before, committed now
        tx.touch_subjects("down", ["svc-1", "svc-2"])
    with ledger.intake() as tx:
        seen = tx.subjects_last_seen("down", ["svc-1", "svc-2"], now - timedelta(minutes=20))
    assert seen["svc-1"] == now and seen["svc-2"] == now - timedelta(minutes=10)
