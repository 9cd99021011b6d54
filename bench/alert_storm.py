"""bench/alert_storm: ingest of an alert storm, opsfleet vs adnanh/webhook.

Posts the same alert payloads (single-alert and 50-alert groups, realistic
labels, each alert a distinct fingerprint) with wrk, for as long as it takes
to post --alerts at 2,000 alerts/s (so at least that many), to:
  - opsfleet: gunicorn + a Celery worker + beat, Redis broker, PostgreSQL ledger;
  - Debian's `webhook` (adnanh/webhook) with a bearer-token rule running
    /bin/true in its synchronous mode (include-command-output-in-response),
    the mode in which every command really runs.
  - the durable floor (bench/durable_floor.py): gunicorn as configured, a
    Flask app that only checks the token, parses and commits the body (one
    INSERT): the least any edge that records before answering costs here.
Prints requests/s, alerts/s, p50/p99 latency for each and the ratios, then
checks opsfleet's ledger: every alert answered 202 is recorded (lost = 0),
and actions taken = one per target (the rest locked or cooling down).

Usage: python bench/alert_storm.py [--alerts 10000] [--targets 100] [--connections 8]
Needs: wrk and webhook (apt-get install wrk webhook), PostgreSQL and Redis on
127.0.0.1, this repo's venv. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.fleet import Fleet  # noqa: E402
from tests.support.servers import free_port, shared_postgres_database, wait_for  # noqa: E402

TOKEN = "bench-token"

# wrk builds each request: a different group of alerts each time, so every
# alert is new to opsfleet (no cheap repeat path). Fingerprints are unique
# per (thread, request, index); targets cycle through svc-0..svc-(T-1).
WRK_SCRIPT = r"""
local counter = 0
local thread_id = 0
local threads = {}
local per_request = tonumber(os.getenv("ALERTS_PER_REQUEST"))
local targets = tonumber(os.getenv("TARGETS"))
local token = os.getenv("TOKEN")
local mix = tonumber(os.getenv("MIX"))

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end

function init(args)
  counter = 0
end

