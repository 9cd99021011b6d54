"""The one configuration file, `opsfleet.yaml`, validated at start.

Secrets never live in the file: they come from the environment (`Secrets`).
The file may name further variables as `${NAME}` for credentials of the
systems opsfleet manages; those values are substituted at load and redacted
whenever the configuration is printed.

Every validation error names the key it is about, in the form
`remediation.rules[2].match: unknown operator "=="`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from worker.matchers import Matcher, parse_matcher
from worker.rotation import parse_size, parse_span


def _size_or_none(value: int | str | None) -> int | None:
    return None if value is None else parse_size(value)


def _seconds_or_none(value: int | str | None) -> int | None:
    return None if value is None else int(parse_span(value).total_seconds())


CONFIG_ENV = "OPSFLEET_CONFIG"
DEFAULT_CONFIG_FILE = "opsfleet.yaml"

SECRET_ENV_NAMES = (
    "REDIS_URL",
    "DATABASE_URL",
    "SLACK_BOT_TOKEN",
    "SLACK_API_URL",
    "GITHUB_TOKEN",
    "GITHUB_API_URL",
    "GITHUB_WEBHOOK_SECRET",
    "ALERTMANAGER_TOKEN",
    "OPSFLEET_API_TOKEN",
    "DOCKER_HOST",
)
# Of those, the ones that are addresses rather than credentials may be shown
# (with any password inside them masked).
_ADDRESS_ENV_NAMES = {"REDIS_URL", "DATABASE_URL", "SLACK_API_URL", "GITHUB_API_URL", "DOCKER_HOST"}

_SERVICE_NAME = r"[a-z0-9][a-z0-9_.-]{0,62}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` are `key: what is wrong` lines."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source} is invalid:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSettings(_Strict):
    data_dir: Path = Field(
        default=Path(".opsfleet"),
        description="Embedded ledger, embedded broker, metrics and logs live here.",
    )
    hostname: str = Field(default_factory=socket.gethostname)
    public_url: str | None = Field(
        default=None,
        # Links built on it go into Slack buttons and GitHub's log_url: http(s) only.
        pattern=r"^https?://[^\s<>|]+$",
        description="Base URL of the web app (http:// or https://), used in links from Slack and GitHub.",
    )
    maintenance_host: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="Scheduled backups, rotation and cleanup run on this host's worker (opsfleet worker --host NAME).",
    )


class WebSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=2, ge=1, le=64)
    # Request threads per worker: their Alertmanager notifications share one commit (webhooks.batching).
    threads: int = Field(default=8, ge=1, le=256)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)


class BrokerSettings(_Strict):
    key_prefix: str = Field(
        default="opsfleet:", min_length=1, description="Prefix of every Redis key the broker writes (Redis is shared)."
    )
    # Above the longest step's hard limit, or Redis redelivers a task that
    # is still running to a second worker.
    visibility_timeout_seconds: int = Field(default=3600, ge=60)
    publish_timeout_seconds: float = Field(default=2.0, gt=0, le=30)


class WorkerSettings(_Strict):
    concurrency: int = Field(default=2, ge=1, le=64)
    step_soft_timeout_seconds: int = Field(default=120, ge=1)
    step_hard_timeout_seconds: int = Field(default=150, ge=2)
    # How long a run may sit between steps (waiting in the queue) before the
    # sweeper decides its worker is gone.
    queue_grace_seconds: int = Field(default=300, ge=5)
    # While a step runs, its worker renews the run's lease every third of this: a worker that
    # dies inside a step (SIGKILL, OOM, its host) is found out within this, however long the
    # step may run (a backup's limit is an hour).
    lease_seconds: int = Field(default=60, ge=3, le=3600)
    # Each worker writes a heartbeat row to the ledger this often; the web's
    # /metrics calls a worker down (celery_worker_up 0) after 3 missed beats,
    # so a SIGKILLed worker is seen without asking the workers anything.
    heartbeat_interval_seconds: float = Field(default=10, ge=0.2, le=300)
    # A worker that stopped beating (killed, host gone) is still reported as
    # down for this long, then dropped from /metrics.
    forget_after_seconds: int = Field(default=86400, ge=60)
    # A worker on a host of its own (another metrics folder than the web's)
    # serves its processes' metrics here for Prometheus; unset, the web's
    # /metrics covers the workers that share its folder.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"

    @model_validator(mode="after")
    def _hard_above_soft(self) -> WorkerSettings:
        if self.step_hard_timeout_seconds <= self.step_soft_timeout_seconds:
            raise ValueError("step_hard_timeout_seconds must be above step_soft_timeout_seconds")
        return self


class SweeperSettings(_Strict):
    interval_seconds: int = Field(default=15, ge=1)
    requeue_after_seconds: int = Field(default=60, ge=1)


class SlackSettings(_Strict):
    channel: str = Field(default="#ops", min_length=1)
    timeout_seconds: int = Field(default=10, ge=1, le=120)


class DockerSettings(_Strict):
    timeout_seconds: int = Field(default=30, ge=1, le=600)


class ServiceSpec(_Strict):
    """A service opsfleet may act on. Alerts select services by name only;
    the container is always found from this entry, never from a label."""

    container: str | None = Field(default=None, description="Container name.")
    compose_project: str | None = None
    compose_service: str | None = None
    health_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s]+$", description="http(s) URL answering 2xx when healthy."
    )
    host: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="Pin actions to this host's worker (opsfleet worker --host NAME).",
    )

    @model_validator(mode="after")
    def _one_locator(self) -> ServiceSpec:
        if bool(self.container) == bool(self.compose_service):
            raise ValueError("set exactly one of container or compose_service")
        return self


# The playbooks a rule may name (tests check this against worker.tasks.playbooks).
RULE_PLAYBOOKS = (
    "restart_service",
    "recreate_service",
    "verify",
    "escalate",
    "free_disk",
    "rotate_logs",
    "run_backup",
)
# Playbooks that act on the host (all log sets, all backup series) rather than
# on one service: their rules need no target, and their runs' target is "all".
HOST_PLAYBOOKS = ("free_disk", "rotate_logs", "run_backup")

_SIGNALS = ("HUP", "USR1", "USR2", "INT", "TERM", "QUIT", "WINCH")


class ReopenSpec(_Strict):
    """How a writer learns to reopen its log after the rename: exactly one of
    a signal to the process in `pidfile`, a signal to a configured service's
    container (Docker adapter), a command (an argv list, never a shell), or
    `watched` (the writer reopens by itself when the path's inode changes, as
    opsfleet's own log handler and Python's WatchedFileHandler do)."""

    signal: str = Field(default="HUP", description="Signal name without SIG: HUP, USR1, USR2, ...")
    pidfile: Path | None = None
    service: str | None = None
    command: tuple[str, ...] | None = Field(default=None, min_length=1)
    watched: bool = False

    @field_validator("signal")
    @classmethod
    def _signal_name(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in _SIGNALS:
            raise ValueError(f'unknown signal "{value}" (use one of {", ".join(_SIGNALS)})')
        return name

    @model_validator(mode="after")
    def _one_way(self) -> ReopenSpec:
        ways = [self.pidfile is not None, self.service is not None, self.command is not None, self.watched]
        if sum(ways) != 1:
            raise ValueError("set exactly one of pidfile, service, command or watched: true")
        return self


class LogSetSpec(_Strict):
    """One set of log files rotated together, under one lock."""

    paths: tuple[str, ...] = Field(min_length=1, description="Absolute paths or globs of live log files.")
    mode: Literal["rename", "copytruncate"] = "rename"
    reopen: ReopenSpec | None = None
    max_size: int | str | None = Field(default=None, description='Rotate at this size: 104857600, "100M", "1G".')
    every: int | str | None = Field(default=None, description='Rotate this often: 86400, "1d", "12h".')
    keep: int = Field(default=7, ge=1, le=10000, description="Rotated files kept per live file.")
    max_age: int | str | None = Field(default=None, description='Remove rotated files older than this: "30d".')
    compress: Literal["zstd", "gzip", "none"] = "zstd"
    compress_newest: bool = Field(
        default=True, description="false: the newest rotated file stays uncompressed one cycle (delaycompress)."
    )
    # copytruncate only: the writer is paused for the final copy and the truncate.
    pause_service: str | None = Field(
        default=None,
        description="copytruncate: pause this service's container; else stop the processes holding the file.",
    )
    writer_appends: bool = Field(
        default=False, description="copytruncate: you checked that the writer opens the file with O_APPEND."
    )
    reopen_timeout_seconds: float = Field(default=10, gt=0, le=600)

    @field_validator("paths")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f'"{path}" must be an absolute path or glob')
        return paths

    _size = field_validator("max_size")(lambda cls, v: _size_or_none(v))
    _spans = field_validator("every", "max_age")(lambda cls, v: _seconds_or_none(v))

    @model_validator(mode="after")
    def _coherent(self) -> LogSetSpec:
        if self.max_size is None and self.every is None:
            raise ValueError("set max_size, every, or both: nothing would ever trigger a rotation")
        if self.mode == "rename" and self.reopen is None:
            raise ValueError(
                "mode rename needs reopen (pidfile, service, command or watched); "
                "for a writer that cannot reopen use mode: copytruncate"
            )
        if self.mode == "copytruncate" and self.reopen is not None:
            raise ValueError("mode copytruncate does not reopen the writer: remove reopen")
        return self


class RotationSettings(_Strict):
    check_interval_seconds: int = Field(default=300, ge=10, description="How often beat checks the triggers.")
    state_dir: Path | None = Field(default=None, description="Locks and journals (default: <data_dir>/rotation).")
    sets: dict[str, LogSetSpec] = Field(default_factory=dict)

    @field_validator("sets")
    @classmethod
    def _set_names(cls, sets: dict[str, LogSetSpec]) -> dict[str, LogSetSpec]:
        for name in sets:
            if not re.match(_SERVICE_NAME, name):
                raise ValueError(f'log set name "{name}" must match {_SERVICE_NAME}')
        return sets


class OwnLogRotation(_Strict):
    max_size: int | str | None = Field(default="50M", validate_default=True)
    every: int | str | None = Field(default="1d", validate_default=True)
    keep: int = Field(default=14, ge=1)
    max_age: int | str | None = Field(default="30d", validate_default=True)
    compress: Literal["zstd", "gzip", "none"] = "zstd"

    _size = field_validator("max_size")(lambda cls, v: _size_or_none(v))
    _spans = field_validator("every", "max_age")(lambda cls, v: _seconds_or_none(v))


class LoggingSettings(_Strict):
    """opsfleet's own logs: JSON lines in <data_dir>/logs (all events, and errors
    alone), rotated by the built-in log set "opsfleet"."""

    files: bool = True
    rotate: OwnLogRotation = OwnLogRotation()


class ImageCleanupSettings(_Strict):
    keep: int = Field(default=3, ge=1, description="Newest images kept per repository.")
    repositories: tuple[str, ...] = Field(default=(), description='Repositories to prune, e.g. "shop/api".')
    services: tuple[str, ...] = Field(
        default=(), description="Configured services whose container's repository is pruned."
    )
    protect: tuple[str, ...] = Field(default=(), description="Image references never removed (repo:tag or id).")
    dangling: bool = True


class CleanupSettings(_Strict):
    at: str = Field(default="03:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Daily, HH:MM UTC.")
    images: ImageCleanupSettings = ImageCleanupSettings()
    runs_max_age: int | str | None = Field(
        default="90d",
        validate_default=True,
        description="Finished runs older than this leave the ledger (counted in run_archive).",
    )

    _span = field_validator("runs_max_age")(lambda cls, v: _seconds_or_none(v))


class TargetSpec(_Strict):
    service: str | None = Field(default=None, description="Always act on this configured service.")
    service_label: str | None = Field(default=None, description="Alert label whose value names a configured service.")

    @model_validator(mode="after")
    def _one_way(self) -> TargetSpec:
        if bool(self.service) == bool(self.service_label):
            raise ValueError("set exactly one of service or service_label")
        return self


class CapSettings(_Strict):
    max_actions: int = Field(default=3, ge=1)
    window_seconds: int = Field(default=3600, ge=1)


class StormSettings(_Strict):
    max_targets: int = Field(default=10, ge=1)
    window_seconds: int = Field(default=300, ge=1)


class SafetySettings(_Strict):
    """Defaults for every rule; a rule may override each."""

    cooldown_seconds: int = Field(default=300, ge=0)
    cap: CapSettings = CapSettings()
    storm: StormSettings = StormSettings()


class RestartParams(_Strict):
    stop_timeout_seconds: int = Field(default=10, ge=0, le=600)
    verify_timeout_seconds: int = Field(default=30, ge=1, le=3600)


class VerifyParams(_Strict):
    verify_timeout_seconds: int = Field(default=30, ge=1, le=3600)


class NoParams(_Strict):
    pass


class RotateParams(_Strict):
    force: bool = Field(default=False, description="Rotate every file, due or not.")


# What `params` each playbook takes; anything else is a configuration error.
PLAYBOOK_PARAMS: dict[str, type[_Strict]] = {
    "restart_service": RestartParams,
    "recreate_service": RestartParams,
    "verify": VerifyParams,
    "escalate": NoParams,
    "free_disk": RotateParams,
    "rotate_logs": RotateParams,
    "run_backup": NoParams,
}


class RuleSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Alertmanager-style matchers, kept as their normalised text; see `matchers`.
    match: tuple[str, ...]
    playbook: str
    target: TargetSpec | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False
    cooldown_seconds: int | None = Field(default=None, ge=0)
    cap: CapSettings | None = None
    storm: StormSettings | None = None

    @field_validator("playbook")
    @classmethod
    def _known_playbook(cls, name: str) -> str:
        if name not in RULE_PLAYBOOKS:
            raise ValueError(f'unknown playbook "{name}" (playbooks: {", ".join(RULE_PLAYBOOKS)})')
        return name

    @field_validator("params")
    @classmethod
    def _playbook_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        schema = PLAYBOOK_PARAMS.get(info.data.get("playbook", ""))
        if schema is None:
            return params
        try:
            schema.model_validate(params, strict=True)
        except ValidationError as err:
            raise ValueError("; ".join(_format_validation_error(err))) from None
        return params

    @model_validator(mode="after")
    def _target_needed(self) -> RuleSpec:
        # Only escalate (people) and the host playbooks go without a target.
        if self.target is None and self.playbook not in ("escalate", *HOST_PLAYBOOKS):
            raise ValueError(f"target is required for playbook {self.playbook}")
        if self.target is not None and self.playbook in HOST_PLAYBOOKS:
            raise ValueError(f"{self.playbook} acts on the host (every log set, every backup series): remove target")
        return self

    @field_validator("match", mode="before")
    @classmethod
    def _parse_matchers(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            raise ValueError("a list of label matcher strings, e.g. ['alertname=\"ServiceDown\"']")
        parsed, problems = [], []
        for i, item in enumerate(value):  # every bad matcher at once, each with its index
            try:
                parsed.append(str(parse_matcher(item)))
            except ValueError as err:
                problems.append(f"[{i}] {err}" if len(value) > 1 else str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return tuple(parsed)

    @property
    def matchers(self) -> tuple[Matcher, ...]:
        return tuple(parse_matcher(text) for text in self.match)


class RemediationSettings(_Strict):
    # first_match: an alert gets the action of the first rule it matches, in
    # file order. all_match: every matching rule acts.
    mode: Literal["first_match", "all_match"] = "first_match"
    defaults: SafetySettings = SafetySettings()
    rules: tuple[RuleSpec, ...] = ()

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[RuleSpec, ...]) -> tuple[RuleSpec, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f'rule name "{rule.name}" is used twice')
            seen.add(rule.name)
        return rules


class EscalationSettings(_Strict):
    """Where `escalate` pages people. Both paths are tried, each on its own,
    so a Slack outage still reaches the team's Alertmanager route."""

    slack_mention: str = Field(
        default="<!here>", description="Who to mention in Slack, e.g. <!subteam^S0123> for a user group."
    )
    alertmanager_url: str | None = Field(default=None, description="Alertmanager to post OpsfleetEscalation to.")
    alertmanager_labels: dict[str, str] = Field(default_factory=lambda: {"severity": "critical"})
    escalation_ttl_seconds: int = Field(default=3600, ge=60, description="endsAt of the posted alert.")
    timeout_seconds: int = Field(default=10, ge=1, le=60)


