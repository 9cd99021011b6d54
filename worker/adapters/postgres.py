"""PostgreSQL for backups and restores: psycopg for queries, pg_dump /
pg_restore / pg_dumpall as child processes.

Credentials never appear in an argv (visible in `ps`): the connection URL is
turned into libpq environment variables (PGHOST, PGPASSWORD, ...) for the
tools. Every query has a connect timeout and a statement timeout; every tool
runs under a deadline (see archive.Watchdog / archive.run).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from worker.adapters.archive import ArchiveError, Unpacking, iter_file, run, run_together

_ENV_OF = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}

# Tables whose rows are counted: ordinary tables and partitions, not
# catalogs, not tables owned by an extension (pg_dump leaves their rows out).
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresError(Exception):
    """A PostgreSQL operation failed; the message says what to check."""


@dataclass(frozen=True)
class TableSize:
    schema: str
    name: str
    bytes: int  # pg_table_size: heap and TOAST, not indexes (a restore builds those)

    @property
    def key(self) -> str:
        """How manifests name a table: "schema.table"."""
        return f"{self.schema}.{self.name}"

    @property
    def pattern(self) -> str:
        """The table exactly, as pg_dump's --table/--exclude-table-data read it: in double
        quotes no character is a wildcard, and a quote is doubled."""
        return ".".join('"' + part.replace('"', '""') + '"' for part in (self.schema, self.name))


@dataclass(frozen=True)
class Snapshot:
    id: str
    row_counts: dict[str, int]  # complete once the snapshot's `with` block has ended
    server_version: str
    tables: tuple[TableSize, ...] = ()  # known when the block starts (a container's: none)

    @property
    def table_bytes(self) -> dict[str, int]:
        return {t.key: t.bytes for t in self.tables}


@dataclass(frozen=True)
class TableData:
    """One table's rows in a dump of their own (`pg_dump --data-only --table`): `feed(out)`
    writes that dump into a pg_restore's stdin, raising ArchiveError if it is not the
    manifest's. `weight` orders the loads, largest first."""

    table: str
    weight: int
    feed: Callable[[BinaryIO], None]


def tables_to_split(tables: Iterable[TableSize], min_bytes: int, most: int = 32) -> list[TableSize]:
    """The tables dumped each into a file of their own: those of `min_bytes` or more, the
    largest `most` of them (each is a pg_dump run, and pg_dump reads the whole catalog
    at start). 0: none. A restore loads them side by side, each decompressed straight into
    its own pg_restore | psql; what stays in the main dump is loaded with it."""
    if min_bytes <= 0:
        return []
    big = [t for t in tables if t.bytes >= min_bytes]
    return sorted(big, key=lambda t: (-t.bytes, t.schema, t.name))[:most]


def check_db_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise PostgresError(f'"{name}" is not a database name opsfleet creates or renames (letters, digits, _)')
    return name


