"""Real servers for opsfleet's tests: the private dockerd, Redis and PostgreSQL.

Every helper fails loudly, naming the server and how to start it: a test that needs a real
server must fail when it is missing, never skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_HINT = "Start it with: bash scripts/services.sh"

TEST_DOCKER_HOST = os.environ.get("OPSFLEET_TEST_DOCKER_HOST", "unix:///run/opsfleet-test-docker/docker.sock")
TEST_IMAGE = "opsfleet-test/busybox:1"

SHARED_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a race is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaveUp(Exception):
    """Raised by a wait_for predicate to stop waiting at once (say, the server process died)."""


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition") -> object:
    """Polls predicate until it returns something truthy; returns that value.

    Exceptions from predicate count as "not yet", so it can probe a server still starting;
    GaveUp ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except GaveUp:
            raise
        except Exception as e:  # noqa: BLE001 - a server that is starting raises all kinds
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a server's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def exited(proc: subprocess.Popen, name: str) -> None:
    """For wait_for predicates: gives up when the server process has already exited."""
    if proc.poll() is not None:
        raise GaveUp(f"{name} exited with status {proc.returncode}")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Asks a server to exit with sig, killing it if it has not within timeout."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# --- Docker ----------------------------------------------------------------------------------------


def docker_client() -> docker.DockerClient:
    """A client for the private test dockerd (scripts/services.sh starts it)."""
    try:
        # The constructor already asks the daemon for its API version, so it can raise too.
        client = docker.DockerClient(base_url=TEST_DOCKER_HOST, timeout=30)
        client.ping()
    except Exception as e:
        raise RuntimeError(f"dockerd not reachable at {TEST_DOCKER_HOST}: {e}. {START_HINT}") from e
    return client


def ensure_test_image(client: docker.DockerClient) -> None:
    try:
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound as e:
        raise RuntimeError(
            f"test image {TEST_IMAGE} is missing from {TEST_DOCKER_HOST}. "
            "Build it with: bash scripts/build-test-image.sh (or bash scripts/services.sh)"
        ) from e


def run_test_container(
    client: docker.DockerClient,
    name: str,
    labels: dict[str, str] | None = None,
    command: tuple[str, ...] | list[str] = ("sleep", "3600"),
):
    """Starts a detached container of the test image; the caller removes it."""
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)
    return client.containers.run(
        TEST_IMAGE, list(command), name=name, labels=labels or {}, detach=True, network_mode="none"
    )


# --- Redis -----------------------------------------------------------------------------------------


def shared_redis_url() -> str:
    try:
        redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5, socket_connect_timeout=5).ping()
    except redis.RedisError as e:
        raise RuntimeError(f"Redis at 127.0.0.1:6379 is not answering: {e}. {START_HINT}") from e
    return SHARED_REDIS_URL


class ServerProcess:
    """A server a test starts in its own folder: subclasses give start() and stop();
    close() also removes the folder. As a context manager, a failed start cleans up."""

    dir: Path

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _launch(self, cmd: list[str], binary: str, probe, what: str, interval: float = 0.1, **popen):
        """Start `cmd` (output to self._log) and wait until `probe()` answers truthy while the
        process stays up; on a timeout or an early exit, stop it and raise with its log's tail."""
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)

        def ready():
            exited(self._proc, binary)
            return probe()

        try:
            wait_for(ready, self.start_timeout, interval=interval, what=what)
        except (TimeoutError, GaveUp) as e:
            self.stop()
            raise RuntimeError(f"{e}\n{binary} log:\n{log_tail(self._log)}") from e
        return self

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class PrivateRedis(ServerProcess):
    """A redis-server of the test's own, for tests that stop and restart it.

    Same port and dir across stop()/start(), so with appendonly (the default) the data survives.
    """

    def __init__(self, appendonly: bool = True, start_timeout: float = 10):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="opsfleet-redis-"))
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = self.dir / "redis.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        if self._proc is not None and self._proc.poll() is None:
            return self
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
        ]  # fmt: skip
        # No client retries: wait_for does the retrying, and must see a dead server promptly.
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            return self._launch(cmd, "redis-server", client.ping, f"private Redis on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        # SIGTERM makes redis flush the AOF before exiting.
        stop_process(self._proc)


# --- PostgreSQL ------------------------------------------------------------------------------------


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return found[-1]  # the newest major version


class PrivatePostgres(ServerProcess):
    """A throwaway PostgreSQL cluster (trust auth) for tests that stop and restart the server."""

    def __init__(self, start_timeout: float = 30):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="opsfleet-pg-"))
        self.data = self.dir / "data"
        self.start_timeout = start_timeout
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._log = self.dir / "postgres.log"
        self._proc: subprocess.Popen | None = None
        # PostgreSQL refuses to run as root; Popen's user= drops to the postgres user directly
        # (runuser would stay as a parent process between us and postgres and eat our signals).
        # cwd: the postgres user may not be allowed into the caller's working directory.
        self._as: dict = {"cwd": self.dir}
        if os.geteuid() == 0:
            self._as |= {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.dir, "postgres", "postgres")

    def _initdb(self) -> None:
        cmd = [
            _postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._as)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> PrivatePostgres:
        if self._proc is not None and self._proc.poll() is None:
            return self
        if not self.data.exists():
            self._initdb()
        cmd = [
            _postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        ]  # fmt: skip

        def accepts() -> bool:
            with psycopg.connect(self.url, connect_timeout=2):
                return True

        return self._launch(cmd, "postgres", accepts, f"private PostgreSQL on port {self.port}", 0.2, **self._as)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
        stop_process(self._proc, signal.SIGINT, timeout=30)