class RetentionSpec(_Strict):
    """Grandfather-father-son counts; see worker/retention.py for the exact rules."""

    daily: int = Field(default=30, ge=0)
    weekly: int = Field(default=12, ge=0)
    monthly: int = Field(default=12, ge=0)
    min_count: int = Field(default=3, ge=0, description="Newest verified backups kept whatever the rules say.")


BackupKind = Literal["database", "documents", "config", "models", "inventory"]


class SeriesSpec(_Strict):
    """One thing backed up. `database`: PostgreSQL by pg_dump over a
    connection (`database_url`, credentials as ${VAR}). `documents` and
    `models`: a directory tree (`path`). `config`: listed files and
    directories (`paths`). `inventory`: Docker images and containers."""

    kind: BackupKind
    # Default: models weekly, inventory monthly, everything else daily.
    every: Literal["daily", "weekly", "monthly"] | None = None
    database_url: str | None = None
    service: str | None = Field(
        default=None,
        description="Configured service whose container runs PostgreSQL: dump and restore by `docker exec`; "
        "database_url is then the connection as seen inside the container.",
    )
    bin_dir: str | None = Field(
        default=None, description="Where pg_dump/psql are inside the container (default: PATH)."
    )
    exec_user: str = Field(default="postgres", description="User the tools run as inside the container.")
    stop_services: tuple[str, ...] = Field(
        default=(), description="Configured services using this database: stopped for a restore's swap, then started."
    )
    # custom: pg_dump's compression off and zstd outside (fast): one file, and one more
    # per table of table_file_min_bytes or more (over a connection; not through `service`),
    # dumped one after another and restored <jobs> at a time, each straight from its
    # compressed file. directory: pg_dump -j <jobs> writes one gzip file per table (level
    # directory_compress), restored in place with -j.
    format: Literal["custom", "directory"] = "custom"
    table_file_min_bytes: int = Field(
        default=64 << 20,
        ge=0,
        description="custom format over a connection: a table this large (heap and TOAST) gets a dump of its own; "
        "0: one file.",
    )
    directory_compress: int = Field(default=1, ge=0, le=9, description="pg_dump --compress for directory format.")
    jobs: int = Field(default=2, ge=1, le=32, description="pg_restore -j (and pg_dump -j for directory format).")
    path: Path | None = None
    paths: tuple[Path, ...] = ()
    secret_files: tuple[str, ...] = Field(
        default=(".env", "*.env", "*.key", "*.pem"), description="Glob of file names stored mode 0600."
    )
    retention: RetentionSpec | None = None
    timeout_seconds: int = Field(default=3000, ge=10, description="Dump, archive or restore of this series.")

    @model_validator(mode="after")
    def _source(self) -> SeriesSpec:
        if self.kind == "database":
            if not self.database_url:
                raise ValueError("a database series needs database_url (credentials as ${VAR})")
            from psycopg import ProgrammingError
            from psycopg.conninfo import conninfo_to_dict

            try:
                conninfo_to_dict(self.database_url)
            except ProgrammingError:
                # Not psycopg's message: it quotes the string, which may hold a password.
                raise ValueError(
                    "database_url is not a PostgreSQL connection: use postgresql://USER@HOST:PORT/DBNAME "
                    "(or host=... dbname=...), credentials as ${VAR}"
                ) from None
        elif self.kind in ("documents", "models"):
            if self.path is None:
                raise ValueError(f"a {self.kind} series needs path")
        elif self.kind == "config":
            if not self.paths:
                raise ValueError("a config series needs paths (files and directories)")
        return self

    @property
    def cadence(self) -> str:
        return self.every or {"models": "weekly", "inventory": "monthly"}.get(self.kind, "daily")


