"""The backup writer: it decompresses what it writes as it goes, so a compressed file
that does not decode to what was written never reaches a manifest."""

from __future__ import annotations

import hashlib
import os

import pytest

from worker.adapters import archive
from worker.adapters.archive import ArchiveError, CompressedWriter, DecodeCheck, iter_decompressed


def _payload() -> bytes:
    # Compressible text and incompressible bytes, as a documents tree or a dump holds.
    text = b"".join(b"row %d proposal section pricing %d\n" % (n, n * 7) for n in range(120_000))
    return text + os.urandom(3 << 20) + text


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_the_writer_decodes_what_it_writes(tmp_path, compression):
    data = _payload()
    path = tmp_path / f"out.{compression}"
    writer = CompressedWriter(path, compression, level=2, threads=2)
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start : start + (1 << 20)])
    size, sha = writer.close()
    assert size == path.stat().st_size and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert writer.check.decoded == len(data) == writer.uncompressed
    assert b"".join(iter_decompressed(path, compression)) == data


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_bytes_damaged_between_the_compressor_and_the_file_fail_the_writer(tmp_path, monkeypatch, compression):
    # A fault after compression (a compressor bug, memory): the file and the check see the
    # same damaged bytes, and the check refuses them when the writer closes.
    original = archive._Checked.write
    seen = {"chunks": 0}

    def damaging(self, data):
        seen["chunks"] += 1
        if seen["chunks"] == 2:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
        return original(self, bytes(data))

    monkeypatch.setattr(archive._Checked, "write", damaging)
    writer = CompressedWriter(tmp_path / "out", compression, level=2, threads=2)
    data = _payload()
    with pytest.raises(ArchiveError, match=f"{compression} check failed|decodes to"):
        for start in range(0, len(data), 1 << 18):
            writer.write(data[start : start + (1 << 18)])  # a later write may say it already
        writer.close()
    writer.abort()
    assert seen["chunks"] >= 2 and not writer.check._thread.is_alive()


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_stream_that_stops_before_its_end_is_called_truncated(tmp_path, compression):
    path = tmp_path / "whole"
    writer = CompressedWriter(path, compression)
    writer.write(_payload())
    writer.close()
    whole = path.read_bytes()
    check = DecodeCheck(compression, "cut")
    check.feed(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError, match=r"cut: truncated \(the (zstd frame|gzip member) does not end\)"):
        check.finish()
    check = DecodeCheck(compression, "nothing")
    with pytest.raises(ArchiveError, match="truncated"):
        check.finish()


def test_a_run_of_zeros_decodes_in_bounded_pieces(tmp_path):
    # 1 GiB of zeros compresses to a few hundred KiB; decoding hands it back in pieces
    # (at most 128 MiB each), never as one object the size of the whole run.
    path = tmp_path / "zeros.zst"
    writer = CompressedWriter(path, "zstd")
    block = bytes(64 << 20)
    for _ in range(16):
        writer.write(block)
    writer.close()
    assert path.stat().st_size < 1 << 20
    largest = total = 0
    for piece in iter_decompressed(path, "zstd"):
        largest, total = max(largest, len(piece)), total + len(piece)
    assert total == 1 << 30 and largest <= 128 << 20


