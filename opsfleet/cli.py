"""The `opsfleet` command."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from worker.adapters.ledger import RUN_STATUSES
from worker.config import CONFIG_ENV, ConfigError, LoadedConfig, config_warnings, load_config, redacted_view

TOKEN_FILE = "alertmanager-token"
# `opsfleet run` starts a web, worker or beat that exits again, unless it exited this many
# times in this window: a crash loop stops the fleet, saying so, instead of spinning.
RESTARTS_PER_WINDOW = 5
RESTART_WINDOW_SECONDS = 300


def _load(ctx: click.Context, *, reading: bool = False) -> LoadedConfig:
    """`reading`: the command only reads the ledger or the backup folder, so a ${VAR} left
    unset in this shell (a credential of a managed system) is a warning, not a refusal."""
    try:
        loaded = load_config(ctx.obj["config"], missing_ok=reading)
    except ConfigError as err:
        click.echo(f"opsfleet: {err}", err=True)
        ctx.exit(2)
    for problem in loaded.unset:
        click.echo(f"opsfleet: warning: {problem} (not needed here; other commands refuse to start)", err=True)
    return loaded


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
    """opsfleet: Alertmanager webhooks drive remediation runs; GitHub pushes drive
    deploys (health gate, automatic rollback); beat runs backups, log rotation
    and cleanup; every run is in the ledger.

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
    for warning in config_warnings(loaded.config, loaded.secrets):
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
        token = path.read_text().strip()
        if token:
            return token, f"from {path}"
    token = secrets.token_urlsafe(32)
    # Written whole under a temporary name, then renamed: never an empty or half file.
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.replace(partial, path)
    return token, f"generated now and saved to {path} (mode 0600); shown only this once: {token}"