class BackupSchedule(_Strict):
    at: str = Field(default="02:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Local time (backup.timezone).")
    weekly_on: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] = "sun"
    monthly_on: int = Field(default=1, ge=1, le=28)
    summary_at: str = Field(
        default="08:00",
        pattern=r"^([01]\d|2[0-3]):[0-5]\d$",
        description="Local time of the daily summary (a run reported to Slack; failed when a backup is stale).",
    )
    enabled: bool = True


class DrillSettings(_Strict):
    enabled: bool = True
    weekday: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] = "sat"
    at: str = Field(default="04:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    scratch_dir: Path | None = Field(
        default=None,
        description="Where the drill extracts trees. Default: <backup.root>/.drill, or <temp dir>/opsfleet-drill "
        "when the backup root is read-only.",
    )
    # The scratch database is created on the series' own server unless a
    # separate (throwaway) server is named here.
    server_url: str | None = None


class BackupSettings(_Strict):
    root: Path = Field(default=Path("/backup"), description="Backup sets live here, one directory each.")
    timezone: str = Field(default="UTC", description="IANA time zone for schedules and retention periods.")
    compression: Literal["zstd", "gzip"] = "zstd"
    zstd_level: int = Field(
        default=2,
        ge=1,
        le=19,
        description="zstd level. 2: measured here as fast as 3 on a database dump and 21 % faster on text, "
        "at the same size or smaller (a pgbench dump 5 % smaller, word text 0.4 % larger); 1 is 23 % larger on text.",
    )
    threads: int = Field(default=2, ge=1, le=64, description="zstd worker threads.")
    lock_ttl_seconds: int = Field(
        default=6 * 3600, ge=60, description="A crashed worker's series lock expires after this."
    )
    free_space_factor: float = Field(default=1.2, ge=1.0, description="Need previous size × this free before starting.")
    min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    step_timeout_seconds: int = Field(
        default=3300, ge=30, description="Soft limit of a backup or restore step (all its series together)."
    )
    retention: RetentionSpec = RetentionSpec()
    schedule: BackupSchedule = BackupSchedule()
    drill: DrillSettings = DrillSettings()
    scratch_dir: Path | None = Field(
        default=None,
        description="Where a restore unpacks a dump (pg_restore -j needs a file it can seek in) and stages config "
        "files. Default: <backup.root>/.restore, or <temp dir>/opsfleet-restore when the backup root is read-only "
        "(restoring from a mounted copy).",
    )
    recover_stop_order: tuple[str, ...] = Field(
        default=(), description="Services `opsfleet recover` stops in this order (and starts in reverse)."
    )
    health_timeout_seconds: int = Field(default=120, ge=1, description="Recovery's health gate waits this long.")
    stop_timeout_seconds: int = Field(default=10, ge=0, le=600, description="Docker stop timeout for restores' stops.")
    series: dict[str, SeriesSpec] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f'unknown time zone "{value}" (an IANA name such as Europe/Berlin)') from None
        return value

    @field_validator("series")
    @classmethod
    def _series_names(cls, series: dict[str, SeriesSpec]) -> dict[str, SeriesSpec]:
        for name in series:
            if not re.fullmatch(_SERVICE_NAME, name):
                raise ValueError(f'series name "{name}" must match {_SERVICE_NAME}')
        return series


