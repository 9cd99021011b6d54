"""The one configuration file, `opsfleet.yaml`, validated at start.

Secrets never live in the file: they come from the environment (`Secrets`).
The file may name further variables as `${NAME}` for credentials of the
systems opsfleet manages; those values are substituted at load and redacted
whenever the configuration is printed.

Every validation error names the key it is about, in the form
`remediation.rules[2].match: unknown operator "=="`.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

_SERVICE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


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
        default=None, description="Base URL of the web app, used in links from Slack and GitHub."
    )


class WebSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=2, ge=1, le=64)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)


class BrokerSettings(_Strict):
    key_prefix: str = Field(default="opsfleet:", description="Prefix of every Redis key the broker writes.")
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

    @model_validator(mode="after")
    def _hard_above_soft(self) -> WorkerSettings:
        if self.step_hard_timeout_seconds <= self.step_soft_timeout_seconds:
            raise ValueError("step_hard_timeout_seconds must be above step_soft_timeout_seconds")
        return self


class SweeperSettings(_Strict):
    interval_seconds: int = Field(default=15, ge=1)
    requeue_after_seconds: int = Field(default=60, ge=1)


class SlackSettings(_Strict):
    channel: str = "#ops"
    timeout_seconds: int = Field(default=10, ge=1, le=120)


class DockerSettings(_Strict):
    timeout_seconds: int = Field(default=30, ge=1, le=600)


class ServiceSpec(_Strict):
    """A service opsfleet may act on. Alerts select services by name only;
    the container is always found from this entry, never from a label."""

    container: str | None = Field(default=None, description="Container name.")
    compose_project: str | None = None
    compose_service: str | None = None
    health_url: str | None = None
    host: str | None = None

    @model_validator(mode="after")
    def _one_locator(self) -> ServiceSpec:
        if bool(self.container) == bool(self.compose_service):
            raise ValueError("set exactly one of container or compose_service")
        return self


PlaybookName = Literal["restart_service"]

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
        default=None, description="copytruncate: pause this service's container; else stop the processes holding the file."
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
    services: tuple[str, ...] = Field(default=(), description="Configured services whose container's repository is pruned.")
    protect: tuple[str, ...] = Field(default=(), description="Image references never removed (repo:tag or id).")
    dangling: bool = True


class CleanupSettings(_Strict):
    at: str = Field(default="03:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Daily, HH:MM UTC.")
    images: ImageCleanupSettings = ImageCleanupSettings()
    runs_max_age: int | str | None = Field(
        default="90d", validate_default=True, description="Finished runs older than this leave the ledger (counted in run_archive)."
    )

    _span = field_validator("runs_max_age")(lambda cls, v: _seconds_or_none(v))


class TargetSpec(_Strict):
    service: str | None = Field(default=None, description="Always act on this configured service.")
    service_label: str | None = Field(
        default=None, description="Alert label whose value names a configured service."
    )

    @model_validator(mode="after")
    def _one_way(self) -> TargetSpec:
        if bool(self.service) == bool(self.service_label):
            raise ValueError("set exactly one of service or service_label")
        return self


class RuleSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Alertmanager-style matchers, kept as their normalised text; see `matchers`.
    match: tuple[str, ...]
    playbook: PlaybookName
    target: TargetSpec
    params: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False

    @field_validator("match", mode="before")
    @classmethod
    def _parse_matchers(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError('a list of label matchers, e.g. [\'alertname="ServiceDown"\']')
        return tuple(str(parse_matcher(item)) for item in value)

    @property
    def matchers(self) -> tuple[Matcher, ...]:
        return tuple(parse_matcher(text) for text in self.match)


class RemediationSettings(_Strict):
    # first_match: an alert gets the action of the first rule it matches, in
    # file order. all_match: every matching rule acts.
    mode: Literal["first_match", "all_match"] = "first_match"
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
    rotation: RotationSettings = RotationSettings()
    cleanup: CleanupSettings = CleanupSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("services")
    @classmethod
    def _service_names(cls, services: dict[str, ServiceSpec]) -> dict[str, ServiceSpec]:
        for name in services:
            if not re.match(_SERVICE_NAME, name):
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
    # Keys whose values came from ${VAR} substitution, redacted when shown.
    interpolated: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        path = self.config.fleet.data_dir
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def mask_url_password(url: str) -> str:
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", url)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(node: Any, path: str, environ: dict[str, str], found: dict[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {
            key: _interpolate(value, f"{path}.{key}" if path else str(key), environ, found, problems)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(value, f"{path}[{i}]", environ, found, problems) for i, value in enumerate(node)]
    if isinstance(node, str) and _VAR.search(node):
        names = _VAR.findall(node)
        missing = [n for n in names if n not in environ]
        if missing:
            problems.append(f"{path}: environment variable {missing[0]} is not set")
            return node
        found[path] = node
        return _VAR.sub(lambda m: environ[m.group(1)], node)
    return node


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
    for i, rule in enumerate(config.remediation.rules):
        service = rule.target.service
        if service and service not in config.services:
            known = ", ".join(names) or "none configured"
            problems.append(f'remediation.rules[{i}].target.service: unknown service "{service}" (services: {known})')
    if "opsfleet" in config.rotation.sets and config.logging.files:
        problems.append('rotation.sets.opsfleet: the name is taken by opsfleet\'s own logs (configure them under logging.rotate)')
    for name, spec in config.rotation.sets.items():
        where = f"rotation.sets.{name}"
        for key, service in (("reopen.service", spec.reopen and spec.reopen.service), ("pause_service", spec.pause_service)):
            if service and service not in config.services:
                known = ", ".join(names) or "none configured"
                problems.append(f'{where}.{key}: unknown service "{service}" (services: {known})')
    for i, service in enumerate(config.cleanup.images.services):
        if service not in config.services:
            problems.append(f'cleanup.images.services[{i}]: unknown service "{service}"')
    return problems


def config_warnings(config: Config) -> list[str]:
    """Valid but risky settings, each naming the key: `config check` prints them."""
    warnings = []
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
    raw: Any, *, source: str, base_dir: Path, environ: dict[str, str] | None = None
) -> LoadedConfig:
    environ = dict(os.environ if environ is None else environ)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"], source)
    problems: list[str] = []
    found: dict[str, str] = {}
    raw = _interpolate(raw, "", environ, found, problems)
    if problems:
        raise ConfigError(problems, source)
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err), source) from None
    problems = _cross_check(config)
    if problems:
        raise ConfigError(problems, source)
    return LoadedConfig(config, Secrets.from_env(environ), source, base_dir, found)


def resolve_config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """--config wins, then $OPSFLEET_CONFIG, then ./opsfleet.yaml; None means embedded defaults."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> LoadedConfig:
    resolved = resolve_config_path(path)
    if resolved is None:
        return parse_config({}, source="embedded defaults", base_dir=Path.cwd(), environ=environ)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read {resolved}: {err.strerror}"], str(resolved)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(resolved)) from None
    return parse_config(raw, source=str(resolved), base_dir=resolved.resolve().parent, environ=environ)


def redacted_view(loaded: LoadedConfig) -> dict[str, Any]:
    """The resolved configuration as `config check` prints it: defaults filled
    in, ${VAR} values shown by name only, environment secrets masked."""
    data = loaded.config.model_dump(mode="json")
    for path in loaded.interpolated:
        _set_path(data, path, f"{loaded.interpolated[path]} (set, redacted)")
    data["fleet"]["data_dir"] = str(loaded.data_dir)
    return {"source": loaded.source, "config": data, "environment": loaded.secrets.redacted()}


def _set_path(data: Any, path: str, value: Any) -> None:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = data
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
