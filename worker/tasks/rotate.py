"""Log rotation playbook: rotate → compress → retain, per configured log set.

A run's target is a log set name, or "all". Params: `force` (rotate every
non-empty live file now, triggers or not), `dry_run` (report, change nothing).

Guarantees, for each live file:
- mode rename: the file is renamed (atomic; the writer keeps writing into
  the same inode, so nothing is lost), an empty file takes its place, and the
  writer is told to reopen (signal to a pidfile's process or to a service's
  container, a command run without a shell, or nothing for `watched` writers).
- mode copytruncate (writers that cannot reopen): the bulk is copied while the
  writer runs, then the writer is paused (its container frozen, or the
  processes holding the file SIGSTOPped and seen stopped), the rest is copied,
  the file truncated, and the writer resumed. An appending (O_APPEND) writer
  then writes at the new end: no line is lost or doubled. A holder without
  O_APPEND would write at its old offset (NUL bytes): the rotation refuses.
- Each file's progress is a journal (<state_dir>/<set>/journal/) written
  before each irreversible move; a rotation found half-done (a crash, a killed
  worker) is completed from its journal before anything else, never redone.
- A set is rotated under one lock; a rotated file is compressed (and may be
  removed) only once no process holds it open.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import signal as signals
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from worker import rotation
from worker.adapters import logfiles, metrics
from worker.adapters.docker import DockerError
from worker.adapters.logfiles import LogFileError
from worker.config import LogSetSpec
from worker.tasks.steps import Step, StepContext, StepFailed

log = logging.getLogger(__name__)

CRASH_ENV = "OPSFLEET_TEST_CRASH_AFTER"  # fault tests only: exit right after writing this journal phase
# How long one step waits, in all, for the locks of sets another rotation holds: a set
# found held after that is given a second at most, so a few held sets cannot make the step
# outlast worker.step_soft_timeout_seconds.
LOCK_TIMEOUT_SECONDS = 60
DRY_RUN_LOCK_SECONDS = 2
_ROTATED_TAIL = re.compile(r"\.\d{8}-\d{4,}(\.zst|\.gz)?(\.partial)?$")


# A journal entry as LogSet.plan and record write it: each key's type, and the phases.
JOURNAL_TYPES = {"live": str, "target": str, "mode": str, "phase": str, "file_mode": int, "uid": int, "gid": int}
JOURNAL_PHASES = {
    "rename": ("planned", "renamed"),
    "copytruncate": ("planned", "paused", "copied", "truncated"),
}


def journal_problem(entry) -> str | None:
    """What makes `entry` not a journal entry this code wrote; None when it is one."""
    if not isinstance(entry, dict):
        return "not an entry"
    for key, kind in JOURNAL_TYPES.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"{key} missing or not {kind.__name__}"
    if entry["phase"] not in JOURNAL_PHASES.get(entry["mode"], ()):
        return f"phase {entry['phase']!r} is not one of mode {entry['mode']!r}"
    if entry["phase"] in ("copied", "truncated") and not isinstance(entry.get("copied"), int):
        return "copied missing"
    return None


def _crash_point(phase: str) -> None:
    if os.environ.get(CRASH_ENV) == phase:
        os._exit(70)


def _now() -> datetime:
    return datetime.now(UTC)


def state_dir(ctx: StepContext) -> Path:
    configured = ctx.config.rotation.state_dir
    if configured is None:
        return ctx.runtime.loaded.data_dir / "rotation"
    return configured if configured.is_absolute() else ctx.runtime.loaded.base_dir / configured


OWN_SET = "opsfleet"


def all_sets(config, data_dir: Path) -> dict[str, LogSetSpec]:
    """The configured log sets, plus opsfleet's own logs (logging.files) as the set "opsfleet"."""
    sets = dict(config.rotation.sets)
    if config.logging.files:
        own = config.logging.rotate
        sets[OWN_SET] = LogSetSpec(
            paths=(str(data_dir / "logs" / "*.jsonl"),),
            mode="rename",
            reopen={"watched": True},
            max_size=own.max_size,
            every=own.every,
            keep=own.keep,
            max_age=own.max_age,
            compress=own.compress,
            # Idle processes let go of the old file only at their next line: wait a cycle.
            compress_newest=False,
            reopen_timeout_seconds=0.5,
        )
    return sets


