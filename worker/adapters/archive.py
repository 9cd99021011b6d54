"""Files on disk for backups: streaming compression (zstd multithreaded, or
gzip), sha256 while writing, decompression that notices truncation, GNU tar
as a child process, fsync, free space, and child processes with deadlines.

Every child process is started from an argv list (never a shell) and runs
under a `Watchdog` that kills it at its deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

CHUNK = 1 << 20
SUFFIX = {"zstd": ".zst", "gzip": ".gz"}


class ArchiveError(Exception):
    """A file could not be written or read back intact; the message says which and why."""


# -- child processes -------------------------------------------------------------------


class Watchdog:
    """Kills the given processes when `seconds` run out; `fired` tells afterwards."""

    def __init__(self, seconds: float, *procs: subprocess.Popen):
        self.procs = list(procs)
        self.seconds = seconds
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def add(self, proc: subprocess.Popen) -> None:
        self.procs.append(proc)

    def _fire(self) -> None:
        self.fired = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None, stdin_bytes: bytes | None = None) -> str:
    """Run a tool to completion; its stdout, or ArchiveError with its stderr tail."""
    try:
        done = subprocess.run(argv, input=stdin_bytes, capture_output=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ArchiveError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    except OSError as err:
        raise ArchiveError(f"cannot run {argv[0]}: {err.strerror}") from None
    if done.returncode != 0:
        raise ArchiveError(f"{Path(argv[0]).name} exited {done.returncode}: {tail(done.stderr)}")
    return done.stdout.decode(errors="replace")


def run_together(
    argvs: list[list[str]],
    timeout: float,
    env: dict[str, str],
    feeders: list[Callable[[BinaryIO], None]] | None = None,
    at_once: int | None = None,
    into: list[list[str] | None] | None = None,
) -> list[str]:
    """Run tools side by side, at most `at_once` at a time (default: all), started in the
    given order, each one's stdin written by its `feeders` entry when given, and its stdout
    read by its `into` entry when given (a second tool: a pipeline without a shell). Returns
    their stdouts (the second tool's, for a pipeline), or raises ArchiveError (the others
    stopped) when one fails, its feeder fails, or time runs out."""
    deadline = time.monotonic() + timeout
    failures: list[ArchiveError] = []  # a feeder's: the real cause when its tool then fails
    limit = max(1, at_once or len(argvs))
    Stage = tuple[subprocess.Popen, BinaryIO, list[str]]

    def pump(feeder: Callable[[BinaryIO], None], proc: subprocess.Popen) -> None:
        try:
            feeder(proc.stdin)
        except BrokenPipeError:
            pass  # the tool has read what it needs (or died: its exit status says)
        except ArchiveError as err:
            failures.append(err)
            proc.kill()
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

    with contextlib.ExitStack() as stack:
        started: list[list[Stage]] = []  # per tool: its stages, first to last
        pumps, outs = [], []

        def start(n: int) -> None:
            outs.append(stack.enter_context(tempfile.TemporaryFile()))
            feeder = feeders[n] if feeders else None
            second = into[n] if into else None
            err = stack.enter_context(tempfile.TemporaryFile())
            stdin = subprocess.PIPE if feeder is not None else None
            stdout = subprocess.PIPE if second else outs[-1]
            first = _popen(argvs[n], stdin=stdin, stdout=stdout, stderr=err, env=env)
            stages = [(first, err, argvs[n])]
            started.append(stages)
            if second:
                err2 = stack.enter_context(tempfile.TemporaryFile())
                stages.append((_popen(second, stdin=first.stdout, stdout=outs[-1], stderr=err2, env=env), err2, second))
                first.stdout.close()  # the second tool's now: the first sees it stop reading
            if feeder is not None:
                pumps.append(threading.Thread(target=pump, args=(feeder, first), daemon=True))
                pumps[-1].start()

        def check(stages: list[Stage]) -> None:
            # The last stage first: a first stage fails when the second stops reading it.
            for proc, err, argv in reversed(stages):
                if proc.returncode != 0:
                    if failures:
                        raise failures[0]
                    err.seek(0)
                    raise ArchiveError(f"{Path(argv[0]).name} exited {proc.returncode}: {tail(err.read())}")

        ended: set[int] = set()
        try:
            while True:
                for n, stages in enumerate(started):
                    if n not in ended and all(proc.poll() is not None for proc, _, _ in stages):
                        check(stages)  # a failure stops the rest now, not when its turn comes
                        ended.add(n)
                running = [stages for n, stages in enumerate(started) if n not in ended]
                while len(started) < len(argvs) and len(running) < limit:
                    start(len(started))
                    running.append(started[-1])
                if not running:
                    break
                if time.monotonic() > deadline:
                    raise ArchiveError(f"{running[0][0][2][0]} did not finish within {timeout:.0f}s")
                waiting = next(proc for proc, _, _ in running[0] if proc.returncode is None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    waiting.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            for thread in pumps:  # a tool may end before its feeder finds fault with what it fed
                thread.join(timeout=max(0.1, deadline - time.monotonic()))
            if failures:
                raise failures[0]
        finally:
            for stages in started:
                for proc, _, _ in stages:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)
            for thread in pumps:
                thread.join(timeout=10)
        for out in outs:
            out.seek(0)
        return [out.read().decode(errors="replace") for out in outs]


def _popen(argv: list[str], **how) -> subprocess.Popen:
    try:
        return subprocess.Popen(argv, **how)
    except OSError as err:
        raise ArchiveError(f"cannot run {argv[0]}: {err.strerror}") from None


def tail(data: bytes | str, lines: int = 6) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no message)"


# -- writing -----------------------------------------------------------------------------


class _Writeback:
    """fdatasync on its own thread each time it is kicked: the disk writes a file while
    it is still being made. Left to the kernel, a large machine keeps a gigabyte dirty
    in memory (dirty_background_ratio) and the final fsync writes all of it, after the
    work, at the disk's speed. An error is kept in `error` and not asked again: Linux
    reports a failed writeback once per open file, to whichever fsync comes first, so
    the final fsync on the same file would then say all is well."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: OSError | None = None
        self._kicked = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kicked.set()

    def _run(self) -> None:
        while self.error is None:
            self._kicked.wait()
            self._kicked.clear()
            if self._stop:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                self.error = err

    def stop(self) -> None:
        self._stop = True
        self._kicked.set()
        self._thread.join()


