"""Backup sets against the real shared PostgreSQL 15, real files and real tools (pg_dump,
pg_restore, GNU tar): committed only when verified; failures leave older sets intact."""

from __future__ import annotations

import io
import stat
import subprocess
import tarfile
import threading

import psycopg
import pytest
import zstandard

from tests.backup_support import (
    ROWS,
    engine,
    fill_database,
    make_config_files,
    make_documents,
    record,
    run_playbook,
    sets_in,
)
from tests.support.servers import shared_postgres_database
from worker.adapters.backupstore import list_sets
from worker.adapters.postgres import Postgres
from worker.tasks.backup import verify_item, verify_set
from worker.tasks.runs import execute_inline


@pytest.fixture
def source_db():
    with shared_postgres_database("opsfleet_bk") as url:
        fill_database(url)
        yield url


@pytest.fixture
def stack(tmp_path, source_db):
    docs = make_documents(tmp_path)
    config_files = make_config_files(tmp_path)
    backup = {
        "root": str(tmp_path / "backups"),
        "timezone": "Europe/Berlin",
        "min_free_bytes": 0,
        "series": {
            "db": {"kind": "database", "database_url": source_db},
            "documents": {"kind": "documents", "path": str(docs)},
            "config": {"kind": "config", "paths": [str(p) for p in config_files]},
        },
    }
    return tmp_path, engine(tmp_path, backup), backup


def test_a_backup_set_is_dumped_verified_committed_and_restores_with_the_same_rows(stack):
    tmp_path, app, _ = stack
    run = run_playbook(app, "backup_set")
    assert run["status"] == "succeeded", (run["reason"], [s["output"] for s in run["steps"]])
    assert [s["name"] for s in run["steps"]] == ["prepare", "dump", "verify", "commit", "retention"]

    (only,) = list_sets(tmp_path / "backups")
    assert sets_in(tmp_path / "backups") == [only.id] and only.id.endswith("Z")  # no .partial left
    m = only.manifest
    assert m["state"] == "complete" and m["run_id"] == run["id"] and m["verification"]["ok"]
    assert set(m["items"]) == {"db", "documents", "config"}
    db = m["items"]["db"]
    assert db["row_counts"] == ROWS and db["server_version"].startswith("15")
    assert db["verified"] and db["files"][0]["name"] == "db.dump.zst"
    assert m["tools"]["pg_dump"].startswith("pg_dump (PostgreSQL) 15")
    assert m["items"]["documents"]["file_count"] == 21 and m["items"]["documents"]["problems"] == []
    assert m["host"]["disk"]["free_bytes"] > 0 and "docker" in m["host"]
    for item in m["items"].values():
        for f in item["files"]:
            assert stat.S_IMODE((only.path / f["name"]).stat().st_mode) == 0o600
    assert all(v.ok for v in verify_set(only, deep=True).values())
    # Each compressed file was decompressed to its end as it was written: the verify step
    # re-reads it for its sha256 (the streaming full read covers the dump's content).
    verified = next(s["output"] for s in run["steps"] if s["name"] == "verify")
    for name in ("db.dump.zst", "documents.tar.zst", "config.tar.zst"):
        assert f"{name} sha256 OK, decompressed to the end as it was written" in verified

    # The config archive holds .env, and it comes back 0600 from a restore (see test_restore);
    # here: the archive itself is readable by its owner only and lists the file.
    data = b"".join(zstandard.ZstdDecompressor().read_to_iter(open(only.path / "config.tar.zst", "rb")))
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert any(n.endswith("app/.env") for n in names)

    # Restore into a new database and compare row counts with the manifest.
    with shared_postgres_database("opsfleet_rs") as target_url:
        pg = Postgres(target_url)
        plain = tmp_path / "db.dump"
        with open(plain, "wb") as out:
            from worker.adapters.archive import iter_decompressed

            for chunk in iter_decompressed(only.path / "db.dump.zst", "zstd"):
                out.write(chunk)
        pg.restore(plain, pg.dbname, jobs=2, timeout=120)
        assert pg.row_counts() == db["row_counts"]


