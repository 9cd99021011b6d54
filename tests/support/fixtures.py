"""pytest fixtures over tests.support, for conftest.py or a test module to import.

Each starts a real server (or the Slack recorder) and tears it down; none skips when a server
is missing: the helpers raise with the server's name and how to start it.
"""

from __future__ import annotations

import contextlib

import pytest

from .alertmanager import Alertmanager
from .health import HealthEndpoint
from .servers import (
    PrivatePostgres,
    PrivateRedis,
    docker_client,
    ensure_test_image,
    run_test_container,
    shared_postgres_database,
)
from .slack_recorder import SlackRecorder


@pytest.fixture(scope="session")
def dockerd():
    """A DockerClient for the private test dockerd, with the test image present."""
    client = docker_client()
    ensure_test_image(client)
    yield client
    client.close()


@pytest.fixture
def make_container(dockerd):
    """make_container(name, labels=None, command=(...)) -> container; all removed afterwards."""
    started = []

    def make(name, labels=None, command=("sleep", "3600")):
        container = run_test_container(dockerd, name, labels=labels, command=command)
        started.append(container)
        return container

    yield make
    for container in started:
        with contextlib.suppress(Exception):  # a test may have removed it already
            container.remove(force=True)


@pytest.fixture
def health():
    """A local health endpoint (HealthEndpoint): set .status and .body; .url to point at."""
    endpoint = HealthEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture
def slack():
    with SlackRecorder() as recorder:
        yield recorder


@pytest.fixture
def private_redis():
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def private_postgres():
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def shared_pg_url():
    with shared_postgres_database() as url:
        yield url


@pytest.fixture
def make_alertmanager():
    """make_alertmanager(webhook_url, **options) -> a started Alertmanager; all closed afterwards."""
    with contextlib.ExitStack() as stack:
        yield lambda webhook_url, **options: stack.enter_context(Alertmanager(webhook_url, **options))
