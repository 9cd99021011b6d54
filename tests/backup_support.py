"""Helpers for the backup and restore tests: a small real database, a documents tree,
config files, and an in-process engine (SQLite ledger, embedded broker) to run playbooks."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

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
        conn.execute("INSERT INTO orders (customer, note) SELECT 1 + g % 120, repeat('x', g) FROM generate_series(1, 300) g")
        conn.execute('INSERT INTO shop."Line Items" SELECT g, \'sku-\' || g FROM generate_series(1, 7) g')
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