def selected_sets(ctx: StepContext) -> list[tuple[str, LogSetSpec]]:
    sets = all_sets(ctx.config, ctx.runtime.loaded.data_dir)
    target = ctx.run.get("target") or "all"
    if target == "all":
        return sorted(sets.items())
    if target not in sets:
        raise StepFailed(f'log set "{target}" is not configured (log sets: {", ".join(sorted(sets)) or "none"})')
    return [(target, sets[target])]


def live_files(spec: LogSetSpec) -> list[Path]:
    """The live files the set's paths and globs match now (never a rotated or partial file)."""
    found: set[Path] = set()
    for pattern in spec.paths:
        for name in glob.glob(pattern):
            path = Path(name)
            if path.is_file() and not _ROTATED_TAIL.search(path.name) and not path.name.endswith(".partial"):
                found.add(path)
    return sorted(found)


def rotated_files(live: Path, *, names_only: bool = False) -> list[Path]:
    """The rotated files of `live`. Something else under such a name (a directory, say) is not
    one: never compressed, never counted toward `keep` (a real file would go in its place);
    `names_only` lists it too, for choosing the next free name."""
    try:
        names = os.listdir(live.parent)
    except FileNotFoundError:
        return []
    found = sorted(live.parent / n for n in names if rotation.parse_rotated(live.name, n))
    return found if names_only else [p for p in found if p.is_file() and not p.is_symlink()]


