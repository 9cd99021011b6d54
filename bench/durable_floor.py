"""The least any edge that commits before it answers can cost here (bench/alert_storm's third peer).

A Flask app that does for an Alertmanager notification only what the brief
makes every 2xx promise: check the bearer token, parse the JSON, and commit the
body to PostgreSQL (one autocommit INSERT, a prepared statement on a connection
kept per thread; PostgreSQL flushes the WAL of concurrent commits together).
No decision, no locks, no Celery, no metrics, no logging. opsfleet's edge does
all of that on top, so its rate cannot beat this one's on the same machine:
when this floor is below webhook's synchronous rate, so is every design that
records before answering.

gunicorn -w 2 --threads 8 -k gthread 'bench.durable_floor:create_app("postgresql://...")'
"""

from __future__ import annotations

import hmac
import json
import os
import threading

import psycopg
from flask import Flask, request

TABLE = "durable_floor_events"


def create_table(database_url: str) -> None:
    """Once, before gunicorn starts (its workers would race to create it)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"create table if not exists {TABLE} (id bigserial primary key, body jsonb not null)")


def create_app(database_url: str | None = None) -> Flask:
    url = database_url or os.environ["FLOOR_DATABASE_URL"]
    token = os.environ["FLOOR_TOKEN"].encode()
    local = threading.local()

    def connection() -> psycopg.Connection:
        if getattr(local, "conn", None) is None:
            local.conn = psycopg.connect(url, autocommit=True, prepare_threshold=0)
        return local.conn

    app = Flask(__name__)

    @app.post("/hooks/alertmanager")
    def alertmanager():
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, b"Bearer " + token):
            return {"error": "bad token"}, 401
        try:
            body = json.loads(request.get_data())
            alerts = body["alerts"]
        except (ValueError, KeyError, TypeError) as err:
            return {"error": f"malformed: {err}"}, 400
        connection().execute(f"insert into {TABLE} (body) values (%s)", (json.dumps(body),))
        return {"accepted": len(alerts)}, 202

    return app
