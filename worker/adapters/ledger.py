"""The ledger: received events, runs and their steps. The source of truth.

PostgreSQL (psycopg 3) when DATABASE_URL is set, an SQLite file otherwise;
one schema and one set of queries for both, in SQLAlchemy Core. Every state
change is a single conditional UPDATE or INSERT inside one transaction, so
two web processes or two workers racing on the same run cannot both win.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

SCHEMA_VERSION = 2
# Upgrades from one schema version to the next, in order: (version it brings the ledger to,
# function(connection, dialect)). Version 1 is the first released schema (every table and
# column below); a change to it after release adds an entry here and bumps SCHEMA_VERSION.
# New tables need no entry (create_all makes them); new columns and data changes do.
UPGRADES: list[tuple[int, Any]] = [
    # 2: the safety checks' indexes (indexes on an existing table: create_all leaves them out).
    (2, lambda conn, dialect: [i.create(conn, checkfirst=True) for i in (runs_storm_escalations, runs_alert_actions)]),
]
OUTPUT_EXCERPT_CHARS = 4000
# An intake's waits on PostgreSQL (see Ledger.intake): inside the edge's 10 s answer.
INTAKE_LOCK_TIMEOUT = "5s"
INTAKE_STATEMENT_TIMEOUT = "8s"

RUN_STATUSES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "skipped",
    "superseded",
    "rolled_back",
    "rollback_failed",
)
FINAL_STATUSES = frozenset(RUN_STATUSES) - {"queued", "running"}
TRIGGERS = ("alert", "github", "schedule", "manual")


class LedgerUnavailable(Exception):
    """The ledger cannot be reached or written; callers answer 503 / retry."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """Stored as naive UTC on both backends, always returned timezone-aware."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = sa.MetaData()