function request()
  counter = counter + 1
  local alerts = {}
  for i = 1, per_request do
    local n = (mix * 100000000) + (tid * 1000000) + (counter * 100) + i
    local fp = string.format("%016x", n)
    local svc = "svc-" .. ((counter * per_request + i + tid * 13) % targets)
    alerts[i] = string.format(
      '{"status":"firing","labels":{"alertname":"InstanceDown","instance":"%s:9100","job":"node-exporter","service":"%s","severity":"critical"},"annotations":{"summary":"Instance down","description":"%s has been down for more than 1 minute"},"startsAt":"2026-12-03T18:44:29.678702744Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus:9090/graph?g0.expr=up","fingerprint":"%s"}',
      svc, svc, svc, fp)
  end
  local body = '{"receiver":"fleet","status":"firing","alerts":[' .. table.concat(alerts, ",") ..
    '],"groupLabels":{"alertname":"InstanceDown"},"commonLabels":{"alertname":"InstanceDown"},"commonAnnotations":{},"externalURL":"http://alertmanager:9093","version":"4","groupKey":"{}:{alertname=\\"InstanceDown\\"}","truncatedAlerts":0}'
  return wrk.format("POST", nil, {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d errors_status=%d errors_connect=%d duration_us=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.errors.status, summary.errors.connect, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, per_request: int, total_alerts: int, connections: int, folder: Path, mix: int) -> dict:
    script = folder / "storm.lua"
    script.write_text(WRK_SCRIPT)
    # wrk runs for a fixed time: long enough, at the goal's 2,000 alerts/s, to
    # post at least `total_alerts` (more when faster).
    seconds = max(3, round(total_alerts / 2000))
    env = {
        "ALERTS_PER_REQUEST": str(per_request),
        "TARGETS": str(ARGS.targets),
        "TOKEN": TOKEN,
        "MIX": str(mix),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), url],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )
    found = re.search(r"RESULT (.*)", done.stdout)
    if not found:
        raise SystemExit(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    result = {k: int(v) for k, v in (item.split("=") for item in found.group(1).split())}
    seconds = result["duration_us"] / 1e6
    result["req_per_s"] = result["requests"] / seconds
    result["alerts_per_s"] = result["requests"] * per_request / seconds
    result["alerts_sent"] = result["requests"] * per_request
    return result


def start_webhook(folder: Path) -> tuple[subprocess.Popen, str]:
    hooks = [
        {
            "id": "alert",
            "execute-command": "/bin/true",
            "include-command-output-in-response": True,
            "trigger-rule": {
                "match": {
                    "type": "value",
                    "value": f"Bearer {TOKEN}",
                    "parameter": {"source": "header", "name": "Authorization"},
                }
            },
        }
    ]
    (folder / "hooks.json").write_text(json.dumps(hooks))
    port = free_port()
    proc = subprocess.Popen(
        ["webhook", "-hooks", str(folder / "hooks.json"), "-ip", "127.0.0.1", "-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/hooks/alert"
    import requests

    wait_for(
        lambda: requests.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).ok,
        10,
        what="webhook to start",
    )
    return proc, url


def start_floor(folder: Path, database_url: str) -> tuple[subprocess.Popen, str]:
    from bench.durable_floor import create_table

    create_table(database_url)
    port = free_port()
    env = {**os.environ, "FLOOR_DATABASE_URL": database_url, "FLOOR_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread"]
    argv += ["--workers", str(ARGS.web_workers), "--threads", str(ARGS.web_threads), "--timeout", "30"]
    proc = subprocess.Popen(
        [*argv, "bench.durable_floor:create_app()"],
        env=env,
        cwd=str(REPO),
        stdout=(folder / "floor.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/hooks/alertmanager"
    import requests

    def answers() -> bool:
        answer = requests.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"alerts": []}, timeout=2)
        return answer.status_code == 202

    wait_for(answers, 30, what=f"the durable floor to start (log: {folder / 'floor.log'})")
    return proc, url


def main() -> None:
    for tool in ("wrk", "webhook"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install -y wrk webhook")
    folder = Path(tempfile.mkdtemp(prefix="opsfleet-bench-storm-"))
    services = {f"svc-{i}": {"container": f"bench-svc-{i}-absent"} for i in range(ARGS.targets)}
    config = {
        "web": {"workers": ARGS.web_workers, "threads": ARGS.web_threads},
        "services": services,
        "remediation": {
            "defaults": {"cooldown_seconds": 3600, "storm": {"max_targets": 100000, "window_seconds": 300}},
            # verify on containers that do not exist: each action is a quick,
            # real run through the worker that fails at its first step.
            "rules": [
                {
                    "name": "down",
                    "match": ['alertname="InstanceDown"'],
                    "playbook": "verify",
                    "target": {"service_label": "service"},
                    "params": {"verify_timeout_seconds": 1},
                }
            ],
        },
    }
    print(f"alert storm: {ARGS.alerts} alerts per mix, {ARGS.targets} targets, {ARGS.connections} connections")
    rows = []
    with shared_postgres_database("opsfleet_bench") as pg:
        env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": pg, "DOCKER_HOST": "unix:///nonexistent"}
        fleet = Fleet(folder, config, env)
        fleet.token = TOKEN
        fleet.env["ALERTMANAGER_TOKEN"] = TOKEN
        hook_proc, hook_url = start_webhook(folder)
        floor_proc, floor_url = start_floor(folder, pg)
        try:
            fleet.start()
            for mix, per_request in enumerate((1, 50)):
                before = _intake_totals(fleet)
                ours = run_wrk(
                    f"{fleet.url}/hooks/alertmanager", per_request, ARGS.alerts, ARGS.connections, folder, mix
                )
                after = _intake_totals(fleet)
                ours["commits"] = after[0] - before[0]
                ours["notifications"] = after[1] - before[1]
                ours["commit_seconds"] = after[2] - before[2]
                theirs = run_wrk(hook_url, per_request, ARGS.alerts, ARGS.connections, folder, mix)
                floor = run_wrk(floor_url, per_request, ARGS.alerts, ARGS.connections, folder, mix)
                rows.append((per_request, ours, theirs, floor))
            time.sleep(3)
            # Answered 202: every request wrk counted, less its non-2xx answers.
            accepted = sum((o["requests"] - o["errors_status"]) * per for per, o, _, _ in rows)
            alert_runs = [r for r in _all_runs(fleet) if r["playbook"] == "verify"]
            try:
                acted = wait_for(lambda: _acted(fleet), 120, what="actions to finish")
            except TimeoutError:
                from collections import Counter

                print("runs by status:", Counter(r["status"] for r in _all_runs(fleet)))
                print(fleet.logs())
                raise
        finally:
            fleet.close()
            for proc in (hook_proc, floor_proc):
                proc.terminate()
                proc.wait(10)

    print(f"\n{'payload':>10} {'who':>9} {'req/s':>9} {'alerts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for per_request, ours, theirs, floor in rows:
        for who, r in (("opsfleet", ours), ("webhook", theirs), ("floor", floor)):
            print(
                f"{per_request:>7} al {who:>9} {r['req_per_s']:>9.0f} {r['alerts_per_s']:>9.0f} "
                f"{r['p50_us'] / 1000:>8.1f} {r['p99_us'] / 1000:>8.1f} {r['errors_status']:>8}"
            )
        # Ratios to webhook's synchronous mode: opsfleet's (the goal's), and the floor's
        # (the most a design that commits before answering could reach here).
        for who, r in (("opsfleet", ours), ("floor", floor)):
            print(
                f"{'':>10} {who + '/wh':>9} {r['req_per_s'] / theirs['req_per_s']:>8.2f}x {'':>9} "
                f"{r['p50_us'] / max(theirs['p50_us'], 1):>7.2f}x {r['p99_us'] / max(theirs['p99_us'], 1):>7.2f}x"
            )
    print("\nopsfleet's group commit (opsfleet_alert_intake_* metrics):")
    for per_request, ours, _, _ in rows:
        commits = max(ours["commits"], 1)
        print(
            f"{per_request:>7} al  {ours['commits']} commits, {ours['notifications'] / commits:.1f} notifications "
            f"per commit, {ours['commit_seconds'] / commits * 1000:.1f} ms per commit"
        )
    # Requests still in flight when wrk stopped are recorded but not counted by
    # wrk, so recorded may exceed accepted; lost is what was accepted and not recorded.
    lost = max(0, accepted - len(alert_runs))
    print(f"\naccepted alerts (202): {accepted}; recorded alert runs: {len(alert_runs)}; lost: {lost}")
    print(f"actions taken: {acted}; expected: {ARGS.targets} (one per target; the rest locked or cooling down)")


def _intake_totals(fleet: Fleet) -> tuple[float, float, float]:
    """(commits, notifications, seconds) so far, from the fleet's /metrics."""
    import requests

    text = requests.get(f"{fleet.url}/metrics", timeout=10).text
    found = {}
    for name in (
        "opsfleet_alert_intake_batch_notifications_count",
        "opsfleet_alert_intake_batch_notifications_sum",
        "opsfleet_alert_intake_seconds_sum",
    ):
        match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        found[name] = float(match.group(1)) if match else 0.0
    return tuple(found.values())


def _all_runs(fleet: Fleet) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(fleet.env["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("select id, playbook, status from runs"))]
    engine.dispose()
    return rows


def _acted(fleet: Fleet) -> int | None:
    runs = _all_runs(fleet)
    if any(r["status"] in ("queued", "running") for r in runs):
        return None
    return sum(1 for r in runs if r["status"] in ("succeeded", "failed"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=10_000, help="alerts per payload mix (default 10000)")
    parser.add_argument("--targets", type=int, default=100, help="distinct services the alerts name")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn workers (default 2, as configured)")
    parser.add_argument("--web-threads", type=int, default=8, help="threads per gunicorn worker (default 8)")
    ARGS = parser.parse_args()
    main()