_TEMPLATE_FIELDS = ("sha", "short_sha", "branch", "tag")


class HealthGate(_Strict):
    passes: int = Field(default=3, ge=1, le=100, description="Consecutive passes each service needs.")
    interval_seconds: float = Field(default=1.0, gt=0, le=60, description="Between two checks.")
    timeout_seconds: int = Field(default=30, ge=1, le=3600, description="The gate fails after this.")


class BusinessCheck(_Strict):
    """An HTTP probe the release must pass after its services are healthy (the health gate's
    last part): the status it answers and, optionally, a text its body holds."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://\S+$", description="Credentials as ${VAR}.")
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_text: str | None = Field(default=None, min_length=1, description="A text the body must contain.")
    timeout_seconds: float = Field(default=5, gt=0, le=60)


class DeployEnvironment(_Strict):
    """One environment a push deploys: which services, which images, which gate."""

    branch: str | None = Field(default=None, description="A push to this branch deploys its head commit.")
    tags: bool = Field(default=False, description="A push of a v* tag deploys it.")
    deployments: bool = Field(
        default=False,
        description="A `deployment` event (Deployments API) for an environment of this name deploys its sha.",
    )
    workflow: str | None = Field(
        default=None,
        min_length=1,
        description="Deploy after CI: a workflow (name or .github/workflows/ path) completing with success on `branch` "
        "deploys its head commit; pushes to the branch then wait for it.",
    )
    repository: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="Accept pushes of this GitHub repository only (owner/name); default: any.",
    )
    services: tuple[str, ...] = Field(
        min_length=1, description="Configured services this environment deploys, in order."
    )
    image: str | None = Field(
        default=None, description='Image repository for every service, e.g. "registry:5000/shop".'
    )
    images: dict[str, str] = Field(default_factory=dict, description="Image repository per service (overrides image).")
    tag_template: str = Field(default="{branch}-{short_sha}", description="Fields: {sha} {short_sha} {branch} {tag}.")
    compose_file: Path | None = Field(
        default=None,
        description="The team's compose file: each service's container is made from its definition there "
        "(with the new tag; compose's labels, so docker-compose ps lists it), depends_on orders the recreate "
        "(dependencies first), and its image names the repository when images/image do not. Services are "
        "matched by their compose_service (or name).",
    )
    health: HealthGate = HealthGate()
    checks: tuple[BusinessCheck, ...] = Field(
        default=(),
        description="Business checks, after every service passed the health gate; a failing one fails the gate.",
    )
    keep_releases: int = Field(default=2, ge=0, le=50, description="Earlier releases kept as rollback targets.")
    backup: tuple[str, ...] = Field(
        default=(),
        description="Backup series (backup.series names) taken and verified before anything is stopped; "
        "empty: no pre-deploy backup.",
    )
    migrating: bool = Field(
        default=False,
        description="This environment's new releases migrate the database as they start: a rollback restores "
        "the pre-deploy backup of the database series in `backup` before the previous images start again.",
    )
    prune_images: bool = Field(
        default=True,
        description="After a release goes live, remove this environment's local images beyond it and its "
        "keep_releases rollback targets (a registry can serve them again).",
    )
    stop_timeout_seconds: int = Field(default=5, ge=0, le=600)
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0, description="Free disk floor on Docker's data root.")
    min_free_memory_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Available memory floor on Docker's host (checked when Docker runs on this host).",
    )

    @field_validator("tag_template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        import string

        try:
            names = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as err:
            raise ValueError(f"not a template: {err}") from None
        for name in names:
            if name not in _TEMPLATE_FIELDS:
                raise ValueError(
                    f'unknown field "{{{name}}}" (use {", ".join("{" + f + "}" for f in _TEMPLATE_FIELDS)})'
                )
        return value

    @model_validator(mode="after")
    def _has_trigger(self) -> DeployEnvironment:
        if not self.branch and not self.tags and not self.deployments:
            raise ValueError("set branch, tags: true or deployments: true (what triggers this environment)")
        if self.workflow and not self.branch:
            raise ValueError("workflow needs branch (the branch whose successful runs deploy)")
        return self

    def image_repository(self, service: str) -> str | None:
        return self.images.get(service) or self.image


class RegistryAuth(_Strict):
    """Credentials for pulling from one registry (its host[:port], as image references name it)."""

    username: str = Field(min_length=1)
    password: str = Field(min_length=1, description="As ${VAR}: secrets come from the environment.")


class DeploySettings(_Strict):
    registries: dict[str, RegistryAuth] = Field(
        default_factory=dict,
        description='Pull credentials per registry host, e.g. {"registry.local:5000": {username: deploy, '
        "password: ${REGISTRY_PASSWORD}}}.",
    )
    lock_ttl_seconds: int = Field(default=900, ge=30, description="A dead worker's environment lock lapses after this.")
    lock_wait_seconds: int = Field(
        default=90,
        ge=0,
        description="How long a deploy waits in its lock step; then it goes back to the queue (the sweeper sends "
        "it again after sweeper.requeue_after_seconds) rather than keep a worker busy.",
    )
    max_wait_seconds: int = Field(
        default=3600, ge=0, description="A deploy still waiting for the lock this long after it was recorded fails."
    )
    environments: dict[str, DeployEnvironment] = Field(default_factory=dict)

    @field_validator("environments")
    @classmethod
    def _env_names(cls, envs: dict[str, DeployEnvironment]) -> dict[str, DeployEnvironment]:
        for name in envs:
            if not re.fullmatch(_SERVICE_NAME, name):
                raise ValueError(f'environment name "{name}" must match {_SERVICE_NAME}')
        return envs


class Config(_Strict):
    fleet: FleetSettings = FleetSettings()
    web: WebSettings = WebSettings()
    broker: BrokerSettings = BrokerSettings()
    worker: WorkerSettings = WorkerSettings()
    sweeper: SweeperSettings = SweeperSettings()
    slack: SlackSettings = SlackSettings()
    docker: DockerSettings = DockerSettings()
    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    remediation: RemediationSettings = RemediationSettings()
    escalation: EscalationSettings = EscalationSettings()
    backup: BackupSettings = BackupSettings()
    rotation: RotationSettings = RotationSettings()
    cleanup: CleanupSettings = CleanupSettings()
    logging: LoggingSettings = LoggingSettings()
    deploy: DeploySettings = DeploySettings()

    @field_validator("services")
    @classmethod
    def _service_names(cls, services: dict[str, ServiceSpec]) -> dict[str, ServiceSpec]:
        for name in services:
            if not re.fullmatch(_SERVICE_NAME, name):
                raise ValueError(f'service name "{name}" must match {_SERVICE_NAME}')
        return services


@dataclass(frozen=True)
class Secrets:
    """Credentials and addresses from the environment only."""

    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Secrets:
        environ = os.environ if environ is None else environ
        return cls({name: environ[name] for name in SECRET_ENV_NAMES if environ.get(name)})

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def redacted(self) -> dict[str, str]:
        shown = {}
        for name in SECRET_ENV_NAMES:
            value = self.values.get(name)
            if value is None:
                shown[name] = "(unset)"
            elif name in _ADDRESS_ENV_NAMES:
                shown[name] = mask_url_password(value)
            else:
                shown[name] = "(set, redacted)"
        return shown


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    secrets: Secrets
    source: str  # the file it came from, or "embedded defaults"
    base_dir: Path
    # Keys (as paths) whose values came from ${VAR} substitution, with the
    # original text: redacted when shown.
    interpolated: dict[tuple, str] = field(default_factory=dict)

    # Values that must never be shown: credentials from the environment and
    # every value a ${VAR} brought in.
    secret_texts: frozenset[str] = frozenset()

    # Loaded with missing_ok: the ${VAR}s that were not set, as "key: environment variable
    # NAME is not set"; each such value holds a placeholder, never to be used.
    unset: tuple[str, ...] = ()

    def redact(self, text: str) -> str:
        """Text fit for the ledger, Slack and logs: secrets replaced by ***."""
        for secret in sorted(self.secret_texts, key=len, reverse=True):
            text = text.replace(secret, "***")
        return mask_url_password(text)

    @property
    def data_dir(self) -> Path:
        path = self.config.fleet.data_dir
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def backup_root(self) -> Path:
        path = self.config.backup.root
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def compose_path(self, environment: str) -> Path | None:
        return _compose_path(self.config.deploy.environments[environment], self.base_dir)

    def compose_names(self, environment: str) -> dict[str, str]:
        """The environment's services → their compose service names."""
        return _compose_names(self.config, self.config.deploy.environments[environment])

    def compose_project(self, environment: str, environ: dict[str, str] | None = None):
        """The environment's compose file, read now (variables from `environ`, default the
        process's, and the .env beside it). Raises ComposeError when it cannot be used."""
        return _compose_project(self.config, self.base_dir, environment, os.environ if environ is None else environ)

    def deploy_order(self, environment: str, project=None) -> list[str]:
        """The environment's services in the order a deploy recreates them: dependencies first
        by its compose file's depends_on when it names one (`project`: that file, read already),
        else as `services` lists them. Raises ComposeError when the compose file cannot be used."""
        from worker.compose import dependency_order, read_compose

        env = self.config.deploy.environments[environment]
        path = self.compose_path(environment)
        if path is None:
            return list(env.services)
        names = self.compose_names(environment)
        compose = {"services": project.services} if project is not None else read_compose(path)
        ordered = dependency_order(list(names.values()), compose)
        by_compose = {compose: service for service, compose in names.items()}
        return [by_compose[name] for name in ordered]


