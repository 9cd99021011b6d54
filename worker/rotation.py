"""Log rotation's pure decisions: names, when to rotate, what to compress, what to keep.

No I/O here: the rotation steps (worker/tasks/rotate.py) gather facts (file
sizes, times, which rotated files a process still holds) and ask these
functions; the tests check them as tables.

Rotated files are named `<live name>.<YYYYMMDD>-<NNNN>[.zst|.gz]`: the UTC
date of the rotation and a per-day sequence, fixed width, so a plain sort of
the names is the order of rotation, and two rotations in one day never collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

COMPRESSED_SUFFIXES = {"zstd": ".zst", "gzip": ".gz", "none": ""}
SEQ_WIDTH = 4


@dataclass(frozen=True)
class RotatedName:
    day: str  # YYYYMMDD (UTC)
    seq: int
    suffix: str  # "", ".zst", ".gz"

    @property
    def order(self) -> tuple[str, int]:
        return (self.day, self.seq)


def rotated_name(live_name: str, day: str, seq: int) -> str:
    """The uncompressed rotated file's name, e.g. app.log.20261203-0002."""
    return f"{live_name}.{day}-{seq:0{SEQ_WIDTH}d}"


def parse_rotated(live_name: str, name: str) -> RotatedName | None:
    """The rotated file's date, sequence and suffix; None when `name` is not one of ours."""
    m = re.fullmatch(re.escape(live_name) + r"\.(\d{8})-(\d{4,})(\.zst|\.gz)?", name)
    if not m:
        return None
    return RotatedName(m.group(1), int(m.group(2)), m.group(3) or "")


def next_rotated_name(live_name: str, existing: list[str], now: datetime) -> str:
    """The next free name for today: one past the highest sequence of today's
    rotated files, compressed or not (so a compressed .0001.zst still counts)."""
    day = now.strftime("%Y%m%d")
    seqs = [p.seq for p in (parse_rotated(live_name, n) for n in existing) if p and p.day == day]
    return rotated_name(live_name, day, max(seqs, default=0) + 1)


def rotation_due(
    *, size: int, last_rotated: datetime | None, now: datetime, max_size: int | None, every: timedelta | None
) -> str | None:
    """Why the live file is due for rotation, or None. An empty file never is
    (a writer that did not reopen leaves the new file empty: rotating it again
    would gain nothing). Either trigger suffices when both are set."""
    if size <= 0:
        return None
    if max_size is not None and size >= max_size:
        return f"size {size} B ≥ max_size {max_size} B"
    if every is not None and last_rotated is not None and now - last_rotated >= every:
        return f"last rotated {last_rotated:%Y-%m-%d %H:%M:%S} UTC, every {_span(every)}"
    return None


@dataclass(frozen=True)
class Rotated:
    """A rotated file as the decisions see it."""

    name: str
    rotated_at: datetime  # its modification time: the last line written to it
    held: bool = False  # a process still has it open (has not reopened yet)


@dataclass(frozen=True)
class Verdict:
    name: str
    action: str  # keep | remove | compress
    reason: str


def to_compress(live_name: str, files: list[Rotated], *, method: str, compress_newest: bool) -> list[Verdict]:
    """Which uncompressed rotated files to compress now. Never one a process
    still holds open (its writer may still be adding lines); the newest one only
    when `compress_newest` (else it waits one cycle, like logrotate's delaycompress)."""
    if method == "none":
        return []
    ordered = _newest_first(live_name, files)
    out = []
    for i, f in enumerate(ordered):
        parsed = parse_rotated(live_name, f.name)
        if parsed is None or parsed.suffix:
            continue
        if f.held:
            out.append(Verdict(f.name, "keep", "still held open by its writer"))
        elif i == 0 and not compress_newest:
            out.append(Verdict(f.name, "keep", "newest rotated file: compressed next cycle"))
        else:
            out.append(Verdict(f.name, "compress", method))
    return out


def retention(
    live_name: str, files: list[Rotated], *, keep: int, max_age: timedelta | None, now: datetime
) -> list[Verdict]:
    """Keep the newest `keep` rotated files that are younger than `max_age`;
    remove the rest, except any a process still holds open (removing it would
    throw away the lines still being written to it)."""
    out = []
    for i, f in enumerate(_newest_first(live_name, files)):
        if i >= keep:
            verdict = ("remove", f"beyond keep={keep} (#{i + 1} newest)")
        elif max_age is not None and now - f.rotated_at > max_age:
            verdict = ("remove", f"older than max_age {_span(max_age)} ({f.rotated_at:%Y-%m-%d %H:%M} UTC)")
        else:
            verdict = ("keep", f"#{i + 1} newest" + (f", within {_span(max_age)}" if max_age else ""))
        if verdict[0] == "remove" and f.held:
            verdict = ("keep", "would be removed, but a process still holds it open")
        out.append(Verdict(f.name, *verdict))
    return out


def _newest_first(live_name: str, files: list[Rotated]) -> list[Rotated]:
    ours = [(parse_rotated(live_name, f.name), f) for f in files]
    return [f for p, f in sorted(((p, f) for p, f in ours if p), key=lambda pf: pf[0].order, reverse=True)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: int | str) -> int:
    """Bytes from 1048576, "100M", "100MiB", "1.5G" (binary units: K = 1024)."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError("must be at least 1 byte")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f'"{value}" is not a size (e.g. 1048576, "100M", "1G")')
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i") or ""
    size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def parse_span(value: int | float | str) -> timedelta:
    """A duration from seconds (int) or "30s", "15m", "12h", "1d", "2w"."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _SPAN.match(str(value))
        if not m:
            raise ValueError(f'"{value}" is not a duration (e.g. 3600, "30m", "12h", "1d", "2w")')
        seconds = float(m.group(1)) * _SPAN_UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("must be positive")
    return timedelta(seconds=seconds)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