schema_version = sa.Table(
    "opsfleet_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),  # alertmanager | github | api | schedule
    sa.Column("dedup_key", sa.String(255)),  # e.g. X-GitHub-Delivery; NULL when the sender has none
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("summary", sa.Text, nullable=False, server_default=""),
    sa.Column("body", sa.Text, nullable=False, server_default=""),
    sa.UniqueConstraint("source", "dedup_key", name="events_source_dedup_key"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("event_id", sa.Integer, sa.ForeignKey("events.id")),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("triggered_by", sa.String(128)),  # who, for manual runs
    sa.Column("rule", sa.String(64)),
    sa.Column("playbook", sa.String(64), nullable=False),
    sa.Column("target", sa.String(128)),
    sa.Column("params", sa.Text, nullable=False, server_default="{}"),
    sa.Column("summary", sa.Text, nullable=False, server_default=""),
    sa.Column("dedup_key", sa.String(255), unique=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("enqueued_at", UTCDateTime),
    sa.Column("enqueue_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    # While running: when the sweeper may decide the worker is gone.
    sa.Column("lease_until", UTCDateTime),
    sa.Column("worker", sa.String(255)),
    sa.Column("repeats", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_repeat_at", UTCDateTime),
    sa.Column("slack_channel", sa.String(64)),
    sa.Column("slack_ts", sa.String(64)),
    sa.Column("report_lock_until", UTCDateTime),
    sa.Column("reported_status", sa.String(20)),
    # Alert runs: which alert firing they answer, and when it resolved.
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("alert_starts_at", sa.String(40)),
    sa.Column("resolved_at", UTCDateTime),
    sa.Column("resolution_reported", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("runs_status_created", "status", "created_at"),
    sa.Index("runs_target_status", "target", "status"),
    sa.Index("runs_rule_created", "rule", "created_at"),
    sa.Index("runs_fingerprint", "fingerprint"),
)

# The storm breaker asks on every intake whether the rule escalated a storm lately; without
# this index that reads every run of the rule in the window (a storm's thousands of skips).
# The predicate is literal SQL so that generic (prepared) plans can use the index too.
# A storm's escalation: no target, and its own dedup key ("escalate:<rule>:*storm*:<window>"),
# which tells it from the runs of a rule whose playbook is escalate (keys "alert:...").
STORM_ESCALATIONS = sa.text("playbook = 'escalate' AND target IS NULL AND dedup_key LIKE 'escalate:%'")
runs_storm_escalations = sa.Index(
    "runs_storm_escalations",
    runs.c.rule,
    runs.c.created_at,
    postgresql_where=STORM_ESCALATIONS,
    sqlite_where=STORM_ESCALATIONS,
)
# The same for the cap and cooldown checks (what a rule did on a target): alert runs that did
# something to their target, i.e. every status but skipped and superseded. Actions are few, skips
# many, and at a storm's start the planner has no statistics to tell the rule index is the wrong one.
ALERT_ACTIONS = sa.text("trigger = 'alert' AND status NOT IN ('skipped', 'superseded')")
runs_alert_actions = sa.Index(
    "runs_alert_actions",
    runs.c.rule,
    runs.c.target,
    postgresql_where=ALERT_ACTIONS,
    sqlite_where=ALERT_ACTIONS,
)

# Which subjects (targets, or alerts without one) fired for each rule, and
# when last: what the storm breaker counts, one row per subject.
alert_subjects = sa.Table(
    "alert_subjects",
    metadata,
    sa.Column("rule", sa.String(64), primary_key=True),
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("last_seen", UTCDateTime, nullable=False),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # running | succeeded | failed | skipped
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("output", sa.Text, nullable=False, server_default=""),
    sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("run_id", "seq", name="steps_run_seq"),
)

# Named locks with an expiry (one backup per series at a time): a crashed
# holder's lock lapses at expires_at. Added to existing ledgers by create_all.
locks = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)


# Deploys: one row per deploy run (what it put live, or tried to), per environment.
# `current` marks the release that is live; at most one per environment.
releases = sa.Table(
    "releases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("environment", sa.String(64), nullable=False),
    sa.Column("sha", sa.String(64), nullable=False),
    sa.Column("ref", sa.String(255), nullable=False, server_default=""),
    sa.Column("images", sa.Text, nullable=False),  # JSON: service → image reference
    sa.Column("previous_images", sa.Text, nullable=False, server_default="{}"),  # what ran before (rollback target)
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, unique=True),
    sa.Column("pushed_at", sa.Float, nullable=False, server_default="0"),  # push order (worker.deploys)
    sa.Column("committed_at", sa.Float, nullable=False, server_default="0"),
    # deploying | live | rolled_back | failed (stays live after another release: see current) | restored
    # (a dead first deploy's repair: the images from before opsfleet are back; never current)
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("current", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("live_at", UTCDateTime),
    sa.Index("releases_env_current", "environment", "current"),
)


# A deploy run's GitHub deployment: its id and the states reported so far.
github_deployments = sa.Table(
    "github_deployments",
    metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True, autoincrement=False),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("deployment_id", sa.BigInteger, nullable=False),
    sa.Column("states", sa.Text, nullable=False, server_default=""),  # comma-separated, in order
)


# Worker liveness, judged by the web at scrape time: each worker's main process
# writes its row every `worker.heartbeat_interval_seconds`. A row whose beat is
# late by 3 intervals is a worker that is down. Added by create_all.
worker_heartbeats = sa.Table(
    "worker_heartbeats",
    metadata,
    sa.Column("hostname", sa.String(255), primary_key=True),  # Celery's node name, e.g. opsfleet@host-1
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("queues", sa.Text, nullable=False, server_default=""),  # comma-separated
    sa.Column("interval_seconds", sa.Float, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
)


# What pruning leaves of old runs: a count per day, playbook, trigger and status.
run_archive = sa.Table(
    "run_archive",
    metadata,
    sa.Column("day", sa.String(10), nullable=False),  # YYYY-MM-DD (UTC) the runs were created
    sa.Column("playbook", sa.String(64), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("runs", sa.Integer, nullable=False),
    sa.Column("repeats", sa.Integer, nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("day", "playbook", "trigger", "status", name="run_archive_pk"),
)


@dataclass(frozen=True)
class PruneResult:
    runs: int
    steps: int
    events: int


@dataclass(frozen=True)
class NewRun:
    trigger: str
    playbook: str
    status: str = "queued"
    reason: str = ""
    rule: str | None = None
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    dedup_key: str | None = None
    triggered_by: str | None = None
    fingerprint: str | None = None
    alert_starts_at: str | None = None


ACTIVE_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class RecordedRun:
    id: int
    created: bool  # False: the dedup key matched an existing run (a repeat)
    status: str


@dataclass(frozen=True)
class RecordedEvent:
    event_id: int
    runs: list[RecordedRun]


def excerpt(text: str, limit: int = OUTPUT_EXCERPT_CHARS) -> str:
    """Keep the end of long output: that is where errors are."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :]


def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 15}, poolclass=sa.pool.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the web read while a worker writes; FULL sync makes a
            # committed event survive a power cut, as the 2xx promised.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=15000")
            cur.close()

        # Let SQLAlchemy (not pysqlite) issue BEGIN, so transactions are real.
        @sa.event.listens_for(engine, "connect")
        def _no_pysqlite_tx(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            # Take the write lock at BEGIN: no deadlock upgrading a read lock.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return sa.create_engine(
        url,
        pool_pre_ping=True,  # a PostgreSQL restart leaves dead pooled connections
        pool_size=5,
        max_overflow=5,
        pool_timeout=5,
        connect_args={"connect_timeout": 3, "application_name": "opsfleet"},
    )


class Ledger:
    def __init__(self, url: str):
        self.url = url
        self.engine = _engine_for(url)
        self.dialect = self.engine.dialect.name

    # -- plumbing -------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as err:
            # Server down, connection lost, SQLite locked past busy_timeout.
            raise LedgerUnavailable(f"ledger ({self.dialect}) unavailable: {err.orig or err}") from err
        except sa.exc.TimeoutError as err:  # connection pool exhausted
            raise LedgerUnavailable(f"ledger ({self.dialect}) unavailable: {err}") from err

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(sa.select(sa.literal(1)))

    def migrate(self) -> int:
        """Create or upgrade the schema; safe when several processes start at once."""
        for attempt in range(5):
            try:
                with self._tx() as conn:
                    if self.dialect == "postgresql":
                        # Serialise concurrent starts (web and worker together).
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7346512)"))
                    metadata.create_all(conn, checkfirst=True)
                    current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
                    if current is None:
                        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=utcnow()))
                        current = SCHEMA_VERSION
                    if current > SCHEMA_VERSION:
                        raise LedgerUnavailable(
                            f"ledger schema is version {current}, newer than this opsfleet ({SCHEMA_VERSION}): upgrade opsfleet"
                        )
                    # In this one transaction (PostgreSQL DDL is transactional; SQLite's BEGIN
                    # IMMEDIATE admits one writer), each upgrade runs once, in order.
                    for version, upgrade in sorted(UPGRADES, key=lambda u: u[0]):
                        if current < version <= SCHEMA_VERSION:
                            upgrade(conn, self.dialect)
                            conn.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
                            current = version
                    return current
            except IntegrityError:
                # Another process created the same objects between our check and create.
                time.sleep(0.2 * (attempt + 1))
            except LedgerUnavailable as err:
                if "already exists" not in str(err) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise LedgerUnavailable("ledger schema could not be created")

    # -- intake ---------------------------------------------------------------

    @contextmanager
    def intake(self) -> Iterator[IntakeTx]:
        """One transaction for recording an event and deciding its runs.

        Decisions read state and write runs inside it; `IntakeTx.lock` keeps
        two intakes about the same rule or target from interleaving. On PostgreSQL
        a lock wait or a statement that takes longer than INTAKE_*_TIMEOUT fails
        the intake (LedgerUnavailable: the edge answers 503), rather than holding
        the edge's committer, and the locks others wait for, without end.
        """
        with self._tx() as conn:
            if self.dialect == "postgresql":
                conn.execute(
                    sa.text(
                        "SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :stmt, true)"
                    ),
                    {"lock": INTAKE_LOCK_TIMEOUT, "stmt": INTAKE_STATEMENT_TIMEOUT},
                )
            yield IntakeTx(self, conn, utcnow())

    def record_event(
        self, *, source: str, summary: str, body: str, new_runs: Iterable[NewRun], dedup_key: str | None = None
    ) -> RecordedEvent:
        """Commit an event and its runs in one transaction (before the edge answers 2xx).

        A run whose dedup key exists already is not created again: the existing
        run's repeat counter goes up and its id is returned with created=False.
        """
        with self.intake() as tx:
            event_id = tx.add_event(source=source, summary=summary, body=body, dedup_key=dedup_key)
            return RecordedEvent(event_id, [tx.add_run(event_id, new) for new in new_runs])

    def mark_enqueued(self, run_ids: Iterable[int]) -> None:
        ids = list(run_ids)
        if not ids:
            return
        with self._tx() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id.in_(ids), runs.c.status == "queued")
                .values(enqueued_at=utcnow(), enqueue_count=runs.c.enqueue_count + 1)
            )

    def clear_enqueued(self, run_ids: Iterable[int]) -> None:
        """The broker did not take these after all: let the sweeper send them at once."""
        ids = list(run_ids)
        if not ids:
            return
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id.in_(ids), runs.c.status == "queued").values(enqueued_at=None))

    def forget_subjects(self, before: datetime) -> int:
        with self._tx() as conn:
            return conn.execute(alert_subjects.delete().where(alert_subjects.c.last_seen < before)).rowcount

    def runs_to_enqueue(self, not_enqueued_since: datetime, limit: int = 200) -> list[int]:
        """Queued runs never enqueued, or enqueued long ago and still not started."""
        with self._tx() as conn:
            return list(
                conn.execute(
                    sa.select(runs.c.id)
                    .where(
                        runs.c.status == "queued",
                        sa.or_(runs.c.enqueued_at.is_(None), runs.c.enqueued_at < not_enqueued_since),
                    )
                    .order_by(runs.c.id)
                    .limit(limit)
                ).scalars()
            )

    # -- execution --------------------------------------------------------------

    def claim_run(self, run_id: int, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        """queued → running, for exactly one caller; None for everyone else."""
        now = utcnow()
        with self._tx() as conn:
            claimed = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == "queued")
                .values(
                    status="running", started_at=now, worker=worker, lease_until=now + timedelta(seconds=lease_seconds)
                )
                .returning(*runs.c)
            ).one_or_none()
            return None if claimed is None else _run_dict(claimed)

    def requeue_run(self, run_id: int, reason: str) -> bool:
        """running → queued again, its steps forgotten, marked enqueued now (so the sweeper
        sends it after sweeper.requeue_after_seconds). False when the run is not running."""
        with self._tx() as conn:
            done = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(
                    status="queued",
                    started_at=None,
                    worker=None,
                    lease_until=None,
                    reason=reason[:2000],
                    enqueued_at=utcnow(),
                )
            ).rowcount
            if done:
                conn.execute(steps.delete().where(steps.c.run_id == run_id))
            return bool(done)

    def begin_step(self, run_id: int, seq: int, name: str, lease_seconds: float, worker: str | None = None) -> str:
        """Record that a step starts (`worker`, "host:pid", now holds the run's lease). Returns
        what the caller must do:

        "start": run it. "done": it already ran (a redelivery), continue.
        "interrupted": an earlier attempt died inside it; never run it twice.
        "not_running": the run already ended (e.g. the sweeper failed it).
        """
        now = utcnow()
        try:
            with self._tx() as conn:
                status = conn.execute(sa.select(runs.c.status).where(runs.c.id == run_id)).scalar()
                if status != "running":
                    return "not_running"
                existing = conn.execute(
                    sa.select(steps.c.status).where(steps.c.run_id == run_id, steps.c.seq == seq)
                ).scalar()
                if existing == "running":
                    return "interrupted"
                if existing is not None:
                    return "done"
                conn.execute(steps.insert().values(run_id=run_id, seq=seq, name=name, status="running", started_at=now))
                held = {"lease_until": now + timedelta(seconds=lease_seconds), **({"worker": worker} if worker else {})}
                conn.execute(runs.update().where(runs.c.id == run_id).values(**held))
                return "start"
        except IntegrityError:
            return "interrupted"

    def renew_lease(self, run_id: int, worker: str, seconds: float) -> bool:
        """The worker running the run's step still has it; False when it no longer holds it."""
        with self._tx() as conn:
            done = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == "running", runs.c.worker == worker)
                .values(lease_until=utcnow() + timedelta(seconds=seconds))
            )
            return done.rowcount == 1

    def end_step(self, run_id: int, seq: int, status: str, output: str, lease_seconds: float) -> None:
        now = utcnow()
        with self._tx() as conn:
            conn.execute(
                steps.update()
                .where(steps.c.run_id == run_id, steps.c.seq == seq, steps.c.status == "running")
                .values(status=status, finished_at=now, output=excerpt(output))
            )
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(lease_until=now + timedelta(seconds=lease_seconds))
            )

    def finish_run(self, run_id: int, status: str, reason: str = "") -> bool:
        """running → a final status; False when the run had already ended."""
        assert status in FINAL_STATUSES, status
        with self._tx() as conn:
            done = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(status=status, reason=reason, finished_at=utcnow(), lease_until=None)
            )
            return done.rowcount == 1

    def expire_leases(self, now: datetime | None = None) -> list[int]:
        """Fail runs whose lease ran out (their worker died), and their open steps."""
        now = now or utcnow()
        return self._fail_running(
            runs.c.lease_until < now,
            "worker lost: the step lease expired before the step finished",
            "worker lost during this step",
            now,
        )

    def fail_runs_of_workers(self, workers: list[str], reason: str, now: datetime | None = None) -> list[int]:
        """Fail the running runs (and their open steps) these workers ("host:pid") held: their
        processes were killed, so the lease need not run out first."""
        if not workers:
            return []
        return self._fail_running(runs.c.worker.in_(workers), reason, reason, now or utcnow())

    def _fail_running(self, which, reason: str, step_output: str, now: datetime) -> list[int]:
        """Fail the running runs `which` selects, and their open steps; their ids."""
        with self._tx() as conn:
            failed = list(
                conn.execute(
                    runs.update()
                    .where(runs.c.status == "running", which)
                    .values(status="failed", reason=reason, finished_at=now, lease_until=None)
                    .returning(runs.c.id)
                ).scalars()
            )
            if failed:
                conn.execute(
                    steps.update()
                    .where(steps.c.run_id.in_(failed), steps.c.status == "running")
                    .values(status="failed", finished_at=now, output=step_output)
                )
            return failed

    # -- locks --------------------------------------------------------------------

    def acquire_lock(self, name: str, holder: str, ttl_seconds: float, now: datetime | None = None) -> bool:
        """Take `name` for `holder` until now + ttl. True when taken (or already
        held by the same holder, whose expiry is then extended); False when
        someone else holds it and it has not expired."""
        now = now or utcnow()
        until = now + timedelta(seconds=ttl_seconds)
        with self._tx() as conn:
            inserted = conn.execute(
                self._insert(locks)
                .values(name=name, holder=holder, acquired_at=now, expires_at=until)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(locks.c.name)
            ).scalar()
            if inserted is not None:
                return True
            taken = conn.execute(
                locks.update()
                .where(locks.c.name == name, sa.or_(locks.c.expires_at < now, locks.c.holder == holder))
                .values(holder=holder, acquired_at=now, expires_at=until)
            )
            return taken.rowcount == 1

    def release_lock(self, name: str, holder: str) -> bool:
        with self._tx() as conn:
            return conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder)).rowcount == 1

    def get_lock(self, name: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(locks).where(locks.c.name == name)).one_or_none()
            return None if row is None else _row_dict(row)

    # -- deliveries and releases ------------------------------------------------------

    def record_delivery(
        self, *, source: str, dedup_key: str, summary: str, body: str, new_runs: Iterable[NewRun]
    ) -> tuple[RecordedEvent, bool]:
        """Record an event that carries the sender's delivery id, with its runs, once.

        (event, True) when new; (the existing event and its runs, False) for a
        redelivery: nothing is written then."""
        with self.intake() as tx:
            event_id = tx.conn.execute(
                self._insert(events)
                .values(source=source, dedup_key=dedup_key, received_at=tx.now, summary=summary[:2000], body=body)
                .on_conflict_do_nothing(index_elements=["source", "dedup_key"])
                .returning(events.c.id)
            ).scalar()
            if event_id is not None:
                return RecordedEvent(event_id, tx.add_runs(event_id, list(new_runs), enqueued=True)), True
            event_id = tx.conn.execute(
                sa.select(events.c.id).where(events.c.source == source, events.c.dedup_key == dedup_key)
            ).scalar_one()
            found = tx.conn.execute(
                sa.select(runs.c.id, runs.c.status).where(runs.c.event_id == event_id).order_by(runs.c.id)
            )
            return RecordedEvent(event_id, [RecordedRun(r.id, False, r.status) for r in found]), False

    def active_deploys(self, environment: str) -> list[dict[str, Any]]:
        """Queued or running deploy runs of an environment."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(runs).where(
                    runs.c.playbook == "deploy",
                    runs.c.target == environment,
                    runs.c.status.in_(ACTIVE_STATUSES),
                )
            )
            return [_run_dict(r) for r in rows]

    def run_status(self, run_id: int) -> str | None:
        with self._tx() as conn:
            return conn.execute(sa.select(runs.c.status).where(runs.c.id == run_id)).scalar()

    def start_release(
        self,
        *,
        environment: str,
        sha: str,
        ref: str,
        images: dict[str, str],
        previous_images: dict[str, str],
        run_id: int,
        order: tuple[float, float],
    ) -> dict[str, Any]:
        """The release row of a deploy run, created once (a re-run finds it)."""
        with self._tx() as conn:
            conn.execute(
                self._insert(releases)
                .values(
                    environment=environment,
                    sha=sha,
                    ref=ref,
                    images=json.dumps(images, sort_keys=True),
                    previous_images=json.dumps(previous_images, sort_keys=True),
                    run_id=run_id,
                    pushed_at=float(order[0]),
                    committed_at=float(order[1]),
                    status="deploying",
                    current=False,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["run_id"])
            )
            row = conn.execute(sa.select(releases).where(releases.c.run_id == run_id)).one()
            return _release_dict(row)

    def release_of_run(self, run_id: int) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(releases).where(releases.c.run_id == run_id)).one_or_none()
            return None if row is None else _release_dict(row)

    def current_release(self, environment: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(releases).where(releases.c.environment == environment, releases.c.current.is_(True))
            ).one_or_none()
            return None if row is None else _release_dict(row)

    def make_current(self, run_id: int) -> None:
        """The run's release is live and current; the environment's previous current one is not."""
        with self._tx() as conn:
            env = conn.execute(sa.select(releases.c.environment).where(releases.c.run_id == run_id)).scalar_one()
            conn.execute(releases.update().where(releases.c.environment == env).values(current=False))
            conn.execute(
                releases.update()
                .where(releases.c.run_id == run_id)
                .values(status="live", current=True, live_at=utcnow())
            )

    def releases_of_dead_deploys(self) -> list[dict[str, Any]]:
        """Releases still `deploying` whose run has ended: their deploy died inside a step
        (worker lost, ledger lost) after it began recreating, so the stack may be half on it."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(releases)
                .join(runs, runs.c.id == releases.c.run_id)
                .where(releases.c.status == "deploying", runs.c.status.in_(sorted(FINAL_STATUSES)))
                .order_by(releases.c.id)
            ).all()
            return [_release_dict(r) for r in rows]

    def set_release_status(self, run_id: int, status: str) -> None:
        with self._tx() as conn:
            conn.execute(releases.update().where(releases.c.run_id == run_id).values(status=status))

    def list_releases(self, environment: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = sa.select(releases).order_by(releases.c.id.desc()).limit(limit)
        if environment:
            query = query.where(releases.c.environment == environment)
        with self._tx() as conn:
            return [_release_dict(r) for r in conn.execute(query)]

    def github_deployment(self, run_id: int) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(github_deployments).where(github_deployments.c.run_id == run_id)).one_or_none()
            if row is None:
                return None
            found = _row_dict(row)
            found["states"] = [s for s in found["states"].split(",") if s]
            return found

    def set_github_deployment(self, run_id: int, repository: str, deployment_id: int) -> None:
        with self._tx() as conn:
            conn.execute(
                self._insert(github_deployments)
                .values(run_id=run_id, repository=repository, deployment_id=deployment_id, states="")
                .on_conflict_do_nothing(index_elements=["run_id"])
            )

    def add_github_state(self, run_id: int, state: str) -> None:
        with self._tx() as conn:
            current = conn.execute(
                sa.select(github_deployments.c.states).where(github_deployments.c.run_id == run_id)
            ).scalar_one()
            joined = f"{current},{state}" if current else state
            conn.execute(github_deployments.update().where(github_deployments.c.run_id == run_id).values(states=joined))

    # -- worker heartbeats ---------------------------------------------------------

    def beat(
        self, hostname: str, pid: int, queues: Iterable[str], interval_seconds: float, now: datetime | None = None
    ) -> None:
        """Record that `hostname` is alive now (upsert of its one row)."""
        now = now or utcnow()
        values = {
            "pid": pid,
            "queues": ",".join(sorted(queues)),
            "interval_seconds": interval_seconds,
            "last_seen": now,
        }
        with self._tx() as conn:
            updated = conn.execute(
                worker_heartbeats.update()
                .where(worker_heartbeats.c.hostname == hostname, worker_heartbeats.c.pid == pid)
                .values(**values)
            )
            if updated.rowcount == 0:
                # New worker, or the same name restarted (new pid): a fresh start time.
                conn.execute(
                    self._insert(worker_heartbeats)
                    .values(hostname=hostname, started_at=now, **values)
                    .on_conflict_do_update(index_elements=["hostname"], set_={**values, "started_at": now})
                )

    def forget_worker(self, hostname: str, pid: int | None = None) -> None:
        """A worker that stopped on purpose: no longer expected to beat."""
        with self._tx() as conn:
            query = worker_heartbeats.delete().where(worker_heartbeats.c.hostname == hostname)
            if pid is not None:
                query = query.where(worker_heartbeats.c.pid == pid)
            conn.execute(query)

    def worker_heartbeats(self, seen_since: datetime) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(worker_heartbeats)
                .where(worker_heartbeats.c.last_seen >= seen_since)
                .order_by(worker_heartbeats.c.hostname)
            ).all()
            return [_row_dict(row) for row in rows]

    # -- pruning --------------------------------------------------------------------

    def prune_runs(self, finished_before: datetime, *, dry_run: bool = False, batch: int = 2000) -> PruneResult:
        """Delete finished runs (and their steps) that ended before `finished_before`,
        and events left with no run; each pruned run is counted in `run_archive`
        (per day, playbook, trigger, status), so totals survive. Queued and
        running runs are never touched, nor deploy runs that a release or a GitHub
        deployment names: they are the deploy history (current release, rollback
        targets, what GitHub was told). Batched: one transaction per batch."""
        total = PruneResult(0, 0, 0)
        while True:
            with self._tx() as conn:
                rows = conn.execute(
                    sa.select(
                        runs.c.id, runs.c.created_at, runs.c.playbook, runs.c.trigger, runs.c.status, runs.c.repeats
                    )
                    .where(
                        runs.c.status.in_(sorted(FINAL_STATUSES)),
                        runs.c.finished_at < finished_before,
                        runs.c.id.not_in(sa.select(releases.c.run_id)),
                        runs.c.id.not_in(sa.select(github_deployments.c.run_id)),
                    )
                    .order_by(runs.c.id)
                    .limit(batch)
                ).all()
                if not rows:
                    break
                ids = [r.id for r in rows]
                step_count = conn.execute(
                    sa.select(sa.func.count()).select_from(steps).where(steps.c.run_id.in_(ids))
                ).scalar_one()
                if dry_run:
                    return PruneResult(len(ids), step_count, 0)
                counts: dict[tuple[str, str, str, str], list[int]] = {}
                for r in rows:
                    key = (f"{r.created_at:%Y-%m-%d}", r.playbook, r.trigger, r.status)
                    counts.setdefault(key, [0, 0])
                    counts[key][0] += 1
                    counts[key][1] += r.repeats
                for (day, playbook, trigger, status), (n, repeats) in counts.items():
                    stmt = self._insert(run_archive).values(
                        day=day, playbook=playbook, trigger=trigger, status=status, runs=n, repeats=repeats
                    )
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["day", "playbook", "trigger", "status"],
                            set_={"runs": run_archive.c.runs + n, "repeats": run_archive.c.repeats + repeats},
                        )
                    )
                conn.execute(steps.delete().where(steps.c.run_id.in_(ids)))
                event_ids = {
                    e for e in conn.execute(sa.select(runs.c.event_id).where(runs.c.id.in_(ids))).scalars() if e
                }
                conn.execute(runs.delete().where(runs.c.id.in_(ids)))
                orphans = [
                    e
                    for e in event_ids
                    if not conn.execute(sa.select(runs.c.id).where(runs.c.event_id == e).limit(1)).first()
                ]
                if orphans:
                    conn.execute(events.delete().where(events.c.id.in_(orphans)))
                total = PruneResult(total.runs + len(ids), total.steps + step_count, total.events + len(orphans))
            if len(rows) < batch:
                break
        return total

    def run_archive(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return [
                _row_dict(r)
                for r in conn.execute(
                    sa.select(run_archive).order_by(run_archive.c.day, run_archive.c.playbook, run_archive.c.status)
                )
            ]

    # -- reading ------------------------------------------------------------------

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one_or_none()
            if row is None:
                return None
            run = _run_dict(row)
            run["steps"] = [
                _row_dict(s)
                for s in conn.execute(sa.select(steps).where(steps.c.run_id == run_id).order_by(steps.c.seq))
            ]
            return run

    def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        trigger: str | None = None,
        target: str | None = None,
        before_id: int | None = None,
        rule: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.id.desc()).limit(limit)
        if rule:
            query = query.where(runs.c.rule == rule)
        if since:
            query = query.where(runs.c.created_at >= since)
        if status:
            query = query.where(runs.c.status == status)
        if trigger:
            query = query.where(runs.c.trigger == trigger)
        if target:
            query = query.where(runs.c.target == target)
        if before_id:
            query = query.where(runs.c.id < before_id)
        with self._tx() as conn:
            return [_run_dict(row) for row in conn.execute(query)]

    def count_events(self, source: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(events)
        if source:
            query = query.where(events.c.source == source)
        with self._tx() as conn:
            return conn.execute(query).scalar_one()

    # -- reporting ------------------------------------------------------------------

    def lock_report(self, run_id: int, seconds: float) -> bool:
        """One reporter per run at a time, so a Slack thread never gets two parents."""
        now = utcnow()
        with self._tx() as conn:
            got = conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    sa.or_(runs.c.report_lock_until.is_(None), runs.c.report_lock_until < now),
                )
                .values(report_lock_until=now + timedelta(seconds=seconds))
            )
            return got.rowcount == 1

    def unlock_report(self, run_id: int) -> None:
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(report_lock_until=None))

    def take_lapsed_report_locks(self, now: datetime | None = None) -> list[tuple[int, str]]:
        """(run id, playbook) of the runs whose report lock ran out, the locks cleared. A reporter
        always unlocks, and is killed at the report task's hard limit, which the lock lasts: one
        that lapsed was held by a reporter that died, whose report (and any retries waiting in
        that worker) is lost until the broker's visibility timeout, and the run's thread behind."""
        now = now or utcnow()
        with self._tx() as conn:
            taken = conn.execute(
                runs.update()
                .where(runs.c.report_lock_until < now)
                .values(report_lock_until=None)
                .returning(runs.c.id, runs.c.playbook)
            ).all()
        return sorted((row.id, row.playbook) for row in taken)

    def set_slack_thread(self, run_id: int, channel: str, ts: str) -> None:
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(slack_channel=channel, slack_ts=ts))

    def mark_step_reported(self, step_id: int) -> None:
        with self._tx() as conn:
            conn.execute(steps.update().where(steps.c.id == step_id).values(reported=True))

    def mark_resolution_reported(self, run_id: int) -> None:
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(resolution_reported=True))

    def set_reported_status(self, run_id: int, status: str) -> None:
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(reported_status=status))