def _compose_path(env: DeployEnvironment, base_dir: Path) -> Path | None:
    if not env.compose_file:
        return None
    return env.compose_file if env.compose_file.is_absolute() else (base_dir / env.compose_file).resolve()


def _compose_names(config: Config, env: DeployEnvironment) -> dict[str, str]:
    return {s: config.services[s].compose_service or s for s in env.services if s in config.services}


def _compose_project(config: Config, base_dir: Path, environment: str, environ):
    from worker.compose import ComposeError, load_project

    env = config.deploy.environments[environment]
    path = _compose_path(env, base_dir)
    projects = {config.services[s].compose_project for s in env.services if s in config.services} - {None}
    if len(projects) > 1:
        raise ComposeError(f"the environment's services name different compose projects: {', '.join(sorted(projects))}")
    return load_project(path, dict(environ), project_name=next(iter(projects), None))


def _read_compose_files(config: Config, base_dir: Path, environ: dict[str, str]) -> tuple[Config, list[str]]:
    """Each environment with a compose_file: the file must define and order its services into
    containers opsfleet can create; a service without an image repository in opsfleet.yaml
    takes the compose file's (which the deploy then tags)."""
    from worker.compose import ComposeError, container_definition, dependency_order, image_repository

    problems: list[str] = []
    environments = dict(config.deploy.environments)
    for name, env in config.deploy.environments.items():
        if not env.compose_file:
            continue
        try:
            project = _compose_project(config, base_dir, name, environ)
            names = _compose_names(config, env)
            dependency_order(list(names.values()), {"services": project.services})
            images = dict(env.images)
            for service, compose_service in names.items():
                container_definition(project, compose_service, "opsfleet-check:tag", environ)
                if not env.image_repository(service) and image_repository(project, compose_service):
                    images[service] = image_repository(project, compose_service)
        except ComposeError as err:
            problems.append(f"deploy.environments.{name}.compose_file: {err}")
            continue
        environments[name] = env.model_copy(update={"images": images})
    deploy = config.deploy.model_copy(update={"environments": environments})
    return config.model_copy(update={"deploy": deploy}), problems


