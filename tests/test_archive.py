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
    for start in range(0, len(data), 1 << 18):
        writer.write(data[start : start + (1 << 18)])
    assert seen["chunks"] >= 2
    with pytest.raises(ArchiveError, match=f"{compression} check failed|decodes to"):
        writer.close()


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