def _die_with_parent() -> None:
    """In each child of `opsfleet run` (Linux): SIGTERM when opsfleet run dies,
    however it dies (SIGKILL, a closed SSH session), so nothing is left running."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _opsfleet_command() -> str:
    """How the user can call opsfleet: bare if it is on PATH, else its full path."""
    found = shutil.which("opsfleet")
    own = Path(sys.executable).with_name("opsfleet")
    return "opsfleet" if found and Path(found).resolve() == own.resolve() else str(own)


def _config_flag(loaded: LoadedConfig) -> str:
    """` --config FILE` when this run's configuration came from a file the command would not find
    by itself (not $OPSFLEET_CONFIG, not ./opsfleet.yaml), so a printed command reads the same ledger."""
    import shlex

    if loaded.source == "embedded defaults" or os.environ.get(CONFIG_ENV):
        return ""
    if Path(loaded.source).resolve() == (Path.cwd() / "opsfleet.yaml").resolve():
        return ""
    return f" --config {shlex.quote(str(Path(loaded.source).resolve()))}"


def _children(loaded: LoadedConfig, host: str, port: int) -> dict[str, list[str]]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "worker.celery_app"]
    concurrency = str(loaded.config.worker.concurrency)
    from worker.celery_factory import known_queues

    # One box runs everything: the shared queues, every pinned host's queue and
    # the maintenance host's (scheduled backups, rotation, cleanup).
    queues = ",".join(known_queues(loaded))
    return {
        "web": [
            python,
            "-m",
            "gunicorn",
            "-c",
            "python:opsfleet.gunicorn_conf",
            "--bind",
            f"{host}:{port}",
            "webhooks:create_app()",
        ],
        "worker": [
            *celery,
            "worker",
            "--loglevel",
            _log_level("INFO"),
            "--concurrency",
            concurrency,
            "--queues",
            queues,
            "--hostname",
            f"opsfleet@{loaded.config.fleet.hostname}",
            "--without-gossip",
            "--without-mingle",
        ],
        # Beat at WARNING: its "sending due task" lines every few seconds would
        # bury what the worker says.
        "beat": [*celery, "beat", "--loglevel", _log_level("WARNING")],
    }


def _log_level(default: str) -> str:
    """LOG_LEVEL when set (it rules every process), else the process's own default."""
    return os.environ.get("LOG_LEVEL", "").upper() or default


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
    # One fleet per data dir: two would run two beats and two workers on one broker folder
    # and one SQLite file. Held while this process lives (the kernel lets go if it is killed).
    ctx.obj["run_lock"] = lock = open(data_dir / "opsfleet-run.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        click.echo(
            f"opsfleet: {data_dir} is in use by another `opsfleet run` ({holder}): stop it first, "
            "or give this one its own fleet.data_dir",
            err=True,
        )
        ctx.exit(1)
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    host = host or loaded.config.web.host
    port = port or loaded.config.web.port
    if not _port_free(host, port):
        click.echo(
            f"opsfleet: {host}:{port} is in use: stop what listens there (an earlier `opsfleet run`? "
            f"see `ss -ltnp 'sport = :{port}'`), or choose --port",
            err=True,
        )
        ctx.exit(1)

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

    children = _children(loaded, host, port)
    procs: dict[str, subprocess.Popen] = {}
    for name, argv in children.items():
        procs[name] = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)

    base = f"http://{host}:{port}"
    broker = "Redis" if loaded.secrets.get("REDIS_URL") else f"embedded broker in {data_dir / 'broker'}"
    ledger = "PostgreSQL" if loaded.secrets.get("DATABASE_URL") else f"SQLite ledger {data_dir / 'ledger.sqlite3'}"
    click.echo(
        f"opsfleet running ({loaded.source}; {broker}; {ledger})\n"
        f"  Alertmanager webhook: POST {base}/hooks/alertmanager  (Authorization: Bearer <token>)\n"
        f"  token: {token_note}\n"
        + (
            f"  GitHub webhook:       POST {base}/hooks/github  (signed with GITHUB_WEBHOOK_SECRET)\n"
            if loaded.secrets.get("GITHUB_WEBHOOK_SECRET")
            else ""
        )
        + f"  status page: {base}/\n"
        f"  runs:    {_opsfleet_command()}{_config_flag(loaded)} runs   or   GET {base}/api/runs\n"
        + (
            # The ledger's address is in this process's environment only; the CLI reads the same.
            "           (the command reads the ledger of DATABASE_URL: set it as for this fleet)\n"
            if loaded.secrets.get("DATABASE_URL")
            else ""
        )
        + f"  health:  {base}/healthz  {base}/readyz   metrics: {base}/metrics\n"
        f"Ctrl-C stops web, worker and beat."
    )
    for warning in config_warnings(loaded.config, loaded.secrets):
        click.echo(f"warning: {warning}", err=True)

    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    exit_code = 0
    # The worker's processes (main and pool children) as last seen: the runs they were in
    # the middle of are failed at once when they die, not when their leases run out.
    worker_pids: set[int] = set()
    restarts: dict[str, list[float]] = {}
    looked = 0.0
    while not stopping:
        if "worker" in procs and time.monotonic() - looked > 2:
            worker_pids |= {procs["worker"].pid, *_descendants(procs["worker"].pid)}
            looked = time.monotonic()
        for name, proc in list(procs.items()):
            if proc.poll() is None or stopping:
                continue
            recent = [t for t in restarts.get(name, []) if time.monotonic() - t < RESTART_WINDOW_SECONDS]
            if len(recent) >= RESTARTS_PER_WINDOW:
                click.echo(
                    f"opsfleet: {name} exited with status {proc.returncode}, its {len(recent) + 1}th exit in "
                    f"{RESTART_WINDOW_SECONDS // 60} minutes; stopping the fleet (see {data_dir / 'logs'})",
                    err=True,
                )
                exit_code = 1
                stopping = True
                break
            click.echo(f"opsfleet: {name} exited with status {proc.returncode}; starting it again", err=True)
            if name == "worker":
                _fail_runs_of_killed(loaded, sorted(worker_pids), f"worker exited with status {proc.returncode}")
                worker_pids = set()
            restarts[name] = [*recent, time.monotonic()]
            procs[name] = subprocess.Popen(children[name], env=env, preexec_fn=_die_with_parent)
        time.sleep(0.3)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pids = [proc.pid, *_descendants(proc.pid)]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=5)
            click.echo(f"opsfleet: {name} did not stop within 30 s: killed", err=True)
            worker_pids |= set(pids) if name == "worker" else set()
    if worker_pids:
        # A warm shutdown leaves no run inside a step; one killed, or stopped cold by a
        # second Ctrl-C, does: those runs are failed now.
        _fail_runs_of_killed(loaded, sorted(worker_pids), "opsfleet run was stopped while this step ran")
    click.echo("opsfleet stopped")
    ctx.exit(exit_code)


