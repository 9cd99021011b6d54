"""Must show 2, on real files and processes: two size-triggered rotations in one day, a
rotation interrupted by a crash completed once on restart, retention by count and by age,
compressed files that decompress to the original bytes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.support.logcheck import audit
from tests.support.rotation import make_ctx, run_rotation
from tests.support.servers import wait_for
from worker.adapters import logfiles

WRITER = str(Path(__file__).parent / "support" / "seqwriter.py")
TODAY = datetime.now(UTC).strftime("%Y%m%d")


def rotated(folder: Path, live: str = "app.log") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(live + ".2"))


def test_two_size_triggered_rotations_in_one_day(tmp_path):
    log = tmp_path / "app.log"
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(log)],
                "reopen": {"watched": True},
                "max_size": "1K",
                "compress": "zstd",
                "compress_newest": False,
            }
        },
    )
    log.write_bytes(b"a" * 1000 + b"\n")
    assert "nothing due" in run_rotation(ctx)  # 1001 B < 1 KiB
    with open(log, "ab") as f:
        f.write(b"b" * 100 + b"\n")
    run_rotation(ctx)
    log.write_bytes(b"c" * 2000 + b"\n")  # the writer refilled the new file
    run_rotation(ctx)
    assert rotated(tmp_path) == [f"app.log.{TODAY}-0001.zst", f"app.log.{TODAY}-0002"]
    assert log.read_bytes() == b""
    with logfiles.open_decompressed(tmp_path / f"app.log.{TODAY}-0001.zst") as r:
        assert r.read() == b"a" * 1000 + b"\n" + b"b" * 100 + b"\n"
    assert (tmp_path / f"app.log.{TODAY}-0002").read_bytes() == b"c" * 2000 + b"\n"
    assert "nothing due" in run_rotation(ctx)  # idempotent: an empty live file is never rotated


def _cli(tmp_path: Path, config: dict, *args: str, crash_after: str | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "opsfleet.yaml"
    path.write_text(yaml.safe_dump({"fleet": {"data_dir": str(tmp_path / "data")}, **config}))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "OPSFLEET_TEST_CRASH_AFTER")}
    if crash_after:
        env["OPSFLEET_TEST_CRASH_AFTER"] = crash_after
    return subprocess.run(
        [sys.executable, "-m", "opsfleet.cli", "--config", str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize(
    "mode, crash_after",
    [("rename", "renamed"), ("copytruncate", "paused"), ("copytruncate", "copied"), ("copytruncate", "truncated")],
)
def test_rotation_interrupted_by_a_crash_completes_once(tmp_path, mode, crash_after):
    log = tmp_path / "app.log"
    rate, seconds = 2000, 4
    writer = subprocess.Popen(
        [sys.executable, WRITER, str(log), "--rate", str(rate), "--seconds", str(seconds), "--reopen-on-hup"],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: log.exists() and log.stat().st_size > 10_000, 10, what="writer wrote")
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(str(writer.pid))
    spec = {"paths": [str(log)], "mode": mode, "max_size": "1G", "compress": "gzip"}
    spec.update({"reopen": {"pidfile": str(pidfile)}} if mode == "rename" else {"writer_appends": True})
    config = {"rotation": {"sets": {"app": spec}}}

    crashed = _cli(tmp_path, config, "rotate-logs", "--force", crash_after=crash_after)
    assert crashed.returncode == 70, crashed.stderr  # died right after journalling `crash_after`
    if mode == "copytruncate" and crash_after != "paused":
        assert _proc_state(writer.pid) == "T"  # the crash left the writer stopped
    restarted = _cli(tmp_path, config, "rotate-logs")  # not forced: only the half-done rotation
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "completing the interrupted rotation" in restarted.stdout
    assert _proc_state(writer.pid) != "T"  # resumed

    assert int(writer.communicate(timeout=60)[0]) == rate * seconds
    assert rotated(tmp_path) == [f"app.log.{TODAY}-0001.gz"]  # one rotation, not two
    result = audit(log, rate * seconds)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled)
    assert not list((tmp_path / "data" / "rotation" / "app" / "journal").iterdir())


def test_writer_that_never_reopens_keeps_every_line(tmp_path):
    """logrotate's rename mode deleted such a writer's lines with `rotate 3`; here the
    file it still holds is neither compressed nor removed, and its empty successor is
    never rotated again."""
    log = tmp_path / "app.log"
    writer = subprocess.Popen(
        [sys.executable, WRITER, str(log), "--rate", "2000", "--seconds", "3"], stdout=subprocess.PIPE, text=True
    )  # ignores SIGHUP
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 10, what="writer wrote")
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(str(writer.pid))
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(log)],
                "reopen": {"pidfile": str(pidfile)},
                "max_size": 1,
                "keep": 1,
                "max_age": "1s",
                "reopen_timeout_seconds": 0.5,
            }
        },
    )
    outputs = [run_rotation(ctx, force=True) for _ in range(3)]
    assert "still open by its writer" in outputs[0]
    assert "kept app.log." in outputs[1] and "still held open by its writer" in outputs[1]
    assert int(writer.communicate(timeout=30)[0]) == 6000
    result = audit(log, 6000)
    assert result.clean and result.files == ["app.log", f"app.log.{TODAY}-0001"], result


def _touch(path: Path, age: timedelta, data: bytes = b"x\n") -> None:
    path.write_bytes(data)
    when = (datetime.now(UTC) - age).timestamp()
    os.utime(path, (when, when))


def two_sets(
    tmp_path: Path, live: bytes = b"x\n", rotated: tuple[tuple[str, int, bytes], ...] = (), **spec
) -> tuple[dict[str, Path], dict[str, dict]]:
    """Log sets "app" and "other", each one live file (holding `live`) in a folder of its own,
    beside rotated files (name suffix, days old, bytes): (the live files, the sets' configuration)."""
    logs = {name: tmp_path / name / f"{name}.log" for name in ("app", "other")}
    for log in logs.values():
        log.parent.mkdir()
        for suffix, days, data in rotated:
            _touch(log.parent / f"{log.name}.{suffix}", timedelta(days=days), data)
        log.write_bytes(live)
    return logs, {name: {"paths": [str(log)], "reopen": {"watched": True}, **spec} for name, log in logs.items()}


def test_retention_by_count_and_by_age(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    for name, age in [
        ("20261101-0001.zst", timedelta(days=40)),
        ("20261120-0001.zst", timedelta(days=13)),
        ("20261125-0001.zst", timedelta(days=8)),
        ("20261125-0002.zst", timedelta(days=8)),
        ("20261201-0001.zst", timedelta(days=2)),
        ("20261203-0001", timedelta(hours=1)),
    ]:
        _touch(tmp_path / f"app.log.{name}", age)
    (tmp_path / "app.log.20261125-0002.zst.partial").write_bytes(b"half")  # a crashed compression
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(log)],
                "reopen": {"watched": True},
                "every": "1d",
                "keep": 5,
                "max_age": "10d",
                "compress": "zstd",
                "compress_newest": False,
            }
        },
    )
    out = run_rotation(ctx)
    assert rotated(tmp_path) == [
        "app.log.20261125-0001.zst",
        "app.log.20261125-0002.zst",
        "app.log.20261201-0001.zst",
        "app.log.20261203-0001",
    ]
    assert "removed app.log.20261120-0001.zst (2 B): older than max_age 10d" in out
    assert "removed app.log.20261101-0001.zst (2 B): beyond keep=5 (#6 newest)" in out
    assert not (tmp_path / "app.log.20261125-0002.zst.partial").exists()