def _lock_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class IntakeTx:
    """Reads and writes of one intake transaction (see `Ledger.intake`).

    Batched: a notification of 50 alerts costs a handful of statements, not
    50 times a handful, so a storm is ingested at the rate it arrives.
    """

    def __init__(self, ledger: Ledger, conn: Connection, now: datetime):
        self.ledger = ledger
        self.conn = conn
        self.now = now

    def lock(self, keys: Iterable[str], shared: Iterable[str] = ()) -> None:
        """Serialise intakes touching the same keys (targets, rules). PostgreSQL:
        transaction-scoped advisory locks, taken in sorted order so two intakes
        cannot deadlock; a key in `shared` (and not in `keys`) is taken in share
        mode: share holders run together, an exclusive holder runs alone.
        SQLite needs nothing: BEGIN IMMEDIATE admits one writer."""
        if self.ledger.dialect != "postgresql":
            return
        modes: dict[int, bool] = {}  # digest → shared?
        for key in shared:
            modes[_lock_digest(key)] = True
        for key in keys:
            modes[_lock_digest(key)] = False
        if modes:
            digests = sorted(modes)
            # One round trip. PostgreSQL evaluates the select list after the ORDER BY (SELECT's
            # documentation: output expressions not referenced in it), so locks go in sorted order.
            self.conn.execute(
                sa.text(
                    "SELECT CASE WHEN s THEN pg_advisory_xact_lock_shared(k) ELSE pg_advisory_xact_lock(k) END"
                    " FROM unnest(CAST(:ks AS bigint[]), CAST(:ss AS boolean[])) AS t(k, s) ORDER BY k"
                ),
                {"ks": digests, "ss": [modes[d] for d in digests]},
            )

    def add_event(self, *, source: str, summary: str, body: str, dedup_key: str | None = None) -> int:
        return self.conn.execute(
            events.insert()
            .values(source=source, dedup_key=dedup_key, received_at=self.now, summary=summary[:2000], body=body)
            .returning(events.c.id)
        ).scalar_one()

    def add_events(self, source: str, items: list[tuple[str, str]]) -> list[int]:
        """Insert (summary, body) events of one source in one statement; ids in the given order."""
        if not items:
            return []
        rows = [dict(source=source, received_at=self.now, summary=summary[:2000], body=body) for summary, body in items]
        # A list of parameters, not .values(rows): SQLAlchemy's "insertmanyvalues" still sends one
        # multi-row INSERT, but from a statement compiled once and cached (a storm's hot path).
        return list(
            self.conn.execute(events.insert().returning(events.c.id, sort_by_parameter_order=True), rows).scalars()
        )

    def _values(self, event_id: int | None, new: NewRun, enqueued: bool) -> dict[str, Any]:
        return dict(
            event_id=event_id,
            trigger=new.trigger,
            triggered_by=new.triggered_by,
            rule=new.rule,
            playbook=new.playbook,
            target=new.target,
            params=json.dumps(new.params, sort_keys=True),
            summary=new.summary[:2000],
            dedup_key=new.dedup_key,
            status=new.status,
            reason=new.reason,
            created_at=self.now,
            finished_at=self.now if new.status in FINAL_STATUSES else None,
            # Set before the broker send; cleared if the send fails (see clear_enqueued).
            enqueued_at=self.now if enqueued and new.status == "queued" else None,
            enqueue_count=1 if enqueued and new.status == "queued" else 0,
            fingerprint=new.fingerprint,
            alert_starts_at=new.alert_starts_at,
            repeats=0,
        )

    def add_run(self, event_id: int | None, new: NewRun) -> RecordedRun:
        """Insert a run, or count a repeat on the run that has its dedup key."""
        return self.add_runs(event_id, [new])[0]

    def add_runs(self, event_id: int | None, new_runs: list[NewRun], enqueued: bool = False) -> list[RecordedRun]:
        """Insert runs of one event in one statement (see `add_event_runs`)."""
        return self.add_event_runs([(event_id, new) for new in new_runs], enqueued)

    def add_event_runs(self, items: list[tuple[int | None, NewRun]], enqueued: bool = False) -> list[RecordedRun]:
        """Insert (event id, run) pairs in one statement. A run whose dedup key
        exists already, or came earlier in `items`, is not inserted: that run's
        repeat counter goes up instead, once per repeat (created=False)."""
        if not items:
            return []
        first: dict[str, NewRun] = {}
        twins: dict[str, int] = defaultdict(int)  # dedup key → repeats within `items`
        rows = []
        for event_id, new in items:
            if new.dedup_key is not None and new.dedup_key in first:
                twins[new.dedup_key] += 1
                continue
            if new.dedup_key is not None:
                first[new.dedup_key] = new
            rows.append(self._values(event_id, new, enqueued))
        # Keyed rows sorted by key: intakes that share a rule lock wait on each other's keys in
        # one order (no deadlock). Unkeyed rows keep their order (their ids are matched by it).
        rows.sort(key=lambda row: (row["dedup_key"] is None, row["dedup_key"] or ""))
        stmt = self.ledger._insert(runs).on_conflict_do_nothing(index_elements=["dedup_key"])
        inserted = {}
        for row in self.conn.execute(stmt.returning(runs.c.id, runs.c.dedup_key, runs.c.status), rows):
            inserted[row.dedup_key if row.dedup_key is not None else ("id", row.id)] = row
        # Repeats per key: 1 for a key the ledger had (plus its twins), the twins alone for a key inserted now.
        counts = {key: twins[key] + (key not in inserted) for key in first if twins[key] + (key not in inserted)}
        existing = {}
        if counts:
            # One statement: its row locks are taken in one order (no deadlock with a sharer).
            for row in self.conn.execute(
                runs.update()
                .where(runs.c.dedup_key.in_(list(counts)))
                .values(
                    repeats=runs.c.repeats + sa.case(counts, value=runs.c.dedup_key, else_=0),
                    last_repeat_at=self.now,
                )
                .returning(runs.c.id, runs.c.dedup_key, runs.c.status)
            ):
                existing[row.dedup_key] = row
        # Runs without a dedup key come back in VALUES order (PostgreSQL and SQLite both).
        unkeyed = iter(sorted(row.id for key, row in inserted.items() if isinstance(key, tuple)))
        out, created = [], set()
        for _, new in items:
            if new.dedup_key is None:
                out.append(RecordedRun(next(unkeyed), True, new.status))
            elif new.dedup_key in inserted and new.dedup_key not in created:
                created.add(new.dedup_key)
                out.append(RecordedRun(inserted[new.dedup_key].id, True, new.status))
            elif new.dedup_key in inserted:  # a twin of a run inserted just now
                out.append(RecordedRun(inserted[new.dedup_key].id, False, new.status))
            else:
                row = existing[new.dedup_key]
                out.append(RecordedRun(row.id, False, row.status))
        return out

    def existing_runs(self, dedup_keys: Iterable[str]) -> dict[str, Any]:
        """dedup key → (id, status, reason) of the runs that have one of these keys."""
        keys = list(set(dedup_keys))
        if not keys:
            return {}
        rows = self.conn.execute(
            sa.select(runs.c.dedup_key, runs.c.id, runs.c.status, runs.c.reason).where(runs.c.dedup_key.in_(keys))
        )
        return {row.dedup_key: row for row in rows}

    def set_reasons(self, reasons: dict[int, str]) -> None:
        """run id → its new reason, in one statement."""
        if reasons:
            self.conn.execute(
                runs.update()
                .where(runs.c.id.in_(list(reasons)))
                .values(reason=sa.case(reasons, value=runs.c.id, else_=runs.c.reason))
            )

    def reconsider_run(self, run_id: int, status: str, reason: str) -> RecordedRun:
        """A firing skipped for a passing reason (a lock, a cooldown), decided again
        on a later notification: the same run, now queued or skipped anew."""
        queued = status == "queued"
        self.conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == "skipped")
            .values(
                status=status,
                reason=reason,
                repeats=runs.c.repeats + 1,
                last_repeat_at=self.now,
                finished_at=None if queued else self.now,
                enqueued_at=self.now if queued else None,
                enqueue_count=runs.c.enqueue_count + (1 if queued else 0),
            )
        )
        return RecordedRun(run_id, False, status)

    def active_runs(self, targets: Iterable[str]) -> dict[str, int]:
        """target → the oldest queued or running run on it (escalations do not hold a target)."""
        targets = list(set(targets))
        if not targets:
            return {}
        rows = self.conn.execute(
            sa.select(runs.c.target, sa.func.min(runs.c.id))
            .where(runs.c.target.in_(targets), runs.c.status.in_(ACTIVE_STATUSES), runs.c.playbook != "escalate")
            .group_by(runs.c.target)
        )
        return dict(rows.all())

    def rule_history(self, rule: str, targets: Iterable[str], cap_since: datetime) -> dict[str, dict[str, Any]]:
        """target → what the rule did there: last action, actions and escalations since cap_since."""
        targets = list(set(targets))
        if not targets:
            return {}
        acted = runs.c.playbook != "escalate"
        in_window = runs.c.created_at >= cap_since
        rows = self.conn.execute(
            sa.select(
                runs.c.target,
                sa.func.max(sa.case((acted, runs.c.created_at))),
                sa.func.count(sa.case((sa.and_(acted, in_window), 1))),
                sa.func.count(sa.case((sa.and_(~acted, in_window), 1))),
            )
            .where(runs.c.rule == rule, runs.c.target.in_(targets), ALERT_ACTIONS)
            .group_by(runs.c.target)
        )
        history = {}
        for target, last, actions, escalations in rows:
            if isinstance(last, str):  # SQLite returns max() of a DateTime as text
                last = datetime.fromisoformat(last).replace(tzinfo=UTC)
            elif last is not None and last.tzinfo is None:
                last = last.replace(tzinfo=UTC)
            history[target] = {
                "last_action_at": last,
                "actions_in_cap_window": actions,
                "escalated_in_cap_window": escalations > 0,
            }
        return history

    def touch_subjects(self, rule: str, subjects: Iterable[str]) -> None:
        """Record that these subjects (targets, or alerts without one) fired for the rule now."""
        # Sorted: intakes sharing a rule lock take these row locks in one order (no deadlock).
        rows = [{"rule": rule, "subject": subject, "last_seen": self.now} for subject in sorted(set(subjects))]
        if not rows:
            return
        stmt = self.ledger._insert(alert_subjects)
        # Never back in time: an intake that began earlier may commit later.
        later = sa.case(
            (stmt.excluded.last_seen > alert_subjects.c.last_seen, stmt.excluded.last_seen),
            else_=alert_subjects.c.last_seen,
        )
        self.conn.execute(
            stmt.on_conflict_do_update(index_elements=["rule", "subject"], set_={"last_seen": later}), rows
        )

    def subjects_last_seen(self, rule: str, subjects: Iterable[str], since: datetime) -> dict[str, datetime]:
        """subject → when it last fired for the rule, for those of these subjects seen since `since`."""
        wanted = list(set(subjects))
        if not wanted:
            return {}
        rows = self.conn.execute(
            sa.select(alert_subjects.c.subject, alert_subjects.c.last_seen).where(
                alert_subjects.c.rule == rule,
                alert_subjects.c.subject.in_(wanted),
                alert_subjects.c.last_seen >= since,
            )
        )
        return dict(rows.all())

    def storm_window(self, rule: str, since: datetime) -> tuple[int, bool]:
        """What the storm breaker reads, in one statement: the rule's distinct subjects seen
        since `since`, and whether it escalated a storm since then."""
        subjects = sa.select(sa.func.count()).where(alert_subjects.c.rule == rule, alert_subjects.c.last_seen >= since)
        storms = sa.select(sa.func.count()).where(runs.c.rule == rule, STORM_ESCALATIONS, runs.c.created_at >= since)
        row = self.conn.execute(sa.select(subjects.scalar_subquery(), storms.scalar_subquery())).one()
        return row[0], row[1] > 0

    def resolve_alert_runs(self, alerts: Iterable[tuple[str, str]]) -> dict[int, tuple[str, str]]:
        """Mark the runs answering these (fingerprint, startsAt) firings resolved;
        return those newly marked: run id → its (fingerprint, startsAt)."""
        pairs = list(set(alerts))
        if not pairs:
            return {}
        rows = self.conn.execute(
            runs.update()
            .where(
                sa.tuple_(runs.c.fingerprint, runs.c.alert_starts_at).in_(pairs),
                runs.c.resolved_at.is_(None),
            )
            .values(resolved_at=self.now)
            .returning(runs.c.id, runs.c.fingerprint, runs.c.alert_starts_at)
        )
        return {row.id: (row.fingerprint, row.alert_starts_at) for row in rows}


def _row_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def _release_dict(row: Any) -> dict[str, Any]:
    release = _row_dict(row)
    release["images"] = json.loads(release["images"] or "{}")
    release["previous_images"] = json.loads(release["previous_images"] or "{}")
    return release


def _run_dict(row: Any) -> dict[str, Any]:
    run = _row_dict(row)
    run["params"] = json.loads(run["params"] or "{}")
    return run


def jsonable(value: Any) -> Any:
    """Ledger rows as JSON: timestamps in ISO 8601 UTC."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def ledger_url(database_url: str | None, data_dir: Any) -> str:
    """DATABASE_URL when set, else the embedded SQLite file in the data dir."""
    if database_url:
        return database_url
    return f"sqlite:///{data_dir}/ledger.sqlite3"


__all__ = [
    "FINAL_STATUSES",
    "Ledger",
    "LedgerUnavailable",
    "NewRun",
    "PruneResult",
    "RecordedEvent",
    "RecordedRun",
    "jsonable",
    "ledger_url",
    "utcnow",
]