def _descendants(pid: int) -> list[int]:
    """The processes under pid (a Celery worker's pool children), from /proc."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The field after the parenthesised command name is the state, then the ppid.
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, ppid in parent_of.items() if ppid == current]
        found += children
        frontier += children
    return found


def _fail_runs_of_killed(loaded: LoadedConfig, pids: list[int], why: str) -> None:
    """Runs a killed worker was in the middle of: failed now, saying so, so their targets are
    not held until the lease runs out (the sweeper's way for a worker that vanished)."""
    from worker.adapters.ledger import LedgerUnavailable
    from worker.runtime import Runtime

    host = socket.gethostname()
    runtime = Runtime(loaded)
    try:
        failed = runtime.ledger.fail_runs_of_workers(
            [f"{host}:{pid}" for pid in pids], f"stopped: {why} (worker killed)"
        )
    except LedgerUnavailable as err:
        click.echo(f"opsfleet: could not record the runs it stopped ({err}); their leases will expire", err=True)
        return
    if not failed:  # a warm shutdown, the usual stop: no broker connection to make
        return
    from worker.celery_factory import create_celery
    from worker.tasks.runs import request_report

    app = create_celery(loaded, include_tasks=False)
    for run_id in failed:
        click.echo(f"opsfleet: run {run_id} was in a step: failed (see `opsfleet runs {run_id}`)", err=True)
        # Told like every ended run (Slack; GitHub for a deploy), by the next worker to start.
        request_report(app, run_id, (runtime.ledger.get_run(run_id) or {}).get("playbook"))


@cli.command("worker")
@click.option("--host", "host", help="Run only the steps pinned to this host (services.<name>.host: NAME).")
@click.option("--concurrency", type=click.IntRange(1, 64), help="Worker processes (default: worker.concurrency).")
@click.pass_context
def worker_command(ctx: click.Context, host: str | None, concurrency: int | None) -> None:
    """Run a Celery worker.

    Without --host it consumes the shared queues (remediate, report,
    maintenance). With --host NAME it consumes only that host's queue: run
    one on each Docker host, next to its daemon (DOCKER_HOST).
    """
    from worker.celery_factory import QUEUES, host_queue

    loaded = _load(ctx)
    queues = host_queue(host) if host else ",".join(QUEUES)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel",
        _log_level("INFO"),
        "--queues",
        queues,
        "--concurrency",
        str(concurrency or loaded.config.worker.concurrency),
        "--hostname",
        f"opsfleet-{host or 'main'}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    env = dict(os.environ)
    if loaded.source != "embedded defaults":
        env[CONFIG_ENV] = str(Path(loaded.source).resolve())
    os.execve(sys.executable, argv, env)


@cli.command("runs")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500), help="How many runs to list.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs with this status.")
@click.option("--trigger", type=click.Choice(["alert", "github", "schedule", "manual"]))
@click.option("--target", help="Only runs on this service or environment.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.argument("run_id", required=False, type=click.IntRange(1, 2**31 - 1))
@click.pass_context
def runs(ctx, limit, status, trigger, target, as_json, run_id) -> None:
    """List runs from the ledger, newest first; with RUN_ID, show one run and its steps."""
    from worker.adapters.ledger import LedgerUnavailable, jsonable
    from worker.runtime import Runtime

    loaded = _load(ctx, reading=True)
    if not loaded.secrets.get("DATABASE_URL") and not (loaded.data_dir / "ledger.sqlite3").exists():
        click.echo(
            f"opsfleet: no ledger at {loaded.data_dir / 'ledger.sqlite3'}: has the fleet run with this "
            "configuration? (set DATABASE_URL, or --config, to read another ledger)",
            err=True,
        )
        ctx.exit(1)
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
            f"{_tty(r['target'] or '-')[:14]:14}  {r['status']:10}  {_tty(r['reason'])[:60]}"
            + (f" (+{r['repeats']} repeats)" if r["repeats"] else "")
        )


def _run_now(ctx: click.Context, playbook: str, target: str, params: dict, dry_run: bool) -> None:
    """Run a playbook now, in this process, through the same step functions a worker runs.

    A real run is recorded in the ledger first (trigger manual, by $USER) and
    its steps are recorded as they run, so it shows in `opsfleet runs` like any
    other. --dry-run records nothing: the steps only say what they would do."""
    from worker.adapters.ledger import LedgerUnavailable, utcnow
    from worker.logs import configure_logging
    from worker.runtime import Runtime
    from worker.tasks.playbooks import PLAYBOOKS
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
        run = {
            "id": None,
            "target": target,
            "params": {**params, "dry_run": True},
            "started_at": utcnow(),
            "playbook": playbook,
            "trigger": "manual",
        }
        failed, stopping = [], None
        for step in PLAYBOOKS[playbook]:
            try:
                output = step.fn(StepContext(runtime, run))
            except StepFailed as err:
                # Say what every other step would do too: one unreachable Docker daemon
                # should not hide what the log and backup steps would remove.
                click.echo(f"{step.name}: would fail: {err}", err=True)
                failed.append(step.name)
                stopping = stopping or (None if step.carry_on else step.name)
                continue
            click.echo(f"{step.name} (dry run):")
            for line in output.splitlines():
                click.echo(f"  {line}")
        if failed:
            then = f"a real run stops at {stopping}" if stopping else "a real run does the other steps, then fails"
            click.echo(f"dry run: {', '.join(failed)} would fail ({then})", err=True)
            ctx.exit(1)
        return
    _execute(ctx, _engine(ctx), playbook, params, target)