@pytest.mark.parametrize("method", ["zstd", "gzip"])
def test_compressed_files_decompress_to_the_original_bytes(tmp_path, method):
    original = os.urandom(3 << 20) + b"".join(b"%09d line\n" % i for i in range(100_000)) + b"\0\xff no newline"
    path = tmp_path / "app.log.20261203-0001"
    _touch(path, timedelta(hours=3), original)
    mtime = path.stat().st_mtime_ns
    final, size_in, size_out, lines = logfiles.compress(path, method)
    assert final.name == "app.log.20261203-0001" + {"zstd": ".zst", "gzip": ".gz"}[method]
    assert not path.exists() and size_in == len(original) and lines == original.count(b"\n")
    with logfiles.open_decompressed(final) as reader:
        assert reader.read() == original
    assert final.stat().st_mtime_ns == mtime  # age-based retention still sees the rotation time
    # the command-line tool agrees (scripts/services.sh installs zstd)
    tool = ["zstd", "-dc"] if method == "zstd" else ["gzip", "-dc"]
    assert subprocess.run([*tool, str(final)], capture_output=True, check=True).stdout == original


def test_dry_run_changes_nothing_and_records_nothing(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"z" * 5000)
    config = {"rotation": {"sets": {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": "1K"}}}}
    done = _cli(tmp_path, config, "rotate-logs", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"would rotate {log} (size 5000 B ≥ max_size 1024 B) → app.log.{TODAY}-0001" in done.stdout
    assert log.stat().st_size == 5000 and rotated(tmp_path) == []
    done = _cli(tmp_path, config, "rotate-logs")
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout + done.stderr
    assert rotated(tmp_path) == [f"app.log.{TODAY}-0001.zst"]
    listed = _cli(tmp_path, config, "runs", "--json")
    assert '"playbook": "rotate_logs"' in listed.stdout and '"trigger": "manual"' in listed.stdout
    # an unknown set is a usage error, like backup run --series: nothing recorded
    unknown = _cli(tmp_path, config, "rotate-logs", "--set", "nosuch")
    assert unknown.returncode == 2 and "--set nosuch: no such log set (rotation.sets: app)" in unknown.stderr
    assert len(json.loads(_cli(tmp_path, config, "runs", "--json").stdout)) == len(json.loads(listed.stdout))


def test_config_check_warns_about_copytruncate_writers_without_o_append(tmp_path):
    config = {
        "rotation": {"sets": {"legacy": {"paths": ["/var/log/legacy.log"], "mode": "copytruncate", "every": "1d"}}}
    }
    done = _cli(tmp_path, config, "config", "check")
    assert done.returncode == 0
    assert (
        "warning: rotation.sets.legacy.mode: copytruncate is safe only for writers that open the file with O_APPEND"
        in done.stderr
    )
    config["rotation"]["sets"]["legacy"]["writer_appends"] = True
    assert "warning: rotation.sets" not in _cli(tmp_path, config, "config", "check").stderr


def test_scheduled_check_records_a_run_only_when_something_is_due(tmp_path):
    from worker.tasks.rotate import worth_a_run

    log = tmp_path / "app.log"
    log.write_bytes(b"x\n")
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(log)],
                "reopen": {"watched": True},
                "max_size": "1K",
                "every": "1d",
                "compress_newest": False,
            }
        },
    )
    assert worth_a_run(ctx.runtime, "all", {}) is None  # never seen: one run records it
    run_rotation(ctx)
    assert worth_a_run(ctx.runtime, "all", {}) == "no log file due"
    log.write_bytes(b"x" * 2048)
    assert worth_a_run(ctx.runtime, "all", {}) is None
    run_rotation(ctx)  # rotated; the newest waits a cycle to be compressed
    assert worth_a_run(ctx.runtime, "all", {}) == "no log file due"


