"""Shared fixtures. Real servers throughout: PostgreSQL and Redis shared on this
machine (own databases, own key prefixes), a private dockerd, a real
Alertmanager; only Slack is a local recorder. A missing server fails the test
with its name, never skips it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# prometheus-client reads this once, at its first import: set it before any
# opsfleet module loads so in-process metrics behave like the real processes'.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    _metrics_dir = tempfile.mkdtemp(prefix="opsfleet-test-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    atexit.register(shutil.rmtree, _metrics_dir, ignore_errors=True)
os.environ.pop("OPSFLEET_CONFIG", None)

import pytest  # noqa: E402

from tests.support.fixtures import (  # noqa: E402,F401  (fixtures, used by name)
    dockerd,
    health,
    make_alertmanager,
    make_container,
    private_postgres,
    private_redis,
    shared_pg_url,
    slack,
)
from worker.adapters.ledger import Ledger, ledger_url  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    """A migrated ledger on each backend."""
    if request.param == "sqlite":
        led = Ledger(ledger_url(None, tmp_path))
        led.migrate()
        yield led
        led.dispose()
        return
    from tests.support.servers import shared_postgres_database

    with shared_postgres_database() as url:
        led = Ledger(url)
        led.migrate()
        yield led
        led.dispose()