@cli.command("rotate-logs")
@click.option("--dry-run", is_flag=True, help="Say what would be rotated, compressed and removed; change nothing.")
@click.option("--force", is_flag=True, help="Rotate every non-empty live file now, due or not.")
@click.option("--set", "log_set", default="all", show_default=True, help="One log set (rotation.sets.NAME).")
@click.pass_context
def rotate_logs(ctx: click.Context, dry_run: bool, force: bool, log_set: str) -> None:
    """Rotate the configured log sets now (rotate, compress, retain).

    Runs here, in this process, as a manual run recorded in the ledger; the
    scheduled runs (beat, every rotation.check_interval_seconds) do the same."""
    sets = _load(ctx).config.rotation.sets
    if log_set != "all" and log_set not in sets:
        click.echo(f"opsfleet: --set {log_set}: no such log set (rotation.sets: {', '.join(sets) or 'none'})", err=True)
        ctx.exit(2)
    _run_now(ctx, "rotate_logs", log_set, {"force": force} if force else {}, dry_run)


@cli.command("cleanup")
@click.option("--dry-run", is_flag=True, help="Say what would be removed and how much space it holds; remove nothing.")
@click.pass_context
def cleanup(ctx: click.Context, dry_run: bool) -> None:
    """Clean up now: Docker images, old rotated logs, old ledger runs, backups (their retention task).

    Runs here, in this process, as a manual run recorded in the ledger."""
    _run_now(ctx, "cleanup", "all", {}, dry_run)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line breaks to a terminal, too


def _tty(value: object) -> str:
    """Ledger text (from alert labels, commit messages, step output) as one terminal line:
    control characters shown as escapes, so none moves the cursor, sets the title or forges a line."""
    return str(value).translate(_CONTROL)


def _print_run(run: dict) -> None:
    click.echo(f"run {run['id']}: {run['playbook']} on {_tty(run['target'] or '-')} — {run['status']}")
    for key in ("trigger", "rule", "summary", "reason", "created_at", "started_at", "finished_at", "worker", "repeats"):
        if run.get(key) not in (None, ""):
            click.echo(f"  {key}: {_tty(run[key])}")
    for step in run["steps"]:
        click.echo(f"  step {step['seq'] + 1} {step['name']}: {step['status']}")  # numbered as progress is
        for line in step["output"].split("\n")[:20]:
            click.echo(f"      {_tty(line)}")


# -- backups and restores ------------------------------------------------------------------


def _engine(ctx: click.Context, *, reading: bool = False):
    """The Celery app (for its tasks, run here in-process) and its ledger, migrated.
    `reading`: as for _load."""
    import logging

    from worker.adapters.metrics_multiproc import use_multiprocess_dir
    from worker.logs import configure_logging

    loaded = _load(ctx, reading=reading)
    # The fleet's log files get this command's events too (a failed step's stack among them).
    configure_logging(loaded.data_dir if loaded.config.logging.files else None, role="cli")
    # Jobs run here count in the fleet's metrics folder, as a worker's do: a backup taken by
    # hand clears OpsfleetBackupTooOld on the web's /metrics (set before metrics are imported).
    use_multiprocess_dir(loaded.data_dir / "metrics")

    from worker.adapters.ledger import LedgerUnavailable
    from worker.celery_factory import create_celery

    # Steps run here through Celery's task machinery: its per-task INFO lines
    # would interleave with the progress this command prints.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)

    app = create_celery(loaded)
    try:
        app.opsfleet.ledger.migrate()
    except LedgerUnavailable as err:
        click.echo(f"opsfleet: {err}", err=True)
        ctx.exit(1)
    return app


def _who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in a container
        return f"uid {os.getuid()}"


