"""Must show 1: a writer appending 20,000 numbered lines/s for 10 s, rotated every 2 s,
loses no line, doubles none, leaves no NUL byte — across the live file and every rotated
(decompressed) file — with rename+reopen and with the copytruncate fallback (O_APPEND writer).
Real files, a real writer process, real signals."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.logcheck import audit
from tests.support.rotation import make_ctx, run_rotation
from tests.support.servers import wait_for

WRITER = str(Path(__file__).parent / "support" / "seqwriter.py")
RATE, SECONDS, EVERY = 20000, 10, 2.0


def start_writer(log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, WRITER, str(log), "--rate", str(RATE), "--seconds", str(SECONDS), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: Path(str(log) + ".ready").exists(), 10, what="writer ready")
    Path(str(log) + ".ready").unlink()
    return proc


def rotate_while_writing(ctx, writer: subprocess.Popen) -> list[str]:
    outputs = []
    while writer.poll() is None:
        time.sleep(EVERY)
        outputs.append(run_rotation(ctx, force=True))
    written = int(writer.stdout.read().strip())
    assert written == RATE * SECONDS
    outputs.append(run_rotation(ctx, force=True))  # and once after the writer ended
    return outputs


def test_rename_and_reopen_loses_no_line(tmp_path):
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    pidfile = tmp_path / "app.pid"
    writer = start_writer(log, "--reopen-on-hup")
    pidfile.write_text(str(writer.pid))
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(tmp_path / "logs" / "*.log")],
                "mode": "rename",
                "max_size": "1G",
                "keep": 50,
                "reopen": {"signal": "HUP", "pidfile": str(pidfile)},
                "compress": "zstd",
                "compress_newest": False,
            }
        },
    )
    outputs = rotate_while_writing(ctx, writer)
    result = audit(log, RATE * SECONDS)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled, outputs)
    assert result.lines == RATE * SECONDS
    rotated = [n for n in result.files if n != "app.log"]
    assert len(rotated) >= 5, result.files
    # names sort in rotation order; all but the newest are compressed (compress_newest: false)
    assert rotated == sorted(rotated)
    assert [n.endswith(".zst") for n in rotated] == [True] * (len(rotated) - 1) + [False]


def test_copytruncate_with_appending_writer_loses_no_line(tmp_path):
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    writer = start_writer(log)  # O_APPEND, never reopens
    ctx = make_ctx(
        tmp_path,
        {
            "app": {
                "paths": [str(log)],
                "mode": "copytruncate",
                "writer_appends": True,
                "max_size": "1G",
                "keep": 50,
                "compress": "gzip",
            }
        },
    )
    outputs = rotate_while_writing(ctx, writer)
    result = audit(log, RATE * SECONDS)
    assert result.clean, (result.missing[:10], result.duplicated[:10], result.nul_bytes, result.garbled, outputs)
    assert result.lines == RATE * SECONDS
    assert len([n for n in result.files if n.endswith(".gz")]) >= 5, result.files
    assert any("writer paused" in o and "pids" in o for o in outputs), outputs
    print("\n".join(outputs))


def test_copytruncate_refuses_a_writer_without_o_append(tmp_path):
    log = tmp_path / "app.log"
    proc = subprocess.Popen(
        [sys.executable, WRITER, str(log), "--rate", "1000", "--seconds", "30", "--no-append"], stdout=subprocess.PIPE
    )
    try:
        wait_for(lambda: log.exists() and log.stat().st_size > 0, 10, what="writer wrote")
        ctx = make_ctx(tmp_path, {"app": {"paths": [str(log)], "mode": "copytruncate", "max_size": 1}})
        from worker.tasks.steps import StepFailed

        with pytest.raises(StepFailed, match="without O_APPEND"):
            run_rotation(ctx, force=True)
        assert log.stat().st_size > 0  # not truncated
        assert not list(tmp_path.glob("app.log.2*"))  # no partial copy left behind
    finally:
        proc.kill()
        proc.wait()