def mask_url_password(url: str) -> str:
    # user:password@ and :password@ (Redis's usual form) alike
    return re.sub(r"(//[^:/@]*:)[^@/]+@", r"\1***@", url)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(
    node: Any, path: tuple, environ: dict[str, str], found: dict[tuple, str], problems: list[str], unset: set[str]
) -> Any:
    """`node` with each ${VAR} substituted; `found`: what was substituted where; `problems` and
    `unset`: each value naming an unset variable (left as it is), and every such variable."""
    if isinstance(node, dict):
        return {key: _interpolate(value, (*path, key), environ, found, problems, unset) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(value, (*path, i), environ, found, problems, unset) for i, value in enumerate(node)]
    if isinstance(node, str) and _VAR.search(node):
        missing = [n for n in _VAR.findall(node) if n not in environ]
        if missing:
            problems.append(f"{_format_loc(path)}: environment variable {missing[0]} is not set")
            unset.update(missing)
            return node
        found[path] = node
        return _VAR.sub(lambda m: environ[m.group(1)], node)
    return node


# Keys that locate the ledger and the backups: a reading command needs them (parse_config).
LOCATING_KEYS = ("fleet.data_dir:", "backup.root:")


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for item in err.errors():
        # Drop pydantic's internal tags (model-validator steps, union arms).
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{_format_loc(loc)}: {msg}")
    return problems