def test_zero_padding_after_a_gzip_member_is_accepted_as_gzip_accepts_it(tmp_path):
    path = tmp_path / "padded.gz"
    writer = CompressedWriter(path, "gzip")
    writer.write(b"hello\n" * 1000)
    writer.close()
    with open(path, "ab") as handle:
        handle.write(bytes(512))
    assert b"".join(iter_decompressed(path, "gzip")) == b"hello\n" * 1000
    with open(path, "ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(ArchiveError, match="gzip check failed"):
        b"".join(iter_decompressed(path, "gzip"))


def test_a_check_that_fails_stops_the_writer_and_nothing_waits_on_its_thread(tmp_path, monkeypatch):
    # A decoder that dies of something other than bad bytes (memory, a library bug): the
    # next write says so instead of blocking on a queue nobody drains; abort returns.
    def dying(self, raw):
        raise MemoryError("decoder out of memory")
        yield b""

    monkeypatch.setattr(archive.Decoder, "feed", dying)
    writer = CompressedWriter(tmp_path / "out.zst", "zstd")
    with pytest.raises(ArchiveError, match="the decode check failed: MemoryError"):
        for _ in range(200):
            writer.write(os.urandom(1 << 20))
            writer.stream.flush()
    writer.abort()
    assert not writer.check._thread.is_alive()


def test_a_file_truncated_while_tar_reads_it_is_reported_not_fatal():
    from worker.adapters.archive import tar_problems

    stderr = (
        "tar: documents/f1: File shrank by 31392 bytes; padding with zeros\n"
        "tar: documents/f2: file changed as we read it\n"
        "tar: documents/f3: Cannot open: Permission denied\n"
        "tar: Exiting with failure status due to previous errors\n"
    )
    reported, fatal = tar_problems(stderr)
    assert reported == [
        "documents/f1: File shrank by 31392 bytes; padding with zeros",
        "documents/f2: file changed as we read it",
    ]
    assert fatal == ["documents/f3: Cannot open: Permission denied"]


def test_tools_run_at_most_at_once_at_a_time_in_the_given_order(tmp_path):
    log = tmp_path / "log"
    argvs = [["sh", "-c", f'echo start {n} >> "$0"; sleep 0.1; echo end {n} >> "$0"', str(log)] for n in range(4)]
    archive.run_together(argvs, timeout=30, env=dict(os.environ), at_once=1)
    assert log.read_text().split("\n")[:-1] == [f"{what} {n}" for n in range(4) for what in ("start", "end")]


def test_a_tool_that_fails_stops_the_others_and_the_rest_never_start(tmp_path):
    log = tmp_path / "log"
    argvs = [
        ["sh", "-c", 'echo first >> "$0"; echo broken >&2; exit 3', str(log)],
        ["sh", "-c", 'echo second >> "$0"', str(log)],
    ]
    with pytest.raises(ArchiveError, match=r"sh exited 3: broken"):
        archive.run_together(argvs, timeout=30, env=dict(os.environ), at_once=1)
    assert log.read_text() == "first\n"


def test_a_feeder_that_finds_fault_after_its_tool_has_read_everything_fails_the_run(tmp_path):
    # `cat` ends as soon as its stdin closes; the feeder's complaint comes with the last byte.
    def feed(out):
        out.write(b"all of it")
        raise ArchiveError("the feeder found the bytes were not the manifest's")

    with pytest.raises(ArchiveError, match="not the manifest's"):
        archive.run_together([["cat"]], timeout=30, env=dict(os.environ), feeders=[feed])


@pytest.mark.parametrize("damage", ["other sha256", "truncated"])
def test_a_decompressing_feeder_refuses_a_file_that_is_not_the_manifests(tmp_path, damage):
    path = tmp_path / "t.dump.zst"
    writer = CompressedWriter(path, "zstd")
    writer.write(os.urandom(300_000))
    _, sha = writer.close()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    feed = archive.decompressing_feeder(path, "zstd", "0" * 64 if damage == "other sha256" else sha)
    with open(os.devnull, "wb") as sink, pytest.raises(ArchiveError, match="sha256 differs|truncated"):
        feed(sink)


def test_a_large_file_asks_for_writeback_as_it_is_written(tmp_path, monkeypatch):
    # So that close()'s fsync finds little left to write (see archive._Writeback).
    kicks = []
    monkeypatch.setattr(archive._Writeback, "kick", lambda self: kicks.append(self.fd))
    monkeypatch.setattr(archive.HashingWriter, "WRITEBACK_BYTES", 1 << 16)
    writer = archive.HashingWriter(tmp_path / "big")
    for _ in range(64):
        writer.write(os.urandom(1 << 14))
    writer.close()
    assert len(kicks) == 16
    assert (tmp_path / "big").stat().st_size == 64 << 14 == writer.size


def test_a_kicked_writeback_syncs_the_file_on_its_thread(tmp_path, monkeypatch):
    import threading

    synced = threading.Event()
    monkeypatch.setattr(archive.os, "fdatasync", lambda fd: synced.set())
    with open(tmp_path / "f", "wb") as handle:
        writeback = archive._Writeback(handle.fileno())
        writeback.kick()
        assert synced.wait(10)
        writeback.stop()


def test_a_tool_can_pipe_into_a_second_without_a_shell_and_either_failing_fails_the_run(tmp_path):
    env = dict(os.environ)
    lines = archive.run_together([["cat"]], 30, env, feeders=[lambda out: out.write(b"a\nb\nc\n")], into=[["wc", "-l"]])
    assert lines[0].strip() == "3"
    # The second stops reading (a SQL error in psql, say): its own complaint is the reason.
    with pytest.raises(ArchiveError, match=r"sh exited 4: psql said no"):
        archive.run_together([["cat", "/dev/zero"]], 30, env, into=[["sh", "-c", "echo psql said no >&2; exit 4"]])
    # The first fails while the second ends well on what it got: the first's complaint.
    with pytest.raises(ArchiveError, match=r"sh exited 2: cut short"):
        archive.run_together([["sh", "-c", "echo partial; echo cut short >&2; exit 2"]], 30, env, into=[["cat"]])


def test_a_writeback_that_fails_fails_the_file_though_the_final_fsync_then_passes(tmp_path, monkeypatch):
    # Linux reports a failed writeback once per open file: to the writeback's fdatasync,
    # not again to close()'s fsync on the same file.
    import errno

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(archive.os, "fdatasync", failing)
    monkeypatch.setattr(archive.HashingWriter, "WRITEBACK_BYTES", 1 << 12)
    writer = archive.HashingWriter(tmp_path / "f")
    writer.write(os.urandom(1 << 13))  # kicks the writeback
    writer._writeback._thread.join(10)  # it stops at its first error
    assert writer._writeback.error is not None
    with pytest.raises(OSError, match="Input/output error"):
        writer.write(os.urandom(1 << 13))  # the next writeback's turn: the file is lost already
    with pytest.raises(OSError, match="Input/output error"):
        writer.close()


def test_a_tool_that_cannot_be_started_is_named(tmp_path):
    with pytest.raises(ArchiveError, match="cannot run no-such-psql: No such file or directory"):
        archive.run_together([["cat"]], 30, dict(os.environ), into=[["no-such-psql"]])