def test_a_set_locked_by_another_rotation_fails_the_step_with_its_name(tmp_path, monkeypatch):
    from worker.adapters.logfiles import locked
    from worker.tasks import rotate
    from worker.tasks.steps import StepFailed

    log = tmp_path / "app.log"
    log.write_bytes(b"x\n")
    ctx = make_ctx(tmp_path, {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": 1}}, target="app")
    monkeypatch.setattr(rotate, "LOCK_TIMEOUT_SECONDS", 0.2)
    with locked(tmp_path / "data" / "rotation" / "app" / "lock", 1):
        with pytest.raises(StepFailed, match="set app: .*held by another rotation"):
            run_rotation(ctx, force=True)
    assert log.read_bytes() == b"x\n"
    assert f"rotated {log}" in run_rotation(ctx, force=True)


def test_rotation_counts_in_metrics(tmp_path):
    from worker.adapters import metrics

    def sample(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in metrics.scrape().decode().splitlines():
            if line.startswith(f"{name}{{{want}}} "):
                return float(line.split()[-1])
        return 0.0

    log = tmp_path / "metered.log"
    log.write_bytes(b"m\n" * 500)
    ctx = make_ctx(tmp_path, {"metered": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": 10}})
    before = sample("opsfleet_log_rotations_total", mode="rename", set="metered")
    run_rotation(ctx)
    assert sample("opsfleet_log_rotations_total", mode="rename", set="metered") == before + 1
    assert sample("opsfleet_log_rotated_bytes_total", set="metered") >= 1000
    assert sample("opsfleet_log_rotated_lines_total", set="metered") >= 500


def test_rename_and_a_reopen_command_loses_no_line(tmp_path):
    """reopen.command: an argv run without a shell (here `kill -HUP <pid>`, as a team's
    `nginx -s reopen` would be); a command that fails is reported and loses nothing."""
    log = tmp_path / "app.log"
    rate, seconds = 2000, 3
    writer = subprocess.Popen(
        [sys.executable, WRITER, str(log), "--rate", str(rate), "--seconds", str(seconds), "--reopen-on-hup"],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: log.exists() and log.stat().st_size > 10_000, 10, what="writer wrote")
    spec = {
        "paths": [str(log)],
        "max_size": "1G",
        "compress": "none",
        "reopen": {"command": ["kill", "-HUP", str(writer.pid)]},
    }
    done = _cli(tmp_path, {"rotation": {"sets": {"app": spec}}}, "rotate-logs", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ran kill to reopen" in done.stdout
    spec["reopen"] = {"command": ["false"]}
    failed = _cli(tmp_path, {"rotation": {"sets": {"app": spec}}}, "rotate-logs", "--force")
    assert "could not tell the writer to reopen (exited 1" in failed.stdout + failed.stderr
    assert int(writer.communicate(timeout=60)[0]) == rate * seconds
    assert rotated(tmp_path) == [f"app.log.{TODAY}-0001", f"app.log.{TODAY}-0002"]
    result = audit(log, rate * seconds)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled)


def test_copytruncate_with_no_holder_says_nothing_was_paused_and_how_to_pause(tmp_path):
    log = tmp_path / "legacy.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))  # its writer opens and closes per line
    spec = {"paths": [str(log)], "mode": "copytruncate", "writer_appends": True, "max_size": "1G", "compress": "none"}
    done = _cli(tmp_path, {"rotation": {"sets": {"legacy": spec}}}, "rotate-logs", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no process holds it, so nothing was paused" in done.stdout
    assert "rotation.sets.legacy.pause_service" in done.stdout
    assert (tmp_path / f"legacy.log.{TODAY}-0001").read_text().count("\n") == 1000 and log.read_text() == ""


def test_a_descriptor_repointed_between_stat_and_fdinfo_is_not_taken_for_a_non_appending_writer(tmp_path):
    """A shell's `printf >&3` points fd 1 at the log and back all the time: the flags read must
    be of the file that was stat'ed (fdinfo's own ino), or an appending writer reads as unsafe."""
    log, pipe_like = tmp_path / "app.log", tmp_path / "stdout"
    appending = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    other = os.open(pipe_like, os.O_WRONLY | os.O_CREAT)  # no O_APPEND: what fd 1 points at in between
    try:
        pid, log_ino = os.getpid(), os.stat(log).st_ino
        assert logfiles._fd_appends(pid, str(appending), log_ino) is True
        assert logfiles._fd_appends(pid, str(other), os.stat(pipe_like).st_ino) is False
        # fd `other` stat'ed as the log a moment ago, now another file: not an answer about the log.
        assert logfiles._fd_appends(pid, str(other), log_ino) is None
        assert [h.appends for h in logfiles.holders([log])[log]] == [True]
    finally:
        os.close(appending)
        os.close(other)


def test_a_set_that_fails_does_not_keep_the_others_from_rotating_compressing_or_retention(tmp_path, monkeypatch):
    """Each step does every set it can, then fails naming the set it could not do."""
    from worker.adapters.logfiles import locked
    from worker.tasks import rotate
    from worker.tasks.steps import StepFailed

    monkeypatch.setattr(rotate, "LOCK_TIMEOUT_SECONDS", 0.2)
    old = (("20261101-0001", 30, b"old\n"), ("20261102-0001", 29, b"older\n"))
    logs, sets = two_sets(tmp_path, rotated=old, max_size=1, keep=1, compress="zstd", compress_newest=False)
    ctx = make_ctx(tmp_path, sets)
    ctx = rotate.StepContext(ctx.runtime, {**ctx.run, "params": {"force": True}})
    with locked(tmp_path / "data" / "rotation" / "app" / "lock", 1):  # "app" is held by another rotation
        for step in (rotate.rotate, rotate.compress, rotate.retain):
            with pytest.raises(StepFailed) as failed:
                step(ctx)
            first, second = str(failed.value).splitlines()[:2]
            assert re.fullmatch(r"1 of \d log sets failed: app", first)  # the run's reason names every failed set
            assert second.startswith("set app: ") and "held by another rotation" in second
            if step is rotate.rotate:
                assert f"rotated {logs['other']}" in str(failed.value)  # reported, not only done
            if step is rotate.compress:
                assert "other: compressed other.log.20261101-0001" in str(failed.value)
                assert (logs["other"].parent / "other.log.20261102-0001.zst").exists()
    # "other": rotated, its older files compressed, then all but the newest removed (keep: 1).
    assert rotated(logs["other"].parent, "other.log") == [f"other.log.{TODAY}-0001"]
    assert logs["other"].read_bytes() == b""
    # "app": untouched.
    assert rotated(logs["app"].parent, "app.log") == ["app.log.20261101-0001", "app.log.20261102-0001"]
    assert logs["app"].read_bytes() == b"x\n"


def test_a_run_with_a_set_held_still_compresses_and_retains_the_others_then_fails_naming_it(tmp_path, monkeypatch):
    from tests.backup_support import engine, run_playbook
    from worker.adapters.logfiles import locked
    from worker.tasks import rotate

    monkeypatch.setattr(rotate, "LOCK_TIMEOUT_SECONDS", 0.2)
    old = tuple((f"202611{day:02d}-0001", 40 - day, b"old\n") for day in (1, 2, 3))
    logs, sets = two_sets(tmp_path, rotated=old, max_size=1, keep=2, compress="zstd")
    app = engine(tmp_path, {}, rotation={"sets": sets}, logging={"files": False})
    with locked(tmp_path / "data" / "rotation" / "app" / "lock", 1):
        run = run_playbook(app, "rotate_logs", {"force": True})
    assert [(s["name"], s["status"]) for s in run["steps"]] == [
        ("rotate", "failed"),
        ("compress", "failed"),
        ("retain", "failed"),
    ]
    assert run["status"] == "failed"
    assert (
        run["reason"].startswith("step rotate failed: 1 of 2 log sets failed: app")
        and "(and compress, retain)" in run["reason"]
    )
    # "other": rotated, compressed, and kept to its newest two.
    assert rotated(logs["other"].parent, "other.log") == ["other.log.20261103-0001.zst", f"other.log.{TODAY}-0001.zst"]
    assert rotated(logs["app"].parent, "app.log") == [f"app.log.202611{d:02d}-0001" for d in (1, 2, 3)]


def test_damaged_state_starts_afresh_and_a_damaged_journal_fails_its_set_only_saying_what_to_do(tmp_path):
    from worker.tasks import rotate
    from worker.tasks.steps import StepFailed

    logs, sets = two_sets(tmp_path, max_size=1)
    ctx = make_ctx(tmp_path, sets)
    state = tmp_path / "data" / "rotation"
    (state / "app").mkdir(parents=True)
    (state / "app" / "state.json").write_text("")  # emptied by a full disk, say
    out = run_rotation(ctx)
    assert f"{state / 'app' / 'state.json'} was damaged" in out and "started afresh" in out
    assert rotated(logs["app"].parent, "app.log") == [f"app.log.{TODAY}-0001.zst"]
    assert json.loads((state / "app" / "state.json").read_text())  # written anew

    journal = state / "other" / "journal"
    journal.mkdir(parents=True, exist_ok=True)
    (journal / "0123.json").write_text('{"live": "/somewhere/other.log"}')  # no phase, no target
    for log in logs.values():
        log.write_bytes(b"y\n")
    with pytest.raises(StepFailed) as failed:
        rotate.rotate(rotate.StepContext(ctx.runtime, {**ctx.run, "params": {"force": True}}))
    message = str(failed.value)
    assert re.match(r"1 of \d log sets failed: other\nset other: damaged rotation journal .*0123\.json", message)
    assert "check the live file and its rotated files, then remove the journal" in message
    assert rotated(logs["app"].parent, "app.log") == [f"app.log.{TODAY}-0001.zst", f"app.log.{TODAY}-0002"]
    assert logs["other"].read_bytes() == b"y\n"  # untouched until a person looked


def test_an_original_that_cannot_be_removed_after_compressing_is_reported_with_its_good_copy(tmp_path, monkeypatch):
    rotated_file = tmp_path / "app.log.20261203-0001"
    rotated_file.write_bytes(b"a line\n" * 10)
    real_unlink = Path.unlink

    def protected(path, *args, **kwargs):  # as `chattr +i` makes it, where the filesystem allows that
        if path == rotated_file:
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", protected)
    with pytest.raises(logfiles.LogFileError) as failed:
        logfiles.compress(rotated_file, "zstd")
    assert str(failed.value) == (
        "app.log.20261203-0001.zst is written and verified, but app.log.20261203-0001 could not be removed "
        "(Operation not permitted): both hold the same lines; remove the original once you see why it is protected"
    )
    with logfiles.open_decompressed(tmp_path / "app.log.20261203-0001.zst") as copy:
        assert copy.read() == rotated_file.read_bytes()


def test_a_step_waits_for_held_locks_once_in_all_not_once_per_held_set(tmp_path, monkeypatch):
    """Three sets held: the step's waits add up to about one LOCK_TIMEOUT_SECONDS (then a
    second each), so held sets cannot push it past the worker's step time limit."""
    from worker.tasks import rotate

    monkeypatch.setattr(rotate, "LOCK_TIMEOUT_SECONDS", 30)
    waits = []

    @contextlib.contextmanager
    def held(path, timeout):
        waits.append(timeout)
        raise logfiles.LogFileError(f"{path} is held by another rotation for over {timeout:.0f}s")
        yield

    monkeypatch.setattr(logfiles, "locked", held)
    sets = {}
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.log").write_bytes(b"x\n")
        sets[name] = {"paths": [str(tmp_path / name / "x.log")], "reopen": {"watched": True}, "max_size": 1}
    ctx = make_ctx(tmp_path, sets)
    monotonic = iter(range(0, 1000, 10))  # each wait "takes" 10 s of the step's clock
    monkeypatch.setattr(rotate.time, "monotonic", lambda: next(monotonic))
    with pytest.raises(rotate.StepFailed, match=r"^\d of \d log sets failed: a, b, c"):
        rotate.rotate(ctx)
    assert waits[:3] == [20, 10, 1.0]  # 30 s in all from the step's start, then a second


def test_a_dry_run_does_not_wait_for_a_held_set(tmp_path, monkeypatch):
    from worker.tasks import rotate

    waits = []

    @contextlib.contextmanager
    def held(path, timeout):
        waits.append(timeout)
        raise logfiles.LogFileError(f"{path} is held by another rotation for over {timeout:.0f}s")
        yield

    monkeypatch.setattr(logfiles, "locked", held)
    (tmp_path / "x.log").write_bytes(b"x\n")
    ctx = make_ctx(tmp_path, {"a": {"paths": [str(tmp_path / "x.log")], "reopen": {"watched": True}, "max_size": 1}})
    ctx = rotate.StepContext(ctx.runtime, {**ctx.run, "params": {"dry_run": True}})
    with pytest.raises(rotate.StepFailed, match="set a: .* is held by another rotation"):
        rotate.rotate(ctx)
    assert 0 < waits[0] <= rotate.DRY_RUN_LOCK_SECONDS < rotate.LOCK_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    "damage",
    [
        {"live": "L", "target": "L.20261204-0009", "mode": "rename", "phase": "renamed"},  # no file_mode, uid, gid
        {"live": "L", "target": "T", "mode": "rename", "phase": "bogus", "file_mode": 420, "uid": 0, "gid": 0},
        {"live": 5, "target": "T", "mode": "rename", "phase": "planned", "file_mode": 420, "uid": 0, "gid": 0},
        None,
    ],
)
def test_a_journal_that_parses_but_is_not_one_fails_its_set_only(tmp_path, damage):
    from worker.tasks import rotate
    from worker.tasks.steps import StepFailed

    logs, sets = two_sets(tmp_path, max_size=1)
    ctx = make_ctx(tmp_path, sets)
    journal = tmp_path / "data" / "rotation" / "app" / "journal"
    journal.mkdir(parents=True)
    (journal / "x.json").write_text(json.dumps(damage).replace('"L', f'"{logs["app"]}'))
    with pytest.raises(StepFailed) as failed:
        rotate.rotate(ctx)
    assert re.match(r"1 of \d log sets failed: app\nset app: damaged rotation journal ", str(failed.value))
    assert rotated(logs["other"].parent, "other.log") == [f"other.log.{TODAY}-0001"]
    assert logs["app"].read_bytes() == b"x\n"


def test_a_time_without_a_zone_in_the_state_starts_afresh(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"x\n")
    ctx = make_ctx(tmp_path, {"app": {"paths": [str(log)], "reopen": {"watched": True}, "every": "1h"}})
    state = tmp_path / "data" / "rotation" / "app" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({str(log): "2026-12-04T10:00:00"}))
    assert "has no time zone): started afresh" in run_rotation(ctx)
    assert datetime.fromisoformat(json.loads(state.read_text())[str(log)]).tzinfo is not None


def test_an_unforeseen_error_in_one_set_fails_that_set_and_the_others_are_done(tmp_path, monkeypatch):
    from worker.tasks import rotate
    from worker.tasks.steps import StepFailed

    logs, sets = two_sets(tmp_path, max_size=1)
    ctx = make_ctx(tmp_path, sets)
    real = rotate._rotate_set

    def buggy(ls, force, dry_run):
        if ls.name == "app":
            raise RuntimeError("a bug")
        return real(ls, force, dry_run)

    monkeypatch.setattr(rotate, "_rotate_set", buggy)
    with pytest.raises(StepFailed) as failed:
        rotate.rotate(ctx)
    assert "set app: unexpected RuntimeError: a bug (stack trace in opsfleet's error log)" in str(failed.value)
    assert rotated(logs["other"].parent, "other.log") == [f"other.log.{TODAY}-0001"]


def test_cleanup_s_old_logs_fails_naming_a_held_set_after_the_others_retention(tmp_path, monkeypatch):
    from worker.adapters.logfiles import locked
    from worker.tasks import cleanup, rotate
    from worker.tasks.steps import StepFailed

    monkeypatch.setattr(rotate, "LOCK_TIMEOUT_SECONDS", 0.2)
    old = tuple((f"202611{day:02d}-0001.zst", 40 - day, b"x\n") for day in (1, 2, 3))
    logs, sets = two_sets(tmp_path, live=b"", rotated=old, max_size=1, keep=1)
    ctx = make_ctx(tmp_path, sets)
    with locked(tmp_path / "data" / "rotation" / "app" / "lock", 1):
        with pytest.raises(StepFailed, match=r"^1 of \d log sets failed: app\n"):
            cleanup.old_logs(ctx)
    assert rotated(logs["other"].parent, "other.log") == ["other.log.20261103-0001.zst"]
    assert len(rotated(logs["app"].parent, "app.log")) == 3


def test_a_directory_named_like_a_rotated_file_is_neither_compressed_nor_counted_toward_keep(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    for day in (1, 2):
        _touch(tmp_path / f"app.log.202611{day:02d}-0001.zst", timedelta(days=40 - day))
    (tmp_path / "app.log.20261203-0001").mkdir()  # someone's folder, not ours
    (tmp_path / "app.log.20261204-0001.zst").mkdir()
    ctx = make_ctx(tmp_path, {"app": {"paths": [str(log)], "reopen": {"watched": True}, "max_size": 1, "keep": 2}})
    out = run_rotation(ctx)
    assert (tmp_path / "app.log.20261101-0001.zst").exists() and (tmp_path / "app.log.20261102-0001.zst").exists()
    assert (tmp_path / "app.log.20261203-0001").is_dir() and "20261203" not in out
    log.write_bytes(b"x\n")
    run_rotation(ctx, force=True)  # the next name is not a directory's
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("app.log.2"))
    assert len(names) == 2 and names[-1].startswith(f"app.log.{TODAY}-")
