"""Helpers for the backup and restore tests: a small real database, a documents tree,
config files, and an in-process engine (SQLite ledger, embedded broker) to run playbooks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import psycopg

from tests.support.servers import TEST_IMAGE, _postgres_bin, free_port, wait_for
from worker.adapters.ledger import NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config
from worker.tasks.runs import execute_inline

ROWS = {"public.customers": 120, "public.orders": 300, "shop.Line Items": 7}


def fill_database(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, customer int REFERENCES customers, note text)")
        conn.execute('CREATE SCHEMA shop; CREATE TABLE shop."Line Items" (id int, sku text)')
        conn.execute("INSERT INTO customers (name) SELECT 'c' || g FROM generate_series(1, 120) g")
        conn.execute(
            "INSERT INTO orders (customer, note) SELECT 1 + g % 120, repeat('x', g) FROM generate_series(1, 300) g"
        )
        conn.execute("INSERT INTO shop.\"Line Items\" SELECT g, 'sku-' || g FROM generate_series(1, 7) g")
    return dict(ROWS)


def make_documents(root: Path) -> Path:
    docs = root / "documents"
    (docs / "contracts" / "2025").mkdir(parents=True)
    for i in range(20):
        (docs / "contracts" / "2025" / f"c{i}.txt").write_text(f"contract {i}\n" * (i + 1))
    (docs / "readme.md").write_text("documents\n")
    return docs


def make_config_files(root: Path) -> list[Path]:
    app = root / "app"
    app.mkdir()
    env = app / ".env"
    env.write_text("DB_PASSWORD=s3cret\n")
    env.chmod(0o644)  # carelessly readable at the source: the backup must still keep it 0600
    compose = app / "docker-compose.yml"
    compose.write_text("services: {}\n")
    return [env, compose]


def engine(tmp_path: Path, backup: dict, **extra):
    """A Celery app over a SQLite ledger in tmp_path, never reaching a Docker daemon."""
    raw = {"fleet": {"data_dir": str(tmp_path / "data")}, "backup": backup, **extra}
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environ.setdefault("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    loaded = parse_config(raw, source="test", base_dir=tmp_path, environ=environ)
    app = create_celery(loaded)
    app.opsfleet.ledger.migrate()
    return app


def record(app, playbook: str, params: dict | None = None, target: str = "all") -> int:
    recorded = app.opsfleet.ledger.record_event(
        source="manual", summary="test", body="",
        new_runs=[NewRun(trigger="manual", triggered_by="test", playbook=playbook, target=target, params=params or {})],
    )  # fmt: skip
    return recorded.runs[0].id


def run_playbook(app, playbook: str, params: dict | None = None) -> dict:
    return execute_inline(app, record(app, playbook, params))


def sets_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def postgres_uid_gid() -> str:
    """Numeric: Docker looks users up in the image's /etc/passwd, which this image lacks."""
    import pwd

    entry = pwd.getpwnam("postgres")
    return f"{entry.pw_uid}:{entry.pw_gid}"


@contextlib.contextmanager
def postgres_in_container(client, name: str = "opsfleet-bk-postgres"):
    """PostgreSQL 15 running inside a container of the busybox test image (nothing can be
    pulled here): the host's PostgreSQL binaries and libraries are bind-mounted read-only,
    the data directory is a fresh initdb. Host networking, so tests also reach it on
    127.0.0.1:PORT. Yields (container, port)."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="opsfleet-pgc-"))
    shutil.chown(folder, "postgres", "postgres")
    bin_dir = Path(_postgres_bin("postgres")).parent
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "--no-sync",
         "--encoding=UTF8", "--locale=C.UTF-8"],
        user="postgres", group="postgres", extra_groups=[], cwd=folder, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)
    container = client.containers.run(
        TEST_IMAGE,
        [str(bin_dir / "postgres"), "-D", "/pg/data", "-p", str(port), "-k", "/pg", "-c", "listen_addresses=127.0.0.1"],
        name=name, detach=True, network_mode="host", user=postgres_uid_gid(),
        volumes={"/usr": {"bind": "/usr", "mode": "ro"}, "/usr/lib": {"bind": "/lib", "mode": "ro"},
                 "/usr/lib64": {"bind": "/lib64", "mode": "ro"}, "/etc": {"bind": "/etc", "mode": "ro"},
                 str(folder): {"bind": "/pg", "mode": "rw"}},
    )  # fmt: skip
    try:
        wait_for(lambda: psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close() or True,
                 30, interval=0.2, what="PostgreSQL in a container")  # fmt: skip
        yield container, port, str(bin_dir)
    finally:
        container.remove(force=True)
        shutil.rmtree(folder, ignore_errors=True)
