"""opsfleet's own logs: JSON lines from several processes at once never mix, the error file
gets the errors, rotation (the built-in "opsfleet" set) loses nothing, and every HTTP request
gets one structured line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.support.rotation import make_ctx, run_rotation
from worker.adapters.logfiles import open_decompressed

LOGPROC = str(Path(__file__).parent / "support" / "logproc.py")


def events(folder: Path, name: str) -> list[dict]:
    out = []
    for path in sorted(folder.iterdir()):
        if path.name == name or path.name.startswith(name + "."):
            with open_decompressed(path) as reader:
                out += [json.loads(line) for line in reader.read().splitlines()]
    return out


def test_processes_write_whole_lines_and_rotation_loses_none(tmp_path):
    data = tmp_path / "data"
    procs = [subprocess.Popen([sys.executable, LOGPROC, str(data), f"p{i}", "3000"]) for i in range(4)]
    ctx = make_ctx(tmp_path, {})  # logging.files is on by default: the "opsfleet" set exists
    rotations = 0
    while any(p.poll() is None for p in procs):
        time.sleep(0.3)
        if (data / "logs" / "opsfleet.jsonl").exists():
            run_rotation(ctx, force=True)
            rotations += 1
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    folder = data / "logs"
    everything = events(folder, "opsfleet.jsonl")  # json.loads on every line: none torn or mixed
    per_role = Counter(e["role"] for e in everything)
    assert per_role == {"p0": 3000, "p1": 3000, "p2": 3000, "p3": 3000}, (per_role, rotations)
    for role in per_role:
        assert sorted(int(e["msg"].split()[1]) for e in everything if e["role"] == role) == list(range(3000))
    assert all(e["run_id"] in range(1000, 1007) and e["logger"] == "opsfleet.test" for e in everything)
    errors = events(folder, "opsfleet-errors.jsonl")
    assert len(errors) == 4 * 60 and all(e["level"] == "ERROR" and "ValueError: xxx" in e["exc"] for e in errors)
    assert max(len(json.dumps(e)) for e in errors) > 8192
    assert rotations >= 2 and any(p.name.startswith("opsfleet.jsonl.2") for p in folder.iterdir())


def test_every_request_gets_one_structured_line(tmp_path):
    from webhooks import create_app
    from worker.config import parse_config

    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ={"ALERTMANAGER_TOKEN": "am"}
    )
    client = create_app(loaded=loaded).test_client()
    client.get("/healthz", headers={"User-Agent": "probe/1"})
    client.post(
        "/hooks/alertmanager",
        data=b'{"version": "4"}',
        headers={"Authorization": "Bearer wrong"},
        environ_base={"REMOTE_ADDR": "10.9.8.7"},
    )
    client.post("/hooks/github", data=b"{}", headers={"X-GitHub-Delivery": "delivery-77", "X-GitHub-Event": "push"})
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = [e for e in events(tmp_path / "logs", "opsfleet.jsonl") if "http" in e]
    ok, refused, unsigned = lines[-3], lines[-2], lines[-1]
    assert unsigned["http"]["key"] == "delivery-77" and unsigned["http"]["status"] == 401  # the delivery, to grep for
    assert ok["level"] == "INFO" and ok["role"] == "web"
    assert ok["http"] == {
        "method": "GET",
        "path": "/healthz",
        "status": 200,
        "duration_ms": ok["http"]["duration_ms"],
        "client": "127.0.0.1",
        "user_agent": "probe/1",
        "body_bytes": 0,
    }
    assert refused["level"] == "WARNING"
    assert refused["http"]["status"] == 401 and refused["http"]["client"] == "10.9.8.7"
    assert refused["http"]["body_bytes"] == 16


def test_an_uncaught_exception_in_the_web_lands_in_the_errors_file_with_its_stack(tmp_path):
    from webhooks import create_app
    from worker.config import parse_config

    loaded = parse_config(
        {"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ={"ALERTMANAGER_TOKEN": "am"}
    )
    app = create_app(loaded=loaded)

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom in a view")

    assert app.test_client().get("/boom").status_code == 500
    errors = events(tmp_path / "logs", "opsfleet-errors.jsonl")
    assert len(errors) == 1 and errors[0]["role"] == "web" and errors[0]["level"] == "ERROR"
    assert "RuntimeError: kaboom in a view" in errors[0]["exc"] and "def boom" not in errors[0]["msg"]
    assert "in boom" in errors[0]["exc"]  # the stack, not just the message


def test_a_task_that_fails_in_the_worker_is_logged_with_its_stack_and_log_level_is_obeyed(tmp_path):
    """A real worker process: a task that raises is in opsfleet-errors.jsonl with its stack
    (role worker); with LOG_LEVEL=WARNING its console has no INFO lines."""
    from tests.support.fleet import Fleet
    from tests.support.servers import wait_for
    from worker.celery_factory import create_celery
    from worker.config import load_config

    fleet = Fleet(tmp_path, {}, {"LOG_LEVEL": "WARNING"})
    with fleet.start("worker@edge", wait_ready=False):  # `opsfleet worker --host edge`, as a team runs it
        app = create_celery(load_config(str(fleet.config_path)), include_tasks=False)
        # A missing argument: raises inside the worker.
        app.send_task("opsfleet.runs.start", args=(), queue="opsfleet.host.edge")
        errors_file = tmp_path / "data" / "logs" / "opsfleet-errors.jsonl"

        def failed():
            if not errors_file.exists():
                return None
            found = [e for e in events(errors_file.parent, errors_file.name) if "TypeError" in (e.get("exc") or "")]
            return found or None

        [error] = wait_for(failed, 60, what="the failed task in the errors file")
        assert error["role"] == "worker" and error["level"] == "ERROR"
        assert "Traceback" in error["exc"] and "opsfleet.runs.start" in error["msg"]
        # ...and counted as celery-exporter counts it, in the metrics folder the web scrapes.
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path / "metrics"))
        failures = [
            (s.labels, s.value)
            for family in registry.collect()
            for s in family.samples
            if s.name == "celery_task_failed_total" and s.labels.get("name") == "opsfleet.runs.start"
        ]
        assert [(labels["exception"], labels["queue_name"], value) for labels, value in failures] == [
            ("TypeError", "opsfleet.host.edge", 1.0)
        ], failures
    console = fleet.log("worker@edge").read_text()
    assert " INFO " not in console and "opsfleet.runs.start" in console
