"""The backup playbook: one run backs up every due series into one set.

    prepare → dump → verify → commit → retention

- `prepare` picks the due series (the run's `params.series`, else by cadence
  at the scheduled local time), takes each series' lock (ledger, with TTL; a
  series another run holds is skipped and counted; all held → the run is
  `skipped`), checks free space against the previous size, and creates
  `<root>/<UTC stamp>.partial/` with a manifest in state `partial`.
- `dump` writes each series: pg_dump (custom format, uncompressed) streamed
  through zstd into the file while a pg_restore reads the same bytes to
  /dev/null (a full read as it streams); GNU tar streamed through zstd.
  The writer decompresses what it writes, as it writes it, to the end of the
  zstd frame and its checksum (archive.CompressedWriter).
- `verify` reads every file back for its sha256: the hash of the bytes that
  were decompressed as they were written, so the same hash is the same checked
  bytes (`backup verify` and the drill decompress from disk again).
- `commit` fsyncs, marks the manifest complete and renames the directory.
- `retention` forgets, per series backed up in this run, what
  worker.retention says; it never runs after a failed step (the chain stops).

Any failure removes the partial set and releases the locks: older sets are
never touched. Steps find the partial set by the run id in its manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import zstandard

from worker.adapters import metrics
from worker.adapters.archive import (
    SUFFIX,
    ArchiveError,
    CompressedWriter,
    Watchdog,
    free_bytes,
    fsync_dir,
    fsync_tree,
    iter_decompressed,
    run,
    stream_into,
    tail,
    tar_create_argv,
    tar_problems,
    wait_all,
)
from worker.adapters.backupstore import (
    FORMAT,
    PARTIAL,
    BackupSet,
    forget_item,
    iso,
    list_sets,
    newest_holding,
    parse_iso,
    partial_sets,
    read_manifest,
    retention_inputs,
    set_id_for,
    write_manifest,
)
from worker.adapters.ledger import utcnow
from worker.adapters.postgres import Postgres, PostgresError, tables_to_split, verify_process
from worker.config import Config, SeriesSpec
from worker.retention import Policy, decide_all
from worker.tasks.steps import Step, StepContext, StepFailed, StepSkipped

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# -- what is due -----------------------------------------------------------------------


def due_series(config: Config, moment: datetime, requested: list[str] | None = None) -> list[str]:
    """Series due at `moment` (local to backup.timezone), or those requested
    (by series name or by kind)."""
    series = config.backup.series
    if requested:
        chosen = [n for n in series if n in requested or series[n].kind in requested]
        unknown = [r for r in requested if r not in series and r not in {s.kind for s in series.values()}]
        if unknown:
            raise StepFailed(
                f"no backup series or kind named {', '.join(unknown)} (backup.series: {', '.join(series) or 'none'})"
            )
        return chosen
    local = moment.astimezone(ZoneInfo(config.backup.timezone))
    sched = config.backup.schedule
    due = []
    for name, spec in series.items():
        if spec.cadence == "daily":
            due.append(name)
        elif spec.cadence == "weekly" and WEEKDAYS[local.weekday()] == sched.weekly_on:
            due.append(name)
        elif spec.cadence == "monthly" and local.day == sched.monthly_on:
            due.append(name)
    return due


def policy_for(config: Config, series: str) -> Policy:
    spec = config.backup.series.get(series)
    r = (spec.retention if spec and spec.retention else None) or config.backup.retention
    return Policy(r.daily, r.weekly, r.monthly, r.min_count, config.backup.timezone)


def policies(config: Config) -> dict[str, Policy]:
    return {name: policy_for(config, name) for name in config.backup.series}


def lock_name(series: str) -> str:
    return f"backup:{series}"


def holder(run: dict) -> str:
    return f"run:{run['id']}"


# -- helpers -----------------------------------------------------------------------------


def backup_root(ctx: StepContext) -> Path:
    return ctx.runtime.loaded.backup_root


def partial_of_run(ctx: StepContext) -> tuple[Path, dict[str, Any]]:
    for path, manifest in partial_sets(backup_root(ctx)):
        if manifest and manifest.get("run_id") == ctx.run["id"]:
            return path, manifest
    raise StepFailed(f"the partial backup set of run {ctx.run['id']} is gone from {backup_root(ctx)}")


def _release(ctx: StepContext, manifest: dict[str, Any] | None) -> None:
    """The run's series locks: the manifest's series and every configured one (a manifest
    that cannot be read must not keep them until their TTL; release_lock matches the holder)."""
    for series in set(ctx.config.backup.series) | set((manifest or {}).get("series", [])):
        ctx.runtime.ledger.release_lock(lock_name(series), holder(ctx.run))


@contextmanager
def abandon_set_on_failure(ctx: StepContext, step: str):
    """A failing step removes the partial set and releases the locks; older sets stay."""
    path = manifest = None
    try:
        yield
    except BaseException as err:
        try:
            path, manifest = partial_of_run(ctx)
            shutil.rmtree(path, ignore_errors=True)
        except StepFailed:
            pass
        _release(ctx, manifest)
        metrics.BACKUP_FAILURES.labels(step).inc()
        if isinstance(err, StepFailed):
            raise
        if isinstance(err, ArchiveError | PostgresError):
            raise StepFailed(f"{err}; the partial set was removed, older backups are untouched") from None
        if isinstance(err, OSError):
            where = getattr(err, "filename", None) or path or backup_root(ctx)
            raise StepFailed(
                f"{err.strerror or err} ({where}); the partial set was removed, older backups are untouched"
            ) from None
        raise


def _host_facts(ctx: StepContext, root: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(root)
    facts: dict[str, Any] = {
        "hostname": ctx.config.fleet.hostname or socket.gethostname(),
        "disk": {"path": str(root), "total_bytes": usage.total, "free_bytes": usage.free},
    }
    try:
        facts["docker"] = ctx.runtime.docker.version()
    except Exception as err:  # Docker is optional for a backup
        facts["docker"] = {"error": str(err)[:200]}
    return facts


def _tool_versions() -> dict[str, str]:
    return {
        "pg_dump": Postgres.tool_version("pg_dump"),
        "pg_restore": Postgres.tool_version("pg_restore"),
        "tar": run(["tar", "--version"], timeout=10).splitlines()[0] if shutil.which("tar") else "missing",
        "zstandard": f"python-zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION})"
        if hasattr(zstandard, "ZSTD_VERSION")
        else f"python-zstandard {zstandard.__version__}",
    }


# -- steps -------------------------------------------------------------------------------------


def prepare(ctx: StepContext) -> str:
    config = ctx.config
    root = backup_root(ctx)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ledger = ctx.runtime.ledger
    # Partial sets of runs that are no longer running (a worker died): remove.
    removed = []
    for path, manifest in partial_sets(root):
        if manifest is None and time.time() - path.stat().st_mtime < 600:
            continue  # being created by another run right now (mkdir, then its manifest)
        other = ledger.get_run(manifest["run_id"]) if manifest and "run_id" in manifest else None
        if other is None or (other["status"] != "running" and other["id"] != ctx.run["id"]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            if manifest:
                for series in manifest.get("series", []):
                    ledger.release_lock(lock_name(series), f"run:{manifest['run_id']}")

    moment = ctx.run.get("created_at") or utcnow()
    due = due_series(config, moment, ctx.params.get("series"))
    if not due:
        raise StepSkipped(f"no backup series due at {moment:%Y-%m-%d %H:%M} UTC")

    taken, skipped = [], {}
    for series in due:
        if ledger.acquire_lock(lock_name(series), holder(ctx.run), config.backup.lock_ttl_seconds):
            taken.append(series)
        else:
            other = ledger.get_lock(lock_name(series))
            skipped[series] = f"another run holds its lock ({other['holder'] if other else '?'})"
            metrics.BACKUP_SKIPPED.labels(series).inc()
    if not taken:
        raise StepSkipped("overlap: " + "; ".join(f"{s}: {why}" for s, why in skipped.items()))

    try:
        previous = list_sets(root)
        need = config.backup.min_free_bytes
        for series in taken:
            last = next((s for s in previous if series in s.items), None)
            if last is not None:
                need += int(last.size(series) * config.backup.free_space_factor)
        free = free_bytes(root)
        if free < need:
            raise StepFailed(
                f"not enough free space in {root}: {free / 1e6:.1f} MB free, {need / 1e6:.1f} MB needed "
                f"(previous sizes × backup.free_space_factor + backup.min_free_bytes)"
            )
        started = ctx.run.get("started_at") or utcnow()
        set_id = set_id_for(started)
        if (root / set_id).exists() or (root / (set_id + PARTIAL)).exists():
            set_id = f"{set_id}-{ctx.run['id']}"
        folder = root / (set_id + PARTIAL)
        folder.mkdir(mode=0o700)
        manifest = {
            "format": FORMAT,
            "id": set_id,
            "run_id": ctx.run["id"],
            "state": "partial",
            "taken_at": iso(started),
            "timezone": config.backup.timezone,
            "compression": config.backup.compression,
            "series": taken,
            "skipped": skipped,
            "items": {},
            "host": _host_facts(ctx, root),
            "tools": _tool_versions(),
        }
        write_manifest(folder, manifest)
    except BaseException:
        for series in taken:
            ledger.release_lock(lock_name(series), holder(ctx.run))
        raise
    lines = [f"set {set_id}: {', '.join(taken)}; {free / 1e6:.0f} MB free (needed {need / 1e6:.1f} MB)"]
    lines += [f"skipped {s}: {why}" for s, why in skipped.items()]
    lines += [f"removed stale partial set {name}" for name in removed]
    return "\n".join(lines)


def dump(ctx: StepContext) -> str:
    with abandon_set_on_failure(ctx, "dump"):
        folder, manifest = partial_of_run(ctx)
        lines = []
        for series in manifest["series"]:
            spec = ctx.config.backup.series.get(series)
            if spec is None:
                raise StepFailed(f"backup series {series} is no longer configured")
            began = time.monotonic()
            item = {"series": series, "kind": spec.kind, "taken_at": iso(utcnow()), "problems": []}
            item.update(_DUMPERS[spec.kind](ctx, series, spec, folder))
            item["finished_at"] = iso(utcnow())
            item["seconds"] = round(time.monotonic() - began, 3)
            metrics.BACKUP_DURATION.labels(spec.kind).observe(item["seconds"])
            manifest["items"][series] = item
            write_manifest(folder, manifest)
            size = sum(f["size"] for f in item["files"])
            lines.append(
                f"{series} ({spec.kind}): {size / 1e6:.2f} MB in {item['seconds']:.1f}s"
                + (f", {len(item['problems'])} problems reported" if item["problems"] else "")
            )
        return "\n".join(lines)


def verify(ctx: StepContext) -> str:
    with abandon_set_on_failure(ctx, "verify"):
        folder, manifest = partial_of_run(ctx)
        lines = []
        for series, item in manifest["items"].items():
            result = verify_item(folder, item, manifest["compression"], deep=False)
            metrics.BACKUP_VERIFICATIONS.labels(item["kind"], "ok" if result.ok else "failed").inc()
            if not result.ok:
                raise StepFailed(f"verification of {series} failed: {result.detail}")
            item["verified"] = True
            item["verification"] = {"at": iso(utcnow()), "detail": result.detail}
            lines.append(f"{series}: {result.detail}")
        manifest["verification"] = {"ok": True, "at": iso(utcnow())}
        write_manifest(folder, manifest)
        return "\n".join(lines)


def commit(ctx: StepContext) -> str:
    with abandon_set_on_failure(ctx, "commit"):
        folder, manifest = partial_of_run(ctx)
        if not manifest.get("verification", {}).get("ok"):
            raise StepFailed("refusing to commit a set that was not verified")
        manifest["state"] = "complete"
        manifest["finished_at"] = iso(utcnow())
        write_manifest(folder, manifest)
        fsync_tree(folder)
        final = folder.with_name(manifest["id"])
        os.rename(folder, final)
        fsync_dir(final.parent)
    _release(ctx, manifest)
    now = time.time()
    total = 0
    for series, item in manifest["items"].items():
        size = sum(f["size"] for f in item["files"])
        total += size
        _export_series(item["kind"], series, now, size, ctx.config.backup.series.get(series))
    return f"committed {final} ({total / 1e6:.2f} MB, {len(manifest['items'])} series)"


def _export_series(kind: str, series: str, finished: float, size: int, spec: SeriesSpec | None) -> None:
    """A series' last success and size, and the age the OpsfleetBackupTooOld alert allows it."""
    metrics.BACKUP_LAST_SUCCESS.labels(kind, series).set(finished)
    metrics.BACKUP_SIZE.labels(kind, series).set(size)
    if spec is not None:
        metrics.BACKUP_MAX_AGE.labels(kind, series).set(MAX_AGE_HOURS[spec.cadence] * 3600)