def _cross_check(config: Config) -> list[str]:
    """Checks that span sections, each naming the key at fault."""
    problems = []
    if config.broker.visibility_timeout_seconds <= config.worker.step_hard_timeout_seconds:
        problems.append(
            "broker.visibility_timeout_seconds: must be above worker.step_hard_timeout_seconds "
            f"({config.worker.step_hard_timeout_seconds}), or Redis re-delivers steps that are still running"
        )
    names = sorted(config.services)
    soft = config.worker.step_soft_timeout_seconds
    for i, rule in enumerate(config.remediation.rules):
        for key in ("stop_timeout_seconds", "verify_timeout_seconds"):
            if rule.params.get(key, 0) >= soft:
                problems.append(
                    f"remediation.rules[{i}].params.{key}: must be below worker.step_soft_timeout_seconds ({soft}), "
                    "or the step is stopped before it ends"
                )
        service = rule.target.service if rule.target else None
        if service and service not in config.services:
            known = ", ".join(names) or "none configured"
            problems.append(f'remediation.rules[{i}].target.service: unknown service "{service}" (services: {known})')
    for name, series in config.backup.series.items():
        if series.service and series.service not in config.services:
            known = ", ".join(names) or "none configured"
            problems.append(f'backup.series.{name}.service: unknown service "{series.service}" (services: {known})')
        for service in series.stop_services:
            if service not in config.services:
                known = ", ".join(names) or "none configured"
                problems.append(f'backup.series.{name}.stop_services: unknown service "{service}" (services: {known})')
    for service in config.backup.recover_stop_order:
        if service not in config.services:
            known = ", ".join(names) or "none configured"
            problems.append(f'backup.recover_stop_order: unknown service "{service}" (services: {known})')
    if config.backup.step_timeout_seconds + 30 >= config.broker.visibility_timeout_seconds:
        problems.append(
            f"backup.step_timeout_seconds: must be below broker.visibility_timeout_seconds - 30 "
            f"({config.broker.visibility_timeout_seconds}), or Redis re-delivers a backup step that is still running"
        )
    if "opsfleet" in config.rotation.sets and config.logging.files:
        problems.append(
            "rotation.sets.opsfleet: the name is taken by opsfleet's own logs (configure them under logging.rotate)"
        )
    for name, spec in config.rotation.sets.items():
        where = f"rotation.sets.{name}"
        for key, service in (
            ("reopen.service", spec.reopen and spec.reopen.service),
            ("pause_service", spec.pause_service),
        ):
            if service and service not in config.services:
                known = ", ".join(names) or "none configured"
                problems.append(f'{where}.{key}: unknown service "{service}" (services: {known})')
    for i, service in enumerate(config.cleanup.images.services):
        if service not in config.services:
            problems.append(f'cleanup.images.services[{i}]: unknown service "{service}"')
    deploy_owner: dict[str, str] = {}
    for env_name, env in config.deploy.environments.items():
        where = f"deploy.environments.{env_name}"
        for i, service in enumerate(env.services):
            if service not in config.services:
                known = ", ".join(names) or "none configured"
                problems.append(f'{where}.services[{i}]: unknown service "{service}" (services: {known})')
            elif not env.image_repository(service):
                problems.append(f"{where}.images.{service}: no image repository (set image or images.{service})")
            if service in deploy_owner:
                problems.append(f'{where}.services[{i}]: "{service}" is deployed by {deploy_owner[service]} already')
            deploy_owner.setdefault(service, where)
        for service in env.images:
            if service not in env.services:
                problems.append(f"{where}.images.{service}: not one of this environment's services")
        for i, series in enumerate(env.backup):
            if series not in config.backup.series:
                known = ", ".join(config.backup.series) or "none configured"
                problems.append(f'{where}.backup[{i}]: unknown backup series "{series}" (backup.series: {known})')
        databases = [s for s in env.backup if s in config.backup.series and config.backup.series[s].kind == "database"]
        if env.migrating and not databases:
            problems.append(
                f"{where}.migrating: a rollback restores the pre-deploy database backup; name a database series "
                "in backup"
            )
        gate = env.health
        # The health step may gate, roll back (stop + start each service) and gate again.
        worst = 2 * gate.timeout_seconds + 2 * env.stop_timeout_seconds * len(env.services)
        if worst >= config.worker.step_soft_timeout_seconds:
            problems.append(
                f"{where}.health.timeout_seconds: 2 × timeout_seconds + 2 × stop_timeout_seconds per service ({worst}) "
                f"must be below worker.step_soft_timeout_seconds ({config.worker.step_soft_timeout_seconds}): "
                "a failed gate rolls back and gates again in the same step"
            )
    if config.deploy.environments and config.deploy.lock_wait_seconds >= config.worker.step_soft_timeout_seconds:
        problems.append(
            f"deploy.lock_wait_seconds: must be below worker.step_soft_timeout_seconds "
            f"({config.worker.step_soft_timeout_seconds})"
        )
    return problems


