"""Application factory: configuration, ledger and broker handles, blueprints."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from celery import Celery
from flask import Flask, current_app, g, request

from webhooks.batching import IntakeBatcher
from worker.adapters.ledger import Ledger, LedgerUnavailable
from worker.adapters.metrics_multiproc import use_multiprocess_dir
from worker.config import ConfigError, LoadedConfig, load_config
from worker.logs import configure_logging, printable

log = logging.getLogger("opsfleet.web")


@dataclass
class Edge:
    """What the blueprints need, attached to the app in `create_app`."""

    loaded: LoadedConfig
    celery: Celery
    alert_intake: IntakeBatcher | None = None  # Alertmanager notifications, group-committed
    schema_ready: bool = field(default=False)
    _collector: object = field(default=None, repr=False)
    _schema_guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ledger(self) -> Ledger:
        return self.celery.opsfleet.ledger

    def fleet_collector(self):
        """Worker heartbeats and queue lengths, read at scrape time (one per process)."""
        if self._collector is None:
            from worker.adapters.fleet_collector import FleetCollector
            from worker.celery_factory import broker_url_and_options, known_queues

            url, options = broker_url_and_options(self.loaded)
            self._collector = FleetCollector(
                self.ledger, url, options, known_queues(self.loaded), self.loaded.config.worker.forget_after_seconds
            )
        return self._collector

    def ensure_schema(self) -> None:
        """Migrate once; if the ledger was down at start, try again per request."""
        if not self.schema_ready:
            with self._schema_guard:  # request threads: one migrates, the others wait for it
                if not self.schema_ready:
                    self.ledger.migrate()
                    self.schema_ready = True


def edge() -> Edge:
    return current_app.extensions["opsfleet"]


def create_app(config_path: str | None = None, *, loaded: LoadedConfig | None = None) -> Flask:
    configure_logging()
    loaded = loaded or load_config(config_path)
    if loaded.config.logging.files:
        configure_logging(loaded.data_dir, role="web")
    if not loaded.secrets.get("ALERTMANAGER_TOKEN"):
        raise ConfigError(
            [
                "ALERTMANAGER_TOKEN: not set; the webhook endpoint never runs without a token "
                "(`opsfleet run` generates one for you)"
            ],
            "environment",
        )
    use_multiprocess_dir(loaded.data_dir / "metrics")

    # Imported after the metrics directory is known (prometheus-client reads it at import).
    from webhooks import alertmanager, api, github, health, pages
    from webhooks.errors import register_error_handlers
    from worker.adapters import metrics
    from worker.celery_factory import create_celery
    from worker.task_metrics import connect_task_metrics
    from worker.tasks.intake import AlertsCommitted, accept_alert_batch

    connect_task_metrics()  # the edge publishes tasks: celery_task_sent_total
    metrics.zero_deploy_outcomes(loaded.config.deploy.environments)
    metrics.zero_alert_outcomes()
    app = Flask("opsfleet")
    app.config["MAX_CONTENT_LENGTH"] = loaded.config.web.max_body_bytes
    app.json.sort_keys = False
    state = Edge(loaded, create_celery(loaded, include_tasks=False))
    # Weighed in alert decisions (alerts × rules each can match): a batch never needs more
    # statement parameters than the largest notification a 1 MiB body holds (~7,700 alerts).
    remediation = loaded.config.remediation
    per_alert = max(1, len(remediation.rules)) if remediation.mode == "all_match" else 1
    state.alert_intake = IntakeBatcher(
        partial(accept_alert_batch, state.celery),
        weight=lambda n: len(n.alerts) * per_alert,
        max_weight=10_000,
        final=(AlertsCommitted,),
    )
    app.extensions["opsfleet"] = state
    try:
        state.ensure_schema()
        # What is live survives a restart of the metrics folder: read from the ledger.
        for environment in loaded.config.deploy.environments:
            live = state.ledger.current_release(environment)
            if live is not None:
                metrics.RELEASE_INFO.labels(environment, live["sha"]).set(1)
    except LedgerUnavailable as err:
        log.warning("ledger not reachable at start (%s); webhooks answer 503 until it is", err)
    try:
        from worker.tasks.backup import export_backup_state

        export_backup_state(loaded)
    except OSError as err:  # the backup root is another host's, or unreadable here
        log.warning("backup state not exported at start: %s", err)

    register_error_handlers(app)
    app.register_blueprint(alertmanager.bp)
    app.register_blueprint(github.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(pages.bp)

    @app.before_request
    def _start_timer() -> None:
        g.started = time.monotonic()

    @app.after_request
    def _count(response):
        source = request.blueprint if request.blueprint in ("alertmanager", "github") else None
        if source:
            metrics.WEBHOOK_REQUESTS.labels(source, str(response.status_code)).inc()
        duration_ms = (time.monotonic() - g.get("started", time.monotonic())) * 1000
        http = {
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(duration_ms, 1),
            "client": request.remote_addr,
            "user_agent": request.user_agent.string,
            "body_bytes": request.content_length or 0,
        }
        key = request.headers.get("X-GitHub-Delivery") or g.get("group_key")
        if key:
            http["key"] = key
        log.log(
            logging.WARNING if response.status_code >= 400 else logging.INFO,
            "%s %s %s %.1fms %s",
            printable(request.method),
            printable(request.path),  # %0A in a URL is a newline here: no forged log lines
            response.status_code,
            duration_ms,
            request.remote_addr,
            extra={"http": http},
        )
        return response

    return app