@contextlib.contextmanager
def shared_postgres_database(prefix: str = "opsfleet_test") -> Iterator[str]:
    """A fresh database on the shared server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(SHARED_POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise RuntimeError(f"PostgreSQL at 127.0.0.1:5432 is not answering: {e}. {START_HINT}") from e
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            # FORCE: a test that leaked a connection must not leave the database behind.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- A dockerd of the test's own -------------------------------------------------------------------

BUILD_TEST_IMAGE = Path(__file__).resolve().parents[2] / "scripts" / "build-test-image.sh"


class PrivateDockerd(ServerProcess):
    """A dockerd of the test's own (its data root, exec root and socket in one short temp folder),
    for tests that stop Docker: never the shared test dockerd, which other tests use.

    stop() is one SIGTERM, as a host's dockerd is stopped: containers without live-restore are
    stopped with it, those with a restart policy come back at start(). The data root stays
    across stop()/start(), so images and containers survive a restart. `client` is a
    DockerClient for the running daemon (a new one after each start); `url` is its DOCKER_HOST.
    The test image (TEST_IMAGE) is imported at each start when missing.
    """

    def __init__(self, start_timeout: float = 60):
        if shutil.which("dockerd") is None:
            raise RuntimeError("dockerd not found on PATH: the private dockerd needs it (apt-get install docker.io)")
        # Unix socket paths are limited to 108 bytes: a short folder under /tmp.
        self.dir = Path(tempfile.mkdtemp(prefix="ofd-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.start_timeout = start_timeout
        self._log = self.dir / "dockerd.log"
        self._proc: subprocess.Popen | None = None
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise RuntimeError(f"the private dockerd at {self.url} is not running (start() it)")
        return self._client

    def start(self) -> PrivateDockerd:
        if self._proc is not None and self._proc.poll() is None:
            return self
        cmd = [
            "dockerd", "--data-root", str(self.dir / "root"), "--exec-root", str(self.dir / "exec"),
            "-H", self.url, "--pidfile", str(self.dir / "dockerd.pid"), "--iptables=false", "--bridge=none",
        ]  # fmt: skip

        def answers() -> bool:
            client = docker.DockerClient(base_url=self.url, timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()

        self._launch(cmd, "dockerd", answers, f"private dockerd at {self.url}", 0.2)
        self._client = docker.DockerClient(base_url=self.url, timeout=60)
        done = subprocess.run(
            ["bash", str(BUILD_TEST_IMAGE)], env={**os.environ, "OPSFLEET_TEST_DOCKER_HOST": self.url},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"importing {TEST_IMAGE} into {self.url} failed:\n{done.stdout}\n{done.stderr}")
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        # One SIGTERM: dockerd stops its containers (each within its stop timeout) and containerd.
        stop_process(self._proc, timeout=60)

    def close(self) -> None:
        self.stop()
        # dockerd leaves an nsfs mount at <exec root>/netns/default (and, killed, maybe more):
        # unmounted, deepest first, before the folder can go.
        prefix = f"{self.dir}/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