def _execute(ctx: click.Context, app, playbook: str, params: dict, target: str) -> None:
    """Record a manual run, run its steps here with progress, print a summary; exit 1 unless it succeeded."""
    from worker.adapters.ledger import NewRun
    from worker.tasks.runs import execute_inline

    recorded = app.opsfleet.ledger.record_event(
        source="cli", summary=f"{playbook} {target}", body=json.dumps(params),
        new_runs=[NewRun(trigger="manual", triggered_by=_who(), playbook=playbook, target=target, params=params,
                         summary=f"{playbook} {target} from the command line")],
    )  # fmt: skip
    run_id = recorded.runs[0].id
    began = time.monotonic()
    click.echo(f"run {run_id}: {playbook}")

    def progress(seq, name, step):
        if step is None:
            click.echo(f"  [{seq + 1}] {name} …")
            return
        click.echo(f"  [{seq + 1}] {name}: {step['status']}")
        for line in step["output"].splitlines()[:40]:
            click.echo(f"        {line}")

    run = execute_inline(app, run_id, on_step=progress)
    click.echo(f"run {run_id} {run['status']} in {time.monotonic() - began:.1f}s: {run['reason']}")
    if run["status"] != "succeeded":
        ctx.exit(1)


# -- deploys ----------------------------------------------------------------------------------


def _environment(ctx: click.Context, app, name: str):
    env = app.opsfleet.config.deploy.environments.get(name)
    if env is None:
        known = ", ".join(sorted(app.opsfleet.config.deploy.environments)) or "none configured"
        click.echo(f'opsfleet: unknown environment "{name}" (deploy.environments: {known})', err=True)
        ctx.exit(2)
    return env


@cli.command("deploy")
@click.option("--env", "environment", required=True, help="The environment (deploy.environments.NAME).")
@click.option("--ref", "sha", required=True, help="The commit sha (40 hex digits) to deploy.")
@click.option("--tag", "git_tag", default="", help="The git tag, for a tag_template that uses {tag}.")
@click.pass_context
def deploy_command(ctx: click.Context, environment: str, sha: str, git_tag: str) -> None:
    """Deploy a commit now, here, through the deploy playbook (lock, validate, pull,
    recreate, health gate, record; rollback on failure). A deliberate deploy: it
    may put an older commit live, which a webhook push never does."""
    import re as _re

    from worker.deploys import manual_deploy_params

    app = _engine(ctx)
    env = _environment(ctx, app, environment)
    if not _re.fullmatch(r"[0-9a-f]{40}", sha):
        click.echo("opsfleet: --ref must be a full commit sha (40 lower-case hex digits)", err=True)
        ctx.exit(2)
    _execute(ctx, app, "deploy", manual_deploy_params(environment, env, sha, git_tag, time.time()), environment)


@cli.command("rollback")
@click.option("--env", "environment", required=True, help="The environment (deploy.environments.NAME).")
@click.option(
    "--to",
    "release_id",
    type=click.IntRange(1, 2**31 - 1),
    help="A release id (opsfleet releases); default: the one live before the current.",
)
@click.pass_context
def rollback_command(ctx: click.Context, environment: str, release_id: int | None) -> None:
    """Put an earlier release live again, through the deploy playbook (with its health gate)."""
    from worker.deploys import rollback_params, rollback_target

    app = _engine(ctx)
    _environment(ctx, app, environment)
    target, why = rollback_target(app.opsfleet.ledger.list_releases(environment, limit=500), release_id)
    if target is None:
        click.echo(f"opsfleet: {environment}: {why}", err=True)
        ctx.exit(2)
    _execute(ctx, app, "deploy", rollback_params(environment, target, time.time()), environment)