def export_backup_state(loaded) -> None:
    """Each series' newest verified backup (time, size, allowed age) into the backup gauges,
    read from the sets on disk: what a restart of the metrics folder (opsfleet run, a new
    container) forgot, so OpsfleetBackupTooOld judges the real age, not an absent series."""
    root = loaded.backup_root
    if not root.is_dir():
        return
    sets = list_sets(root)
    for series, spec in loaded.config.backup.series.items():
        newest = newest_holding(sets, series, verified_only=True)
        if newest is None:
            continue
        finished = parse_iso(newest.manifest.get("finished_at") or newest.manifest["taken_at"])
        _export_series(spec.kind, series, finished.timestamp(), newest.size(series), spec)


def retention(ctx: StepContext) -> str:
    """Forget what the retention decision says, for the series this run backed up."""
    root = backup_root(ctx)
    mine = None
    for s in list_sets(root):
        if s.manifest.get("run_id") == ctx.run["id"]:
            mine = s
            break
    if mine is None:
        return "no committed set of this run; nothing pruned"
    return "\n".join(prune(ctx.config, root, series=list(mine.items), dry_run=False)) or "nothing to prune"


def prune(
    config: Config, root: Path, series: list[str] | None = None, dry_run: bool = True, now: datetime | None = None
) -> list[str]:
    """Apply retention to the sets in `root` (only `series` when given). With
    dry_run, only say what would go and why each stays."""
    now = now or utcnow()
    sets = list_sets(root)
    by_id = {s.id: s for s in sets}
    backups = [b for b in retention_inputs(sets) if series is None or b.series in series]
    decisions = decide_all(backups, policies(config), policy_for(config, ""), now)
    lines, freed, forgotten = [], 0, 0
    for d in decisions:
        lines.append(("would " if dry_run and not d.keep else "") + d.describe(config.backup.timezone))
        if not d.keep:
            forgotten += 1
            freed += by_id[d.backup.set_id].size(d.backup.series)
            if not dry_run:
                forget_item(by_id[d.backup.set_id], d.backup.series, "; ".join(d.reasons), now)
                metrics.BACKUP_PRUNED.labels(d.backup.series).inc()
    if forgotten:
        verb = "would free" if dry_run else "freed"
        lines.append(
            f"{forgotten} backup items {'would go' if dry_run else 'gone'}: {verb} {freed} B ({freed / 2**20:.1f} MiB)"
        )
    return lines