class HashingWriter:
    """A file being written: counts and hashes the bytes that reach it, and has them
    written to disk every WRITEBACK_BYTES (_Writeback), so close()'s fsync is short."""

    WRITEBACK_BYTES = 32 << 20

    def __init__(self, path: Path, mode: int = 0o600):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._unsynced = 0
        self._writeback = _Writeback(fd)

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        self._unsynced += len(data)
        if self._unsynced >= self.WRITEBACK_BYTES:
            if self._writeback.error is not None:  # the file is lost already: stop now
                raise self._writeback.error
            self.file.flush()
            self._writeback.kick()
            self._unsynced = 0
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.flush()
            self._writeback.stop()
            os.fsync(self.file.fileno())
            if self._writeback.error is not None:
                raise self._writeback.error
        finally:
            self._writeback.stop()
            self.file.close()

    def abort(self) -> None:
        """Stop without syncing (the file is about to be removed)."""
        self._writeback.stop()
        with contextlib.suppress(OSError):
            self.file.close()


class CompressedWriter:
    """bytes -> compressor -> HashingWriter(path), while a `DecodeCheck` decompresses the
    compressed bytes to their end as they are written. `close()` returns (size, sha256)
    and raises ArchiveError when those bytes do not decompress to what was written: the
    file on disk is then known good by its sha256 alone (see `checked_while_written`)."""

    def __init__(self, path: Path, compression: str, level: int = 2, threads: int = 2):
        if compression not in SUFFIX:
            raise ValueError(f"unknown compression {compression}")
        self.raw = HashingWriter(path)
        self.compression = compression
        self.uncompressed = 0
        self.check = DecodeCheck(compression, path.name)
        sink = _Checked(self.raw, self.check)
        if compression == "zstd":
            compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
            self.stream = compressor.stream_writer(sink, closefd=False, write_size=CHUNK)
        else:
            self.stream = gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0)

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.uncompressed += len(data)

    def close(self) -> tuple[int, str]:
        try:
            if self.compression == "zstd":
                self.stream.flush(zstandard.FLUSH_FRAME)
            self.stream.close()
            self.raw.close()
            decoded = self.check.finish()
        except BaseException:
            self.check.abandon()
            raise
        if decoded != self.uncompressed:
            raise ArchiveError(
                f"{self.check.name}: the compressed stream decodes to {decoded} bytes, {self.uncompressed} were written"
            )
        return self.raw.size, self.raw.sha256.hexdigest()

    def abort(self) -> None:
        self.check.abandon()
        self.raw.abort()