@cli.command("releases")
@click.option("--env", "environment", help="Only this environment.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def releases_command(ctx: click.Context, environment: str | None, limit: int, as_json: bool) -> None:
    """Releases, newest first: what each deploy put live (or tried to), and which is current."""
    from worker.adapters.ledger import jsonable

    app = _engine(ctx, reading=True)
    configured = app.opsfleet.loaded.config.deploy.environments
    if environment is not None and environment not in configured:
        known = ", ".join(sorted(configured)) or "none (deploy.environments is empty)"
        click.echo(f"opsfleet: no environment {environment!r} is configured; configured: {known}", err=True)
        ctx.exit(2)
    rows = app.opsfleet.ledger.list_releases(environment, limit=limit)
    if as_json:
        click.echo(json.dumps(jsonable(rows), indent=2))
        return
    if not rows:
        click.echo("no releases")
        return
    click.echo(f"{'ID':>5}  {'ENV':12}  {'SHA':7}  {'STATUS':11}  {'CUR':3}  {'RUN':>5}  {'CREATED (UTC)':19}  IMAGES")
    for r in rows:
        images = ", ".join(f"{s}={i}" for s, i in r["images"].items())
        click.echo(
            f"{r['id']:>5}  {r['environment'][:12]:12}  {r['sha'][:7]:7}  {r['status']:11}  "
            f"{'*' if r['current'] else '':3}  {r['run_id']:>5}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {images}"
        )


def _local(moment, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return f"{moment.astimezone(ZoneInfo(tz)):%Y-%m-%d %H:%M %Z}"


@cli.group("backup")
def backup_group() -> None:
    """Backup sets: list, run, verify, prune, and the restore drill (see README "Backups")."""


@backup_group.command("list")
@click.option(
    "--kind", help="Only sets holding a series of this kind (database, documents, config, models, inventory)."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def backup_list(ctx, kind, as_json) -> None:
    """Complete backup sets, newest first (by the manifest's time, not the name)."""
    from worker.adapters.backupstore import list_sets

    loaded = _load(ctx, reading=True)
    sets = list_sets(loaded.backup_root)
    if kind:
        from typing import get_args

        from worker.config import BackupKind

        kinds = get_args(BackupKind)
        if kind not in kinds:
            raise click.BadParameter(f"unknown kind {kind!r} (use one of {', '.join(kinds)})", param_hint="--kind")
        sets = [s for s in sets if any(i["kind"] == kind for i in s.items.values())]
    if as_json:
        click.echo(json.dumps([s.manifest for s in sets], indent=2))
        return
    if not sets:
        click.echo(f"no backup sets in {loaded.backup_root}")
        return
    tz = loaded.config.backup.timezone
    click.echo(f"{'SET':22}  {'TAKEN (' + tz + ')':26}  {'SERIES':12}  {'KIND':10}  {'SIZE':>10}  VERIFIED")
    for s in sets:
        for series, item in sorted(s.items.items()):
            if kind and item["kind"] != kind:
                continue
            click.echo(
                f"{s.id:22}  {_local(s.item_taken_at(series), tz):26}  {series:12}  {item['kind']:10}  "
                f"{s.size(series) / 1e6:>8.2f}MB  {'yes' if item.get('verified') else 'NO'}"
            )


@backup_group.command("run")
@click.option(
    "--kind", "kinds", multiple=True,
    help="Series of this kind (repeatable; with --series, those too). Default: every series.",
)  # fmt: skip
@click.option("--series", "names", multiple=True, help="This series (repeatable; with --kind, that kind's too).")
@click.pass_context
def backup_run(ctx, kinds, names) -> None:
    """Back up now, as one set; recorded in the ledger as a manual run."""
    app = _engine(ctx)
    series = app.opsfleet.config.backup.series
    if not series:
        click.echo("opsfleet: no backup series configured (backup.series)", err=True)
        ctx.exit(2)
    known_kinds = {spec.kind for spec in series.values()}
    for kind in kinds:
        if kind not in known_kinds:
            click.echo(
                f"opsfleet: --kind {kind}: no series of that kind (kinds: {', '.join(sorted(known_kinds))})", err=True
            )
            ctx.exit(2)
    for name in names:
        if name not in series:
            click.echo(f"opsfleet: --series {name}: no such series (series: {', '.join(sorted(series))})", err=True)
            ctx.exit(2)
    wanted = list(kinds) + list(names) or list(series)
    # The run's target says what was asked for, as `opsfleet runs` lists it.
    _execute(ctx, app, "backup_set", {"series": wanted}, ",".join([*kinds, *names]) or "all")


@backup_group.command("verify")
@click.argument("set_id")
@click.pass_context
def backup_verify(ctx, set_id) -> None:
    """Full read of every file in a set: sha256 against the manifest, a complete
    decompression, pg_restore of the whole dump to /dev/null, tar --list of each
    archive. The result is written into the manifest (a failed item is never
    restored by --latest and never counted by retention)."""
    from worker.adapters.backupstore import get_set, iso, write_manifest
    from worker.adapters.ledger import utcnow
    from worker.tasks.backup import verify_set

    loaded = _load(ctx)
    found = get_set(loaded.backup_root, set_id)
    if found is None:
        click.echo(f"opsfleet: no backup set {set_id} in {loaded.backup_root}", err=True)
        ctx.exit(1)
    results = verify_set(found, deep=True)
    for series, result in results.items():
        click.echo(f"{series}: {'OK' if result.ok else 'FAILED'}: {result.detail}")
        found.items[series]["verified"] = result.ok
        found.items[series]["verification"] = {"at": iso(utcnow()), "detail": result.detail, "deep": True}
    try:
        write_manifest(found.path, found.manifest)
    except OSError as err:
        click.echo(
            f"opsfleet: the result could not be written into {found.path / 'manifest.json'}: "
            f"{err.strerror or err}; the manifest is unchanged (free space, or a writable backup root, and run it again)",
            err=True,
        )
        ctx.exit(1)
    if not all(r.ok for r in results.values()):
        ctx.exit(1)


@backup_group.command("prune")
@click.option("--dry-run", is_flag=True, help="Print what would go and why each backup stays; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting.")
@click.pass_context
def backup_prune(ctx, dry_run, yes) -> None:
    """Apply retention (backup.retention, per-series overrides) to every series."""
    from worker.tasks.backup import prune

    loaded = _load(ctx)
    lines = prune(loaded.config, loaded.backup_root, dry_run=True)
    for line in lines:
        click.echo(line)
    going = sum(1 for line in lines if line.startswith("would forget"))
    if dry_run or not going:
        click.echo(f"{going} backup items would be deleted" if dry_run else "nothing to delete")
        return
    if not yes and not click.confirm(f"delete {going} backup items?", default=False):
        ctx.exit(1)
    done = prune(loaded.config, loaded.backup_root, dry_run=False)
    click.echo(f"deleted {sum(1 for line in done if line.startswith('forget'))} backup items")


@backup_group.command("drill")
@click.pass_context
def backup_drill(ctx) -> None:
    """Run the restore drill now (what the weekly schedule runs)."""
    app = _engine(ctx)
    _execute(ctx, app, "restore_drill", {}, "newest")


def _restore_plan(ctx, loaded, set_id, latest, kinds, swap=True):
    from worker.adapters.backupstore import list_sets
    from worker.adapters.postgres import Postgres
    from worker.tasks.restore import plan_restore

    if bool(set_id) == bool(latest):
        click.echo("opsfleet: name a backup set ID or --latest (one of them)", err=True)
        ctx.exit(2)
    sets = list_sets(loaded.backup_root)
    if set_id and not any(s.id == set_id for s in sets):
        click.echo(
            f"opsfleet: no backup set {set_id} in {loaded.backup_root} (`opsfleet backup list` shows the sets)",
            err=True,
        )
        ctx.exit(1)
    plan, gaps = plan_restore(sets, loaded.config.backup.series, kinds, None if latest else set_id)
    if not plan:
        where = "the newest verified sets hold" if latest else f"set {set_id} holds"
        click.echo(f"opsfleet: {where} no verified item of kind {', '.join(kinds)} in {loaded.backup_root}:", err=True)
        for series, why in gaps.items():
            click.echo(f"  {series}: {why}", err=True)
        ctx.exit(1)
    by_id = {s.id: s for s in sets}
    tz = loaded.config.backup.timezone
    for series, sid in sorted(plan.items()):
        s = by_id[sid]
        item = s.items[series]
        facts = (
            f"{len(item.get('row_counts', {}))} tables, {sum(item.get('row_counts', {}).values())} rows"
            if item["kind"] == "database" else f"{item.get('file_count', '?')} files"
        )  # fmt: skip
        click.echo(
            f"  {series} ({item['kind']}) from set {sid}, taken {_local(s.item_taken_at(series), tz)}, "
            f"{s.size(series) / 1e6:.2f} MB, {facts}, source {item.get('source')}"
        )
        spec = loaded.config.backup.series.get(series)
        if spec is not None and spec.kind in ("documents", "models") and spec.path:
            click.echo(f"    the current tree is moved aside to {spec.path}.before-restore-<run>, kept")
        elif spec is not None and spec.kind == "database" and swap:
            live = Postgres(spec.database_url).dbname
            click.echo(f"    the live database {live} is kept, renamed {live}_before_<run>")
            if spec.stop_services:
                click.echo(f"    {', '.join(spec.stop_services)} stopped for the swap, started again after it")
    for series, why in gaps.items():
        click.echo(f"  not restored: {series}: {why}")
    if len(set(plan.values())) > 1:
        click.echo("  note: these items come from different sets, taken at different times")
    return plan


def _kinds(database, documents, config, models, default):
    chosen = [
        k for k, on in (("database", database), ("documents", documents), ("config", config), ("models", models)) if on
    ]
    return chosen or default


@cli.command("restore")
@click.argument("set_id", required=False)
@click.option("--latest", is_flag=True, help="For each item asked for, the newest verified set holding it.")
@click.option("--database", is_flag=True, help="Restore database series.")
@click.option("--documents", is_flag=True, help="Restore documents series.")
@click.option("--config-files", "config_files", is_flag=True, help="Restore config series (files and folders).")
@click.option("--models", is_flag=True, help="Restore models series.")
@click.option(
    "--target-db",
    help="Restore the database into this new database and stop there (no swap). "
    "Alone, it restores the database only; add --documents etc. to restore those in place too.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be restored; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.pass_context
def restore(ctx, set_id, latest, database, documents, config_files, models, target_db, dry_run, yes) -> None:
    """Restore from a backup set (default items: database and documents; with
    --target-db, the database only).

    A database goes into a fresh database first and is checked against the
    manifest's row counts; only then is it swapped in (rename; the services in
    stop_services stopped and started), the old one kept as <name>_before_<run>.
    A documents tree is extracted beside the current one, which is moved aside
    to <path>.before-restore-<run>. Recorded as a run in the ledger."""
    from worker.adapters.postgres import PostgresError, check_db_name

    loaded = _load(ctx)
    if target_db:
        try:
            check_db_name(target_db)
        except PostgresError as err:
            click.echo(f"opsfleet: --target-db: {err}", err=True)
            ctx.exit(2)
    # A restore to the side (--target-db) touches nothing live unless asked to.
    kinds = _kinds(database, documents, config_files, models, ["database"] if target_db else ["database", "documents"])
    click.echo("restore plan:")
    plan = _restore_plan(ctx, loaded, set_id, latest, kinds, swap=not target_db)
    if target_db:
        click.echo(f"  databases go into {target_db} (no swap)")
        _refuse_existing_target(ctx, loaded, plan, target_db)
    elif any(spec.kind == "database" for name, spec in loaded.config.backup.series.items() if name in plan):
        click.echo("  databases: restored into a fresh database, checked, then swapped in by rename")
    if dry_run:
        click.echo("dry run: nothing changed")
        return
    if not yes and not click.confirm("restore now?", default=False):
        click.echo("not restored: nothing changed")
        ctx.exit(1)
    app = _engine(ctx)
    _execute(ctx, app, "restore", {"plan": plan, "target_db": target_db, "swap": not target_db}, "restore")


def _refuse_existing_target(ctx: click.Context, loaded: LoadedConfig, plan: dict, target_db: str) -> None:
    """A restore goes into a fresh database: say so now, dry run or not, not after the prompt."""
    from worker.adapters.postgres import Postgres, PostgresError

    for series in plan:
        spec = loaded.config.backup.series.get(series)
        if spec is None or spec.kind != "database" or spec.service:
            continue
        pg = Postgres(spec.database_url, connect_timeout=5)
        try:
            exists = pg.database_exists(target_db)
        except PostgresError as err:
            click.echo(f"  (could not check whether {target_db} exists: {err})")
            continue
        if exists:
            click.echo(
                f"opsfleet: database {target_db} exists already on {pg.where()}: a restore goes into a fresh "
                "database; name another --target-db, or drop that one first",
                err=True,
            )
            ctx.exit(1)


@cli.command("recover")
@click.argument("set_id", required=False)
@click.option("--latest", is_flag=True, help="For each item, the newest verified set holding it.")
@click.option("--config-files", "config_files", is_flag=True, help="Restore config series (files and folders) too.")
@click.option("--models", is_flag=True, help="Restore models series too.")
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.pass_context
def recover(ctx, set_id, latest, config_files, models, dry_run, yes) -> None:
    """Full recovery: stop the services (backup.recover_stop_order), restore
    database and documents (config and models when asked), start the services
    in reverse order, pass the deploy health gate (their environment's passes
    and business checks). On a failure the report says which step and why."""
    loaded = _load(ctx)
    kinds = ["database", "documents"] + (["config"] if config_files else []) + (["models"] if models else [])
    services = list(loaded.config.backup.recover_stop_order)
    click.echo(f"recovery plan (services stopped in this order: {', '.join(services) or 'none configured'}):")
    plan = _restore_plan(ctx, loaded, set_id, latest, kinds)
    if dry_run:
        click.echo("dry run: nothing changed")
        return
    if not yes and not click.confirm("stop the services and recover now?", default=False):
        ctx.exit(1)
    app = _engine(ctx)
    params = {
        "plan": plan, "swap": True, "services": services, "services_stopped": True,
        "health_timeout_seconds": loaded.config.backup.health_timeout_seconds,
    }  # fmt: skip
    _execute(ctx, app, "recover", params, "recover")


def main() -> None:
    cli(prog_name="opsfleet")


if __name__ == "__main__":
    main()
