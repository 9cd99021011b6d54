"""Docker adapter: the few container operations the tasks need, on the Docker SDK.

Containers are always found from a configured service (name or compose
labels), never from text in an alert. Every call has a timeout: the client's
socket timeout, plus the stop timeout given to the daemon for restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import docker
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

    def find_container(self, service_name: str, spec: ServiceSpec):
        try:
            if spec.container:
                return self.client.containers.get(spec.container)
            labels = [f"{COMPOSE_SERVICE}={spec.compose_service}"]
            if spec.compose_project:
                labels.append(f"{COMPOSE_PROJECT}={spec.compose_project}")
            found = self.client.containers.list(all=True, filters={"label": labels})
        except NotFound:
            raise DockerError(
                f'service "{service_name}": no container named "{spec.container}" (check services.{service_name}.container)'
            ) from None
        except DockerException as err:
            raise DockerError(f'service "{service_name}": Docker error while looking it up: {err}') from None
        if not found:
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

    def restart(self, container, stop_timeout: int) -> None:
        # The daemon waits stop_timeout for a clean exit before SIGKILL; the
        # HTTP call must outlive that wait.
        api = self.client.api
        previous = api.timeout
        api.timeout = self.timeout + stop_timeout
        try:
            container.restart(timeout=stop_timeout)
        except DockerException as err:
            raise DockerError(f"container {container.name}: restart failed: {err}") from None
        finally:
            api.timeout = previous

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