class LogSet:
    """One log set's state on disk: lock, journals, last rotation times."""

    def __init__(self, ctx: StepContext, name: str, spec: LogSetSpec, lock_deadline: float | None = None):
        self.ctx, self.name, self.spec = ctx, name, spec
        self.folder = state_dir(ctx) / name
        self.journal_dir = self.folder / "journal"
        self.out: list[str] = []
        self.problems: list[str] = []
        # time.monotonic() by which its step stops waiting for held locks (see LOCK_TIMEOUT_SECONDS)
        self.lock_deadline = lock_deadline

    @contextlib.contextmanager
    def lock(self):
        """The set's lock; errors inside become StepFailed naming the set."""
        wait = LOCK_TIMEOUT_SECONDS
        if self.lock_deadline is not None:
            wait = max(min(1.0, wait), self.lock_deadline - time.monotonic())
        try:
            with logfiles.locked(self.folder / "lock", wait):
                yield
        except (StepFailed, SoftTimeLimitExceeded):
            raise
        except (LogFileError, DockerError, OSError) as err:
            raise StepFailed(f"set {self.name}: {err}") from None
        except Exception as err:  # a bug, or state damaged in a way not foreseen: this set only
            log.exception("log set %s failed", self.name)
            raise StepFailed(
                f"set {self.name}: unexpected {type(err).__name__}: {err} (stack trace in opsfleet's error log)"
            ) from None

    # -- journal and state --------------------------------------------------------

    def journal_path(self, live: Path) -> Path:
        return self.journal_dir / (hashlib.sha256(str(live).encode()).hexdigest()[:20] + ".json")

    def journals(self) -> list[dict]:
        if not self.journal_dir.is_dir():
            return []
        entries = []
        for path in sorted(self.journal_dir.glob("*.json")):
            try:
                entry = logfiles.read_json(path)
                if entry is None and not path.exists():
                    continue  # gone since the listing
                problem = journal_problem(entry)
            except (ValueError, UnicodeDecodeError) as err:
                problem = str(err)
            if problem:
                # Written whole or not at all, so damage came from outside; what it recorded
                # (a rotation cut short) a person must check before it is dropped.
                raise LogFileError(
                    f"damaged rotation journal {path} ({problem}): it recorded a rotation cut short; "
                    "check the live file and its rotated files, then remove the journal, and rotate again"
                )
            entries.append(entry)
        return entries

    def record(self, entry: dict, phase: str) -> dict:
        entry = {**entry, "phase": phase}
        logfiles.write_json_atomic(self.journal_path(Path(entry["live"])), entry)
        _crash_point(phase)
        return entry

    def forget(self, entry: dict) -> None:
        logfiles.remove_durably(self.journal_path(Path(entry["live"])))

    def last_rotated(self) -> dict[str, str]:
        path = self.folder / "state.json"
        try:
            times = logfiles.read_json(path)
            times = {} if times is None else times
            if not (isinstance(times, dict) and all(isinstance(v, str) for v in times.values())):
                raise ValueError("not a map of times")
            for seen in times.values():
                if datetime.fromisoformat(seen).tzinfo is None:
                    raise ValueError(f"{seen!r} has no time zone")
        except (ValueError, UnicodeDecodeError) as err:
            # Only when each file was last rotated or first seen: starting afresh loses no line
            # (age triggers count from now), so say so and go on.
            self.out.append(f"  {path} was damaged ({err}): started afresh, age triggers count from now")
            return {}
        return times

    def set_last_rotated(self, times: dict[str, str]) -> None:
        logfiles.write_json_atomic(self.folder / "state.json", times)

    def journal_targets(self) -> set[str]:
        return {e["target"] for e in self.journals()}

    # -- telling the writer -------------------------------------------------------------

    def reopen(self) -> None:
        reopen = self.spec.reopen
        if reopen is None or reopen.watched:
            return
        sig = reopen.signal
        try:
            if reopen.pidfile is not None:
                pid = int(Path(reopen.pidfile).read_text().split()[0])
                os.kill(pid, signals.Signals[f"SIG{sig}"])
                self.out.append(f"sent SIG{sig} to pid {pid} ({reopen.pidfile})")
            elif reopen.service is not None:
                docker = self.ctx.runtime.docker
                container = docker.find_container(reopen.service, self.ctx.config.services[reopen.service])
                docker.kill(container, sig)
                self.out.append(f"sent SIG{sig} to container {container.name} (service {reopen.service})")
            elif reopen.command is not None:
                done = subprocess.run(
                    list(reopen.command),
                    capture_output=True,
                    text=True,
                    timeout=self.spec.reopen_timeout_seconds,
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
                self.out.append(f"ran {reopen.command[0]} to reopen")
        except (OSError, ValueError, IndexError, RuntimeError, DockerError, subprocess.TimeoutExpired) as err:
            self.problems.append(
                f"set {self.name}: could not tell the writer to reopen ({err}); it keeps writing to the rotated "
                "file (nothing lost), which stays uncompressed until it lets go"
            )

    # -- rename mode ---------------------------------------------------------------------

    def rename(self, entry: dict) -> dict:
        live, target = Path(entry["live"]), Path(entry["target"])
        if entry["phase"] == "planned":
            if not target.exists():
                os.rename(live, target)  # atomic: the writer's descriptor follows the inode
                logfiles.fsync_dir(live.parent)
            entry = self.record(entry, "renamed")
        logfiles.create_like(live, entry["file_mode"], entry["uid"], entry["gid"])
        return entry

    # -- copytruncate mode -----------------------------------------------------------------

    def _pause(self, live: Path) -> dict:
        """Who to pause while the tail is copied and the file truncated (also journalled)."""
        held = logfiles.holders([live])[live]
        unsafe = [h for h in held if not h.appends]
        if unsafe:
            raise StepFailed(
                f"{live}: process {unsafe[0].pid} holds it without O_APPEND; a truncate would make it write at its "
                "old offset (NUL bytes). Not truncated: use mode rename with reopen for this writer."
            )
        if self.spec.pause_service:
            docker = self.ctx.runtime.docker
            service = self.spec.pause_service
            container = docker.find_container(service, self.ctx.config.services[service])
            return {"container": container.id, "container_name": container.name}
        pids = sorted({h.pid for h in held if h.pid != os.getpid()})
        if not pids:
            # A writer that opens the file for each line is not seen holding it: nothing can be paused,
            # and a line it writes between the last copy and the truncate would be lost.
            self.out.append(
                f"  {live}: no process holds it, so nothing was paused; if its writer opens the file for each "
                f"line, set rotation.sets.{self.name}.pause_service to freeze its container during the truncate"
            )
        return {"pids": pids}

    def _freeze(self, paused: dict) -> None:
        if paused.get("container"):
            self.ctx.runtime.docker.pause(self.ctx.runtime.docker.get_container(paused["container"]))
        elif paused.get("pids"):
            logfiles.stop_processes(paused["pids"])

    def _thaw(self, paused: dict | None) -> None:
        if not paused:
            return
        if paused.get("container"):
            self.ctx.runtime.docker.unpause(paused["container"])
        if paused.get("pids"):
            logfiles.resume_processes(paused["pids"])

    def copytruncate(self, entry: dict) -> dict:
        live, target = Path(entry["live"]), Path(entry["target"])
        partial = target.with_name(target.name + ".partial")
        if entry["phase"] in ("planned", "paused"):
            # Nothing irreversible happened yet: resume a writer a crash left paused, start the copy over.
            self._thaw(entry.get("paused"))
            partial.unlink(missing_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, entry["file_mode"])
            try:
                bulk = logfiles.copy_range(live, fd, 0, os.stat(live).st_size)  # the writer still runs
                os.fsync(fd)  # the bulk reaches the disk now, not inside the pause
                try:
                    paused = self._pause(live)
                except (StepFailed, DockerError) as err:
                    partial.unlink(missing_ok=True)
                    self.forget(entry)
                    raise StepFailed(str(err)) from None
                entry = self.record({**entry, "paused": paused}, "paused")
                self._freeze(paused)
                began = time.monotonic()
                try:
                    size = os.stat(live).st_size
                    logfiles.copy_range(live, fd, bulk, size)
                    os.fsync(fd)
                    entry = self.record({**entry, "copied": size, "inode": os.stat(live).st_ino}, "copied")
                    os.rename(partial, target)
                    logfiles.fsync_dir(target.parent)
                    os.truncate(live, 0)
                    entry = self.record(entry, "truncated")
                finally:
                    self._thaw(paused)
                pause = time.monotonic() - began
            finally:
                os.close(fd)
            metrics.LOG_WRITER_PAUSE.labels(self.name).observe(pause)
            if paused.get("container_name"):
                who = f"container {paused['container_name']}"
            else:
                who = (
                    f"pids {', '.join(map(str, paused['pids']))}"
                    if paused.get("pids")
                    else "nothing to pause: no process held it"
                )
            self.out.append(
                f"  writer paused {pause * 1000:.1f} ms ({who}) for the last {size - bulk} B and the truncate"
            )
            return entry
        if entry["phase"] == "copied":
            # The copy [0, copied) is durable; the truncate may or may not have happened.
            if partial.exists() and not target.exists():
                os.rename(partial, target)
            # Resume whoever the crash left stopped, then pause the file's holders as found
            # now: after a while a recorded pid may belong to another process.
            self._thaw(entry.get("paused"))
            paused = self._pause(live) if live.exists() else {}
            entry = self.record({**entry, "paused": paused}, "copied")
            self._freeze(paused)
            try:
                if not live.exists():
                    self.out.append(f"  {live} is gone: the copy is complete as it stands")
                    return self.record(entry, "truncated")
                st = os.stat(live)
                # A crash leaves the writer stopped, so a live file at least `copied` long
                # was not truncated (only a writer resumed by hand could make this wrong).
                if st.st_ino == entry["inode"] and st.st_size >= entry["copied"]:
                    fd = os.open(target, os.O_WRONLY)
                    try:
                        logfiles.copy_range(live, fd, entry["copied"], st.st_size)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.truncate(live, 0)
                    self.out.append(f"  completed: copied {st.st_size - entry['copied']} more B, truncated")
                else:
                    self.out.append("  completed: the truncate had happened")
                entry = self.record(entry, "truncated")
            finally:
                self._thaw(paused)
            return entry
        self._thaw(entry.get("paused"))  # truncated: only the resume may be missing
        return entry

    # -- one file ---------------------------------------------------------------------------

    def plan(self, live: Path, reason: str) -> dict:
        st = os.stat(live)
        existing = [p.name for p in rotated_files(live, names_only=True)]
        target = live.parent / rotation.next_rotated_name(live.name, existing, _now())
        entry = {
            "live": str(live),
            "target": str(target),
            "mode": self.spec.mode,
            "reason": reason,
            "size": st.st_size,
            "file_mode": st.st_mode & 0o7777,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "began": _now().isoformat(),
        }
        return self.record(entry, "planned")

    def carry_out(self, entry: dict) -> dict:
        live, target = Path(entry["live"]), Path(entry["target"])
        if entry["phase"] == "planned" and not live.exists() and not target.exists():
            self.out.append(f"  {live} is gone: nothing to complete")
            return entry
        if entry["mode"] == "rename":
            return self.rename(entry)
        return self.copytruncate(entry)


def due_files(ls: LogSet, times: dict[str, str], now: datetime, force: bool) -> list[tuple[Path, str, int]]:
    """(live file, why, size) for each file due now; records first sightings in `times`."""
    due = []
    for live in live_files(ls.spec):
        size = os.stat(live).st_size
        seen = times.get(str(live))
        if seen is None:
            times[str(live)] = now.isoformat()  # age triggers count from when opsfleet first saw it
        reason = (
            "forced"
            if force and size > 0
            else rotation.rotation_due(
                size=size,
                last_rotated=datetime.fromisoformat(seen) if seen else None,
                now=now,
                max_size=ls.spec.max_size,
                every=timedelta(seconds=ls.spec.every) if ls.spec.every else None,
            )
        )
        if reason:
            due.append((live, reason, size))
    return due


def worth_a_run(runtime, target: str, params: dict) -> str | None:
    """The scheduler's gate: None when a rotation run has work (a file due, a
    half-done rotation, a file never seen), else why not, so a check every few
    minutes records a run (and a Slack thread) only when it will do something."""
    ctx = StepContext(runtime, {"id": None, "target": target, "params": params})
    for ls in _sets(ctx):
        if ls.journals():
            return None
        times = ls.last_rotated()
        before = len(times)
        if due_files(ls, times, _now(), bool(params.get("force"))) or len(times) != before:
            return None
        for live in live_files(ls.spec):
            files = rotated_files(live)
            held = {p for p, who in logfiles.holders(files).items() if who}
            verdicts = rotation.to_compress(
                live.name,
                [rotation.Rotated(p.name, _mtime(p), p in held) for p in files],
                method=ls.spec.compress,
                compress_newest=ls.spec.compress_newest,
            )
            if any(v.action == "compress" for v in verdicts):
                return None
    return "no log file due"


def log_sets(ctx: StepContext, specs: Iterable[tuple[str, LogSetSpec]]) -> list[LogSet]:
    """A step's sets, sharing one wait for held locks (a dry run, which changes nothing,
    waits DRY_RUN_LOCK_SECONDS: it says a held set is held rather than wait for it)."""
    wait = min(LOCK_TIMEOUT_SECONDS, DRY_RUN_LOCK_SECONDS) if ctx.params.get("dry_run") else LOCK_TIMEOUT_SECONDS
    deadline = time.monotonic() + wait
    return [LogSet(ctx, name, spec, deadline) for name, spec in specs]


def _sets(ctx: StepContext) -> list[LogSet]:
    return log_sets(ctx, selected_sets(ctx))


def _each_set(sets: list[LogSet], work: Callable[[LogSet], None]) -> dict[str, list[str]]:
    """`work` on each set under its lock. One set that fails does not keep the others from it:
    returns each failed set's problems (the error naming it, then what it put in ls.problems)."""
    problems = {}
    for ls in sets:
        try:
            with ls.lock():
                work(ls)
        except StepFailed as err:  # names its set (LogSet.lock)
            ls.problems.insert(0, str(err))
        if ls.problems:
            problems[ls.name] = ls.problems
    return problems


def rotate(ctx: StepContext) -> str:
    force = bool(ctx.params.get("force"))
    dry_run = bool(ctx.params.get("dry_run"))
    sets = _sets(ctx)
    problems = _each_set(sets, lambda ls: _rotate_set(ls, force, dry_run))
    out = [line for ls in sets for line in ls.out]
    _fail_if(problems, len(sets), out)
    return "\n".join(out) or "no log sets configured"


def _fail_if(problems: dict[str, list[str]], total: int, out: list[str]) -> None:
    """StepFailed whose first line (the run's reason) names every set that failed, then each
    problem, then what was done for all of them."""
    if problems:
        head = f"{len(problems)} of {total} log sets failed: {', '.join(problems)}"
        raise StepFailed("\n".join([head, *(p for found in problems.values() for p in found), "", *out]))


def _rotate_set(ls: LogSet, force: bool, dry_run: bool) -> None:
    """One set, under its lock: what it did goes to ls.out, what went wrong raises or goes to ls.problems."""
    ls.out.append(f"set {ls.name} ({ls.spec.mode}):")
    # 1. Half-finished rotations first: completed, never started over under a new name.
    pending = ls.journals()
    if pending and dry_run:
        ls.out.extend(f"  would complete the interrupted rotation of {e['live']} ({e['phase']})" for e in pending)
        pending = []
    for entry in pending:
        ls.out.append(f"  completing the interrupted rotation of {entry['live']} (journal: {entry['phase']})")
        entry = ls.carry_out(entry)
    if pending and ls.spec.mode == "rename":
        ls.reopen()
    for entry in pending:
        ls.forget(entry)
    # 2. Due files.
    times = ls.last_rotated()
    now = _now()
    due = due_files(ls, times, now, force)
    if dry_run:
        for live, reason, _ in due:
            existing = [p.name for p in rotated_files(live, names_only=True)]
            ls.out.append(f"  would rotate {live} ({reason}) → {rotation.next_rotated_name(live.name, existing, now)}")
        if not due:
            ls.out.append("  nothing due")
        return
    entries = []
    for live, reason, size in due:
        entry = ls.plan(live, reason)
        entries.append(ls.carry_out(entry))
        ls.out.append(f"  rotated {live} → {Path(entry['target']).name} ({reason})")  # once it is
        times[str(live)] = _now().isoformat()
        metrics.LOG_ROTATIONS.labels(ls.name, ls.spec.mode).inc()
        metrics.LOG_ROTATED_BYTES.labels(ls.name).inc(size)
    if entries and ls.spec.mode == "rename":
        ls.reopen()
        deadline = time.monotonic() + ls.spec.reopen_timeout_seconds
        for entry in entries:
            released, waited = logfiles.wait_released(Path(entry["target"]), max(0.0, deadline - time.monotonic()))
            ls.out.append(
                f"  writer let go of {Path(entry['target']).name} after {waited * 1000:.0f} ms"
                if released
                else f"  {Path(entry['target']).name} still open by its writer after {waited:.1f}s: "
                "compressed once it lets go"
            )
    for entry in entries:
        ls.forget(entry)
    ls.set_last_rotated(times)
    if not due and not pending:
        ls.out.append("  nothing due")


def compress(ctx: StepContext) -> str:
    dry_run = bool(ctx.params.get("dry_run"))
    sets = _sets(ctx)
    # As in rotate: a file or a set that fails does not keep the others uncompressed.
    problems = _each_set(sets, lambda ls: _compress_set(ls, dry_run))
    out = [line for ls in sets for line in ls.out]
    _fail_if(problems, len(sets), out)
    return "\n".join(out) or "nothing to compress"


def _compress_set(ls: LogSet, dry_run: bool) -> None:
    """One set, under its lock: what it did goes to ls.out, the files it could not compress to ls.problems."""
    out, problems = ls.out, ls.problems
    in_flight = ls.journal_targets()
    for live in live_files(ls.spec) or _lives_of_rotated(ls.spec):
        files = [p for p in rotated_files(live) if str(p) not in in_flight]
        plain = [p for p in files if not p.name.endswith((".zst", ".gz"))]
        held = {p for p, who in logfiles.holders(plain).items() if who}
        verdicts = rotation.to_compress(
            live.name,
            [rotation.Rotated(p.name, _mtime(p), p in held) for p in files],
            method=ls.spec.compress,
            compress_newest=ls.spec.compress_newest,
        )
        for v in verdicts:
            if v.action != "compress":
                out.append(f"{ls.name}: kept {v.name} uncompressed: {v.reason}")
                continue
            if dry_run:
                out.append(f"{ls.name}: would compress {v.name} ({v.reason})")
                continue
            try:
                final, size_in, size_out, lines = logfiles.compress(live.parent / v.name, ls.spec.compress)
            except (LogFileError, OSError) as err:
                problems.append(f"{ls.name}: compressing {v.name} failed: {err}")
                continue
            metrics.LOG_ROTATED_LINES.labels(ls.name).inc(lines)
            out.append(f"{ls.name}: compressed {v.name} → {final.name} ({size_in} → {size_out} B, {lines} lines)")


def retain(ctx: StepContext) -> str:
    return retain_sets(_sets(ctx), bool(ctx.params.get("dry_run")))


def retain_sets(sets: list[LogSet], dry_run: bool) -> str:
    """Retention of each set under its lock (also the cleanup job's old_logs step): a set that
    fails does not keep the others from theirs; then fails naming every set that failed."""
    done: list[tuple[int, int, list[str]]] = []  # (files, bytes, lines) of each set that was done
    problems = _each_set(sets, lambda ls: done.append(apply_retention(ls, dry_run)))
    out = [line for _, _, lines in done for line in lines]
    verb = "would remove" if dry_run else "removed"
    out.append(f"{verb} {sum(n for n, _, _ in done)} rotated files, {sum(b for _, b, _ in done)} B")
    _fail_if(problems, len(sets), out)
    return "\n".join(out)


def apply_retention(ls: LogSet, dry_run: bool) -> tuple[int, int, list[str]]:
    """Retention for one set (also called by the cleanup playbook). Caller holds the lock."""
    in_flight = ls.journal_targets()
    now = _now()
    out, removed, freed = [], 0, 0
    for live in live_files(ls.spec) or _lives_of_rotated(ls.spec):
        files = [p for p in rotated_files(live) if str(p) not in in_flight]
        held = {p for p, who in logfiles.holders(files).items() if who}
        max_age = timedelta(seconds=ls.spec.max_age) if ls.spec.max_age else None
        for v in rotation.retention(
            live.name,
            [rotation.Rotated(p.name, _mtime(p), p in held) for p in files],
            keep=ls.spec.keep,
            max_age=max_age,
            now=now,
        ):
            if v.action != "remove":
                continue
            path = live.parent / v.name
            size = path.stat().st_size
            if not dry_run:
                path.unlink(missing_ok=True)
                metrics.CLEANUP_REMOVED.labels("rotated_log").inc()
                metrics.CLEANUP_RECLAIMED_BYTES.labels("rotated_log").inc(size)
            removed, freed = removed + 1, freed + size
            out.append(f"{ls.name}: {'would remove' if dry_run else 'removed'} {v.name} ({size} B): {v.reason}")
        if not in_flight and not dry_run:
            for stale in live.parent.glob(glob.escape(live.name) + ".*.partial"):
                stale.unlink(missing_ok=True)  # a compression or copy a crash cut short; the original is intact
    return removed, freed, out


def _lives_of_rotated(spec: LogSetSpec) -> list[Path]:
    """Live files that are gone (a service removed) still have rotated files to compress and retire."""
    lives = set()
    for pattern in spec.paths:
        for name in glob.glob(pattern + ".*"):
            m = _ROTATED_TAIL.search(name)
            if m:
                lives.add(Path(name[: m.start()]))
    return sorted(lives)


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


# Scheduled triggers ask these first (worker.tasks.schedule); see worth_a_run.
GATES = {"rotate_logs": worth_a_run}

PLAYBOOKS = {
    "rotate_logs": (
        # A set that fails one step fails it, but the other sets still get the next ones.
        Step("rotate", rotate, carry_on=True),
        Step("compress", compress, carry_on=True),
        Step("retain", retain, carry_on=True),
    ),
}

__all__ = [
    "PLAYBOOKS",
    "LogSet",
    "apply_retention",
    "live_files",
    "log_sets",
    "retain_sets",
    "rotated_files",
    "state_dir",
]