def config_warnings(config: Config, secrets: Secrets | None = None) -> list[str]:
    """Valid but risky settings, each naming the key: `config check` and `opsfleet run` print them.
    With `secrets`, also what the environment leaves out (no way to page a person)."""
    warnings = []
    if not config.remediation.rules:
        warnings.append(
            "remediation.rules: none configured, so every alert is recorded and ignored; "
            "start from opsfleet.example.yaml (cp opsfleet.example.yaml opsfleet.yaml)"
        )
    elif secrets is not None and not config.escalation.alertmanager_url and not secrets.get("SLACK_BOT_TOKEN"):
        warnings.append(
            "escalation: neither escalation.alertmanager_url nor SLACK_BOT_TOKEN is set, so an escalation "
            "(a cap reached, a storm, an escalate rule) pages nobody and its run fails; set one of them"
        )
    for name, spec in config.rotation.sets.items():
        if spec.mode == "copytruncate" and not spec.writer_appends:
            warnings.append(
                f"rotation.sets.{name}.mode: copytruncate is safe only for writers that open the file with "
                "O_APPEND; a writer without it keeps its offset after the truncate and fills the file with NUL "
                "bytes (opsfleet refuses to truncate while such a writer holds it). Prefer mode: rename with "
                "reopen, or set writer_appends: true once you checked the writer."
            )
    return warnings


def parse_config(
    raw: Any, *, source: str, base_dir: Path, environ: dict[str, str] | None = None, missing_ok: bool = False
) -> LoadedConfig:
    """Validate `raw`. `missing_ok`: for commands that only read the ledger or the backup
    folder, an unset ${VAR} (a credential of a system opsfleet manages) is not an error: the
    value gets a placeholder and `LoadedConfig.unset` says which; every other mistake still is."""
    environ = dict(os.environ if environ is None else environ)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"], source)
    problems: list[str] = []
    found: dict[tuple, str] = {}
    unset: set[str] = set()
    interpolated = _interpolate(raw, (), environ, found, problems, unset)
    # Where the ledger and the backups are is what reading commands read: never a placeholder.
    locating = [p for p in problems if p.startswith(LOCATING_KEYS)]
    if problems and missing_ok and not locating:
        stand_ins = {name: f"unset-{name}" for name in unset}
        try:
            loaded = parse_config(raw, source=source, base_dir=base_dir, environ={**environ, **stand_ins})
        except ConfigError:
            pass  # a placeholder where a URL must be, or other mistakes: reported as without missing_ok
        else:
            # The environment's own secrets (DATABASE_URL, ...) as they are, never a placeholder.
            return dataclasses.replace(loaded, secrets=Secrets.from_env(environ), unset=tuple(problems))
    raw = interpolated
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        # All in one round: what an unset ${VAR} leaves behind is not reported again.
        unset = {problem.split(": ", 1)[0] for problem in problems}

        def caused_by_unset(problem: str) -> bool:
            where, _, what = problem.partition(": ")
            return any(
                where == key
                or where.startswith((f"{key}.", f"{key}["))
                # a check of the section holding it, about it ("backup.series.db: database_url is not ...")
                or (key.startswith(f"{where}.") and key.rsplit(".", 1)[-1] in what)
                for key in unset
            )

        invalid = [p for p in _format_validation_error(err) if not caused_by_unset(p)]
        raise ConfigError(problems + invalid, source) from None
    if problems:
        raise ConfigError(problems, source)
    config, problems = _read_compose_files(config, base_dir, environ)
    problems += _cross_check(config)
    for host in config.deploy.registries:
        if ("deploy", "registries", host, "password") not in found:
            problems.append(
                f"deploy.registries.{host}.password: give it as ${{VAR}} and set VAR in the environment "
                "(secrets never live in the file)"
            )
    if problems:
        raise ConfigError(problems, source)
    secrets = Secrets.from_env(environ)
    texts = {environ[name] for original in found.values() for name in _VAR.findall(original)}
    texts |= {v for k, v in secrets.values.items() if k not in _ADDRESS_ENV_NAMES}
    # Too short to redact without mangling ordinary words.
    texts = frozenset(t for t in texts if len(t) >= 4)
    return LoadedConfig(config, secrets, source, base_dir, found, texts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice: YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def resolve_config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """--config wins, then $OPSFLEET_CONFIG, then ./opsfleet.yaml; None means embedded defaults."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(
    path: str | os.PathLike | None = None, environ: dict[str, str] | None = None, *, missing_ok: bool = False
) -> LoadedConfig:
    """`missing_ok`: see parse_config."""
    resolved = resolve_config_path(path)
    if resolved is None:
        return parse_config({}, source="embedded defaults", base_dir=Path.cwd(), environ=environ)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read {resolved}: {err.strerror}"], str(resolved)) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"not UTF-8 text (byte {err.start}): save the file as UTF-8"], str(resolved)) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        # PyYAML names a string it parsed "<unicode string>"; the reader knows the file already.
        message = str(err).replace('in "<unicode string>", ', "")
        raise ConfigError([f"not valid YAML: {message}"], str(resolved)) from None
    return parse_config(
        raw, source=str(resolved), base_dir=resolved.resolve().parent, environ=environ, missing_ok=missing_ok
    )


def redacted_view(loaded: LoadedConfig) -> dict[str, Any]:
    """The resolved configuration as `config check` prints it: defaults filled
    in, ${VAR} values shown by name only, environment secrets masked."""
    data = loaded.config.model_dump(mode="json")
    for path, original in loaded.interpolated.items():
        _set_path(data, path, f"{original} (set, redacted)")
    data["fleet"]["data_dir"] = str(loaded.data_dir)
    return {"source": loaded.source, "config": data, "environment": loaded.secrets.redacted()}


def _set_path(data: Any, path: tuple, value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