# -- dumpers, one per kind --------------------------------------------------------------------


def _suffix(ctx: StepContext) -> str:
    return SUFFIX[ctx.config.backup.compression]


def _writer(ctx: StepContext, path: Path) -> CompressedWriter:
    b = ctx.config.backup
    return CompressedWriter(path, b.compression, b.zstd_level, b.threads)


def _written(name: str, size: int, sha: str, writer: CompressedWriter, fmt: str) -> dict[str, Any]:
    """A file's manifest entry once its writer closed: the writer decompressed it to the
    end as it was written, so the verify step needs only its sha256 (verify_item)."""
    return {
        "name": name, "size": size, "sha256": sha, "format": fmt, "uncompressed_bytes": writer.uncompressed,
        "checked_while_written": True,
    }  # fmt: skip


def _kill(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_into(path, digest)
    return digest.hexdigest()


def _roles(pg: Postgres, series: str, folder: Path) -> tuple[list[dict], list[str]]:
    try:
        roles = pg.dump_roles()
    except ArchiveError as err:
        return [], [f"roles not captured (pg_dumpall --roles-only): {err}"]
    name = f"{series}.roles.sql"
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(roles)
    return [{"name": name, "size": len(roles), "sha256": hashlib.sha256(roles).hexdigest(), "format": "sql"}], []


def dump_database_directory(
    ctx: StepContext, series: str, spec: SeriesSpec, folder: Path, pg: Postgres
) -> dict[str, Any]:
    """pg_dump -Fd -j: parallel dump, one gzip file per table; then pg_restore reads
    the whole directory to /dev/null (the full read; it cannot stream here)."""
    out = folder / f"{series}.dir"
    with pg.snapshot() as snap:
        argv = [
            "pg_dump", "--format=directory", f"--jobs={spec.jobs}", f"--compress={spec.directory_compress}",
            f"--snapshot={snap.id}", "--no-password", f"--file={out}",
        ]  # fmt: skip
        run(argv, timeout=spec.timeout_seconds, env=pg.env())
    run(["pg_restore", "--file=/dev/null", str(out)], timeout=spec.timeout_seconds)
    out.chmod(0o700)
    files = []
    for path in sorted(out.iterdir()):
        path.chmod(0o600)
        files.append({"name": f"{out.name}/{path.name}", "size": path.stat().st_size, "sha256": _sha256(path)})
    roles, problems = _roles(pg, series, folder)
    return {
        "source": pg.where(),
        "format": "directory",
        "server_version": snap.server_version,
        "row_counts": snap.row_counts,
        "files": files + roles,
        "problems": problems,
        "full_read": "pg_restore read the whole directory to /dev/null after the dump",
    }


def postgres_for(ctx: StepContext, spec: SeriesSpec):
    """The series' database: over a connection, or through `docker exec` into its service."""
    if not spec.service:
        return Postgres(spec.database_url, spec.timeout_seconds)
    from worker.adapters.docker import DockerError
    from worker.adapters.postgres import ContainerPostgres

    try:
        container = ctx.runtime.docker.find_container(spec.service, ctx.config.services[spec.service])
    except DockerError as err:
        raise StepFailed(str(err)) from None
    return ContainerPostgres(
        ctx.runtime.docker, container, spec.database_url, spec.bin_dir, spec.exec_user, spec.timeout_seconds
    )


def dump_database(ctx: StepContext, series: str, spec: SeriesSpec, folder: Path) -> dict[str, Any]:
    pg = postgres_for(ctx, spec)
    if spec.format == "directory":
        if spec.service:
            raise StepFailed(f"backup.series.{series}.format: directory is not available with service (docker exec)")
        return dump_database_directory(ctx, series, spec, folder, pg)
    with pg.snapshot() as snap:
        # The largest tables each in a dump of their own, the rest (and the schema) in the main one.
        apart = tables_to_split(snap.tables, spec.table_file_min_bytes)
        parts = [(f"{series}.dump{_suffix(ctx)}", None, [f"--exclude-table-data={t.pattern}" for t in apart])]
        parts += [
            (f"{series}.table-{n:02d}.dump{_suffix(ctx)}", t, ["--data-only", f"--table={t.pattern}"])
            for n, t in enumerate(apart, 1)
        ]
        files = [_dump_part(ctx, pg, snap.id, spec, folder, *part) for part in parts]
    roles, problems = _roles(pg, series, folder)
    extra = {"pg_dump": pg.tool_version("pg_dump")} if spec.service else {}
    return {
        **extra,
        "source": pg.where(),
        "format": "custom",
        "server_version": snap.server_version,
        "row_counts": snap.row_counts,
        **({"table_bytes": snap.table_bytes} if snap.tables else {}),
        "files": files + roles,
        "problems": problems,
        "streaming_check": "pg_restore read each dump whole to /dev/null as it streamed",
    }


def _dump_part(
    ctx: StepContext, pg, snapshot: str, spec: SeriesSpec, folder: Path, name: str, table, select: list[str]
) -> dict[str, Any]:
    """One pg_dump in the set's snapshot (`select`: what it dumps) -> zstd -> file, while
    a pg_restore reads the same stream to /dev/null. Parts are dumped one after another:
    side by side, two of these pipelines took 1.6x as long on two cores as in turn."""
    errors, check_errors = folder / f".{name}.pg_dump.log", folder / f".{name}.pg_restore.log"
    dumper = checker = None
    writer = _writer(ctx, folder / name)
    try:
        dumper = pg.dump_process(snapshot, errors, select)
        checker = verify_process(check_errors)
        with Watchdog(spec.timeout_seconds, dumper, checker) as dog:
            problem = stream_into(dumper, writer, checker, dog)
            wait_all(dumper, checker, timeout=spec.timeout_seconds)
        if dumper.returncode != 0:
            raise ArchiveError(f"pg_dump of {pg.where()} exited {dumper.returncode}: {tail(errors.read_bytes())}")
        size, sha = writer.close()
    except BaseException:
        _kill(dumper, checker)
        writer.abort()
        raise
    if checker.returncode != 0 or problem:
        raise ArchiveError(
            f"{name}: the streaming full read (pg_restore to /dev/null) failed: {problem or tail(check_errors.read_bytes())}"
        )
    errors.unlink(missing_ok=True)
    check_errors.unlink(missing_ok=True)
    entry = _written(name, size, sha, writer, f"pg_dump custom, {ctx.config.backup.compression}")
    return {**entry, "table": table.key} if table is not None else entry


def _tar_item(
    ctx: StepContext, series: str, spec: SeriesSpec, folder: Path, base: Path, members: list[str]
) -> dict[str, Any]:
    name = f"{series}.tar{_suffix(ctx)}"
    index = folder / f".{series}.index"
    errors = folder / f".{series}.tar.log"
    tar = None
    writer = _writer(ctx, folder / name)
    try:
        with open(errors, "wb") as err:
            tar = subprocess.Popen(tar_create_argv(base, members, index), stdout=subprocess.PIPE, stderr=err)
        # No second reader of tar's stream: GNU tar wrote it itself. The writer decompresses
        # what it writes as it goes (the verify step then re-reads the file for its sha256),
        # and `backup verify` also lists the archive.
        with Watchdog(spec.timeout_seconds, tar) as dog:
            stream_into(tar, writer, None, dog)
            wait_all(tar, timeout=spec.timeout_seconds)
        reported, fatal = tar_problems(errors.read_text(errors="replace"))
        if tar.returncode not in (0, 1) or (tar.returncode == 1 and fatal):
            raise ArchiveError(
                f"tar of {base / members[0] if len(members) == 1 else base} failed ({tar.returncode}): {'; '.join(fatal[-5:]) or tail(errors.read_bytes())}"
            )
        size, sha = writer.close()
    except BaseException:
        _kill(tar)
        writer.abort()
        raise
    entries = [line for line in index.read_text(errors="replace").splitlines() if line]
    for path in (index, errors):
        path.unlink(missing_ok=True)
    return {
        "source": str(base / members[0]) if len(members) == 1 else [str(base / m) for m in members],
        "file_count": sum(1 for e in entries if not e.endswith("/")),
        "entry_count": len(entries),
        "files": [_written(name, size, sha, writer, f"tar, {ctx.config.backup.compression}")],
        # Files that vanished or changed while archived: reported, not fatal.
        "problems": reported,
    }


def dump_tree(ctx: StepContext, series: str, spec: SeriesSpec, folder: Path) -> dict[str, Any]:
    path = _abs(ctx, spec.path)
    if not path.is_dir():
        raise StepFailed(f"backup.series.{series}.path: {path} is not a directory")
    return _tar_item(ctx, series, spec, folder, path.parent, [path.name])


def dump_config(ctx: StepContext, series: str, spec: SeriesSpec, folder: Path) -> dict[str, Any]:
    paths = [_abs(ctx, p) for p in spec.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise StepFailed(f"backup.series.{series}.paths: missing {', '.join(missing)}")
    item = _tar_item(ctx, series, spec, folder, Path("/"), [str(p.relative_to("/")) for p in paths])
    item["secret_files"] = list(spec.secret_files)
    return item


def dump_inventory(ctx: StepContext, series: str, spec: SeriesSpec, folder: Path) -> dict[str, Any]:
    facts = ctx.runtime.docker.inventory()
    data = json.dumps(facts, indent=2, sort_keys=True).encode()
    name = f"{series}.json{_suffix(ctx)}"
    writer = _writer(ctx, folder / name)
    try:
        writer.write(data)
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {
        "source": "docker",
        "file_count": len(facts.get("images", [])) + len(facts.get("containers", [])),
        "files": [_written(name, size, sha, writer, "json")],
    }


_DUMPERS = {
    "database": dump_database,
    "documents": dump_tree,
    "models": dump_tree,
    "config": dump_config,
    "inventory": dump_inventory,
}


def _abs(ctx: StepContext, path: Path) -> Path:
    return path if path.is_absolute() else (ctx.runtime.loaded.base_dir / path).resolve()


def is_secret(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(Path(name).name, p) for p in patterns)


# -- verification (also used by `opsfleet backup verify` and the drill) --------------------------


class Verification:
    def __init__(self, ok: bool, detail: str):
        self.ok, self.detail = ok, detail


def verify_item(
    folder: Path,
    item: dict[str, Any],
    compression: str,
    deep: bool = True,
    timeout: float = 3000,
    sha_only: bool = False,
    trust_written: bool = True,
) -> Verification:
    """Read every file to its end: sha256 against the manifest and decompression to
    the end (truncation fails). deep: also pg_restore the whole dump to /dev/null
    (or tar --list the archive and compare its entry count). sha_only: the hash only.
    trust_written: a file its writer decompressed to the end as it wrote it
    (`checked_while_written`) is checked by its sha256 alone, unless deep."""

    details = []
    if item.get("format") == "directory":
        for f in item.get("files", []):
            path = folder / f["name"]
            if not path.exists():
                return Verification(False, f"{f['name']} is missing")
            if _sha256(path) != f["sha256"]:
                return Verification(False, f"{f['name']}: sha256 differs from the manifest's: the file is damaged")
        detail = f"{len(item['files'])} files sha256 OK"
        if deep:
            dump_dir = next(folder / f["name"].split("/")[0] for f in item["files"] if "/" in f["name"])
            try:
                run(["pg_restore", "--file=/dev/null", str(dump_dir)], timeout=timeout)
            except ArchiveError as err:
                return Verification(False, f"{dump_dir.name}: {err}")
            detail += ", pg_restore full read OK"
        return Verification(True, detail)
    for f in item.get("files", []):
        path = folder / f["name"]
        if not path.exists():
            return Verification(False, f"{f['name']} is missing")
        digest = hashlib.sha256()
        compressed = f["name"].endswith((".zst", ".gz"))
        kind = item["kind"]
        if deep and compressed and not sha_only:
            # First, so damage is called what it is, not whatever the tools make of it; the
            # full read below then need not hash again.
            _hash_into(path, digest)
            if digest.hexdigest() != f["sha256"]:
                return Verification(False, f"{f['name']}: sha256 differs from the manifest's: the file is damaged")
        try:
            # Decompressed to its end as it was written, by the writer that hashed it (see
            # CompressedWriter): the same sha256 on disk is the same checked bytes.
            checked_before = trust_written and not deep and f.get("checked_while_written", False)
            if not compressed or sha_only or checked_before:
                _hash_into(path, digest)
            elif deep and kind == "database":
                _feed(path, compression, ["pg_restore", "--file=/dev/null"], timeout)
            elif deep and "file_count" in item and ".tar" in f["name"]:
                listing = _feed(path, compression, ["tar", "--list", "--file=-"], timeout)
                entries = len([line for line in listing.splitlines() if line])
                if entries != item.get("entry_count", entries):
                    return Verification(
                        False, f"{f['name']}: {entries} entries, the manifest says {item['entry_count']}"
                    )
            else:
                # sha256 of the file and its decompression in parallel (both release the GIL).
                hashed = threading.Thread(target=_hash_into, args=(path, digest))
                hashed.start()
                try:
                    for _ in iter_decompressed(path, compression):
                        pass
                finally:
                    hashed.join()
        except ArchiveError as err:
            return Verification(False, str(err))
        if digest.hexdigest() != f["sha256"]:
            return Verification(
                False,
                f"{f['name']}: sha256 {digest.hexdigest()[:12]}… differs from the manifest's {f['sha256'][:12]}…: "
                "the file is damaged",
            )
        if not compressed or sha_only:
            details.append(f"{f['name']} sha256 OK")
        elif checked_before:
            details.append(f"{f['name']} sha256 OK, decompressed to the end as it was written")
        else:
            details.append(f"{f['name']} sha256 OK, full read OK")
    return Verification(True, "; ".join(details))


def _hash_into(path: Path, digest) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)


def _feed(path: Path, compression: str, argv: list[str], timeout: float) -> str:
    """Decompress `path` into a tool's stdin; return its stdout; ArchiveError when it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err)
        with Watchdog(timeout, proc) as dog:
            try:
                for chunk in iter_decompressed(path, compression):
                    proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            except BaseException:
                _kill(proc)
                raise
            proc.wait(timeout=timeout)
        if dog.fired:
            raise ArchiveError(f"{argv[0]} on {path.name} timed out after {timeout:.0f}s")
        if proc.returncode != 0:
            err.seek(0)
            raise ArchiveError(f"{path.name}: {argv[0]} failed ({proc.returncode}): {tail(err.read())}")
        out.seek(0)
        return out.read().decode(errors="replace")


def verify_set(backup_set: BackupSet, deep: bool = True) -> dict[str, Verification]:
    return {
        series: verify_item(backup_set.path, item, backup_set.manifest.get("compression", "zstd"), deep=deep)
        for series, item in backup_set.items.items()
    }


# -- daily summary (its output is the run's Slack reply) ------------------------------------------

MAX_AGE_HOURS = {"daily": 26, "weekly": 8 * 24, "monthly": 32 * 24}


def summarize(config: Config, sets: list[BackupSet], runs: list[dict], now: datetime) -> tuple[bool, str]:
    """(all fresh, text): per series the newest verified backup, its age against its
    cadence, size; the last day's backup and drill runs by status."""
    tz = ZoneInfo(config.backup.timezone)
    lines, fresh = [], True
    for name, spec in sorted(config.backup.series.items()):
        newest = next((s for s in sets if name in s.items and s.verified(name)), None)
        if newest is None:
            fresh = False
            lines.append(f"{name} ({spec.kind}): NO verified backup")
            continue
        taken = newest.item_taken_at(name)
        hours = (now - taken).total_seconds() / 3600
        stale = hours > MAX_AGE_HOURS[spec.cadence]
        fresh = fresh and not stale
        lines.append(
            f"{name} ({spec.kind}, {spec.cadence}): {'STALE ' if stale else ''}newest {newest.id} "
            f"({taken.astimezone(tz):%Y-%m-%d %H:%M %Z}, {hours:.0f} h ago), {newest.size(name) / 1e6:.1f} MB"
        )
    by_status: dict[str, int] = {}
    for r in runs:
        key = f"{r['playbook']} {r['status']}"
        by_status[key] = by_status.get(key, 0) + 1
    if by_status:
        lines.append("last 24 h: " + ", ".join(f"{n} × {k}" for k, n in sorted(by_status.items())))
    return fresh, "\n".join(lines) or "no backup series configured"


def summary(ctx: StepContext) -> str:
    from datetime import timedelta

    now = utcnow()
    recent = [
        r for r in ctx.runtime.ledger.list_runs(limit=500)
        if r["playbook"] in ("backup_set", "restore_drill", "restore", "recover") and r["created_at"] > now - timedelta(hours=24)
    ]  # fmt: skip
    fresh, text = summarize(ctx.config, list_sets(backup_root(ctx)), recent, now)
    if not fresh:
        raise StepFailed("backups are missing or stale:\n" + text)
    return text


def _step_timeout(config: Config) -> int:
    return config.backup.step_timeout_seconds


PLAYBOOKS = {
    "backup_set": (
        Step("prepare", prepare),
        Step("dump", dump, timeout=_step_timeout),
        Step("verify", verify, timeout=_step_timeout),
        Step("commit", commit),
        Step("retention", retention),
    ),
    "backup_summary": (Step("summary", summary),),
}

__all__ = ["PLAYBOOKS", "due_series", "prune", "verify_item", "verify_set", "read_manifest", "is_secret"]
