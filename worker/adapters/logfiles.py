"""Log files on this host: who holds them open, pausing writers, copying,
compressing, and the per-set lock and journal that make rotation restartable.

Everything here is bounded: waits take a deadline, copies run in the kernel
(copy_file_range) and compression streams in 1 MiB chunks.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from worker.adapters.archive import fsync_dir  # noqa: F401  (rotation calls logfiles.fsync_dir)

CHUNK = 1 << 20
O_APPEND = os.O_APPEND


class LogFileError(Exception):
    """A file operation failed; the message says what to check."""


@dataclass(frozen=True)
class Holder:
    pid: int
    fd: int
    appends: bool  # the descriptor was opened with O_APPEND


def holders(paths: list[Path]) -> dict[Path, list[Holder]]:
    """Processes with each file open for writing, found by inode in /proc/*/fd.
    Readers (tail -f, a backup, this process's own copy) neither lose lines
    nor write NULs, so they are not holders.

    Needs to see the writers' /proc entries: run as root or as the writers'
    user, on their host (containers' processes are visible from the host)."""
    wanted: dict[tuple[int, int], Path] = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            wanted[(st.st_dev, st.st_ino)] = path
    found: dict[Path, list[Holder]] = {path: [] for path in paths}
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to see
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            path = wanted.get(key)
            if path is None:
                continue
            appends = _fd_appends(pid, fd, st.st_ino)
            try:
                # The descriptor may have been closed or re-pointed (dup2) between
                # the stat and the fdinfo read: only a stable answer counts.
                again = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (again.st_dev, again.st_ino) == key and appends is not None:
                found[path].append(Holder(pid, int(fd), appends))
    return found


def _fd_appends(pid: int, fd: str, ino: int | None = None) -> bool | None:
    """Whether a writing descriptor appends; None for a read-only one (or gone). With `ino`,
    also None when the descriptor names another file by the time its fdinfo is read: a shell
    that runs `printf ... >&3` points fd 1 at the log and back many times a second, and flags
    read from the wrong file (its stdout pipe) would say "no O_APPEND" of an appending writer.
    fdinfo's flags and ino come from one read, so they describe one file."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            fields = dict(line.split(":", 1) for line in info.read().splitlines() if ":" in line)
    except OSError:
        return None
    if "flags" not in fields:
        return None
    if ino is not None and "ino" in fields and int(fields["ino"]) != ino:
        return None
    flags = int(fields["flags"].split()[0], 8)
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return None
    return bool(flags & O_APPEND)


def wait_released(path: Path, timeout: float) -> tuple[bool, float]:
    """Wait until no process holds `path` open; (released, seconds waited)."""
    began = time.monotonic()
    while True:
        if not holders([path])[path]:
            return True, time.monotonic() - began
        if time.monotonic() - began >= timeout:
            return False, time.monotonic() - began
        time.sleep(0.02)


# -- pausing writers that are plain processes -----------------------------------


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def stop_processes(pids: list[int], timeout: float = 5.0) -> None:
    """SIGSTOP each and wait until the kernel shows it stopped: a write that
    was in flight has then completed, and no new one starts."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _state(pid) not in (None, "T", "t", "Z", "X"):
            if time.monotonic() >= deadline:
                resume_processes(pids)
                raise LogFileError(f"process {pid} did not stop within {timeout:.0f}s")
            time.sleep(0.0005)


def resume_processes(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- copying --------------------------------------------------------------------


def copy_range(src: Path, dst_fd: int, start: int, end: int) -> int:
    """Append bytes [start, end) of src to the file behind dst_fd, in the kernel
    (copy_file_range) when it can. dst_fd must not be O_APPEND: the kernel refuses
    such a destination, so the end is tracked here."""
    copied = 0
    dst_offset = os.lseek(dst_fd, 0, os.SEEK_END)
    kernel = True
    with open(src, "rb") as source:
        fd = source.fileno()
        offset = start
        while offset < end:
            want = min(end - offset, 64 * CHUNK)
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, want, offset, dst_offset)
                except OSError:
                    kernel = False  # another filesystem or an old kernel: plain reads and writes
            if not kernel:
                data = os.pread(fd, min(want, CHUNK), offset)
                n = os.pwrite(dst_fd, data, dst_offset) if data else 0
            if n == 0:  # the source shrank under us
                break
            offset += n
            dst_offset += n
            copied += n
    return copied


def create_like(path: Path, mode: int, uid: int, gid: int) -> bool:
    """Create an empty live file with the old one's mode and owner; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, mode)
    except FileExistsError:
        return False
    try:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return True


# -- compression ----------------------------------------------------------------


def compress(src: Path, method: str) -> tuple[Path, int, int, int]:
    """Compress src to src.zst / src.gz, verified, then remove src.

    Written to a `.partial` file, fsynced, decompressed again and compared
    (SHA-256) with the original before it takes the final name and the
    original goes; a crash at any point leaves the original in place, and
    running it again redoes the work. Returns (path, bytes in, bytes out, lines)."""
    suffix = {"zstd": ".zst", "gzip": ".gz"}[method]
    final = src.with_name(src.name + suffix)
    partial = src.with_name(src.name + suffix + ".partial")
    st = os.stat(src)
    digest = hashlib.sha256()
    with open(src, "rb") as source, open(partial, "wb") as raw:
        if method == "zstd":
            with zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(raw, closefd=False) as out:
                lines = _pump(source, out, digest)
        else:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=int(st.st_mtime)) as out:
                lines = _pump(source, out, digest)
        raw.flush()
        os.fsync(raw.fileno())
    if _digest_of_compressed(partial, method) != digest.hexdigest():
        partial.unlink()
        raise LogFileError(f"{partial}: decompressed bytes differ from {src}; original kept")
    os.utime(partial, ns=(st.st_atime_ns, st.st_mtime_ns))
    with contextlib.suppress(PermissionError):
        os.chown(partial, st.st_uid, st.st_gid)
    os.chmod(partial, st.st_mode & 0o7777)
    os.replace(partial, final)
    fsync_dir(final.parent)
    try:
        src.unlink()
    except OSError as err:  # an immutable or read-only original: say that the copy is good
        raise LogFileError(
            f"{final.name} is written and verified, but {src.name} could not be removed ({err.strerror}): "
            "both hold the same lines; remove the original once you see why it is protected"
        ) from None
    fsync_dir(final.parent)
    return final, st.st_size, os.stat(final).st_size, lines


def _pump(source, out, digest) -> int:
    lines = 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        lines += chunk.count(b"\n")
        out.write(chunk)
    return lines


def open_decompressed(path: Path):
    """A binary reader of a rotated file's original bytes, whatever its suffix."""
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _digest_of_compressed(path: Path, method: str) -> str:
    digest = hashlib.sha256()
    opener = zstandard.ZstdDecompressor().stream_reader if method == "zstd" else None
    with open(path, "rb") as raw:
        reader = opener(raw) if opener else gzip.GzipFile(fileobj=raw, mode="rb")
        with reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


# -- per-set lock and journal -----------------------------------------------------


@contextlib.contextmanager
def locked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on `path`, waiting up to `timeout`; released when the
    process dies, so a crashed rotation never leaves a stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LogFileError(
                        f"{path} is held by another rotation (waited {timeout:.0f}s); the next run tries again "
                        "(if it stays held: opsfleet runs --status running shows a run holding it; else a "
                        "process has it open: fuser or lsof on that path)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write, fsync, rename, fsync the folder: the file is the old or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def remove_durably(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)
