"""Celery task metrics (celery-exporter's names), worker liveness from heartbeats,
queue lengths read from the broker: in-process pieces, multiprocess summing,
and a real fleet (gunicorn, Celery worker, beat) whose /metrics shows them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
import redis
import requests

from tests.support.fleet import REPO, Fleet, service_down
from worker.adapters.fleet_collector import FleetCollector
from worker.adapters.ledger import utcnow
from worker.adapters.metrics import scrape

REDIS_URL = "redis://127.0.0.1:6379/0"

COUNT_IN_A_PROCESS = """
import sys
from worker.adapters import metrics
labels = dict(name="opsfleet.runs.step", hostname="w@h", queue_name="opsfleet.remediate")
metrics.TASK_SUCCEEDED.labels(**labels).inc()
metrics.TASK_RUNTIME.labels(**labels).observe(float(sys.argv[1]))
"""


def value(text: str, metric: str, **labels: str) -> float:
    """metric_value, with `task` standing for the label `name` (metric_value's own argument)."""
    if "task" in labels:
        labels["name"] = labels.pop("task")
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _samples(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        json.dumps(s.labels, sort_keys=True): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


def test_two_processes_count_one_scrape_sums(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    for runtime in ("0.2", "3"):
        subprocess.run([sys.executable, "-c", COUNT_IN_A_PROCESS, runtime], env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("*.db"))) >= 2, "each process writes its own file"
    text = subprocess.run(
        [sys.executable, "-c", "from worker.adapters.metrics import scrape; print(scrape().decode())"],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    labels = {"task": "opsfleet.runs.step", "hostname": "w@h", "queue_name": "opsfleet.remediate"}
    assert value(text, "celery_task_succeeded_total", **labels) == 2
    assert value(text, "celery_task_runtime_count", **labels) == 2
    assert value(text, "celery_task_runtime_sum", **labels) == pytest.approx(3.2)
    assert value(text, "celery_task_runtime_bucket", le="0.25", **labels) == 1


def test_heartbeats_judge_workers_up_down_and_forgotten(ledger):
    now = utcnow()
    ledger.beat("fresh@a", 10, ["opsfleet.remediate", "opsfleet.report"], 1.0, now=now)
    ledger.beat("late@b", 11, ["opsfleet.remediate"], 1.0, now=now - timedelta(seconds=3.5))
    ledger.beat("gone@c", 12, ["opsfleet.remediate"], 1.0, now=now - timedelta(hours=2))
    ledger.beat("stopped@d", 13, ["opsfleet.remediate"], 1.0, now=now)
    ledger.forget_worker("stopped@d", 13)
    # A restart under the same name replaces the row, with a fresh start time.
    ledger.beat("fresh@a", 14, ["opsfleet.remediate", "opsfleet.report"], 1.0, now=now)
    collector = FleetCollector(
        ledger,
        "memory://",
        {},
        ["opsfleet.remediate", "opsfleet.report", "opsfleet.maintenance"],
        forget_after_seconds=3600,
    )
    text = scrape(collector).decode()
    assert _samples(text, "celery_worker_up") == {
        json.dumps({"hostname": "fresh@a"}): 1.0,
        json.dumps({"hostname": "late@b"}): 0.0,  # 3 beats missed
    }
    assert value(text, "celery_active_worker_count", queue_name="opsfleet.remediate") == 1
    assert value(text, "celery_active_worker_count", queue_name="opsfleet.report") == 1
    assert 'celery_active_worker_count{queue_name="opsfleet.maintenance"} 0.0' in text
    assert value(text, "opsfleet_ledger_up") == 1
    # memory:// has no queue length reader: the broker part says so, the rest still scrapes.
    assert value(text, "opsfleet_broker_up") == 0
    assert "celery_queue_length" not in text


def test_queue_length_from_redis_lists_and_filesystem_folder(tmp_path, ledger):
    prefix = f"opsfleet-test-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.rpush(prefix + "opsfleet.remediate", "a", "b")
        client.rpush(prefix + "opsfleet.remediate\x06\x169", "c")  # kombu's priority-9 list
        client.rpush("opsfleet.remediate", "not ours")  # another prefix's queue
        collector = FleetCollector(
            ledger, REDIS_URL, {"global_keyprefix": prefix}, ["opsfleet.remediate", "opsfleet.report"], 3600
        )
        assert collector.queue_lengths() == {"opsfleet.remediate": 3, "opsfleet.report": 0}
    finally:
        client.delete(prefix + "opsfleet.remediate", prefix + "opsfleet.remediate\x06\x169", "opsfleet.remediate")
    folder = tmp_path / "queue"
    folder.mkdir()
    for name in ("1_aa.opsfleet.remediate.msg", "2_bb.opsfleet.remediate.msg", "3_cc.opsfleet.report.msg", "x.tmp"):
        (folder / name).write_text("{}")
    collector = FleetCollector(
        ledger,
        "filesystem://localhost/",
        {"data_folder_in": str(folder)},
        ["opsfleet.remediate", "opsfleet.report", "opsfleet.maintenance"],
        3600,
    )
    assert collector.queue_lengths() == {"opsfleet.remediate": 2, "opsfleet.report": 1, "opsfleet.maintenance": 0}


def test_unreachable_redis_costs_a_bounded_wait_not_the_scrape(ledger):
    collector = FleetCollector(
        ledger, "redis://10.255.255.1:6379/0", {}, ["opsfleet.remediate"], 3600, timeout_seconds=0.5
    )
    started = time.monotonic()
    text = scrape(collector).decode()
    assert time.monotonic() - started < 3
    assert value(text, "opsfleet_broker_up") == 0
    assert value(text, "opsfleet_ledger_up") == 1


FLEET_CONFIG = {
    "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 2},
    "worker": {"heartbeat_interval_seconds": 0.5},
}


def _worker_hostname(fleet: Fleet) -> str:
    def up_worker():
        ups = _samples(fleet.metrics(), "celery_worker_up")
        return next((json.loads(k)["hostname"] for k, v in ups.items() if v == 1), None)

    return fleet.wait(up_worker, 20, "a worker's heartbeat in /metrics")


@pytest.mark.slow
def test_real_worker_tasks_in_web_metrics_and_sigkilled_worker_goes_down_redis_postgres(tmp_path, shared_pg_url):
    env = {"REDIS_URL": REDIS_URL, "DATABASE_URL": shared_pg_url}
    with Fleet(tmp_path, FLEET_CONFIG, env).start("web", "worker", "beat") as fleet:
        hostname = _worker_hostname(fleet)
        sweep = {"task": "opsfleet.sweeper.sweep", "queue_name": "opsfleet.maintenance"}

        # beat publishes the sweeper every second; the worker runs it. Both sides counted,
        # by different processes, summed by the web's scrape.
        def swept():
            text = fleet.metrics()
            return text if value(text, "celery_task_succeeded_total", hostname=hostname, **sweep) >= 2 else None

        text = fleet.wait(swept, 30, "sweeper tasks counted as succeeded")
        assert value(text, "celery_task_sent_total", **sweep) >= 2
        assert value(text, "celery_task_received_total", hostname=hostname, **sweep) >= 2
        assert value(text, "celery_task_started_total", hostname=hostname, **sweep) >= 2
        assert value(text, "celery_task_runtime_count", hostname=hostname, **sweep) >= 2
        assert value(text, "celery_task_queue_wait_time_count", hostname=hostname, **sweep) >= 2
        assert value(text, "celery_active_worker_count", queue_name="opsfleet.maintenance") == 1
        assert value(text, "opsfleet_broker_up") == 1 and value(text, "opsfleet_ledger_up") == 1

        killed_at = time.monotonic()
        fleet.stop("worker", sig=signal.SIGKILL)

        def down():
            text = fleet.metrics()
            return text if _samples(text, "celery_worker_up").get(json.dumps({"hostname": hostname})) == 0 else None

        text = fleet.wait(down, 20, "celery_worker_up 0 for the killed worker")
        # 3 missed beats of 0.5 s, plus one scrape's delay.
        assert time.monotonic() - killed_at < 5
        assert value(text, "celery_active_worker_count", queue_name="opsfleet.maintenance") == 0
        # Nobody consumes now: beat's sweeps pile up in Redis, read by LLEN at scrape.
        fleet.wait(
            lambda: value(fleet.metrics(), "celery_queue_length", queue_name="opsfleet.maintenance") >= 2,
            20,
            "celery_queue_length to grow with the worker dead",
        )


@pytest.mark.slow
def test_embedded_fleet_counts_tasks_and_a_stopped_worker_leaves_metrics(tmp_path):
    """SQLite ledger and the filesystem broker: the same metrics; SIGTERM is a stop, not an outage."""
    with Fleet(tmp_path, FLEET_CONFIG).start("web", "worker", "beat") as fleet:
        hostname = _worker_hostname(fleet)
        fleet.wait(
            lambda: (
                value(fleet.metrics(), "celery_task_succeeded_total", hostname=hostname, task="opsfleet.sweeper.sweep")
                >= 1
            ),
            30,
            "a sweep counted",
        )
        text = fleet.metrics()
        assert value(text, "opsfleet_broker_up") == 1
        assert 'celery_queue_length{queue_name="opsfleet.maintenance"}' in text
        fleet.stop("worker")
        fleet.wait(
            lambda: json.dumps({"hostname": hostname}) not in _samples(fleet.metrics(), "celery_worker_up"),
            20,
            "the stopped worker's heartbeat row removed",
        )


@pytest.mark.slow
def test_a_worker_serves_its_own_metrics_endpoint(tmp_path):
    """For a worker on another host: its processes' metrics on worker.metrics_port."""
    from tests.support.servers import free_port

    port = free_port()
    config = {**FLEET_CONFIG, "worker": {**FLEET_CONFIG["worker"], "metrics_port": port, "metrics_host": "127.0.0.1"}}
    with Fleet(tmp_path, config).start("web", "worker", "beat") as fleet:
        hostname = _worker_hostname(fleet)

        def served():
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return (
                text
                if value(text, "celery_task_succeeded_total", hostname=hostname, task="opsfleet.sweeper.sweep") >= 1
                else None
            )

        text = fleet.wait(served, 30, "the worker's own endpoint to count a sweep")
        assert value(text, "celery_task_received_total", hostname=hostname) >= 1

        # The shipped prometheus.yml finds it from a file dropped in its discovery folder.
        from pathlib import Path

        import yaml

        from tests.support.prometheus import Prometheus

        shipped = yaml.safe_load((Path(__file__).parent.parent / "compose" / "prometheus.yml").read_text())
        [job] = [j for j in shipped["scrape_configs"] if j["job_name"] == "opsfleet-workers"]
        prometheus = Prometheus({}, [])
        folder = prometheus.dir / "opsfleet-workers"
        folder.mkdir()
        (folder / "edge-1.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"]}]))
        job["file_sd_configs"][0]["files"] = [str(folder / Path(job["file_sd_configs"][0]["files"][0]).name)]
        config = yaml.safe_load(prometheus.config_file.read_text())
        config["scrape_configs"] = [job]
        prometheus.config_file.write_text(yaml.safe_dump(config))
        with prometheus:

            def up(want: float):
                found = prometheus.query('up{job="opsfleet-workers"}')
                return found if found and float(found[0]["value"][1]) == want else None

            fleet.wait(lambda: up(1), 30, "Prometheus to scrape the worker it discovered")
            fleet.stop("worker")
            with pytest.raises(requests.ConnectionError):  # gone with its worker: Prometheus' `up` says 0
                requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            fleet.wait(lambda: up(0), 30, "Prometheus to see the worker gone")


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("storm: 12 targets firing within 5m (breaker at 10); no action", "storm"),
        ("locked: run 7 is working on this target", "locked"),
        ("cooldown: acted 2m ago, 3m left", "cooldown"),
        ("cap reached: 3 actions within 1h, escalated instead of acting", "cap"),
        ("dry run: would restart_service api", "dry_run"),
        ('unknown target: label "service" names no configured service', "unknown_target"),
        ("rule matched", "other"),
        ("", "other"),
    ],
)
def test_reason_kinds_for_the_held_back_metric(reason, kind):
    from worker.safety import reason_kind

    assert reason_kind(reason) == kind


def test_alerts_held_back_are_counted_by_reason(tmp_path):
    from webhooks import create_app
    from worker.config import parse_config

    config = {
        "fleet": {"data_dir": str(tmp_path)},
        "services": {"api": {"container": "shop-api"}},
        "remediation": {
            "rules": [
                {
                    "name": "down",
                    "match": ['alertname="ServiceDown"'],
                    "playbook": "restart_service",
                    "target": {"service_label": "service"},
                }
            ]
        },
    }
    loaded = parse_config(config, source="t", base_dir=tmp_path, environ={"ALERTMANAGER_TOKEN": "am"})
    client = create_app(loaded=loaded).test_client()
    before = value(scrape().decode(), "opsfleet_alerts_held_back_total", outcome="skip", reason="unknown_target")
    body = service_down("00000000000000f1", "nope")
    answer = client.post("/hooks/alertmanager", data=body, headers={"Authorization": "Bearer am"})
    assert answer.status_code == 202, answer.json
    after = value(scrape().decode(), "opsfleet_alerts_held_back_total", outcome="skip", reason="unknown_target")
    assert after == before + 1
