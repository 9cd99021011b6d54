"""The `opsfleet` command."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from worker.config import CONFIG_ENV, ConfigError, LoadedConfig, config_warnings, load_config, redacted_view

TOKEN_FILE = "alertmanager-token"


def _load(ctx: click.Context) -> LoadedConfig:
    try:
        return load_config(ctx.obj["config"])
    except ConfigError as err:
        click.echo(f"opsfleet: {err}", err=True)
        ctx.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar=CONFIG_ENV,
    help="Configuration file (default: $OPSFLEET_CONFIG, else ./opsfleet.yaml, else embedded defaults).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """opsfleet: Alertmanager and GitHub webhooks drive remediation, deploy and backup runs.

    Secrets come from the environment: REDIS_URL and DATABASE_URL (unset: an
    embedded broker and an SQLite ledger in the data dir), ALERTMANAGER_TOKEN,
    OPSFLEET_API_TOKEN, SLACK_BOT_TOKEN, SLACK_API_URL, DOCKER_HOST, GITHUB_*.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration and print it resolved, secrets redacted.

    Exits 0 when valid, 2 with one line per problem (naming the key) when not.
    """
    loaded = _load(ctx)
    click.echo(yaml.safe_dump(redacted_view(loaded), sort_keys=False, allow_unicode=True).rstrip())
    for warning in config_warnings(loaded.config):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"configuration OK ({loaded.source})", err=True)


def _alertmanager_token(loaded: LoadedConfig) -> tuple[str, str]:
    """The webhook token: from the environment, else generated once and kept
    (mode 0600) in the data dir, so Alertmanager's config stays valid across restarts."""
    token = loaded.secrets.get("ALERTMANAGER_TOKEN")
    if token:
        return token, "from ALERTMANAGER_TOKEN"
    path = loaded.data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text().strip(), f"from {path}"
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, f"generated now and saved to {path} (mode 0600); shown only this once: {token}"


def _children(loaded: LoadedConfig, host: str, port: int) -> dict[str, list[str]]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "worker.celery_app"]
    concurrency = str(loaded.config.worker.concurrency)
    return {
        "web": [
            python, "-m", "gunicorn", "-c", "python:opsfleet.gunicorn_conf",
            "--bind", f"{host}:{port}", "webhooks:create_app()",
        ],
        "worker": [*celery, "worker", "--loglevel", "INFO", "--concurrency", concurrency,
                   "--hostname", f"opsfleet@{loaded.config.fleet.hostname}", "--without-gossip", "--without-mingle"],
        "beat": [*celery, "beat", "--loglevel", "INFO"],
    }