class _Checked:
    """The compressor's output: to the file (hashed) and to the decode check."""

    def __init__(self, raw: HashingWriter, check: DecodeCheck):
        self.raw, self.check = raw, check

    def write(self, data) -> int:
        data = bytes(data)  # the compressor may hand a view of a buffer it reuses
        self.raw.write(data)
        self.check.feed(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class DecodeCheck:
    """Decompresses bytes fed to it, on its own thread, to the end of the stream (zstd
    frames and their content checksum, gzip's CRC and length), discarding the output:
    verifying while a backup streams, so the verify step need not decompress it again.
    `finish()` returns the decompressed length, or raises ArchiveError saying why the
    bytes do not decode; once they do not, `feed()` raises it too, so a failing backup
    stops there. Its queue is bounded, so a slow check slows the writer, never fills
    memory; nothing here waits on a thread that has stopped."""

    def __init__(self, compression: str, name: str):
        self.decoder = Decoder(compression, name)
        self.name = name
        self.decoded = 0
        self.error: ArchiveError | None = None
        self._abandoned = False
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self._thread = threading.Thread(target=self._run, name=f"decode-check {name}", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        self._put(data)
        if self.error is not None:
            raise self.error

    def _put(self, item: bytes | None) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        if self.error is None and not self._abandoned:
            self.error = ArchiveError(f"{self.name}: the decode check stopped")

    def _run(self) -> None:
        try:
            while (data := self._queue.get()) is not None and not self._abandoned:
                for out in self.decoder.feed(data):
                    self.decoded += len(out)
        except ArchiveError as err:
            self.error = err
        except Exception as err:  # MemoryError, a library bug: the check did not pass
            self.error = ArchiveError(f"{self.name}: the decode check failed: {err!r}")

    def finish(self) -> int:
        self._put(None)
        self._thread.join()
        if self.error is None:
            try:
                self.decoder.finish()
            except ArchiveError as err:
                self.error = err
        if self.error is not None:
            raise self.error
        return self.decoded

    def abandon(self) -> None:
        """Stop the thread without checking (the write failed): it drops what is queued."""
        self._abandoned = True
        self._put(None)
        self._thread.join(timeout=10)


# -- reading ----------------------------------------------------------------------------


def iter_file(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


# Compressed bytes fed to the decompressor per call; one call's output is one bytes object.
# Small on purpose: a database dump inflates about 12× (1.1 GB from 105 MB decompressed here
# in 0.82 s fed 64 KiB at a time, 0.43 s fed 4 KiB), and a run of zeros about 32,000× (zstd
# encodes 128 KiB of one byte in 4 bytes): 4 KiB in is at most 128 MiB out.
ZSTD_FEED = 1 << 12


class Decoder:
    """Incremental decompression that notices truncation and corruption: zstd frames
    are checked to their end and checksum (the library's stream reader would end
    quietly on a truncated file), gzip members to their CRC and length. `feed(raw)`
    yields the decompressed bytes; `finish()` raises ArchiveError when the stream
    stopped before its end."""

    def __init__(self, compression: str, name: str):
        self.compression, self.name = compression, name
        self.started = False
        if compression not in SUFFIX:
            raise ValueError(f"unknown compression {compression}")
        self._dctx = zstandard.ZstdDecompressor() if compression == "zstd" else None
        self._obj = self._member()

    def _member(self):
        """A decompressor for the next zstd frame or gzip member (wbits=31: gzip's header and trailer)."""
        return self._dctx.decompressobj() if self._dctx is not None else zlib.decompressobj(wbits=31)

    def feed(self, raw: bytes) -> Iterator[bytes]:
        try:
            for start in range(0, len(raw), ZSTD_FEED):
                piece = raw[start : start + ZSTD_FEED]
                while piece:
                    if self._obj.eof:  # a new frame (or gzip member) follows the finished one
                        if self._dctx is None:
                            piece = piece.lstrip(b"\0")  # zero padding after a gzip member is allowed
                            if not piece:
                                break
                        self._obj = self._member()
                    out = self._obj.decompress(piece)
                    self.started = True
                    piece = self._obj.unused_data if self._obj.eof else b""
                    if out:
                        yield out
        except zstandard.ZstdError as err:
            raise ArchiveError(f"{self.name}: zstd check failed: {err}") from None
        except zlib.error as err:
            raise ArchiveError(f"{self.name}: gzip check failed: {err}") from None

    def finish(self) -> None:
        if not self.started or not self._obj.eof:
            what = "zstd frame" if self.compression == "zstd" else "gzip member"
            raise ArchiveError(f"{self.name}: truncated (the {what} does not end)")


def iter_decompressed(path: Path, compression: str, hasher=None) -> Iterator[bytes]:
    """The file's content, decompressed; raises ArchiveError when it is truncated
    or corrupt (see Decoder). `hasher` sees the raw bytes."""
    decoder = Decoder(compression, path.name)
    for raw in iter_file(path, CHUNK):
        if hasher is not None:
            hasher.update(raw)
        yield from decoder.feed(raw)
    decoder.finish()


def decompressing_feeder(src: Path, compression: str, expect_sha256: str | None) -> Callable[[BinaryIO], None]:
    """`feed(out)`: `src` decompressed into `out` (a tool's stdin), nothing kept on disk.
    Raises ArchiveError when it does not decompress to its end, or once its last byte is
    fed, when its sha256 is not `expect_sha256`: the tool must then be stopped (run_together
    does) and what it loaded thrown away."""

    def feed(out: BinaryIO) -> None:
        digest = hashlib.sha256()
        for chunk in iter_decompressed(src, compression, digest):
            out.write(chunk)
        if expect_sha256 and digest.hexdigest() != expect_sha256:
            raise ArchiveError(f"{src.name}: sha256 differs from the manifest's")

    return feed


class Unpacking:
    """`src` decompressed into `dest` on a thread, its sha256 checked, while readers
    follow `dest` as it grows: a restore starts loading the first table while the
    last is still being unpacked, and still gets a seekable file for what needs one.

    `with Unpacking(...) as unpacking:` starts it; `feed(out)` writes the file from the
    start into `out` as it grows; `wait()` returns once `dest` is whole, or raises why it is not. Leaving
    the block stops the thread."""

    def __init__(self, src: Path, compression: str, dest: Path, expect_sha256: str | None = None):
        self.src, self.compression, self.dest, self.expect_sha256 = src, compression, dest, expect_sha256
        self.written = 0
        self.error: ArchiveError | None = None
        self._done = False
        self._stop = False
        self._grown = threading.Condition()
        self._thread = threading.Thread(target=self._unpack, name=f"unpack {src.name}", daemon=True)

    def __enter__(self) -> Unpacking:
        fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._grown:
            self._stop = True
            self._grown.notify_all()
        self._thread.join()

    def _unpack(self) -> None:
        digest = hashlib.sha256()
        try:
            with self._out:
                for chunk in iter_decompressed(self.src, self.compression, digest):
                    self._out.write(chunk)
                    with self._grown:
                        if self._stop:
                            raise ArchiveError(f"{self.src.name}: unpacking stopped")
                        self.written += len(chunk)
                        self._grown.notify_all()
            if self.expect_sha256 and digest.hexdigest() != self.expect_sha256:
                raise ArchiveError(f"{self.src.name}: sha256 differs from the manifest's")
        except ArchiveError as err:
            self.error = err
        except OSError as err:
            self.error = ArchiveError(f"unpacking {self.src.name} into {self.dest}: {err.strerror}")
        finally:
            with self._grown:
                self._done = True
                self._grown.notify_all()

    def _available(self, offset: int) -> int:
        """Bytes readable at `offset`: waits for more; 0 once the file is whole."""
        with self._grown:
            while self.written <= offset and not self._done and not self._stop:
                self._grown.wait()
            if self.error is not None or self._stop:
                raise self.error or ArchiveError(f"{self.src.name}: unpacking stopped")
            return self.written - offset

    def feed(self, out) -> None:
        """Write the file's bytes from the start into `out` (a tool's stdin) as they are
        written: with sendfile where `out` is a pipe, so the bytes do not pass through
        Python; chunk by chunk into anything else with write() (a `docker exec` stdin)."""
        pipe = out.fileno() if hasattr(out, "fileno") else None
        with open(self.dest, "rb") as handle:
            offset = 0
            while available := self._available(offset):
                if pipe is not None:
                    offset += os.sendfile(pipe, handle.fileno(), offset, min(available, 1 << 24))
                else:
                    chunk = os.pread(handle.fileno(), min(available, CHUNK), offset)
                    out.write(chunk)
                    offset += len(chunk)

    def wait(self) -> None:
        self._available(1 << 62)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in iter_file(path):
        digest.update(chunk)
    return digest.hexdigest()


# -- disk -----------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for folder, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# -- tar --------------------------------------------------------------------------------------

# GNU tar's warnings when the tree changes under it; its exit status is then 1.
_CHANGED_MARKERS = (
    "file changed as we read it", "File removed before we read it", "Cannot stat", "file is unchanged",
    "File shrank by",  # truncated while read: tar pads it with zeros, and says so
)  # fmt: skip


def tar_create_argv(base: Path, members: list[str], index_file: Path) -> list[str]:
    """GNU tar writing the archive to stdout, listing members into index_file."""
    return [
        "tar", "--create", "--file=-", "--format=posix", "--numeric-owner", "--sparse", "--sort=name",
        f"--directory={base}", "--verbose", f"--index-file={index_file}", "--warning=no-file-ignored",
        "--", *members,
    ]  # fmt: skip


def tar_problems(stderr: str) -> tuple[list[str], list[str]]:
    """Split tar's stderr into (changed/vanished files: reported, other errors: fatal)."""
    reported, fatal = [], []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith("tar: Exiting with failure status"):
            continue
        (reported if any(m in line for m in _CHANGED_MARKERS) else fatal).append(line.removeprefix("tar: "))
    return reported, fatal


def widen_pipe(pipe) -> None:
    """Let the producer run ahead by a chunk while the consumer compresses: Linux's default
    64 KiB pipe stalls tar or pg_dump on every chunk (F_SETPIPE_SZ, up to pipe-max-size)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)


def stream_into(
    source: subprocess.Popen, writer: CompressedWriter, check: subprocess.Popen | None, watchdog: Watchdog
) -> str:
    """Pump source's stdout into writer (and into check's stdin, a verifier
    reading the same bytes as they stream). Returns "" or the verifier's
    complaint about its stdin closing early."""
    problem = ""
    widen_pipe(source.stdout)
    try:
        while chunk := source.stdout.read(CHUNK):
            writer.write(chunk)
            if check is not None and not problem:
                try:
                    check.stdin.write(chunk)
                except BrokenPipeError:
                    problem = "the verifier stopped reading early"
    finally:
        source.stdout.close()
        if check is not None:
            try:
                check.stdin.close()
            except BrokenPipeError:
                problem = problem or "the verifier stopped reading early"
    if watchdog.fired:
        raise ArchiveError(f"timed out after {watchdog.seconds:.0f}s")
    return problem


def wait_all(*procs: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
