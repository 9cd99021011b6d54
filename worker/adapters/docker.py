"""Docker adapter: the few container operations the tasks need, on the Docker SDK.

Containers are always found from a configured service (name or compose
labels), never from text in an alert. Every call has a timeout: the client's
socket timeout, plus the stop timeout given to the daemon for restarts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import docker
import requests
from docker.errors import DockerException, NotFound

from worker.config import ServiceSpec

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"


class DockerError(Exception):
    """A Docker operation failed; the message says what to check."""


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    status: str
    running: bool
    started_at: str
    restart_count: int
    health: str | None


def _unreachable_is_a_docker_error(cls):
    """The SDK raises DockerException for what the daemon answers, but requests' own errors
    (ConnectionError, ReadTimeout) when it cannot be reached at all: its socket gone (dockerd
    stopped), the connection refused or dropped, no answer within the timeout. Each public
    method turns those into a DockerError saying so: the tasks handle DockerError (a deploy's
    gate fails and rolls back), where a stray ConnectionError was a crash of the step."""

    def reachable(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except requests.exceptions.RequestException as err:
                raise DockerError(f"Docker at {self.base_url or 'the default socket'} does not answer: {err}") from None

        return call

    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(method):
            setattr(cls, name, reachable(method))
    return cls


@_unreachable_is_a_docker_error
class DockerAdapter:
    def __init__(self, base_url: str | None, timeout_seconds: int):
        self.base_url = base_url
        self.timeout = timeout_seconds
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                if self.base_url:
                    self._client = docker.DockerClient(base_url=self.base_url, timeout=self.timeout)
                else:
                    self._client = docker.from_env(timeout=self.timeout)
            except DockerException as err:
                raise DockerError(f"cannot reach Docker at {self.base_url or 'the default socket'}: {err}") from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def ping(self) -> None:
        try:
            self.client.ping()
        except DockerException as err:
            raise DockerError(f"Docker at {self.base_url or 'the default socket'} does not answer: {err}") from None

    def find_container(self, service_name: str, spec: ServiceSpec, missing_ok: bool = False):
        """The service's container; with `missing_ok`, None when it has none (yet)."""
        try:
            if spec.container:
                return self.client.containers.get(spec.container)
            labels = [f"{COMPOSE_SERVICE}={spec.compose_service}"]
            if spec.compose_project:
                labels.append(f"{COMPOSE_PROJECT}={spec.compose_project}")
            found = self.client.containers.list(all=True, filters={"label": labels})
        except NotFound:
            if missing_ok:
                return None
            raise DockerError(
                f'service "{service_name}": no container named "{spec.container}" (check services.{service_name}.container)'
            ) from None
        except DockerException as err:
            raise DockerError(f'service "{service_name}": Docker error while looking it up: {err}') from None
        if not found:
            if missing_ok:
                return None
            raise DockerError(
                f'service "{service_name}": no container has labels {", ".join(labels)} '
                f"(check services.{service_name}.compose_project / compose_service)"
            )
        # Prefer a running one; compose may leave exited one-off containers around.
        found.sort(key=lambda c: (c.status != "running", c.name))
        return found[0]

    def state(self, container) -> ContainerState:
        try:
            container.reload()
        except DockerException as err:
            raise DockerError(f"container {container.name}: cannot inspect: {err}") from None
        st = container.attrs.get("State", {})
        return ContainerState(
            id=container.id,
            name=container.name,
            status=st.get("Status", "unknown"),
            running=bool(st.get("Running")),
            started_at=st.get("StartedAt", ""),
            restart_count=int(container.attrs.get("RestartCount", 0)),
            health=(st.get("Health") or {}).get("Status"),
        )

    @contextlib.contextmanager
    def _waiting_for_stop(self, stop_timeout: int):
        """The daemon waits stop_timeout for a clean exit before SIGKILL: the
        HTTP call must outlive that wait."""
        api = self.client.api
        previous = api.timeout
        api.timeout = self.timeout + stop_timeout
        try:
            yield api
        finally:
            api.timeout = previous

    def restart(self, container, stop_timeout: int) -> None:
        with self._waiting_for_stop(stop_timeout):
            try:
                container.restart(timeout=stop_timeout)
            except DockerException as err:
                raise DockerError(f"container {container.name}: restart failed: {err}") from None

    def find_by_name(self, name: str):
        try:
            return self.client.containers.get(name)
        except NotFound:
            return None
        except DockerException as err:
            raise DockerError(f"container {name}: cannot inspect: {err}") from None

    def recreate(self, container, marker: str, stop_timeout: int, image: str | None = None, definition=None):
        """A fresh container from the same image (or `image`, for a deploy) and
        the same configuration, under the same name; or, given a compose
        `definition` (worker.compose.ContainerDefinition), from that definition
        under the old container's name, its anonymous volumes kept.

        Idempotent across a crash at any point: the old container is first
        renamed to `<name>.<marker>-old` (found and finished on a re-run); the
        new one carries the label `opsfleet.recreated-by=<marker>`.
        """
        if definition is not None:
            return self._recreate_from(container, marker, stop_timeout, definition)
        attrs = container.attrs
        name = attrs["Name"].lstrip("/")
        config, host_config = attrs["Config"], attrs["HostConfig"]
        networks = attrs.get("NetworkSettings", {}).get("Networks") or {}
        mode = host_config.get("NetworkMode", "")
        endpoints = {
            net: {"Aliases": cfg.get("Aliases")}
            for net, cfg in networks.items()
            if net not in ("host", "none", "bridge", "default") and net == mode
        }
        with self._waiting_for_stop(stop_timeout) as api:
            try:
                container.stop(timeout=stop_timeout)
                container.rename(f"{name}.{marker}-old")
                created = api.create_container(
                    image=image or attrs["Image"],  # default: the exact image the old container ran, by id
                    name=name,
                    command=config.get("Cmd"),
                    entrypoint=config.get("Entrypoint"),
                    environment=config.get("Env"),
                    working_dir=config.get("WorkingDir") or None,
                    user=config.get("User") or None,
                    labels={**(config.get("Labels") or {}), "opsfleet.recreated-by": marker},
                    healthcheck=config.get("Healthcheck"),
                    stop_signal=config.get("StopSignal"),
                    host_config=host_config,
                    networking_config={"EndpointsConfig": endpoints} if endpoints else None,
                )
                api.start(created["Id"])
                self.client.containers.get(f"{name}.{marker}-old").remove(force=True)
                return self.client.containers.get(created["Id"])
            except DockerException as err:
                raise DockerError(f"container {name}: recreate failed: {err}") from None

    def _recreate_from(self, container, marker: str, stop_timeout: int, definition):
        name = container.name
        # Anonymous volumes stay the container's data across a recreate, as compose keeps them.
        kept = {
            m["Destination"]: m["Name"]
            for m in container.attrs.get("Mounts") or []
            if m.get("Type") == "volume" and m.get("Name") and m.get("Destination") in definition.anonymous
        }
        with self._waiting_for_stop(stop_timeout):
            try:
                container.stop(timeout=stop_timeout)
                container.rename(f"{name}.{marker}-old")
            except DockerException as err:
                raise DockerError(f"container {name}: recreate failed: {err}") from None
        fresh = self.create(definition, marker, name=name, volumes_kept=kept)
        try:
            self.client.containers.get(f"{name}.{marker}-old").remove(force=True)
        except DockerException as err:
            raise DockerError(f"container {name}.{marker}-old: cannot remove: {err}") from None
        return fresh

    def create(self, definition, marker: str, name: str | None = None, volumes_kept: dict | None = None):
        """Create and start a container from a compose definition, its named volumes and
        networks made first when compose would make them (external ones must exist).
        Labelled `opsfleet.recreated-by=<marker>`, so a re-run finds it done."""
        api = self.client.api
        name = name or definition.name
        try:
            for volume, key, external in definition.volumes:
                self._ensure_volume(volume, key, external, definition.labels)
            for network, _, external in definition.networks:
                self._ensure_network(network, external, definition.labels)
            host = dict(definition.host)
            if volumes_kept:
                host["binds"] = [*host.get("binds", []), *(f"{v}:{d}" for d, v in volumes_kept.items())]
            networks = list(definition.networks)
            first = networks[0] if networks else None
            created = api.create_container(
                image=definition.image,
                name=name,
                **{**definition.config, "labels": {**definition.labels, "opsfleet.recreated-by": marker}},
                host_config=api.create_host_config(**host),
                networking_config=(
                    api.create_networking_config({first[0]: api.create_endpoint_config(aliases=list(first[1]))})
                    if first
                    else None
                ),
            )
            for network, aliases, _ in networks[1:]:
                api.connect_container_to_network(created["Id"], network, aliases=list(aliases))
            api.start(created["Id"])
            return self.client.containers.get(created["Id"])
        except DockerException as err:
            raise DockerError(f"container {name}: create from the compose file failed: {err}") from None

    def _ensure_volume(self, volume: str, key: str, external: bool, labels: dict) -> None:
        from worker.compose import COMPOSE_PROJECT

        try:
            self.client.volumes.get(volume)
            return
        except NotFound:
            if external:
                raise DockerError(
                    f'volume "{volume}" is external in the compose file and does not exist: create it first'
                ) from None
        self.client.volumes.create(
            name=volume,
            labels={COMPOSE_PROJECT: labels[COMPOSE_PROJECT], "com.docker.compose.volume": key},
        )

    def _ensure_network(self, network: str, external: bool, labels: dict) -> None:
        from worker.compose import COMPOSE_PROJECT

        if network in ("host", "none", "bridge") or network.startswith("container:"):
            return
        if self.client.networks.list(names=[network]):
            return
        if external:
            raise DockerError(
                f'network "{network}" is external in the compose file and does not exist: create it first'
            )
        project = labels[COMPOSE_PROJECT]
        self.client.networks.create(
            network,
            labels={COMPOSE_PROJECT: project, "com.docker.compose.network": network.removeprefix(f"{project}_")},
        )

    def remove(self, container, stop_timeout: int) -> None:
        """Stop and remove a container (a rollback of a service that did not exist before)."""
        with self._waiting_for_stop(stop_timeout):
            try:
                container.stop(timeout=stop_timeout)
                container.remove()
            except NotFound:
                return
            except DockerException as err:
                raise DockerError(f"container {container.name}: cannot remove: {err}") from None

    def finish_recreate(self, name: str, marker: str):
        """After a crash mid-recreate: the new container if it exists, else None;
        a leftover renamed original is removed once the new one runs."""
        new = self.find_by_name(name)
        old = self.find_by_name(f"{name}.{marker}-old")
        if new is not None and (new.labels or {}).get("opsfleet.recreated-by") == marker:
            if old is not None:
                try:
                    old.remove(force=True)
                except DockerException as err:
                    raise DockerError(f"container {old.name}: cannot remove: {err}") from None
            return new
        return None

    # -- deploys ---------------------------------------------------------------------

    def image_id(self, reference: str) -> str | None:
        """The id of a local image by reference, or None when it is not here."""
        try:
            return self.client.images.get(reference).id
        except NotFound:
            return None
        except DockerException as err:
            raise DockerError(f"image {reference}: cannot inspect: {err}") from None

    def pull(self, reference: str, auth_config: dict | None = None, always: bool = False) -> str:
        """Make sure `reference` is here; returns its image id.

        Present already → nothing pulled, unless `always` (a tag that may have
        moved). Otherwise pulled, and the pull is judged by its stream: the
        daemon answers 200 and reports a failure (unknown tag, auth, registry
        down) inside it as an `error` message. Then the image must really be here."""
        found = self.image_id(reference)
        if found and not always:
            return found
        repository, _, tag = reference.rpartition(":")
        if not repository or "/" in tag:
            repository, tag = reference, "latest"
        api = self.client.api
        try:
            for message in api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth_config):
                if isinstance(message, dict) and (message.get("error") or message.get("errorDetail")):
                    detail = message.get("error") or (message.get("errorDetail") or {}).get("message")
                    raise DockerError(f"pull {reference} failed: {detail}")
        except DockerException as err:
            raise DockerError(f"pull {reference} failed: {err}") from None
        found = self.image_id(reference)
        if not found:
            raise DockerError(f"pull {reference} ended without an error, but the image is not here")
        return found

    def root_dir_free(self) -> tuple[str, int | None]:
        """Docker's data root and its free bytes (None when that path is not on this host)."""
        import shutil

        try:
            root = self.client.info().get("DockerRootDir") or ""
        except DockerException as err:
            raise DockerError(f"Docker at {self.base_url or 'the default socket'} does not answer: {err}") from None
        try:
            return root, shutil.disk_usage(root).free
        except OSError:
            return root, None

    def memory_available(self) -> int | None:
        """MemAvailable of Docker's host in bytes, when Docker runs on this host (a unix
        socket); None for a remote engine, whose API gives total memory only."""
        if self.base_url and not self.base_url.startswith(("unix:", "/")):
            return None
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def repair_leftovers(self, name: str, marker_kinds: tuple[str, ...] = ("deploy", "rollback")) -> list[str]:
        """Containers `<name>.opsfleet-run-N-<kind>-…-old` that a recreate which died half-way
        left behind (the original, stopped and renamed). With no container under `name`, the
        newest such original is renamed back and started; otherwise they are removed (the new
        one was made). What was done, one line each."""
        import re

        pattern = re.compile(rf"^{re.escape(name)}\.opsfleet-run-(\d+)-(?:{'|'.join(marker_kinds)})-.+-old$")
        try:
            found = self.client.containers.list(all=True, filters={"name": f"{name}.opsfleet-run-"})
        except DockerException as err:
            raise DockerError(f"cannot list containers named {name}.opsfleet-run-*: {err}") from None
        left = sorted(
            (c for c in found if pattern.match(c.name)), key=lambda c: int(pattern.match(c.name)[1]), reverse=True
        )
        lines = []
        live = self.find_by_name(name)
        for old in left:
            try:
                if live is None:
                    old.rename(name)
                    old.start()
                    live = old
                    lines.append(f"{name}: the original, left stopped as {old.name} by a dead deploy, put back")
                else:
                    old.remove(force=True)
                    lines.append(f"{name}: removed {old.name}, left by a dead deploy")
            except DockerException as err:
                raise DockerError(f"container {old.name}: cannot repair: {err}") from None
        return lines

    def undo_recreate(self, name: str, marker: str):
        """After a recreate that failed half-way (the original stopped and renamed
        to `<name>.<marker>-old`, the new one not created or not started): the
        half-made new container is removed, the original renamed back and started.
        Returns the original, or None when there is nothing to undo."""
        old = self.find_by_name(f"{name}.{marker}-old")
        if old is None:
            return None
        new = self.find_by_name(name)
        try:
            if new is not None:
                if (new.labels or {}).get("opsfleet.recreated-by") != marker:
                    raise DockerError(f"container {name} exists and is not {marker}'s: left alone")
                new.remove(force=True)
            old.rename(name)
            old.start()
            old.reload()
        except DockerException as err:
            raise DockerError(f"container {name}: cannot put the original back: {err}") from None
        return old

    # -- backups and recovery ------------------------------------------------------

    def version(self) -> dict:
        try:
            info = self.client.version()
        except DockerException as err:
            raise DockerError(f"Docker at {self.base_url or 'the default socket'} does not answer: {err}") from None
        return {"version": info.get("Version"), "api_version": info.get("ApiVersion")}

    def inventory(self) -> dict:
        """Images and containers, for the monthly inventory backup."""
        try:
            images = self.client.images.list()
            containers = self.client.containers.list(all=True)
        except DockerException as err:
            raise DockerError(f"cannot list images and containers: {err}") from None
        return {
            "images": sorted(
                ({"id": i.id, "tags": sorted(i.tags), "created": i.attrs.get("Created")} for i in images),
                key=lambda i: i["id"],
            ),
            "containers": sorted(
                (
                    {
                        "name": c.name,
                        "image": c.attrs.get("Config", {}).get("Image"),
                        "status": c.status,
                        "labels": c.labels,
                    }
                    for c in containers
                ),
                key=lambda c: c["name"],
            ),
        }

    def stop(self, container, stop_timeout: int) -> None:
        with self._waiting_for_stop(stop_timeout):
            try:
                container.stop(timeout=stop_timeout)
            except DockerException as err:
                raise DockerError(f"container {container.name}: stop failed: {err}") from None

    def start(self, container) -> None:
        try:
            container.start()
        except DockerException as err:
            raise DockerError(f"container {container.name}: start failed: {err}") from None

    def exec_process(
        self, container, argv: list[str], env: dict[str, str], user: str = "", stdin: bool = False, stderr_path=None
    ) -> ExecProcess:
        """`docker exec` a command, streaming: see ExecProcess. argv is a list (no shell)."""
        api = self.client.api
        try:
            created = api.exec_create(
                container.id, argv, stdout=True, stderr=True, stdin=stdin, user=user, environment=env
            )
            sock = api.exec_start(created["Id"], socket=True)
        except DockerException as err:
            raise DockerError(f"container {container.name}: cannot exec {argv[0]}: {err}") from None
        return ExecProcess(api, created["Id"], sock, argv[0], stderr_path)

    # -- signals and pauses (log rotation) --------------------------------------

    def kill(self, container, signal: str) -> None:
        """Send a signal (name without SIG, e.g. "HUP") to the container's main process."""
        try:
            container.kill(signal=f"SIG{signal}")
        except DockerException as err:
            raise DockerError(f"container {container.name}: cannot send SIG{signal}: {err}") from None

    def pause(self, container) -> None:
        """Freeze every process of the container (cgroup freezer); returns once frozen."""
        try:
            container.pause()
        except DockerException as err:
            raise DockerError(f"container {container.name}: cannot pause: {err}") from None

    def unpause(self, container_id: str) -> bool:
        """Thaw a container; False when it was not paused (safe to call twice)."""
        try:
            self.client.api.unpause(container_id)
        except DockerException as err:
            if "is not paused" in str(err):
                return False
            raise DockerError(f"container {container_id[:12]}: cannot unpause: {err}") from None
        return True

    def get_container(self, container_id: str):
        try:
            return self.client.containers.get(container_id)
        except DockerException as err:
            raise DockerError(f"container {container_id[:12]}: {err}") from None

    # -- images (cleanup) -------------------------------------------------------

    def images(self, repository: str | None = None) -> list[ImageInfo]:
        """Images (all of a repository, or all), each with its tags, creation time and size."""
        try:
            found = self.client.images.list(name=repository) if repository else self.client.images.list()
        except DockerException as err:
            raise DockerError(f"cannot list images{' of ' + repository if repository else ''}: {err}") from None
        return [_image_info(img) for img in found]

    def dangling_images(self) -> list[ImageInfo]:
        try:
            found = self.client.images.list(filters={"dangling": True})
        except DockerException as err:
            raise DockerError(f"cannot list dangling images: {err}") from None
        return [_image_info(img) for img in found]

    def prune_dangling(self) -> tuple[list[str], int]:
        """Remove every dangling image no container uses (the daemon decides, atomically);
        returns (removed image ids, bytes the daemon reports reclaimed)."""
        try:
            answer = self.client.images.prune(filters={"dangling": True})
        except DockerException as err:
            raise DockerError(f"cannot prune dangling images: {err}") from None
        removed = [d["Deleted"] for d in answer.get("ImagesDeleted") or [] if d.get("Deleted")]
        return removed, int(answer.get("SpaceReclaimed") or 0)

    def images_in_use(self) -> dict[str, str]:
        """Image id → a container using it (running or not): never removed."""
        try:
            containers = self.client.api.containers(all=True)
        except DockerException as err:
            raise DockerError(f"cannot list containers: {err}") from None
        return {c["ImageID"]: c["Names"][0].lstrip("/") if c.get("Names") else c["Id"][:12] for c in containers}

    def container_image(self, container) -> ImageInfo:
        try:
            container.reload()
            return _image_info(self.client.images.get(container.attrs["Image"]))
        except DockerException as err:
            raise DockerError(f"container {container.name}: cannot inspect its image: {err}") from None

    def remove_image(self, image_id: str) -> None:
        """Remove an image by id (all its tags). Not forced: Docker refuses an image a container uses."""
        try:
            self.client.api.remove_image(image_id, force=False, noprune=False)
        except NotFound:
            return  # already gone: idempotent
        except DockerException as err:
            raise DockerError(f"image {image_id[:19]}: cannot remove: {err}") from None

    def untag(self, reference: str) -> None:
        """Remove one tag (the image stays while other tags name it)."""
        try:
            self.client.api.remove_image(reference, force=False, noprune=False)
        except NotFound:
            return
        except DockerException as err:
            raise DockerError(f"image {reference}: cannot remove: {err}") from None