@cli.command("run")
@click.option("--port", type=click.IntRange(1, 65535), help="Web port (default: web.port, 8080).")
@click.option("--host", help="Web bind address (default: web.host, 127.0.0.1).")
@click.pass_context
def run(ctx: click.Context, port: int | None, host: str | None) -> None:
    """Run the whole fleet (web + worker + beat) in one process group.

    Without REDIS_URL and DATABASE_URL it needs no server: an embedded broker
    and an SQLite ledger live in the data dir. Ctrl-C stops everything.
    """
    loaded = _load(ctx)
    data_dir = loaded.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    host = host or loaded.config.web.host
    port = port or loaded.config.web.port

    from worker.adapters.ledger import LedgerUnavailable
    from worker.adapters.metrics_multiproc import use_multiprocess_dir
    from worker.runtime import Runtime

    token, token_note = _alertmanager_token(loaded)
    env = dict(os.environ)
    env["ALERTMANAGER_TOKEN"] = token
    if loaded.source != "embedded defaults":
        env[CONFIG_ENV] = str(Path(loaded.source).resolve())
    metrics_dir = data_dir / "metrics"
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Samples of an earlier run's processes would be summed with ours.
        shutil.rmtree(metrics_dir, ignore_errors=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(use_multiprocess_dir(metrics_dir))
    try:
        Runtime(loaded).ledger.migrate()
    except LedgerUnavailable as err:
        click.echo(f"opsfleet: {err}\nCheck DATABASE_URL, or unset it to use the embedded SQLite ledger.", err=True)
        ctx.exit(1)

    procs: dict[str, subprocess.Popen] = {}
    for name, argv in _children(loaded, host, port).items():
        procs[name] = subprocess.Popen(argv, env=env)

    base = f"http://{host}:{port}"
    broker = "Redis" if loaded.secrets.get("REDIS_URL") else f"embedded broker in {data_dir / 'broker'}"
    ledger = "PostgreSQL" if loaded.secrets.get("DATABASE_URL") else f"SQLite ledger {data_dir / 'ledger.sqlite3'}"
    click.echo(
        f"opsfleet running ({loaded.source}; {broker}; {ledger})\n"
        f"  Alertmanager webhook: POST {base}/hooks/alertmanager  (Authorization: Bearer <token>)\n"
        f"  token: {token_note}\n"
        f"  runs:    opsfleet runs   or   GET {base}/api/runs\n"
        f"  health:  {base}/healthz  {base}/readyz   metrics: {base}/metrics\n"
        f"Ctrl-C stops web, worker and beat."
    )

    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    exit_code = 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                click.echo(f"opsfleet: {name} exited with status {proc.returncode}; stopping the fleet", err=True)
                exit_code = 1
                stopping = True
                break
        time.sleep(0.3)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    click.echo("opsfleet stopped")
    ctx.exit(exit_code)


@cli.command("runs")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--status", help="Only runs with this status (queued, running, succeeded, failed, skipped, ...).")
@click.option("--trigger", type=click.Choice(["alert", "github", "schedule", "manual"]))
@click.option("--target", help="Only runs on this service or environment.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.argument("run_id", required=False, type=int)
@click.pass_context
def runs(ctx, limit, status, trigger, target, as_json, run_id) -> None:
    """List runs from the ledger, newest first; with RUN_ID, show one run and its steps."""
    from worker.adapters.ledger import LedgerUnavailable, jsonable
    from worker.runtime import Runtime

    loaded = _load(ctx)
    ledger = Runtime(loaded).ledger
    try:
        ledger.migrate()
        if run_id is not None:
            run = ledger.get_run(run_id)
            if run is None:
                click.echo(f"opsfleet: no run {run_id}", err=True)
                ctx.exit(1)
            rows = [run]
        else:
            rows = ledger.list_runs(limit=limit, status=status, trigger=trigger, target=target)
    except LedgerUnavailable as err:
        click.echo(f"opsfleet: {err}", err=True)
        ctx.exit(1)
    if as_json:
        click.echo(json.dumps(jsonable(rows if run_id is None else rows[0]), indent=2))
        return
    if run_id is not None:
        _print_run(rows[0])
        return
    if not rows:
        click.echo("no runs")
        return
    click.echo(f"{'ID':>6}  {'CREATED (UTC)':19}  {'TRIGGER':8}  {'PLAYBOOK':16}  {'TARGET':14}  {'STATUS':10}  REASON")
    for r in rows:
        click.echo(
            f"{r['id']:>6}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {r['trigger']:8}  {r['playbook'][:16]:16}  "
            f"{(r['target'] or '-')[:14]:14}  {r['status']:10}  {r['reason'][:60]}"
            + (f" (+{r['repeats']} repeats)" if r["repeats"] else "")
        )


def _run_now(ctx: click.Context, playbook: str, target: str, params: dict, dry_run: bool) -> None:
    """Run a playbook now, in this process, through the same step functions a worker runs.

    A real run is recorded in the ledger first (trigger manual, by $USER) and
    its steps are recorded as they run, so it shows in `opsfleet runs` like any
    other. --dry-run records nothing: the steps only say what they would do."""
    from worker.adapters.ledger import LedgerUnavailable, NewRun, utcnow
    from worker.logs import configure_logging
    from worker.runtime import Runtime
    from worker.tasks.playbooks import PLAYBOOKS
    from worker.tasks.runs import run_inline
    from worker.tasks.steps import StepContext, StepFailed

    loaded = _load(ctx)
    configure_logging(loaded.data_dir if loaded.config.logging.files else None, role="cli")
    runtime = Runtime(loaded)
    if dry_run:
        try:
            runtime.ledger.migrate()  # the schema only: a dry run records nothing
        except LedgerUnavailable as err:
            click.echo(f"opsfleet: {err}", err=True)
            ctx.exit(1)
        run = {"id": None, "target": target, "params": {**params, "dry_run": True}, "started_at": utcnow(),
               "playbook": playbook, "trigger": "manual"}
        for step in PLAYBOOKS[playbook]:
            try:
                output = step.fn(StepContext(runtime, run))
            except StepFailed as err:
                click.echo(f"{step.name}: would fail: {err}", err=True)
                ctx.exit(1)
            click.echo(f"{step.name} (dry run):")
            for line in output.splitlines():
                click.echo(f"  {line}")
        return
    who = os.environ.get("USER") or "cli"
    try:
        runtime.ledger.migrate()
        recorded = runtime.ledger.record_event(
            source="cli", summary=f"{playbook} {target} by {who}", body="",
            new_runs=[NewRun(trigger="manual", playbook=playbook, target=target, params=params,
                             summary=f"{playbook} {target} (opsfleet CLI)", triggered_by=who)],
        )
        ended = run_inline(runtime, recorded.runs[0].id)
    except LedgerUnavailable as err:
        click.echo(f"opsfleet: {err}", err=True)
        ctx.exit(1)
    _print_run(ended)
    if ended["status"] != "succeeded":
        ctx.exit(1)


@cli.command("rotate-logs")
@click.option("--dry-run", is_flag=True, help="Say what would be rotated, compressed and removed; change nothing.")
@click.option("--force", is_flag=True, help="Rotate every non-empty live file now, due or not.")
@click.option("--set", "log_set", default="all", show_default=True, help="One log set (rotation.sets.NAME).")
@click.pass_context
def rotate_logs(ctx: click.Context, dry_run: bool, force: bool, log_set: str) -> None:
    """Rotate the configured log sets now (rotate, compress, retain).

    Runs here, in this process, as a manual run recorded in the ledger; the
    scheduled runs (beat, every rotation.check_interval_seconds) do the same."""
    _run_now(ctx, "rotate_logs", log_set, {"force": force} if force else {}, dry_run)


@cli.command("cleanup")
@click.option("--dry-run", is_flag=True, help="Say what would be removed and how much space it holds; remove nothing.")
@click.pass_context
def cleanup(ctx: click.Context, dry_run: bool) -> None:
    """Clean up now: Docker images, old rotated logs, old ledger runs, backups (their retention task).

    Runs here, in this process, as a manual run recorded in the ledger."""
    _run_now(ctx, "cleanup", "all", {}, dry_run)


def _print_run(run: dict) -> None:
    click.echo(f"run {run['id']}: {run['playbook']} on {run['target'] or '-'} — {run['status']}")
    for key in ("trigger", "rule", "summary", "reason", "created_at", "started_at", "finished_at", "worker", "repeats"):
        if run.get(key) not in (None, ""):
            click.echo(f"  {key}: {run[key]}")
    for step in run["steps"]:
        click.echo(f"  step {step['seq']} {step['name']}: {step['status']}")
        for line in step["output"].splitlines()[:20]:
            click.echo(f"      {line}")


def main() -> None:
    cli(prog_name="opsfleet")


if __name__ == "__main__":
    main()
