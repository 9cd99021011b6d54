"""The Celery settings each guard against a failure (worker/celery_factory.py says which):
pinned here so a refactor cannot quietly drop one."""

from __future__ import annotations

import pytest

from worker.celery_factory import QUEUES, ROUTES, create_celery
from worker.config import parse_config


def app_for(tmp_path, environ=None):
    loaded = parse_config({"fleet": {"data_dir": str(tmp_path)}}, source="t", base_dir=tmp_path, environ=environ or {})
    return loaded, create_celery(loaded)


def test_production_settings(tmp_path):
    loaded, app = app_for(tmp_path)
    conf = app.conf
    assert conf.task_acks_late is True  # a worker dying mid-task leaves it to be redelivered
    assert conf.task_reject_on_worker_lost is True  # a SIGKILLed child requeues, not "failed"
    assert conf.worker_prefetch_multiplier == 1  # no task sits reserved behind a long one
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_ignore_result is True  # the ledger holds the results
    worker = loaded.config.worker
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (
        worker.step_soft_timeout_seconds,
        worker.step_hard_timeout_seconds,
    )
    # Every task has its own soft and hard limit, soft below hard.
    for name in ROUTES:
        limits = conf.task_annotations[name]
        assert 0 < limits["soft_time_limit"] < limits["time_limit"], name
    # Named queues, every task routed to one of them.
    assert {q.name for q in conf.task_queues} == set(QUEUES)
    assert {route["queue"] for route in conf.task_routes.values()} <= set(QUEUES)
    assert set(conf.task_routes) == set(ROUTES)


def test_redis_visibility_timeout_is_above_the_longest_step_and_keys_are_prefixed(tmp_path):
    loaded, app = app_for(tmp_path, {"REDIS_URL": "redis://127.0.0.1:6379/0"})
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] > loaded.config.worker.step_hard_timeout_seconds
    assert options["visibility_timeout"] > loaded.config.backup.step_timeout_seconds
    assert options["global_keyprefix"] == loaded.config.broker.key_prefix and options["global_keyprefix"]


def test_embedded_defaults_need_no_server(tmp_path):
    _, app = app_for(tmp_path)
    assert app.conf.broker_url.startswith("filesystem://")
    assert (tmp_path / "broker" / "queue").is_dir()


def _drain(app, queue: str, want: int, timeout: float = 60) -> list[int]:
    import time

    got: list[int] = []
    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as q:
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            try:
                message = q.get(timeout=0.5)
            except q.Empty:
                continue
            got.append(message.payload["n"])
            message.ack()
    return got


def test_the_embedded_broker_never_shows_a_reader_half_a_message(tmp_path):
    """kombu's filesystem transport creates a message's file, then writes it: a worker polling
    meanwhile took the empty file and exited on the decode error. Written whole, then renamed."""
    import threading

    _, app = app_for(tmp_path)
    count = 1000

    def produce():
        with app.connection_for_write() as conn, conn.SimpleQueue("t-race") as q:
            for n in range(count):
                q.put({"n": n, "pad": "x" * 2000})

    with app.connection_for_read() as conn, conn.SimpleQueue("t-race"):
        pass  # bound first: kombu skips a binding this process declared already, file written or not
    producer = threading.Thread(target=produce)
    producer.start()
    got = _drain(app, "t-race", count, timeout=120)
    producer.join()
    assert sorted(got) == list(range(count))  # every message once, whole
    assert not list((tmp_path / "broker" / "queue").iterdir())  # no partial file left behind


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"body": "x"}',
        b"[1, 2]",
        b'{"properties": {}}',
    ],
)
def test_an_unreadable_message_file_is_dropped_and_the_next_one_delivered(tmp_path, caplog, content):
    _, app = app_for(tmp_path)
    queue = f"t-bad-{len(content)}"  # kombu keeps declared bindings per process: one queue per case
    # Named to sort before any message put now, so it is read first.
    (tmp_path / "broker" / "queue" / f"{0:015d}_00000000-0000-0000-0000-000000000000.{queue}.msg").write_bytes(content)
    with app.connection_for_write() as conn, conn.SimpleQueue(queue) as q:
        q.put({"n": 7})
    assert _drain(app, queue, 1, timeout=20) == [7]
    assert f"dropped an unreadable message of queue {queue}" in caplog.text


def test_messages_are_served_in_order_across_a_power_of_ten_of_the_uptime(tmp_path, monkeypatch):
    """kombu sorts message names as text; its names start with the uptime in milliseconds."""
    from worker.adapters import file_broker

    _, app = app_for(tmp_path)
    with app.connection_for_write() as conn, conn.SimpleQueue("t-order") as q:
        for n, uptime in ((1, 999.999), (2, 1000.0)):
            monkeypatch.setattr(file_broker, "monotonic", lambda uptime=uptime: uptime)
            q.put({"n": n})
    assert _drain(app, "t-order", 2, timeout=20) == [1, 2]


def test_an_exchange_table_is_never_read_half_written(tmp_path):
    """kombu created an exchange's table file, then wrote it: a publisher reading it in
    between failed on an empty file. Replaced whole here."""
    import threading

    _, app = app_for(tmp_path)
    with app.connection_for_write() as conn:
        binder, reader = conn.channel(), conn.channel()
        names, errors, done = [f"t-x{n}" for n in range(400)], [], threading.Event()

        def read():
            while not done.is_set():
                for name in names:
                    try:
                        reader.get_table(name)
                    except Exception as err:  # noqa: BLE001 - any failure is the finding
                        errors.append(err)

        thread = threading.Thread(target=read)
        thread.start()
        for name in names:
            binder._queue_bind(name, "rk", "", "q")
            binder._queue_bind(name, "rk2", "", "q")
        done.set()
        thread.join()
        assert errors == []
        assert [tuple(q) for q in reader.get_table("t-x7")] == [("rk2", "", "q"), ("rk", "", "q")]