class _ExecStdout:
    def __init__(self, proc: ExecProcess):
        self.proc = proc

    def read(self, n: int = -1) -> bytes:
        return self.proc._read_stdout()

    def close(self) -> None:
        pass


class _ExecStdin:
    def __init__(self, proc: ExecProcess):
        self.proc = proc

    def write(self, data: bytes) -> int:
        self.proc._raw.sendall(data)
        return len(data)

    def close(self) -> None:
        import socket as pysocket

        try:
            self.proc._raw.shutdown(pysocket.SHUT_WR)  # the command sees end of input
        except OSError:
            pass


class ExecProcess:
    """A command running in a container through `docker exec`, shaped like the
    part of subprocess.Popen the backup code uses: stdout.read(), stdin.write()/
    close(), poll(), wait(), returncode, kill(). Docker multiplexes stdout and
    stderr on one connection (8-byte frame headers); stderr is kept (and written
    to stderr_path when given). kill() closes the connection: the command then
    gets end of input / a broken pipe."""

    def __init__(self, api, exec_id: str, sock, name: str, stderr_path=None):
        self.api = api
        self.exec_id = exec_id
        self._sock = sock
        self._raw = getattr(sock, "_sock", sock)
        self.name = name
        self.stderr = b""
        self.stderr_path = stderr_path
        self.returncode: int | None = None
        self._eof = False
        self.stdout = _ExecStdout(self)
        self.stdin = _ExecStdin(self)

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._raw.recv(n - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    def _read_stdout(self) -> bytes:
        """The next stdout bytes; b"" at the end."""
        while not self._eof:
            try:
                header = self._recv_exactly(8)
            except OSError:
                header = b""
            if len(header) < 8:
                self._eof = True
                break
            size = int.from_bytes(header[4:8], "big")
            payload = self._recv_exactly(size) if size else b""
            if header[0] == 2:
                self.stderr += payload
                continue
            if payload:
                return payload
        return b""

    def read_all(self) -> bytes:
        out = []
        while chunk := self._read_stdout():
            out.append(chunk)
        return b"".join(out)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                info = self.api.exec_inspect(self.exec_id)
            except DockerException:
                return None
            if not info.get("Running") and info.get("ExitCode") is not None:
                self.returncode = int(info["ExitCode"])
                if self.stderr_path is not None:
                    with open(self.stderr_path, "ab") as handle:
                        handle.write(self.stderr)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._eof:
            if not self._read_stdout():
                break
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                import subprocess

                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.05)
        self.close()
        return self.returncode

    def send_signal(self, _sig) -> None:
        self.kill()

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except Exception:
            pass


@dataclass(frozen=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    created: str  # ISO 8601 from the daemon
    size: int


def _image_info(image) -> ImageInfo:
    attrs = image.attrs
    return ImageInfo(
        id=image.id, tags=tuple(image.tags), created=attrs.get("Created", ""), size=int(attrs.get("Size") or 0)
    )