class Postgres:
    def __init__(self, url: str, timeout_seconds: float = 3000, connect_timeout: int = 5):
        self.url = url
        self.params = conninfo_to_dict(url)
        self.dbname = self.params.get("dbname") or self.params.get("user") or "postgres"
        self.timeout = timeout_seconds
        self.connect_timeout = connect_timeout

    # -- plumbing --------------------------------------------------------------

    def where(self) -> str:
        return f"{self.params.get('host', 'localhost')}:{self.params.get('port', 5432)}/{self.dbname}"

    def env(self, dbname: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        for key, value in self.params.items():
            if key in _ENV_OF and value not in (None, ""):
                env[_ENV_OF[key]] = str(value)
        env.setdefault("PGCONNECT_TIMEOUT", str(self.connect_timeout))
        if dbname:
            env["PGDATABASE"] = dbname
        return env

    def connect(self, dbname: str | None = None, autocommit: bool = True) -> psycopg.Connection:
        conninfo = make_conninfo(
            self.url,
            dbname=dbname or self.dbname,
            connect_timeout=self.connect_timeout,
            options=f"-c statement_timeout={int(self.timeout)}s",
        )
        try:
            return psycopg.connect(conninfo, autocommit=autocommit, application_name="opsfleet-backup")
        except psycopg.Error as err:
            raise PostgresError(f"cannot connect to PostgreSQL at {self._where(dbname)}: {_first_line(err)}") from None

    def _where(self, dbname: str | None) -> str:
        return f"{self.params.get('host', 'localhost')}:{self.params.get('port', 5432)}/{dbname or self.dbname}"

    def admin(self) -> psycopg.Connection:
        """A connection to the maintenance database, for CREATE/DROP/ALTER DATABASE."""
        return self.connect("postgres")

    # -- facts -------------------------------------------------------------------

    def server_version(self) -> str:
        with self.connect() as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    @staticmethod
    def tool_version(tool: str) -> str:
        try:
            return run([tool, "--version"], timeout=10).strip()
        except ArchiveError as err:
            return f"unknown ({err})"

    def row_counts(self, dbname: str | None = None, skip: Collection[str] = ()) -> dict[str, int]:
        """Rows per "schema.table", but for the tables in `skip`."""
        with self.connect(dbname) as conn:
            return _count_rows(conn, skip)

    # -- dump -------------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """A REPEATABLE READ transaction held open while the caller dumps:
        its snapshot is exported for `pg_dump --snapshot`, and the row counts
        are taken inside it, so they describe exactly the dumped data. They are
        counted while the caller dumps (a thread on this transaction's own
        connection; counting a large table takes as long as a second of dump)
        and are in the Snapshot when the `with` block ends."""
        conn = self.connect(autocommit=False)
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction(), ThreadPoolExecutor(1, thread_name_prefix="row-counts") as counter:
                snap = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
                version = conn.execute("SHOW server_version").fetchone()[0]
                tables = _table_sizes(conn)  # the catalog alone: quick, and the dump's layout needs it first
                if tables:
                    # Held to the end, as pg_dump holds them for its own run: a table dumped in a
                    # later pg_dump of the set cannot be dropped, renamed or swapped for another
                    # in between (that pg_dump would find it by name, and dump the stranger).
                    names = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
                    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(names))
                counts: dict[str, int] = {}
                counting = counter.submit(lambda: counts.update(_count_rows(conn)))
                try:
                    yield Snapshot(snap, counts, version, tables)
                except BaseException:
                    with contextlib.suppress(psycopg.Error):  # the server may be what failed
                        conn.cancel_safe(timeout=5)  # the dump failed: stop counting now
                    raise  # leaving the executor waits for the counting thread
                counting.result()  # raises what the counting raised
        except psycopg.Error as err:
            raise PostgresError(f"PostgreSQL at {self.where()}: {_first_line(err)}") from None
        finally:
            conn.close()

    def dump_process(self, snapshot_id: str, stderr: Path, select: Iterable[str] = ()) -> subprocess.Popen:
        """pg_dump, custom format, uncompressed (we compress with zstd), to stdout;
        `select`: options choosing what it dumps (--table, --exclude-table-data, ...)."""
        argv = ["pg_dump", "--format=custom", "--compress=0", f"--snapshot={snapshot_id}", "--no-password", *select]
        with open(stderr, "wb") as err:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=self.env())

    def dump_roles(self, timeout: float = 60) -> bytes:
        """Roles (no passwords kept out: pg_dumpall needs superuser to read them)."""
        argv = ["pg_dumpall", "--roles-only", "--no-password"]
        return run(argv, timeout=timeout, env=self.env()).encode()

    # -- databases ----------------------------------------------------------------

    def database_exists(self, name: str) -> bool:
        with self.admin() as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def database_owner(self, name: str) -> str | None:
        with self.admin() as conn:
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (check_db_name(name),)
            ).fetchone()
            return row[0] if row else None

    def create_database(self, name: str, owner: str | None = None) -> None:
        check_db_name(name)
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        if owner:
            statement = statement + sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with self.admin() as conn:
            try:
                conn.execute(statement)
            except psycopg.Error as err:
                raise PostgresError(f"cannot create database {name}: {_first_line(err)}") from None

    def drop_database(self, name: str) -> None:
        check_db_name(name)
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def rename_database(self, old: str, new: str) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(check_db_name(old)), sql.Identifier(check_db_name(new))
                )
            )

    def swap_databases(self, live: str, restored: str, keep_as: str) -> None:
        """live -> keep_as, restored -> live. Connections to live are refused,
        then ended (its users are expected to be stopped already)."""
        for name in (live, restored, keep_as):
            check_db_name(name)
        with self.admin() as conn:
            try:
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(live)))
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                    ([live, restored],),
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(live), sql.Identifier(keep_as))
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(live))
                )
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(keep_as)))
            except psycopg.Error as err:
                raise PostgresError(f"swapping {restored} into {live} failed: {_first_line(err)}") from None

    # -- restore --------------------------------------------------------------------

    def restore(
        self,
        dump: Path,
        dbname: str,
        jobs: int,
        timeout: float,
        roles: Path | None = None,
        keep_owners: bool = False,
        weights: dict[str, int] | None = None,
        unpacking: Unpacking | None = None,
        tables: Sequence[TableData] = (),
    ) -> dict[str, int]:
        """pg_restore a dump into an existing empty database, in parallel; returns the
        restored tables' row counts. Owners are kept when the server has the roles (`roles`
        applied first, or `keep_owners`: the dump's own server); otherwise objects belong to
        the restoring user.

        `dump`: pg_dump's directory format (restored with -j in place), or a custom-format
        dump, restored section by section: pre-data; then the data, `jobs` loads (pg_restore
        into psql) at a time, largest first: the `tables` dumped each on its own (each fed
        straight from its compressed file) and the dump's own table data, shared out by
        `weights` (bytes or rows per "schema.table", see split_table_data: a dump streamed
        through a pipe carries no data offsets, so pg_restore -j could neither seek to a
        table nor start the largest first); then post-data with -j, while the rows are
        counted. `unpacking`: `dump` is still being decompressed into: pre-data and data are
        read from it as it grows; post-data, which seeks, waits for the whole file."""
        if roles is not None and roles.exists():
            # Roles first, so ownership and grants resolve; existing roles are errors psql reports and skips.
            run(["psql", "--no-password", "--quiet", "--file", str(roles)], timeout=60, env=self.env("postgres"))
        owners = [] if roles is not None or keep_owners else ["--no-owner"]
        base = ["pg_restore", "--no-password", f"--dbname={dbname}", "--exit-on-error", *owners]
        # Table data as SQL into psql: pg_restore -d sends a custom-format archive's rows one
        # CopyData message each (pg_dump --compress=0 writes a chunk per row); psql sends
        # them in full buffers. Measured here, 7 M rows: 5.31 s against 5.73 s.
        as_sql = ["pg_restore", "--file=-", *owners]
        psql = ["psql", "--no-password", "--no-psqlrc", "--set=ON_ERROR_STOP=1", f"--dbname={dbname}"]
        deadline = time.monotonic() + timeout
        env = self.env(dbname)

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        try:
            if dump.is_dir():
                run([*base, f"--jobs={jobs}", str(dump)], timeout=left(), env=env)
                return self.row_counts(dbname)
            whole = unpacking.feed if unpacking is not None else _file_feeder(dump)
            run_together([[*base, "--section=pre-data"]], left(), env, feeders=[whole])
            # The dump's own table data: its weights are those of the tables not dumped apart.
            apart = {t.table for t in tables}
            own = {table: weight for table, weight in (weights or {}).items() if table not in apart}
            loads = []  # (weight, argv, feeder, the table whose rows its COPY counts, or None)
            folder = Path(tempfile.mkdtemp(prefix="opsfleet-restore-lists-"))
            try:
                shares = split_table_data(self._listing(whole, left(), env), own, jobs) if own else None
                for n, lines in enumerate(shares or []):
                    (folder / f"{n}.list").write_text("\n".join(lines) + "\n")
                    argv = [*as_sql, "--section=data", f"--use-list={folder / f'{n}.list'}"]
                    loads.append((sum(own.get(_data_table(line) or "", 0) for line in lines), argv, whole, None))
                if not shares:
                    loads.append((sum(own.values()), [*as_sql, "--section=data"], whole, None))
                loads += [(t.weight, [*as_sql, "--section=data"], t.feed, t.table) for t in tables]
                loads.sort(key=lambda load: -load[0])
                outputs = run_together(
                    [load[1] for load in loads], left(), env, feeders=[load[2] for load in loads], at_once=jobs,
                    into=[psql] * len(loads),
                )  # fmt: skip
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            # A table dumped apart is loaded by one COPY into the fresh, empty table: the server's
            # count of the rows it wrote ("COPY n") is the table's count, with no second pass over
            # a large table beside the index builds. Not for a parent of inheritance children:
            # its count, like the manifest's, includes theirs. Every other table is counted.
            parents = self._inheritance_parents(dbname)
            counts: dict[str, int] = {}
            for (_, _, _, table), out in zip(loads, outputs, strict=True):
                if table and table not in parents and len(tags := _COPY_TAG.findall(out)) == 1:
                    counts[table] = int(tags[0])
            with ThreadPoolExecutor(1, thread_name_prefix="count rows") as counting:
                rest = counting.submit(self.row_counts, dbname, skip=set(counts))  # beside post-data
                if unpacking is not None:
                    unpacking.wait()
                run([*base, "--section=post-data", f"--jobs={jobs}", str(dump)], timeout=left(), env=env)
                return {**rest.result(), **counts}
        except ArchiveError as err:
            raise PostgresError(f"pg_restore into {dbname} failed: {err}") from None

    def _inheritance_parents(self, dbname: str) -> set[str]:
        """ "schema.table" of the tables with inheritance children (count(*) includes their rows)."""
        query = (
            "SELECT DISTINCT n.nspname || '.' || c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhparent JOIN pg_namespace n ON n.oid = c.relnamespace"
        )
        with self.connect(dbname) as conn:
            return {name for (name,) in conn.execute(query).fetchall()}

    @staticmethod
    def _listing(feed: Callable[[BinaryIO], None], timeout: float, env: dict[str, str]) -> str:
        return run_together([["pg_restore", "--list"]], timeout, env, feeders=[feed])[0]


def _file_feeder(path: Path) -> Callable[[BinaryIO], None]:
    def feed(out: BinaryIO) -> None:
        for chunk in iter_file(path):
            out.write(chunk)

    return feed


_COPY_TAG = re.compile(r"^COPY (\d+)$", re.M)  # psql's report of a COPY: the rows it wrote


def _data_table(line: str) -> str | None:
    """The "schema.table" of a `pg_restore --list` line if it is a TABLE DATA entry, else None."""
    parts = line.split(";", 1)[-1].split()
    if len(parts) >= 6 and parts[2:4] == ["TABLE", "DATA"]:
        return f"{parts[4]}.{parts[5]}"
    return None


def split_table_data(listing: str, weights: dict[str, int], jobs: int) -> list[list[str]] | None:
    """`pg_restore --list` split into `jobs` lists for --section=data runs side by side:
    each TABLE DATA entry goes, largest first (by `weights`, "schema.table"), to the list
    carrying the least so far; the first list also keeps every other entry (sequence
    values, large objects: --section=data picks the data ones). Each list keeps the
    listing's order, the order of the dump's bytes: pg_restore reading a stream cannot
    go back for an entry listed out of order. None when fewer than two tables have data
    (nothing to share out)."""
    lines = [line for line in listing.splitlines() if line and not line.startswith(";")]
    entries = [(weights.get(key, 0), n) for n, line in enumerate(lines) if (key := _data_table(line)) is not None]
    if len(entries) < 2:
        return None
    bins: list[list[int]] = [[] for _ in range(min(jobs, len(entries)))]
    loads = [0] * len(bins)
    for weight, position in sorted(entries, key=lambda e: -e[0]):
        n = loads.index(min(loads))
        bins[n].append(position)
        loads[n] += max(weight, 1)
    shared = {position for _, position in entries}
    bins[0] += [position for position in range(len(lines)) if position not in shared]
    return [[lines[position] for position in sorted(positions)] for positions in bins]


def verify_process(stderr: Path, source: Path | None = None) -> subprocess.Popen:
    """pg_restore reading a whole custom-format dump (stdin, or `source`) and
    writing the SQL to /dev/null: a full read of every block. (`--list` reads
    only the table of contents and passes a truncated dump.)"""
    argv = ["pg_restore", "--file=/dev/null"] + ([str(source)] if source else [])
    with open(stderr, "wb") as err:
        return subprocess.Popen(argv, stdin=None if source else subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)


def _table_sizes(conn: psycopg.Connection) -> tuple[TableSize, ...]:
    query = "SELECT n.nspname, c.relname, pg_table_size(c.oid) " + _TABLES[_TABLES.index("FROM pg_class") :]
    return tuple(TableSize(schema, name, size) for schema, name, size in conn.execute(query).fetchall())


def _count_rows(conn: psycopg.Connection, skip: Collection[str] = ()) -> dict[str, int]:
    counts = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        if f"{schema}.{table}" in skip:
            continue
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]
    return counts


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


# -- PostgreSQL inside a container, through `docker exec` ------------------------------------

_COUNTS_ONE_QUERY = (
    "SELECT n.nspname || '.' || c.relname, (xpath('/row/c/text()', query_to_xml("
    "format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text "
    + _TABLES[_TABLES.index("FROM pg_class") :]
)
_SEP = "\x1f"  # psql field separator: no table name holds a unit separator


class ContainerPostgres:
    """The Postgres operations backups and restores need, run with the tools
    inside a container (`docker exec`), as the seed did: the tools match the
    server's version and no port has to be reachable from the host.

    `url` is the connection as seen inside the container (e.g.
    postgresql://postgres@/shop?host=/var/run/postgresql); it reaches the tools
    as libpq environment variables of the exec, never in argv. SQL goes to psql
    on stdin. Restores stream the dump into pg_restore's stdin (serial: a
    parallel restore needs the file inside the container)."""

    def __init__(self, docker, container, url: str, bin_dir: str | None, user: str, timeout_seconds: float = 3000):
        self.docker = docker
        self.container = container
        self.host_side = Postgres(url, timeout_seconds)
        self.dbname = self.host_side.dbname
        self.bin = (bin_dir.rstrip("/") + "/") if bin_dir else ""
        self.user = user
        self.timeout = timeout_seconds

    def where(self) -> str:
        return f"container {self.container.name}, database {self.dbname}"

    def env(self, dbname: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in self.host_side.env(dbname).items() if k.startswith("PG")}
        env.setdefault("PGDATABASE", self.dbname)
        return env

    def _exec(self, argv, dbname=None, stdin=False, stderr_path=None):
        from worker.adapters.docker import DockerError

        try:
            return self.docker.exec_process(
                self.container, [self.bin + argv[0], *argv[1:]], self.env(dbname), self.user, stdin, stderr_path
            )
        except DockerError as err:
            raise PostgresError(str(err)) from None

    def _psql(self, script: str, dbname: str | None = None, timeout: float = 120) -> list[list[str]]:
        proc = self._exec(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", f"--field-separator={_SEP}"],
                          dbname, stdin=True)  # fmt: skip
        proc.stdin.write(script.encode())
        proc.stdin.close()
        out = proc.read_all()
        if proc.wait(timeout) != 0:
            raise PostgresError(f"psql in {self.container.name}: {proc.stderr.decode(errors='replace').strip()[-500:]}")
        return [line.split(_SEP) for line in out.decode().splitlines() if line]

    def tool_version(self, tool: str) -> str:
        proc = self._exec([tool, "--version"])
        out = proc.read_all().decode(errors="replace").strip()
        return out if proc.wait(30) == 0 else f"unknown ({proc.stderr.decode(errors='replace').strip()[-200:]})"

    def server_version(self) -> str:
        return self._psql("SHOW server_version;\n")[0][0]

    def row_counts(self, dbname: str | None = None) -> dict[str, int]:
        return {name: int(count) for name, count in self._psql(_COUNTS_ONE_QUERY + ";\n", dbname)}

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """An interactive psql holds a REPEATABLE READ transaction open; its
        snapshot is exported and the rows counted in it."""
        proc = self._exec(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", f"--field-separator={_SEP}"],
                          stdin=True)  # fmt: skip
        try:
            proc.stdin.write(
                (
                    "BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT 'snapshot', pg_export_snapshot();\n"
                    "SELECT 'version', current_setting('server_version');\n"
                    + _COUNTS_ONE_QUERY
                    + ";\n\\echo opsfleet-end\n"
                ).encode()
            )
            buffered = b""
            while b"opsfleet-end\n" not in buffered:
                chunk = proc.stdout.read()
                if not chunk:
                    proc.wait(30)
                    raise PostgresError(
                        f"psql in {self.container.name} ended: {proc.stderr.decode(errors='replace').strip()[-500:]}"
                    )
                buffered += chunk
            rows = [line.split(_SEP) for line in buffered.decode().splitlines() if line and line != "opsfleet-end"]
            snap = next(r[1] for r in rows if r[0] == "snapshot")
            version = next(r[1] for r in rows if r[0] == "version")
            counts = {r[0]: int(r[1]) for r in rows if r[0] not in ("snapshot", "version")}
            yield Snapshot(snap, counts, version)
            proc.stdin.write(b"COMMIT;\n")
        finally:
            proc.stdin.close()
            try:
                proc.wait(30)
            except Exception:
                proc.kill()

    def dump_process(self, snapshot_id: str, stderr: Path, select: Iterable[str] = ()):
        return self._exec(
            ["pg_dump", "--format=custom", "--compress=0", f"--snapshot={snapshot_id}", "--no-password", *select],
            stderr_path=stderr,
        )

    def dump_roles(self, timeout: float = 60) -> bytes:
        proc = self._exec(["pg_dumpall", "--roles-only", "--no-password"])
        out = proc.read_all()
        if proc.wait(timeout) != 0:
            raise ArchiveError(f"pg_dumpall exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
        return out

    def database_exists(self, name: str) -> bool:
        check_db_name(name)
        return bool(self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';\n", "postgres"))

    def database_owner(self, name: str) -> str | None:
        check_db_name(name)
        rows = self._psql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{name}';\n", "postgres")
        return rows[0][0] if rows else None

    def create_database(self, name: str, owner: str | None = None) -> None:
        if owner is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,63}", owner):
            raise PostgresError(f"role name {owner!r} is not one opsfleet quotes safely here")
        suffix = f' OWNER "{owner}"' if owner else ""
        self._psql(f'CREATE DATABASE "{check_db_name(name)}" TEMPLATE template0{suffix};\n', "postgres")

    def drop_database(self, name: str) -> None:
        self._psql(f'DROP DATABASE IF EXISTS "{check_db_name(name)}" WITH (FORCE);\n', "postgres")

    def rename_database(self, old: str, new: str) -> None:
        self._psql(f'ALTER DATABASE "{check_db_name(old)}" RENAME TO "{check_db_name(new)}";\n', "postgres")

    def swap_databases(self, live: str, restored: str, keep_as: str) -> None:
        for name in (live, restored, keep_as):
            check_db_name(name)
        self._psql(
            f'ALTER DATABASE "{live}" WITH ALLOW_CONNECTIONS false;\n'
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname IN ('{live}', '{restored}') "
            "AND pid <> pg_backend_pid();\n"
            f'ALTER DATABASE "{live}" RENAME TO "{keep_as}";\n'
            f'ALTER DATABASE "{restored}" RENAME TO "{live}";\n'
            f'ALTER DATABASE "{keep_as}" WITH ALLOW_CONNECTIONS true;\n',
            "postgres",
        )

    def restore(
        self,
        dump: Path,
        dbname: str,
        jobs: int,
        timeout: float,
        roles: Path | None = None,
        keep_owners: bool = False,
        weights: dict[str, int] | None = None,  # one stream through stdin: nothing to share out
        unpacking: Unpacking | None = None,
        tables: Sequence[TableData] = (),
    ) -> dict[str, int]:
        """One pg_restore through stdin; with `tables` dumped apart: the dump's pre-data and
        data, each table's data, then the dump's post-data (constraints after all rows)."""
        if roles is not None and roles.exists():
            self._psql(roles.read_text(), "postgres")
        argv = ["pg_restore", "--no-password", f"--dbname={dbname}", "--exit-on-error"]
        if roles is None and not keep_owners:
            argv.append("--no-owner")
        whole = unpacking.feed if unpacking is not None else _file_feeder(dump)
        if not tables:
            self._stream(argv, dbname, whole, timeout)
        else:
            self._stream([*argv, "--section=pre-data", "--section=data"], dbname, whole, timeout)
            for table in tables:
                self._stream([*argv, "--section=data"], dbname, table.feed, timeout)
            self._stream([*argv, "--section=post-data"], dbname, whole, timeout)
        return self.row_counts(dbname)

    def _stream(self, argv: list[str], dbname: str, feed: Callable[[BinaryIO], None], timeout: float) -> None:
        proc = self._exec(argv, dbname, stdin=True)
        try:
            feed(proc.stdin)
        except OSError as err:
            proc.kill()
            raise PostgresError(f"pg_restore in {self.container.name} stopped reading: {err}") from None
        except ArchiveError as err:
            proc.kill()
            raise PostgresError(f"pg_restore into {dbname} in {self.container.name} failed: {err}") from None
        proc.stdin.close()
        if proc.wait(timeout) != 0:
            raise PostgresError(
                f"pg_restore into {dbname} in {self.container.name} failed: {proc.stderr.decode(errors='replace').strip()[-500:]}"
            )