def test_a_truncated_dump_fails_verification(stack):
    tmp_path, app, _ = stack
    assert run_playbook(app, "backup_set", {"series": ["db"]})["status"] == "succeeded"
    (only,) = list_sets(tmp_path / "backups")
    dump = only.path / "db.dump.zst"
    data = dump.read_bytes()
    dump.write_bytes(data[: len(data) * 2 // 3])
    result = verify_item(only.path, only.items["db"], "zstd", deep=True)
    assert not result.ok and result.detail == "db.dump.zst: sha256 differs from the manifest's: the file is damaged"
    # The verify step's re-read (sha256 only, the file was decoded as written) refuses it too.
    result = verify_item(only.path, only.items["db"], "zstd", deep=False)
    assert not result.ok and "differs from the manifest" in result.detail
    # A file cut before it was hashed (its manifest agrees with it): the full read still says truncated.
    import hashlib

    item = dict(only.items["db"])
    item["files"] = [{**item["files"][0], "sha256": hashlib.sha256(dump.read_bytes()).hexdigest()}, *item["files"][1:]]
    result = verify_item(only.path, item, "zstd", deep=True)
    assert not result.ok and "truncated" in result.detail


def test_pg_restore_list_passes_a_truncated_dump_but_our_full_read_does_not(source_db, tmp_path):
    # Why verification is a full read: the table of contents sits at the front.
    pg = Postgres(source_db)
    whole = subprocess.run(
        ["pg_dump", "--format=custom", "--compress=0"], env=pg.env(), capture_output=True, check=True
    ).stdout
    cut = tmp_path / "cut.dump"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    assert subprocess.run(["pg_restore", "--list", str(cut)], capture_output=True).returncode == 0
    assert subprocess.run(["pg_restore", "--file=/dev/null", str(cut)], capture_output=True).returncode != 0


def test_a_server_stopped_mid_run_fails_cleanly_and_keeps_older_sets(tmp_path, private_postgres, monkeypatch):
    fill_database(private_postgres.url)
    app = engine(tmp_path, {
        "root": str(tmp_path / "backups"), "min_free_bytes": 0,
        "series": {"db": {"kind": "database", "database_url": private_postgres.url}},
    })  # fmt: skip
    assert run_playbook(app, "backup_set")["status"] == "succeeded"
    older = sets_in(tmp_path / "backups")

    # Hold the next run inside its dump step, stop the server there, let the step go on.
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    monkeypatch.setenv("OPSFLEET_TEST_HOLD_DIR", str(hold_dir))
    (hold_dir / "hold-backup_set-dump").touch()
    run_id = record(app, "backup_set")
    result = {}
    worker = threading.Thread(target=lambda: result.update(execute_inline(app, run_id)))
    worker.start()
    from tests.support.servers import wait_for

    wait_for(lambda: (hold_dir / f"held-{run_id}-dump").exists(), 60, what="the dump step to be held")
    from worker.adapters import metrics

    failures_before = metrics.BACKUP_FAILURES.labels("dump")._value.get()
    private_postgres.stop()
    (hold_dir / "hold-backup_set-dump").unlink()
    worker.join(120)
    assert result["status"] == "failed" and "step dump failed" in result["reason"]
    assert "cannot connect" in result["reason"] or "pg_dump" in result["reason"]
    assert [s["name"] for s in result["steps"]] == ["prepare", "dump"]  # no retention after a failure
    assert sets_in(tmp_path / "backups") == older  # partial removed, older set intact
    assert app.opsfleet.ledger.get_lock("backup:db") is None
    assert b'opsfleet_backup_failures_total{step="dump"}' in metrics.scrape()
    assert metrics.BACKUP_FAILURES.labels("dump")._value.get() == failures_before + 1


def test_a_filling_disk_fails_cleanly_with_older_backups_intact(tmp_path, source_db):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        app = engine(tmp_path, {
            "root": str(mount / "backups"), "min_free_bytes": 0,
            "series": {"db": {"kind": "database", "database_url": source_db}},
        })  # fmt: skip
        assert run_playbook(app, "backup_set")["status"] == "succeeded"
        older = sets_in(mount / "backups")
        (first,) = list_sets(mount / "backups")
        # 4 MB of incompressible rows: the next dump cannot fit in what is left of 3 MB.
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("CREATE TABLE blobs AS SELECT g AS id, decode(string_agg(md5(random()::text || g2), ''), 'hex') AS b "
                         "FROM generate_series(1, 64) g, generate_series(1, 4096) g2 GROUP BY g")  # fmt: skip
        run = run_playbook(app, "backup_set")
        assert run["status"] == "failed", run
        assert "No space left on device" in run["reason"]
        assert sets_in(mount / "backups") == older
        assert all(v.ok for v in verify_set(list_sets(mount / "backups")[0]).values())
        assert list_sets(mount / "backups")[0].id == first.id
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_two_concurrent_runs_make_one_backup_and_one_recorded_skip(stack, monkeypatch):
    tmp_path, app, _ = stack
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    monkeypatch.setenv("OPSFLEET_TEST_HOLD_DIR", str(hold_dir))
    (hold_dir / "hold-backup_set-dump").touch()
    first_id = record(app, "backup_set")
    first = {}
    worker = threading.Thread(target=lambda: first.update(execute_inline(app, first_id)))
    worker.start()
    from tests.support.servers import wait_for

    wait_for(lambda: (hold_dir / f"held-{first_id}-dump").exists(), 60, what="the first run to hold its locks")
    second = run_playbook(app, "backup_set")
    (hold_dir / "hold-backup_set-dump").unlink()
    worker.join(120)
    assert first["status"] == "succeeded"
    assert second["status"] == "skipped" and second["reason"].startswith("overlap: db: another run holds its lock")
    assert len(list_sets(tmp_path / "backups")) == 1
    from worker.adapters.metrics import scrape

    assert b'opsfleet_backup_skipped_overlaps_total{series="db"}' in scrape()


def test_two_beats_in_one_slot_make_one_backup_run(stack):
    _, app, _ = stack
    trigger = app.tasks["opsfleet.schedule.trigger"]
    a = trigger.apply(args=("backup_set", "all"), kwargs={"slot_seconds": 3600}).get()
    b = trigger.apply(args=("backup_set", "all"), kwargs={"slot_seconds": 3600}).get()
    assert a["created"] and not b["created"] and a["run_id"] == b["run_id"]


@pytest.mark.parametrize(
    "moments",
    [
        # The night clocks go back in Berlin (2026-10-25): 02:30 happens at 00:30 and at 01:30 UTC.
        ("2026-10-25T00:30:00+00:00", "2026-10-25T01:30:00+00:00"),
        # A trigger delivered late, into the next hour (its message may wait up to 50 minutes).
        ("2026-12-03T01:30:00+00:00", "2026-12-03T02:19:00+00:00"),
    ],
)
def test_a_daily_job_is_one_run_per_local_day(stack, monkeypatch, moments):
    from datetime import datetime

    import worker.tasks.schedule as schedule

    _, app, _ = stack
    trigger = app.tasks["opsfleet.schedule.trigger"]
    got = []
    for moment in moments:
        monkeypatch.setattr(schedule, "utcnow", lambda m=moment: datetime.fromisoformat(m))
        got.append(trigger.apply(args=("backup_set", "all"), kwargs={"slot_tz": "Europe/Berlin"}).get())
    assert got[0]["created"] and not got[1]["created"] and got[0]["run_id"] == got[1]["run_id"]
    monkeypatch.setattr(schedule, "utcnow", lambda: datetime.fromisoformat(moments[0]).replace(day=26))
    assert trigger.apply(args=("backup_set", "all"), kwargs={"slot_tz": "Europe/Berlin"}).get()["created"]  # next day


def test_files_changing_during_the_archive_are_reported_not_fatal(tmp_path):
    from worker.adapters.archive import tar_problems

    reported, fatal = tar_problems(
        "tar: documents/a.txt: file changed as we read it\n"
        "tar: documents/b.txt: File removed before we read it\n"
        "tar: Exiting with failure status due to previous errors\n"
    )
    assert reported == [
        "documents/a.txt: file changed as we read it",
        "documents/b.txt: File removed before we read it",
    ]
    assert fatal == []
    _, fatal = tar_problems("tar: documents/c: Cannot open: Permission denied\n")
    assert fatal == ["documents/c: Cannot open: Permission denied"]


def test_free_space_precheck_refuses_before_writing(stack):
    tmp_path, app, backup = stack
    assert run_playbook(app, "backup_set", {"series": ["documents"]})["status"] == "succeeded"
    greedy = engine(tmp_path, {**backup, "min_free_bytes": 10**15})
    run = run_playbook(greedy, "backup_set", {"series": ["documents"]})
    assert run["status"] == "failed" and "not enough free space" in run["reason"]
    assert len(list_sets(tmp_path / "backups")) == 1
    assert greedy.opsfleet.ledger.get_lock("backup:documents") is None


def test_unknown_series_is_refused_by_name(stack):
    _, app, _ = stack
    run = run_playbook(app, "backup_set", {"series": ["nope"]})
    assert run["status"] == "failed" and "no backup series or kind named nope" in run["reason"]


def test_gzip_is_selectable_and_a_truncated_gzip_archive_fails_verification(tmp_path):
    docs = make_documents(tmp_path)
    app = engine(tmp_path, {
        "root": str(tmp_path / "backups"), "min_free_bytes": 0, "compression": "gzip",
        "series": {"documents": {"kind": "documents", "path": str(docs)}},
    })  # fmt: skip
    assert run_playbook(app, "backup_set")["status"] == "succeeded"
    (only,) = list_sets(tmp_path / "backups")
    archive = only.path / "documents.tar.gz"
    assert subprocess.run(["gzip", "-t", str(archive)]).returncode == 0  # plain gzip, for compatibility
    assert verify_item(only.path, only.items["documents"], "gzip", deep=True).ok
    archive.write_bytes(archive.read_bytes()[:-100])
    result = verify_item(only.path, only.items["documents"], "gzip", deep=True)
    assert not result.ok


def test_directory_format_dumps_in_parallel_and_restores_in_place(tmp_path, source_db):
    app = engine(tmp_path, {
        "root": str(tmp_path / "backups"), "min_free_bytes": 0,
        "series": {"db": {"kind": "database", "database_url": source_db, "format": "directory", "jobs": 2}},
    })  # fmt: skip
    run = run_playbook(app, "backup_set")
    assert run["status"] == "succeeded", run["reason"]
    (only,) = list_sets(tmp_path / "backups")
    item = only.items["db"]
    assert item["format"] == "directory" and item["row_counts"] == ROWS
    assert any(f["name"] == "db.dir/toc.dat" for f in item["files"])
    assert verify_item(only.path, item, "zstd", deep=True).ok

    with shared_postgres_database("opsfleet_rs") as target_url:
        target = Postgres(target_url).dbname
        Postgres(target_url).drop_database(target)  # restores go into a fresh database
        restored = run_playbook(app, "restore", {"plan": {"db": only.id}, "target_db": target, "swap": False})
        assert restored["status"] == "succeeded", restored["reason"]
        assert Postgres(target_url).row_counts() == ROWS

    # A damaged table file fails verification.
    data_file = next(only.path / f["name"] for f in item["files"] if f["name"].endswith(".dat.gz"))
    data_file.write_bytes(data_file.read_bytes()[:-5])
    result = verify_item(only.path, item, "zstd", deep=True)
    assert not result.ok and "sha256 differs" in result.detail


def test_daily_summary_fails_on_a_missing_or_stale_backup(stack):
    from datetime import timedelta

    from worker.adapters.ledger import utcnow
    from worker.tasks.backup import summarize

    tmp_path, app, _ = stack
    assert run_playbook(app, "backup_set", {"series": ["db"]})["status"] == "succeeded"
    partial = run_playbook(app, "backup_summary")
    assert (
        partial["status"] == "failed" and "documents (documents): NO verified backup" in partial["steps"][0]["output"]
    )
    assert run_playbook(app, "backup_set")["status"] == "succeeded"
    done = run_playbook(app, "backup_summary")
    assert done["status"] == "succeeded", done["reason"]
    text = done["steps"][0]["output"]
    assert "db (database, daily): newest" in text and "last 24 h: 2 × backup_set succeeded" in text
    fresh, text = summarize(app.opsfleet.config, list_sets(tmp_path / "backups"), [], utcnow() + timedelta(hours=27))
    assert not fresh and "db (database, daily): STALE newest" in text


def test_files_vanishing_or_changing_while_archived_are_reported_in_the_manifest(tmp_path, monkeypatch):
    import worker.tasks.backup as backup_module

    docs = make_documents(tmp_path)
    (docs / "a-big.bin").write_bytes(b"\0" * 3_000_000)
    (docs / "zz-late.txt").write_text("goes away\n")
    original = backup_module.tar_create_argv

    def tar_that_sees_changes(base, members, index):
        # GNU tar runs this at each 10 KB record: the tree changes while it is archived.
        action = f"exec=sh -c 'rm -f {docs}/zz-late.txt; echo more >> {docs}/a-big.bin'"
        argv = original(base, members, index)
        return argv[:1] + ["--checkpoint=1", f"--checkpoint-action={action}"] + argv[1:]

    monkeypatch.setattr(backup_module, "tar_create_argv", tar_that_sees_changes)
    app = engine(tmp_path, {
        "root": str(tmp_path / "backups"), "min_free_bytes": 0,
        "series": {"documents": {"kind": "documents", "path": str(docs)}},
    })  # fmt: skip
    run = run_playbook(app, "backup_set")
    assert run["status"] == "succeeded", run["reason"]
    (only,) = list_sets(tmp_path / "backups")
    problems = only.items["documents"]["problems"]
    assert "documents/a-big.bin: file changed as we read it" in problems
    assert "documents/zz-late.txt: File removed before we read it" in problems
    assert "1 problems reported" not in run["steps"][1]["output"] and "problems reported" in run["steps"][1]["output"]
    assert verify_item(only.path, only.items["documents"], "zstd", deep=True).ok


def test_drill_on_a_throwaway_cluster_restores_roles_first_and_keeps_owners(tmp_path, private_postgres):
    from tests.support.servers import PrivatePostgres

    with psycopg.connect(private_postgres.url, autocommit=True) as admin:
        admin.execute("CREATE ROLE shop_owner LOGIN")
        admin.execute("CREATE DATABASE shop OWNER shop_owner")
    shop = private_postgres.url.rsplit("/", 1)[0] + "/shop"
    fill_database(shop)
    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute("ALTER TABLE customers OWNER TO shop_owner")
    with PrivatePostgres() as throwaway:
        app = engine(tmp_path, {
            "root": str(tmp_path / "backups"), "min_free_bytes": 0,
            "drill": {"server_url": throwaway.url},
            "series": {"db": {"kind": "database", "database_url": shop}},
        })  # fmt: skip
        assert run_playbook(app, "backup_set")["status"] == "succeeded"
        drill = run_playbook(app, "restore_drill")
        assert drill["status"] == "succeeded", drill["reason"]
        assert "match the manifest" in drill["steps"][0]["output"]
        with psycopg.connect(throwaway.url) as conn:
            assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'shop_owner'").fetchone()  # roles came first
            assert not conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE 'opsfleet_drill_%'").fetchall()


def test_drill_fails_when_a_series_has_no_verified_backup_or_a_file_is_damaged(stack):
    tmp_path, app, _ = stack
    assert run_playbook(app, "backup_set", {"series": ["db"]})["status"] == "succeeded"
    drill = run_playbook(app, "restore_drill")
    assert drill["status"] == "failed" and "no verified backup" in drill["reason"] and "documents" in drill["reason"]
    assert run_playbook(app, "backup_set")["status"] == "succeeded"
    newest = list_sets(tmp_path / "backups")[0]
    (newest.path / "documents.tar.zst").write_bytes(b"not zstd")
    drill = run_playbook(app, "restore_drill")
    assert drill["status"] == "failed" and "documents in " in drill["reason"]
    output = drill["steps"][0]["output"]
    assert "drill failed for 1 of 3 series" in output and output.count("passed: ") == 2  # db and config still drilled


def test_a_dead_runs_partial_set_and_locks_are_cleared_by_the_next_run(stack):
    tmp_path, app, _ = stack
    ledger = app.opsfleet.ledger
    dead = record(app, "backup_set")
    ledger.claim_run(dead, "worker-that-dies", 60)
    app.tasks["opsfleet.runs.step"].apply(args=(dead, 0))  # prepare: locks taken, .partial made
    assert any(name.endswith(".partial") for name in sets_in(tmp_path / "backups"))
    ledger.finish_run(dead, "failed", "worker lost: the step lease expired")  # what the sweeper records
    run = run_playbook(app, "backup_set")
    assert run["status"] == "succeeded", run["reason"]
    assert "removed stale partial set" in run["steps"][0]["output"]
    assert not any(name.endswith(".partial") for name in sets_in(tmp_path / "backups"))
    assert ledger.get_lock("backup:db") is None


def test_a_manifest_that_does_not_fit_is_not_written_short(tmp_path):
    # On a full filesystem os.write() writes what fits and returns its count: a manifest
    # cut there would hide its set from every listing. It is written whole or not at all.
    from worker.adapters.backupstore import read_manifest, write_manifest

    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        folder = mount / "set"
        folder.mkdir()
        write_manifest(folder, {"state": "complete", "items": {}})
        with open(mount / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass  # full
        big = {"state": "complete", "items": {f"series-{n}": {"note": "x" * 200} for n in range(200)}}
        with pytest.raises(OSError) as err:
            write_manifest(folder, big)
        assert err.value.errno == 28  # ENOSPC
        assert read_manifest(folder) == {"state": "complete", "items": {}}  # the old one, whole
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # no .tmp left
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_step_that_fails_releases_the_runs_locks_even_when_its_manifest_is_unreadable(stack, monkeypatch):
    tmp_path, app, _ = stack
    import worker.tasks.backup as backup_tasks

    def cut_manifest_then_fail(ctx, series, spec, folder):
        (folder / "manifest.json").write_text('{"cut sh')  # as a full disk could leave it
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(backup_tasks._DUMPERS, "database", cut_manifest_then_fail)
    run = run_playbook(app, "backup_set")
    assert run["status"] == "failed" and "No space left on device" in run["reason"], run
    for series in ("db", "documents", "config"):
        assert app.opsfleet.ledger.get_lock(f"backup:{series}") is None
    monkeypatch.undo()
    assert run_playbook(app, "backup_set")["status"] == "succeeded"  # not skipped on a stale lock
