"""Restores, the weekly restore drill, and full recovery.

`restore` (params: `plan` {series: set id}, `target_db`, `swap`):
    check → database → files → cleanup
- check: every planned file is read back whole (sha256, decompression).
- database: into a FRESH database (`<live>_restore_<run>` or `target_db`),
  pg_restore in parallel, row counts compared with the manifest's; only then,
  when swapping, the services that use it (`stop_services`) are stopped, the
  live database is renamed to `<live>_before_<run>` (kept) and the restored
  one renamed into place, and the services started again.
- files: documents/models trees are extracted beside their target, their
  file counts checked, the current tree moved aside to
  `<path>.before-restore-<run>`, the restored one renamed into place. Config
  files likewise, one by one; secret files (`.env`) come back mode 0600.

`restore_drill`: restores each series' newest verified backup into a scratch
database (roles first when a throwaway server is configured) and a scratch directory,
compares row counts, file counts and checksums with the manifest, records
the time taken (`opsfleet_restore_drill_seconds`), removes the scratch.

`recover`: the seed's full recovery: stop the configured services in
order, restore (as `restore`, swapping), start them in reverse order, pass
the health gate (running, Docker health, health_url 2xx).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from worker.adapters import metrics
from worker.adapters.archive import (
    ArchiveError,
    Unpacking,
    Watchdog,
    decompressing_feeder,
    free_bytes,
    iter_decompressed,
    tail,
)
from worker.adapters.backupstore import BackupSet, get_set, list_sets, mark_unverified, newest_holding
from worker.adapters.docker import DockerError
from worker.adapters.ledger import utcnow
from worker.adapters.postgres import Postgres, PostgresError, TableData, check_db_name
from worker.config import SeriesSpec
from worker.tasks.backup import backup_root, is_secret, postgres_for, verify_item
from worker.tasks.gate import pass_gate, recovery_gate
from worker.tasks.steps import Step, StepContext, StepFailed

FILE_KINDS = ("documents", "models", "config")


# -- planning (pure over the sets on disk; used by the CLI and the drill) ----------------------


def plan_restore(
    sets: list[BackupSet], series_specs: dict[str, SeriesSpec], wanted_kinds: list[str], set_id: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """({series: set id}, {series: why it is not in the plan}) for each configured series
    of a wanted kind: from the given set, or (latest) the newest verified set holding it.
    An item that is not verified is never planned; the reason says what to run instead."""
    plan, gaps = {}, {}
    for name, spec in sorted(series_specs.items()):
        if spec.kind not in wanted_kinds:
            continue
        newest = newest_holding(sets, name)
        instead = f"; the newest verified one is in set {newest.id}" if newest else "; no set holds a verified one"
        if set_id is None:
            if newest is not None:
                plan[name] = newest.id
            else:
                held = newest_holding(sets, name, verified_only=False)
                gaps[name] = "no set holds a verified backup of it" + (
                    f" (set {held.id} holds one that is not: `opsfleet backup verify {held.id}`)" if held else ""
                )
            continue
        chosen = next((s for s in sets if s.id == set_id), None)
        if chosen is None or name not in chosen.items:
            gaps[name] = f"set {set_id} does not hold it{instead}"
        elif not chosen.verified(name):
            detail = chosen.items[name].get("verification", {}).get("detail") or "never verified"
            gaps[name] = (
                f"set {set_id}'s copy is not verified ({detail}): `opsfleet backup verify {set_id}` "
                f"checks it again{instead}"
            )
        else:
            plan[name] = chosen.id
    return plan, gaps


# -- helpers -------------------------------------------------------------------------------------


def _scratch_bases(ctx: StepContext, name: str) -> list[Path]:
    settings = ctx.config.backup
    configured = settings.scratch_dir if name == "restore" else settings.drill.scratch_dir
    if configured is not None:
        return [_abs(ctx, configured)]
    return [backup_root(ctx) / f".{name}", Path(tempfile.gettempdir()) / f"opsfleet-{name}"]


def scratch_folder(ctx: StepContext, name: str = "restore") -> Path:
    """This run's scratch folder, created 0700: under the configured folder (backup.scratch_dir,
    for the drill's trees backup.drill.scratch_dir), else under the
    backup root, else (a read-only backup root: restoring from a mounted copy, or a full one)
    under the temp dir. The free-space checks then judge the folder chosen."""
    failures = []
    for base in _scratch_bases(ctx, name):
        folder = base / str(ctx.run["id"])
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder.mkdir(exist_ok=True, mode=0o700)
        except OSError as err:
            failures.append(f"{folder}: {err.strerror or err}")
            continue
        return folder
    key = "backup.scratch_dir" if name == "restore" else "backup.drill.scratch_dir"
    raise StepFailed(
        f"no scratch folder can be made ({'; '.join(failures)}): set {key} to a writable folder "
        "with room for the decompressed dump"
    )


def remove_scratch(ctx: StepContext, name: str = "restore") -> None:
    for base in _scratch_bases(ctx, name):
        shutil.rmtree(base / str(ctx.run["id"]), ignore_errors=True)


def _damaged(ctx: StepContext, found: BackupSet, series: str, detail: str) -> str:
    """Marks an item that did not read back unverified (restore --latest passes it over from
    now on); returns what the operator should know about it."""
    try:
        mark_unverified(
            found, series, f"run {ctx.run['id']} ({ctx.run.get('playbook', 'restore')}): {detail}", utcnow()
        )
    except (OSError, ValueError) as err:
        return (
            f"it could not be marked unverified in its manifest ({getattr(err, 'strerror', None) or err}), so "
            f"`opsfleet restore --latest` may choose it again: restore another set by its ID (`opsfleet backup list`)"
        )
    older = newest_holding(list_sets(backup_root(ctx)), series)
    return "it is marked unverified: " + (
        f"`opsfleet restore --latest` now takes set {older.id}" if older else "no verified backup of it is left"
    )


def _planned(ctx: StepContext, kinds: tuple[str, ...]) -> list[tuple[str, SeriesSpec, BackupSet]]:
    out = []
    for series, set_id in sorted(ctx.params.get("plan", {}).items()):
        spec = ctx.config.backup.series.get(series)
        if spec is None:
            raise StepFailed(f"backup series {series} is no longer configured")
        if spec.kind not in kinds:
            continue
        found = get_set(backup_root(ctx), set_id)
        if found is None or series not in found.items:
            raise StepFailed(f"backup set {set_id} holding {series} is gone from {backup_root(ctx)}")
        out.append((series, spec, found))
    return out


def _abs(ctx: StepContext, path: Path) -> Path:
    return path if path.is_absolute() else (ctx.runtime.loaded.base_dir / path).resolve()


def extract(src: Path, compression: str, dest: Path, timeout: float) -> None:
    """Decompress an archive into GNU tar extracting under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["tar", "--extract", "--file=-", f"--directory={dest}", "--numeric-owner"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        with Watchdog(timeout, proc) as dog:
            try:
                for chunk in iter_decompressed(src, compression):
                    proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            except BaseException:
                proc.kill()
                proc.wait(timeout=10)
                raise
            proc.wait(timeout=timeout)
        if dog.fired:
            raise ArchiveError(f"extracting {src.name} timed out after {timeout:.0f}s")
        if proc.returncode != 0:
            err.seek(0)
            raise ArchiveError(f"extracting {src.name} failed ({proc.returncode}): {tail(err.read())}")


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def restore_database_into(
    ctx: StepContext,
    series: str,
    spec: SeriesSpec,
    found: BackupSet,
    pg: Postgres,
    dbname: str,
    with_roles: bool,
    owner_like: str | None = None,
) -> str:
    """Fresh database `dbname` from the set's dump, row counts checked; dropped again on failure.
    `owner_like`: a database on the same server whose owner the fresh one gets, objects
    keeping their owners from the dump (the server has the roles): a restore swapped into
    place must be the live database again, privileges and all, not one owned by opsfleet."""
    item = found.items[series]
    compression = found.manifest.get("compression", "zstd")
    roles_file = next((f for f in item["files"] if f["name"].endswith(".roles.sql")), None)
    began = time.monotonic()
    with contextlib.ExitStack() as unpacked:
        unpacking = None
        if item.get("format") == "directory":
            # pg_restore -j reads the directory in place (its files were hashed by the check step).
            plain = found.path / next(f["name"].split("/")[0] for f in item["files"] if "/" in f["name"])
        else:
            plain = scratch_folder(ctx) / f"{series}.dump"
            unpacked.callback(plain.unlink, missing_ok=True)
            # The main dump (schema and the smaller tables) is unpacked: post-data seeks in it.
            dump_file = next(f for f in item["files"] if ".dump" in f["name"] and "table" not in f)
            need = int(dump_file.get("uncompressed_bytes", 0) * 1.05)
            free = free_bytes(plain.parent)
            if free < need:
                raise StepFailed(
                    f"{series}: the decompressed dump needs {need / 1e6:.0f} MB in {plain.parent}, "
                    f"{free / 1e6:.0f} MB free (pg_restore -j needs a seekable file)"
                )
        if pg.database_exists(dbname):
            raise StepFailed(f"database {dbname} exists already on {pg.where()}: restores go into a fresh database")
        owner = pg.database_owner(owner_like) if owner_like else None  # None: no such database
        if item.get("format") != "directory":
            # Decompressed (and its sha256 checked) while pg_restore already reads it.
            unpacking = unpacked.enter_context(
                Unpacking(found.path / dump_file["name"], compression, plain, expect_sha256=dump_file["sha256"])
            )
        weights = None if item.get("format") == "directory" else item.get("table_bytes") or item.get("row_counts")
        # Tables dumped each on their own: decompressed straight into their own pg_restore.
        tables = [
            TableData(
                f["table"],
                (weights or {}).get(f["table"], f.get("uncompressed_bytes", 0)),
                decompressing_feeder(found.path / f["name"], compression, f["sha256"]),
            )
            for f in item["files"]
            if "table" in f
        ]
        pg.create_database(dbname, owner=owner)
        try:
            roles = found.path / roles_file["name"] if (with_roles and roles_file) else None
            counts = pg.restore(
                plain, dbname, spec.jobs, spec.timeout_seconds, roles=roles, keep_owners=owner is not None,
                weights=weights, unpacking=unpacking, tables=tables,
            )  # fmt: skip
            expected = item.get("row_counts", {})
            if counts != expected:
                diffs = [
                    f"{t}: {counts.get(t, 'missing')} rows, manifest {expected.get(t, 'missing')}"
                    for t in sorted(set(counts) | set(expected))
                    if counts.get(t) != expected.get(t)
                ]
                raise StepFailed(f"{series}: restored row counts differ from the manifest: {'; '.join(diffs[:10])}")
        except BaseException:
            pg.drop_database(dbname)
            raise
    return (
        f"{series}: {len(expected)} tables, {sum(expected.values())} rows restored into {dbname} and match the manifest "
        f"(sha256-checked, pg_restore -j{spec.jobs} and counted in {time.monotonic() - began:.1f}s)"
    )


def _services(ctx: StepContext, names: tuple[str, ...] | list[str]):
    out = []
    for name in names:
        spec = ctx.config.services.get(name)
        if spec is None:
            raise StepFailed(f'service "{name}" is not configured')
        try:
            out.append((name, ctx.runtime.docker.find_container(name, spec)))
        except DockerError as err:
            raise StepFailed(str(err)) from None
    return out


def stop_services(ctx: StepContext, names) -> list[str]:
    lines = []
    for name, container in _services(ctx, names):
        try:
            ctx.runtime.docker.stop(container, ctx.config.backup.stop_timeout_seconds)
        except DockerError as err:
            raise StepFailed(str(err)) from None
        lines.append(f"stopped {name} ({container.name})")
    return lines


def start_services(ctx: StepContext, names) -> list[str]:
    lines = []
    for name, container in _services(ctx, names):
        try:
            ctx.runtime.docker.start(container)
        except DockerError as err:
            raise StepFailed(str(err)) from None
        lines.append(f"started {name} ({container.name})")
    return lines


# -- restore steps ---------------------------------------------------------------------------------


def check(ctx: StepContext) -> str:
    lines = []
    for series, spec, found in _planned(ctx, ("database",) + FILE_KINDS):
        try:
            result = verify_item(
                found.path, found.items[series], found.manifest.get("compression", "zstd"),
                deep=False, sha_only=spec.kind == "database",
            )  # fmt: skip
        except OSError as err:  # an unreadable disk, not (yet) a damaged file
            raise StepFailed(f"{series} in set {found.id} cannot be read: {err}") from None
        # sha256 here (databases, and files decompressed as they were written); the
        # database and files steps decompress as they restore, to the end.
        if not result.ok:
            raise StepFailed(
                f"{series} in set {found.id} does not read back: {result.detail}; {_damaged(ctx, found, series, result.detail)}"
            )
        lines.append(f"{series} from {found.id}: {result.detail}")
    if not lines:
        raise StepFailed("nothing to restore: the plan names no backup items")
    return "\n".join(lines)


def database(ctx: StepContext) -> str:
    try:
        return _restore_databases(ctx)
    finally:
        remove_scratch(ctx)  # a failed restore leaves no unpacked dump (nor an empty folder) behind


def _restore_databases(ctx: StepContext) -> str:
    lines = []
    target_db = ctx.params.get("target_db")
    swap = ctx.params.get("swap", not target_db)
    for series, spec, found in _planned(ctx, ("database",)):
        pg = postgres_for(ctx, spec)
        live = check_db_name(pg.dbname)
        fresh = check_db_name(target_db or f"{live}_restore_{ctx.run['id']}")
        try:
            lines.append(restore_database_into(ctx, series, spec, found, pg, fresh, with_roles=False, owner_like=live))
            if not swap:
                continue
            keep_as = check_db_name(f"{live}_before_{ctx.run['id']}")
            stopped = [] if ctx.params.get("services_stopped") else list(spec.stop_services)
            lines += stop_services(ctx, stopped)
            try:
                if pg.database_exists(live):
                    pg.swap_databases(live, fresh, keep_as)
                    lines.append(f"{series}: {fresh} is now {live}; the previous {live} is kept as {keep_as}")
                else:
                    pg.rename_database(fresh, live)
                    lines.append(f"{series}: {fresh} is now {live} (there was no {live})")
            finally:
                lines += start_services(ctx, list(reversed(stopped)))
        except (PostgresError, ArchiveError, OSError) as err:
            raise StepFailed(f"{series}: {err}") from None
    return "\n".join(lines) or "no database in the plan"


def files(ctx: StepContext) -> str:
    try:
        return _restore_files(ctx)
    finally:
        remove_scratch(ctx)


def _restore_files(ctx: StepContext) -> str:
    lines = []
    run_id = ctx.run["id"]
    for series, spec, found in _planned(ctx, FILE_KINDS):
        item = found.items[series]
        compression = found.manifest.get("compression", "zstd")
        archive = found.path / item["files"][0]["name"]
        try:
            if spec.kind in ("documents", "models"):
                target = _abs(ctx, spec.path)
                staging = target.parent / f".{target.name}.restore-{run_id}"
                shutil.rmtree(staging, ignore_errors=True)
                extract(archive, compression, staging, spec.timeout_seconds)
                restored = staging / Path(item["source"]).name
                got = count_files(restored)
                if got != item.get("file_count"):
                    shutil.rmtree(staging, ignore_errors=True)
                    raise StepFailed(f"{series}: {got} files extracted, the manifest says {item.get('file_count')}")
                aside = target.with_name(f"{target.name}.before-restore-{run_id}")
                if target.exists():
                    os.rename(target, aside)
                os.rename(restored, target)
                shutil.rmtree(staging, ignore_errors=True)
                lines.append(
                    f"{series}: {got} files restored to {target}"
                    + (f"; the previous tree is at {aside}" if aside.exists() else "")
                )
            else:  # config: listed files and directories, each put back where it was
                staging = scratch_folder(ctx) / series
                extract(archive, compression, staging, spec.timeout_seconds)
                sources = item["source"] if isinstance(item["source"], list) else [item["source"]]
                for source in sources:
                    target = Path(source)
                    staged = staging / target.relative_to("/")
                    if target.exists():
                        os.replace(target, target.with_name(f"{target.name}.before-restore-{run_id}"))
                    shutil.move(str(staged), str(target))
                    for path in [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]:
                        if is_secret(path.name, item.get("secret_files", [".env"])):
                            path.chmod(0o600)
                    lines.append(f"{series}: restored {target}")
        except (ArchiveError, OSError) as err:
            raise StepFailed(f"{series}: {err}") from None
    return "\n".join(lines) or "no files in the plan"


def cleanup(ctx: StepContext) -> str:
    remove_scratch(ctx)
    return "scratch removed"


# -- drill -------------------------------------------------------------------------------------------


def drill(ctx: StepContext) -> str:
    """Each series' newest verified backup (the newest set, and older sets for
    series it does not hold: a weekly series lives in fewer sets). Every series is
    drilled, a failed one does not stop the others; an item that does not read back
    is marked unverified."""
    began = time.monotonic()
    root = backup_root(ctx)
    sets = list_sets(root)
    plan = {name: newest_holding(sets, name) for name in ctx.config.backup.series}
    missing = sorted(name for name, found in plan.items() if found is None)
    lines, failures = [], []
    try:
        if missing or not plan:
            failures.append(f"no verified backup in {root} of {', '.join(missing) or 'any series'}")
        for series, found in sorted(plan.items()):
            if found is None:
                continue
            try:
                lines.append(_drill_one(ctx, series, found))
            except StepFailed as err:
                failures.append(str(err))
            except (ArchiveError, PostgresError, OSError) as err:
                failures.append(f"{series} in {found.id}: {err}")
    finally:
        remove_scratch(ctx, "drill")
        remove_scratch(ctx)
        seconds = time.monotonic() - began
        metrics.RESTORE_DRILL_SECONDS.set(seconds)
        metrics.RESTORE_DRILL_RESULT.set(0 if failures else 1)
    if failures:
        # The first line is the run's reason: the first failure, and how many more.
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StepFailed(
            f"{failures[0]}{more}\ndrill failed for {len(failures)} of {len(plan) or 1} series in {seconds:.1f}s:\n"
            + "\n".join(failures[1:] + [f"passed: {line}" for line in lines])
        )
    lines.append(f"drill passed in {seconds:.1f}s")
    return "\n".join(lines)


def _drill_one(ctx: StepContext, series: str, found: BackupSet) -> str:
    settings = ctx.config.backup.drill
    spec = ctx.config.backup.series[series]
    item = found.items[series]
    compression = found.manifest.get("compression", "zstd")
    # From disk to the end (the restore below reads the dump again, hence sha_only).
    result = verify_item(
        found.path, item, compression, deep=False, sha_only=item["kind"] == "database", trust_written=False
    )
    if not result.ok:
        raise StepFailed(f"{series} in {found.id}: {result.detail}; {_damaged(ctx, found, series, result.detail)}")
    if item["kind"] == "database":
        pg = Postgres(settings.server_url, spec.timeout_seconds) if settings.server_url else postgres_for(ctx, spec)
        scratch_db = check_db_name(f"opsfleet_drill_{ctx.run['id']}_{series.replace('-', '_').replace('.', '_')}"[:63])
        done = restore_database_into(ctx, series, spec, found, pg, scratch_db, with_roles=bool(settings.server_url))
        pg.drop_database(scratch_db)
        return f"{found.id} {done}"
    if "file_count" in item and ".tar" in item["files"][0]["name"]:
        dest = scratch_folder(ctx, "drill") / series
        extract(found.path / item["files"][0]["name"], compression, dest, spec.timeout_seconds)
        got = count_files(dest)
        shutil.rmtree(dest, ignore_errors=True)
        if got != item["file_count"]:
            raise StepFailed(f"{series} in {found.id}: {got} files extracted, the manifest says {item['file_count']}")
        return f"{found.id} {series}: {got} files extracted, checksums and count match"
    return f"{found.id} {series}: checksum and decompression OK"


# -- recover -------------------------------------------------------------------------------------------


def stop_all(ctx: StepContext) -> str:
    return "\n".join(stop_services(ctx, ctx.params.get("services", []))) or "no services configured to stop"


def start_all(ctx: StepContext) -> str:
    return "\n".join(start_services(ctx, list(reversed(ctx.params.get("services", []))))) or "nothing to start"


def health_gate(ctx: StepContext) -> str:
    """The deploy health gate (worker.tasks.gate) for the services this recovery started:
    each started by this run, running, healthy (Docker health check, health_url) the
    deploy gate's `passes` times in a row, then the business checks of their environments,
    within params.health_timeout_seconds (backup.health_timeout_seconds)."""
    names = list(ctx.params.get("services", []))
    if not names:
        return "no services to check (backup.recover_stop_order is empty)"
    timeout = int(ctx.params.get("health_timeout_seconds", ctx.config.backup.health_timeout_seconds))
    gate_spec, checks = recovery_gate(ctx.config, names, timeout)
    return pass_gate(ctx, names, gate_spec, checks, since=ctx.run.get("started_at"))


def _long(config) -> int:
    return config.backup.step_timeout_seconds


PLAYBOOKS = {
    "restore": (
        Step("check", check, timeout=_long),
        Step("database", database, timeout=_long),
        Step("files", files, timeout=_long),
        Step("cleanup", cleanup),
    ),
    "restore_drill": (Step("drill", drill, timeout=_long),),
    "recover": (
        Step("check", check, timeout=_long),
        Step("stop", stop_all),
        Step("database", database, timeout=_long),
        Step("files", files, timeout=_long),
        Step("start", start_all),
        Step("health", health_gate),
        Step("cleanup", cleanup),
    ),
}
