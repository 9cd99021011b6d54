"""Issue 8, fault 1: Redis stopped WHILE alerts arrive.

A real fleet (gunicorn with 2 workers, a Celery worker, beat) on a private redis-server with
AOF and a fresh PostgreSQL ledger. A client posts distinct alerts at a steady rate (the body a
real Alertmanager sent, each a new fingerprint for a target of its own, so each is exactly one
action); while it posts, Redis is stopped for several seconds (SIGTERM: a clean shutdown; or
SIGKILL, with `appendfsync everysec`), then started again, and the client goes on a little.

Then, once the fleet has settled:
- every alert the edge answered 2xx is in the ledger, and none answered otherwise is;
- every recorded run ran exactly once, seen outside the ledger too: its `verify` step GETs the
  target's own health URL, which counts the hits per target (a run executed twice, by the
  sweeper's re-send and the original message both, would hit twice);
- no run is left queued or running; the edge never hung (every request got an answer).
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis
import yaml

from tests.support.fleet import REPO, Fleet, metric_value
from tests.support.servers import TEST_DOCKER_HOST, PrivateRedis, wait_for
from worker.adapters.ledger import Ledger, NewRun
from worker.celery_factory import create_celery
from worker.config import parse_config

pytestmark = pytest.mark.slow

# The body a real Alertmanager sent (a copy of shared/fixtures/alertmanager; see its README).
FIXTURE = REPO / "tests" / "fixtures" / "alertmanager" / "firing-single.json"

RATE = 6  # alerts per second
POST_SECONDS = 11  # how long the client posts
DOWN_AT, UP_AT = 3.0, 8.0  # Redis goes down 3 s into the posting (once a step is in hand), back at 8 s
HELD = int(DOWN_AT * RATE) - 2  # this alert's step is running when Redis goes down
TARGETS = RATE * POST_SECONDS + RATE  # a target for every alert, and some spare


class HitCounter:
    """GET /health/<target> answers 200 and counts the hits per target. The `held` target's
    GET waits for `release`: its verify step is inside the worker while Redis goes down."""

    def __init__(self, held: str):
        self.hits: Counter[str] = Counter()
        self.held, self.arrived, self.release = held, threading.Event(), threading.Event()
        lock = threading.Lock()
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with lock:
                    counter.hits[name] += 1
                if name == counter.held:
                    counter.arrived.set()
                    counter.release.wait(4)  # under the step's 5 s request timeout
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def target(i: int) -> str:
    return f"t{i:03d}"


def fleet_config(container: str, health_url: str) -> dict:
    return {
        "sweeper": {"interval_seconds": 1, "requeue_after_seconds": 2},
        "logging": {"files": False},
        "worker": {"step_soft_timeout_seconds": 20, "step_hard_timeout_seconds": 25, "queue_grace_seconds": 5},
        # Every target is a service of its own (one container serves them all: the action
        # that counts is the verify step's GET of the target's own health URL).
        "services": {
            target(i): {"container": container, "health_url": f"{health_url}/{target(i)}"} for i in range(TARGETS)
        },
        "remediation": {
            # Many targets at once is the point here, not a storm; one action per target.
            "defaults": {"cooldown_seconds": 0, "storm": {"max_targets": 10_000}},
            "rules": [
                {
                    "name": "memory",
                    "match": ['alertname="HighMemoryUsage"'],
                    "playbook": "verify",
                    "target": {"service_label": "service"},
                    "params": {"verify_timeout_seconds": 10},
                }
            ],
        },
    }


def alert_body(template: dict, i: int, fingerprint: str) -> bytes:
    body = copy.deepcopy(template)
    [alert] = body["alerts"]
    alert["labels"] = {**alert["labels"], "service": target(i)}
    alert["fingerprint"] = fingerprint
    body["commonLabels"] = dict(alert["labels"])
    body["groupKey"] = f'{{}}:{{alertname="HighMemoryUsage", service="{target(i)}"}}'
    return json.dumps(body).encode()


class Client:
    """Posts alert i at t0 + i/RATE (a pool of senders, so a slow answer does not slow the
    rate), POST_SECONDS long; records every answer, or the error in its place."""

    def __init__(self, fleet: Fleet, run_tag: str):
        self.fleet = fleet
        self.template = json.loads(FIXTURE.read_text())
        self.tag = run_tag
        self.answers: dict[int, dict] = {}
        self.t0 = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def fingerprint(self, i: int) -> str:
        return f"{self.tag}{i:06x}"

    def _post(self, i: int) -> None:
        began = time.monotonic()
        entry: dict = {"sent": began - self.t0}
        try:
            answer = self.fleet.post_alerts(alert_body(self.template, i, self.fingerprint(i)))
            entry.update(code=answer.status_code, body=answer.json() if answer.content else None)
        except Exception as err:  # noqa: BLE001 - a hang or a reset is what the test reports
            entry.update(code=None, error=repr(err))
        entry["seconds"] = time.monotonic() - began
        self.answers[i] = entry

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for i in range(RATE * POST_SECONDS):
                delay = self.t0 + i / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._post, i)

    def start(self) -> Client:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def at(self, seconds: float) -> None:
        """Wait until `seconds` into the posting (the schedule of the outage, not a check)."""
        time.sleep(max(0.0, self.t0 + seconds - time.monotonic()))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def join(self) -> None:
        self._thread.join(POST_SECONDS + 30)
        assert not self._thread.is_alive(), "the client did not finish posting"


def sigkill_redis(server: PrivateRedis) -> None:
    """SIGKILL, not a shutdown: Redis gets no chance to flush or close its clients."""
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    pid = client.info("server")["process_id"]
    client.close()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server._proc.poll() is not None, 10, what="redis-server to die")


@pytest.mark.parametrize("how", ["stopped", "sigkilled"])
def test_every_alert_answered_2xx_while_redis_was_down_is_acted_on_exactly_once(
    tmp_path, make_container, shared_pg_url, how
):
    began = time.monotonic()
    container = make_container(f"e2e-redis-down-{uuid.uuid4().hex[:8]}")
    hits = HitCounter(held=target(HELD))
    try:
        with PrivateRedis(appendonly=True) as broker:
            probe = redis.Redis.from_url(broker.url, socket_timeout=2)
            # The setting the SIGKILL case is about: writes fsynced once a second, not each.
            assert probe.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert probe.config_get("appendonly") == {"appendonly": "yes"}
            probe.close()
            env = {"REDIS_URL": broker.url, "DATABASE_URL": shared_pg_url, "DOCKER_HOST": TEST_DOCKER_HOST}
            with Fleet(tmp_path, fleet_config(container.name, hits.url), env).start() as fleet:
                client = Client(fleet, uuid.uuid4().hex[:10]).start()
                client.at(DOWN_AT)
                # A step is running when Redis goes down, and ends while it is down.
                fleet.wait(hits.arrived.is_set, 30, f"the worker to be inside {target(HELD)}'s verify step")
                if how == "stopped":
                    broker.stop()
                else:
                    sigkill_redis(broker)
                down = client.now()
                time.sleep(1.5)
                hits.release.set()
                client.at(UP_AT)
                up = client.now()
                broker.start()
                client.join()
                ledger = Ledger(shared_pg_url)
                try:
                    check(fleet, client, hits, ledger, down, up)
                finally:
                    ledger.dispose()
    finally:
        hits.close()
    print(f"\n{how}: {time.monotonic() - began:.1f} s")


def check(fleet: Fleet, client: Client, hits: HitCounter, ledger: Ledger, down: float, up: float) -> None:
    """`down`, `up`: Redis was down from `down` (it had exited) until at least `up` (its start
    began), in seconds into the posting."""
    answers = client.answers
    posted = RATE * POST_SECONDS
    assert len(answers) == posted, f"{posted - len(answers)} posts never finished"

    # The edge never hung and never failed a request: every post got an answer, and the
    # only answer it may give instead of 202 is a 5xx for an alert it did not record.
    unanswered = {i: a for i, a in answers.items() if a["code"] is None}
    assert not unanswered, f"no answer (a hang or a reset at the edge): {unanswered}"
    assert all(a["code"] == 202 or a["code"] >= 500 for a in answers.values()), Counter(
        a["code"] for a in answers.values()
    )
    slowest = max(a["seconds"] for a in answers.values())
    assert slowest < 8, f"the edge took {slowest:.1f} s to answer with the broker down"
    accepted = {i: a["body"] for i, a in answers.items() if a["code"] == 202}
    refused = sorted(set(answers) - set(accepted))
    # Every accepted alert was decided `act`: a new firing on a free target.
    for i, body in accepted.items():
        [decision] = body["alerts"]
        assert decision["outcome"] == "act" and decision["target"] == target(i), (i, decision)
        assert body["runs"] == [decision["run_id"]], body
    # The outage happened while alerts arrived, and the edge saw it: some runs it could not
    # hand to the broker (the sweeper sends those), before and after it the broker took them.
    not_enqueued = sorted(i for i, body in accepted.items() if not body["enqueued"])
    during = [i for i in accepted if down <= answers[i]["sent"] and answers[i]["sent"] + answers[i]["seconds"] <= up]
    assert during, "no alert was posted and answered while Redis was down"
    assert set(during) <= set(not_enqueued), "the edge says it enqueued an alert while Redis was down"
    assert any(i not in not_enqueued for i in accepted if answers[i]["sent"] > up + 1), "the edge never enqueued again"

    def ledger_runs() -> dict[str, dict]:
        return {r["fingerprint"]: r for r in ledger.list_runs(limit=10_000, trigger="alert")}

    def settled():
        found = ledger_runs()
        return found if all(r["status"] not in ("queued", "running") for r in found.values()) else None

    try:
        runs = fleet.wait(settled, 90, "every run to end")
    except TimeoutError:
        stuck = {f: (r["id"], r["status"]) for f, r in ledger_runs().items() if r["status"] in ("queued", "running")}
        raise AssertionError(f"runs stuck: {stuck}\n{fleet.logs()}") from None

    # Quiet: several more sweeps ran after everything ended (any late re-send has been made),
    # and nothing waits in the broker's queue.
    sweeps = re.compile(rb"opsfleet\.sweeper\.sweep\[[^\]]+\] succeeded")
    seen = len(sweeps.findall(fleet.log("worker").read_bytes()))
    fleet.wait(lambda: len(sweeps.findall(fleet.log("worker").read_bytes())) >= seen + 3, 30, "three more sweeps")
    prefix = yaml.safe_load(fleet.config_path.read_text())["broker"]["key_prefix"]
    probe = redis.Redis.from_url(fleet.env["REDIS_URL"], socket_timeout=2)
    try:
        fleet.wait(lambda: probe.llen(f"{prefix}opsfleet.remediate") == 0, 30, "the remediate queue to drain")
    finally:
        probe.close()

    # In the ledger: every accepted alert, once, run to success; no refused one.
    by_fingerprint = {client.fingerprint(i): i for i in answers}
    assert set(runs) <= set(by_fingerprint), set(runs) - set(by_fingerprint)
    lost = sorted(i for i in accepted if client.fingerprint(i) not in runs)
    assert not lost, f"answered 202, not in the ledger: {lost}"
    recorded_refused = sorted(i for i in refused if client.fingerprint(i) in runs)
    assert not recorded_refused, f"answered 5xx, yet recorded: {recorded_refused}"
    for i, body in accepted.items():
        run = runs[client.fingerprint(i)]
        assert run["id"] == body["runs"][0] and run["target"] == target(i), (i, run)
    unsuccessful = {run["id"]: (run["status"], run["reason"]) for run in runs.values() if run["status"] != "succeeded"}
    assert not unsuccessful, unsuccessful
    for run in runs.values():
        steps = ledger.get_run(run["id"])["steps"]
        assert [(s["name"], s["status"]) for s in steps] == [("verify", "succeeded")], (run["id"], steps)

    # Outside the ledger: each accepted alert's target was acted on exactly once, no other.
    doubled = {t: n for t, n in hits.hits.items() if n > 1}
    assert not doubled, f"acted on more than once: {doubled}"
    assert set(hits.hits) == {target(i) for i in accepted}, (
        sorted({target(i) for i in accepted} - set(hits.hits)),
        sorted(set(hits.hits) - {target(i) for i in accepted}),
    )
    # The ledger, not the broker, brought back what the outage dropped.
    assert metric_value(fleet.metrics(), "opsfleet_sweeper_actions_total", action="requeued") >= 1
    print(
        f"\nposted {len(answers)}, accepted {len(accepted)}, refused {len(refused)}, "
        f"not enqueued at the edge {len(not_enqueued)}, Redis down {down:.1f}-{up:.1f} s, acted {sum(hits.hits.values())}, slowest answer {slowest:.2f} s"
    )


# -- the two ways Redis going away broke a run, each on its own ---------------------------


def app_on(tmp_path, redis_url: str, database_url: str | None = None):
    """opsfleet's own Celery app (the worker's settings and transport) on this Redis."""
    environ = {"REDIS_URL": redis_url, **({"DATABASE_URL": database_url} if database_url else {})}
    raw = {"fleet": {"data_dir": str(tmp_path / "data")}, "broker": {"key_prefix": f"t-{uuid.uuid4().hex[:8]}:"}}
    return create_celery(parse_config(raw, source="t", base_dir=tmp_path, environ=environ))


def test_a_worker_that_loses_redis_with_a_task_in_hand_closes_the_connection_cleanly(tmp_path):
    """What Celery does when its consumer loses Redis: collect the connection, then close it.
    With a message delivered and not yet acknowledged (a task running) and a second channel
    polling too (Celery's remote control), kombu 5.7's own transport raised AttributeError in
    that close, which Celery takes for an unrecoverable error: the worker exited. The message
    itself stays in Redis (unacked, redelivered after the visibility timeout)."""
    from kombu import Exchange, Queue

    with PrivateRedis(appendonly=True) as broker:
        app = app_on(tmp_path, broker.url)
        prefix = app.conf.broker_transport_options["global_keyprefix"]
        conn = app.connection_for_read()
        conn.ensure_connection(max_retries=3)
        exchange = Exchange("opsfleet", type="direct")
        tasks, control = (
            Queue("t-tasks", exchange, routing_key="t-tasks"),
            Queue("t-ctl", exchange, routing_key="t-ctl"),
        )
        with conn.Producer() as producer:
            producer.publish({"task": 1}, exchange=exchange, routing_key="t-tasks", declare=[tasks, control])
        in_hand = []
        conn.Consumer([tasks], callbacks=[lambda _body, message: in_hand.append(message)], accept=["json"]).consume()
        conn.Consumer([control], channel=conn.channel(), callbacks=[lambda *_: None], accept=["json"]).consume()
        conn.drain_events(timeout=5)
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=0.3)  # both channels now wait in BRPOP
        assert len(in_hand) == 1 and not in_hand[0].acknowledged

        broker.stop()
        conn.collect(socket_timeout=1)
        conn.close()  # raised AttributeError("'NoneType' object has no attribute 'hostname'")

        broker.start()
        probe = redis.Redis.from_url(broker.url, socket_timeout=2)
        assert probe.hlen(f"{prefix}unacked") == 1, "the message in hand was lost"
        probe.close()


def test_a_run_whose_first_step_the_broker_refuses_goes_back_to_the_queue(tmp_path, shared_pg_url):
    """`start` claims the run, then the broker refuses the first step's message: the run
    goes back to queued (no step ran) for the sweeper to send again, instead of staying
    running, its target locked, until the lease lapses and the sweeper fails it."""
    with PrivateRedis(appendonly=True) as broker:
        app = app_on(tmp_path, broker.url, shared_pg_url)
        ledger = app.opsfleet.ledger
        try:
            ledger.migrate()
            prefix = app.conf.broker_transport_options["global_keyprefix"]
            recorded = ledger.record_event(
                source="t", summary="", body="",
                new_runs=[NewRun(trigger="manual", triggered_by="t", playbook="verify", target="api", params={})],
            )  # fmt: skip
            run_id = recorded.runs[0].id
            broker.stop()
            app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
            run = ledger.get_run(run_id)
            assert run["status"] == "queued" and run["steps"] == [], run
            assert run["reason"].startswith("broker unavailable at start"), run["reason"]
            assert run["id"] in ledger.runs_to_enqueue(run["enqueued_at"] + timedelta(seconds=1))

            broker.start()  # the sweeper's re-send, once the broker is back
            app.tasks["opsfleet.runs.start"].apply(args=(run_id,))
            assert ledger.get_run(run_id)["status"] == "running"
            probe = redis.Redis.from_url(broker.url, socket_timeout=2)
            [message] = [json.loads(m) for m in probe.lrange(f"{prefix}opsfleet.remediate", 0, -1)]
            probe.close()
            assert (
                message["headers"]["task"] == "opsfleet.runs.step"
                and message["headers"]["argsrepr"] == f"({run_id}, 0)"
            )
        finally:
            ledger.dispose()
