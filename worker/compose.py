"""The team's compose file, read the way docker-compose reads it, as far as deploys need it.

A deploy of an environment with `compose_file` takes each service's definition from that
file (image repository, command, entrypoint, environment and env files, volumes, network
mode and networks, health check, restart policy, ports, labels, ...), puts the new image
tag on it, and creates the container with compose's own labels, so `docker-compose ps`
(and `docker compose ps`) still list the stack. `depends_on` orders the recreate:
dependencies first (a database before the API that depends on it); a rollback puts them
back in the same order.

Everything here is pure (a parsed mapping in, definitions out), tested as tables in
tests/test_compose_order.py and tests/test_compose_file.py; `read_compose` and
`load_project` read the file (and the `.env` beside it, as compose does). A compose key
opsfleet does not apply is an error naming it, never silently dropped: a container
without its `ulimits` or `devices` is not the container the team wrote down.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ComposeError(ValueError):
    """The compose file cannot be used; the message says why and where."""


# -- reading ---------------------------------------------------------------------------

# compose's interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


@dataclass(frozen=True)
class Interpolated:
    value: Any
    unset: tuple[str, ...]  # variables that were neither set nor defaulted (blank, as compose does)


def interpolate(value: Any, variables: dict[str, str], where: str = "") -> Interpolated:
    """compose's variable substitution over every string of a parsed file.
    An unset variable without a default becomes "" (compose warns; so do we, through
    `unset`); `${NAME:?message}` / `${NAME?message}` is an error."""
    unset: list[str] = []

    def one(text: str, at: str) -> str:
        def replace(match: re.Match) -> str:
            if match["escaped"]:
                return "$"
            name = match["bare"] or match["braced"]
            op, arg = match["op"], match["arg"] or ""
            present = name in variables
            empty = not variables.get(name)
            if op in (":-", "-"):
                use_default = empty if op == ":-" else not present
                return arg if use_default else variables[name]
            if op in (":?", "?"):
                if empty if op == ":?" else not present:
                    raise ComposeError(f"{at}: variable {name} is required: {arg or 'not set'}")
                return variables[name]
            if not present:
                unset.append(name)
                return ""
            return variables[name]

        return _VARIABLE.sub(replace, text)

    def walk(node: Any, at: str) -> Any:
        if isinstance(node, str):
            return one(node, at)
        if isinstance(node, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(node)]
        return node

    result = walk(value, where)
    return Interpolated(result, tuple(dict.fromkeys(unset)))


def read_compose(path: Path) -> dict[str, Any]:
    """The file, parsed (no interpolation): enough for its structure and depends_on."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ComposeError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ComposeError(f"{path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ComposeError(f"{path} is not YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ComposeError(f"{path} has no services mapping")
    return data


def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines (compose's env_file and .env): blank lines and # comments skipped,
    an `export ` prefix allowed, one pair of matching quotes around the value removed."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            continue  # a bare name: compose takes it from the environment; the file gives nothing
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def default_project_name(directory: Path) -> str:
    """compose's default project name: the directory's name, lowercased, [a-z0-9_-] kept."""
    return re.sub(r"[^a-z0-9_-]", "", directory.name.lower()) or "default"


@dataclass(frozen=True)
class ComposeProject:
    name: str
    path: Path
    services: dict[str, dict]
    volumes: dict[str, dict]
    networks: dict[str, dict]
    env_files: dict[str, dict[str, str]] = field(default_factory=dict)  # path → values, read for the services
    unset: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return self.path.parent


def load_project(path: Path, environ: dict[str, str], project_name: str | None = None) -> ComposeProject:
    """The file with variables substituted from `environ` and the `.env` beside it
    (the environment wins, as in compose), and every env_file it names read."""
    data = read_compose(path)
    variables: dict[str, str] = {}
    dotenv = path.parent / ".env"
    if dotenv.is_file():
        try:
            variables.update(parse_env_file(dotenv.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as err:
            raise ComposeError(f"cannot read {dotenv}: {err}") from None
    variables.update(environ)
    done = interpolate(data, variables)
    data = done.value
    # compose's precedence: -p (the services' compose_project here), COMPOSE_PROJECT_NAME, name:, the folder.
    name = project_name or variables.get("COMPOSE_PROJECT_NAME")
    name = name or (data.get("name") if isinstance(data.get("name"), str) else None)
    name = name or default_project_name(path.parent)
    env_files: dict[str, dict[str, str]] = {}
    for service_name, service in data["services"].items():
        for file_path, required in _env_file_paths(service_name, service):
            full = _beside(path.parent, file_path)
            if full in env_files:
                continue
            try:
                env_files[full] = parse_env_file(Path(full).read_text(encoding="utf-8"))
            except FileNotFoundError:
                if required:
                    raise ComposeError(f"services.{service_name}.env_file: {full} does not exist") from None
                env_files[full] = {}
            except (OSError, UnicodeDecodeError) as err:
                raise ComposeError(f"services.{service_name}.env_file: cannot read {full}: {err}") from None
    return ComposeProject(
        name=name,
        path=path,
        services=data["services"],
        volumes=_mapping(data.get("volumes"), "volumes"),
        networks=_mapping(data.get("networks"), "networks"),
        env_files=env_files,
        unset=done.unset,
    )


def _mapping(value: Any, where: str) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: must be a mapping")
    return {str(k): (v or {}) for k, v in value.items()}


def _beside(directory: Path, file_path: str) -> str:
    """A path the compose file names, relative to the file's folder unless absolute."""
    return file_path if os.path.isabs(file_path) else str((directory / file_path).resolve())


def _env_file_paths(name: str, service: Any) -> list[tuple[str, bool]]:
    if not isinstance(service, dict) or service.get("env_file") is None:
        return []
    value = service["env_file"]
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        if isinstance(item, str):
            found.append((item, True))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            found.append((item["path"], bool(item.get("required", True))))
        else:
            raise ComposeError(f"services.{name}.env_file: each entry is a path or {{path, required}}")
    return found


# -- order -----------------------------------------------------------------------------


def depends_on(service: Any) -> list[str]:
    """A compose service's dependencies, in either of compose's forms (a list, or a
    mapping of name → {condition: ...})."""
    if not isinstance(service, dict):
        return []
    found = service.get("depends_on") or []
    if isinstance(found, dict):
        return [str(name) for name in found]
    if isinstance(found, list):
        return [str(name) for name in found]
    raise ComposeError(f"depends_on must be a list or a mapping, not {type(found).__name__}")


def waits_for_healthy(compose: dict[str, Any], wanted: list[str]) -> set[str]:
    """Services among `wanted` that another of `wanted` depends on with
    `condition: service_healthy`: a deploy waits for each to be healthy before going on."""
    found = set()
    for name in wanted:
        service = compose["services"].get(name)
        value = service.get("depends_on") if isinstance(service, dict) else None
        if isinstance(value, dict):
            for dependency, options in value.items():
                if isinstance(options, dict) and options.get("condition") == "service_healthy" and dependency in wanted:
                    found.add(str(dependency))
    return found


def dependency_order(wanted: list[str], compose: dict[str, Any]) -> list[str]:
    """`wanted` (compose service names) ordered dependencies first, following depends_on
    through services outside `wanted` too; otherwise in the order given. A name the file
    does not define, or a cycle, is a ComposeError."""
    services = compose["services"]
    for name in wanted:
        if name not in services:
            raise ComposeError(f'service "{name}" is not in the compose file (it has: {", ".join(services)})')
    order: list[str] = []
    state: dict[str, str] = {}  # name → "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ComposeError(f"depends_on has a cycle: {' → '.join([*path, name])}")
        state[name] = "visiting"
        for dependency in depends_on(services.get(name)):
            if dependency not in services:
                raise ComposeError(
                    f'service "{name}" depends on "{dependency}", which the compose file does not define'
                )
            visit(dependency, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, [])
    chosen = set(wanted)
    return [name for name in order if name in chosen]


# -- definitions -----------------------------------------------------------------------

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_ONEOFF = "com.docker.compose.oneoff"
COMPOSE_NUMBER = "com.docker.compose.container-number"
COMPOSE_CONFIG_HASH = "com.docker.compose.config-hash"
COMPOSE_WORKING_DIR = "com.docker.compose.project.working_dir"
COMPOSE_CONFIG_FILES = "com.docker.compose.project.config_files"

# Keys applied to the container; every other key but these is refused.
APPLIED_KEYS = frozenset(
    {
        "image",
        "command",
        "entrypoint",
        "environment",
        "env_file",
        "volumes",
        "network_mode",
        "networks",
        "healthcheck",
        "labels",
        "container_name",
        "restart",
        "working_dir",
        "user",
        "hostname",
        "ports",
        "stop_signal",
        "stop_grace_period",
        "extra_hosts",
        "logging",
        "privileged",
        "cap_add",
        "cap_drop",
        "init",
        "read_only",
        "tmpfs",
    }
)
# Keys that say nothing about the running container (build is the CI's job; depends_on is
# the order; profiles select services, and a deploy names its services itself).
IGNORED_KEYS = frozenset({"build", "depends_on", "profiles"})


@dataclass(frozen=True)
class ContainerDefinition:
    """What to create: Docker API container config, host config, networks, volumes."""

    service: str  # the compose service
    name: str  # the container name
    image: str
    config: dict[str, Any]  # docker-py APIClient.create_container keyword arguments (but host/networking)
    host: dict[str, Any]  # docker-py APIClient.create_host_config keyword arguments
    networks: tuple[tuple[str, tuple[str, ...], bool], ...]  # (docker network, aliases, external)
    volumes: tuple[tuple[str, str, bool], ...]  # (docker volume, compose key, external)
    anonymous: tuple[str, ...]  # container paths of anonymous volumes
    config_hash: str

    @property
    def labels(self) -> dict[str, str]:
        return self.config["labels"]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_NS = {"us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}


def duration_ns(value: Any, where: str) -> int:
    """compose durations ("1m30s", "500ms", "10s"; a bare number is seconds) in nanoseconds."""
    if isinstance(value, bool):
        raise ComposeError(f"{where}: not a duration: {value!r}")
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    text = str(value).strip()
    if not text or _DURATION.sub("", text):
        raise ComposeError(f'{where}: not a duration: "{text}" (e.g. 30s, 1m30s, 500ms)')
    return sum(int(float(n) * _DURATION_NS[unit]) for n, unit in _DURATION.findall(text))


def _argv(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as err:
            raise ComposeError(f"{where}: {err}") from None
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise ComposeError(f"{where}: a string or a list of strings")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pairs(value: Any, where: str, separator: str = "=") -> dict[str, str | None]:
    """compose's list-or-mapping form (environment, labels, extra_hosts)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): None if v is None else _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        found: dict[str, str | None] = {}
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where}: list entries are strings")
            key, sep, val = item.partition(separator)
            found[key] = val if sep else None
        return found
    raise ComposeError(f"{where}: a list or a mapping")


def _environment(project: ComposeProject, name: str, service: dict, environ: dict[str, str]) -> list[str]:
    where = f"services.{name}.environment"
    merged: dict[str, str] = {}
    for file_path, _ in _env_file_paths(name, service):
        merged.update(project.env_files.get(_beside(project.directory, file_path), {}))
    for key, value in _pairs(service.get("environment"), where).items():
        if value is None:
            # A bare name takes the value from opsfleet's own environment (as compose's shell), or is left out.
            if key in environ:
                merged[key] = environ[key]
            continue
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _docker_name(project: ComposeProject, spec: dict, key: str) -> tuple[str, bool]:
    """(the Docker name of a top-level volume or network, whether it is external): its `name`,
    else `<project>_<key>`; an external one is `name` or the key itself."""
    external = spec.get("external")
    if isinstance(external, dict):  # compose v1's external: {name: ...}
        return str(external.get("name") or key), True
    if external:
        return str(spec.get("name") or key), True
    return str(spec.get("name") or f"{project.name}_{key}"), False


def _volume_name(project: ComposeProject, key: str) -> tuple[str, bool]:
    if key not in project.volumes:
        raise ComposeError(f'volume "{key}" is not declared under the top-level volumes')
    return _docker_name(project, project.volumes[key] or {}, key)


def _volumes(project: ComposeProject, name: str, service: dict):
    binds: list[str] = []
    named: list[tuple[str, str, bool]] = []
    anonymous: list[str] = []
    tmpfs: dict[str, str] = {}
    value = service.get("volumes") or []
    if not isinstance(value, list):
        raise ComposeError(f"services.{name}.volumes: a list")
    for i, item in enumerate(value):
        where = f"services.{name}.volumes[{i}]"
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                anonymous.append(parts[0])
                continue
            if len(parts) > 3:
                raise ComposeError(f'{where}: "{item}" is not SOURCE:TARGET[:MODE]')
            source, target, mode = parts[0], parts[1], (parts[2] if len(parts) == 3 else "rw")
            kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        elif isinstance(item, dict):
            kind = item.get("type", "volume")
            source, target = item.get("source"), item.get("target")
            mode = "ro" if item.get("read_only") else "rw"
            if not isinstance(target, str):
                raise ComposeError(f"{where}: target is required")
            if kind == "tmpfs":
                size = (item.get("tmpfs") or {}).get("size")
                tmpfs[target] = f"size={size}" if size else ""
                continue
            if kind not in ("bind", "volume"):
                raise ComposeError(f'{where}: type "{kind}" is not applied by opsfleet (bind, volume, tmpfs)')
            if not source:
                if kind == "bind":
                    raise ComposeError(f"{where}: a bind needs a source")
                anonymous.append(target)
                continue
        else:
            raise ComposeError(f"{where}: a string or a mapping")
        if kind == "bind":
            path = Path(os.path.expanduser(source))
            source = str(path if path.is_absolute() else (project.directory / path).resolve())
        else:
            volume, external = _volume_name(project, source)
            named.append((volume, source, external))
            source = volume
        binds.append(f"{source}:{target}:{mode}")
    return binds, named, anonymous, tmpfs


def _ports(name: str, value: Any) -> tuple[list, dict]:
    """compose ports → (container ports, port bindings) for docker-py."""
    exposed: list = []
    bindings: dict = {}
    for i, item in enumerate(value or []):
        where = f"services.{name}.ports[{i}]"
        host_ip, published, protocol = None, None, "tcp"
        if isinstance(item, int):
            target = str(item)
        elif isinstance(item, str):
            spec, _, proto = item.partition("/")
            protocol = proto or "tcp"
            parts = spec.rsplit(":", 2)
            target = parts[-1]
            if len(parts) == 2:
                published = parts[0]
            elif len(parts) == 3:
                host_ip, published = parts[0] or None, parts[1] or None
        elif isinstance(item, dict) and item.get("target") is not None:
            target, protocol = str(item["target"]), str(item.get("protocol") or "tcp")
            published = str(item["published"]) if item.get("published") is not None else None
            host_ip = item.get("host_ip")
        else:
            raise ComposeError(f"{where}: [HOST_IP:][PUBLISHED:]TARGET[/PROTOCOL] or {{target, published}}")
        if not target.isdigit() or (published is not None and not published.replace("-", "").isdigit()):
            raise ComposeError(f'{where}: "{item}" is not a port mapping (ranges are not applied by opsfleet)')
        key = f"{target}/{protocol}"
        exposed.append((int(target), protocol) if protocol != "tcp" else int(target))
        binding = (host_ip, int(published)) if host_ip else (int(published) if published else None)
        bindings.setdefault(key, []).append(binding)
    return exposed, bindings


def _healthcheck(name: str, value: Any) -> dict | None:
    if value is None:
        return None
    where = f"services.{name}.healthcheck"
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: a mapping")
    if value.get("disable"):
        return {"Test": ["NONE"]}
    check: dict[str, Any] = {}
    test = value.get("test")
    if isinstance(test, str):
        check["Test"] = ["CMD-SHELL", test]
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        check["Test"] = test
    elif test is not None:
        raise ComposeError(f"{where}.test: a string or a list such as [CMD, curl, -f, URL]")
    for key, api in (("interval", "Interval"), ("timeout", "Timeout"), ("start_period", "StartPeriod")):
        if value.get(key) is not None:
            check[api] = duration_ns(value[key], f"{where}.{key}")
    if value.get("retries") is not None:
        if not isinstance(value["retries"], int) or isinstance(value["retries"], bool):
            raise ComposeError(f"{where}.retries: a whole number")
        check["Retries"] = value["retries"]
    return check


def _restart(name: str, value: Any) -> dict | None:
    if value is None:
        return None
    text = str(value)
    policy, _, count = text.partition(":")
    if policy == "no":
        return None
    if policy not in ("always", "unless-stopped", "on-failure") or (count and policy != "on-failure"):
        raise ComposeError(f'services.{name}.restart: "{text}" (use no, always, unless-stopped, on-failure[:N])')
    if count and not count.isdigit():
        raise ComposeError(f'services.{name}.restart: "{text}": the retry count is a number')
    return {"Name": policy, "MaximumRetryCount": int(count or 0)}


def _networks(project: ComposeProject, name: str, service: dict) -> tuple[str | None, list]:
    """(network_mode, [(network, aliases, external)]); compose's default network when neither is given."""
    mode = service.get("network_mode")
    if mode is not None:
        mode = str(mode)
        if mode.startswith("service:"):
            raise ComposeError(
                f'services.{name}.network_mode: "{mode}" is not applied by opsfleet (use container:NAME)'
            )
        if "networks" in service:
            raise ComposeError(f"services.{name}: network_mode and networks cannot both be set")
        return mode, []
    value = service.get("networks")
    if value is None:
        value = {"default": None}
    if isinstance(value, list):
        value = {str(n): None for n in value}
    if not isinstance(value, dict):
        raise ComposeError(f"services.{name}.networks: a list or a mapping")
    found = []
    for key, options in value.items():
        aliases = [name]
        if isinstance(options, dict) and options.get("aliases"):
            aliases += [str(a) for a in options["aliases"]]
        if key not in project.networks and key != "default":
            raise ComposeError(f'services.{name}.networks: "{key}" is not declared under the top-level networks')
        network, is_external = _docker_name(project, project.networks.get(key) or {}, key)
        found.append((network, tuple(aliases), is_external))
    return None, found


def container_definition(
    project: ComposeProject,
    service: str,
    image: str,
    environ: dict[str, str],
    container_name: str | None = None,
) -> ContainerDefinition:
    """The container compose would create for `service`, on `image`, carrying compose's labels
    (project, service, one-off False, number 1, config hash, working dir, config file)."""
    if service not in project.services:
        raise ComposeError(f'service "{service}" is not in the compose file (it has: {", ".join(project.services)})')
    spec = project.services[service] or {}
    if not isinstance(spec, dict):
        raise ComposeError(f"services.{service}: must be a mapping")
    refused = sorted(k for k in spec if k not in APPLIED_KEYS | IGNORED_KEYS and not str(k).startswith("x-"))
    if refused:
        raise ComposeError(
            f"services.{service}: {', '.join(refused)} not applied by opsfleet's deploy; remove "
            f"{'it' if len(refused) == 1 else 'them'} or leave this service out of the environment"
        )
    where = f"services.{service}"
    mode, networks = _networks(project, service, spec)
    binds, named, anonymous, tmpfs = _volumes(project, service, spec)
    if spec.get("tmpfs") is not None:
        extra = spec["tmpfs"] if isinstance(spec["tmpfs"], list) else [spec["tmpfs"]]
        for path in extra:
            target, _, options = str(path).partition(":")
            tmpfs[target] = options
    ports, port_bindings = _ports(service, spec.get("ports"))
    user_labels = {k: (v or "") for k, v in _pairs(spec.get("labels"), f"{where}.labels").items()}
    extra_hosts = _pairs(spec.get("extra_hosts"), f"{where}.extra_hosts", separator=":")
    config: dict[str, Any] = {
        "command": _argv(spec.get("command"), f"{where}.command"),
        "entrypoint": _argv(spec.get("entrypoint"), f"{where}.entrypoint"),
        "environment": _environment(project, service, spec, environ),
        "working_dir": str(spec["working_dir"]) if spec.get("working_dir") else None,
        "user": str(spec["user"]) if spec.get("user") is not None else None,
        "hostname": str(spec["hostname"]) if spec.get("hostname") else None,
        "healthcheck": _healthcheck(service, spec.get("healthcheck")),
        "stop_signal": str(spec["stop_signal"]) if spec.get("stop_signal") else None,
        "stop_timeout": (
            duration_ns(spec["stop_grace_period"], f"{where}.stop_grace_period") // 1_000_000_000
            if spec.get("stop_grace_period") is not None
            else None
        ),
        "ports": ports or None,
        "volumes": anonymous or None,
    }
    logging_spec = spec.get("logging")
    if logging_spec is not None and not isinstance(logging_spec, dict):
        raise ComposeError(f"{where}.logging: a mapping of driver and options")
    host: dict[str, Any] = {
        "binds": binds or None,
        "network_mode": mode or (networks[0][0] if networks else None),
        "restart_policy": _restart(service, spec.get("restart")),
        "port_bindings": port_bindings or None,
        "extra_hosts": {k: v or "" for k, v in extra_hosts.items()} or None,
        "log_config": (
            {"Type": str(logging_spec.get("driver") or "json-file"), "Config": logging_spec.get("options") or {}}
            if logging_spec
            else None
        ),
        "privileged": bool(spec.get("privileged")) or None,
        "cap_add": [str(c) for c in spec.get("cap_add") or []] or None,
        "cap_drop": [str(c) for c in spec.get("cap_drop") or []] or None,
        "init": bool(spec["init"]) if spec.get("init") is not None else None,
        "read_only": bool(spec.get("read_only")) or None,
        "tmpfs": tmpfs or None,
    }
    config = {k: v for k, v in config.items() if v is not None}
    host = {k: v for k, v in host.items() if v is not None}
    # The hash covers what the container is made of, so a redelivered step can tell a
    # container already on this definition from one that only runs the same image.
    digest = hashlib.sha256(
        json.dumps({"image": image, "config": config, "host": host, "networks": networks}, sort_keys=True).encode()
    ).hexdigest()
    labels = {
        **user_labels,
        COMPOSE_PROJECT: project.name,
        COMPOSE_SERVICE: service,
        COMPOSE_ONEOFF: "False",
        COMPOSE_NUMBER: "1",
        COMPOSE_CONFIG_HASH: digest,
        COMPOSE_WORKING_DIR: str(project.directory),
        COMPOSE_CONFIG_FILES: str(project.path),
    }
    name = container_name or (str(spec["container_name"]) if spec.get("container_name") else None)
    return ContainerDefinition(
        service=service,
        name=name or f"{project.name}_{service}_1",
        image=image,
        config={**config, "labels": labels},
        host=host,
        networks=tuple(networks),
        volumes=tuple(named),
        anonymous=tuple(anonymous),
        config_hash=digest,
    )


def image_repository(project: ComposeProject, service: str) -> str | None:
    """The repository part of the service's `image` ("registry:5000/shop/api:1.2" →
    "registry:5000/shop/api"); None when it names none."""
    spec = project.services.get(service) or {}
    image = spec.get("image") if isinstance(spec, dict) else None
    if not isinstance(image, str) or not image:
        return None
    image = image.split("@", 1)[0]
    head, colon, tag = image.rpartition(":")
    return head if colon and "/" not in tag else image
