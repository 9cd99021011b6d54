"""The test support code against the real servers it drives (and slack_sdk against the recorder)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
import redis
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from tests.support import servers

# The fixtures (dockerd, slack, private_redis, ...) come from tests/conftest.py.
from tests.support.servers import TEST_IMAGE, shared_redis_url, wait_for

TOKEN = "xoxb-test-token"


# --- helpers ---------------------------------------------------------------------------------------


def test_wait_for_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for(lambda: False, timeout=0.2, what="the moon")
    assert wait_for(lambda: 42, timeout=1) == 42


def test_docker_client_names_the_server_when_unreachable(monkeypatch):
    monkeypatch.setattr(servers, "TEST_DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(RuntimeError, match=r"dockerd not reachable at unix:///nonexistent/docker.sock.*services\.sh"):
        servers.docker_client()


def test_shared_servers_are_named_when_down(monkeypatch):
    closed = f"127.0.0.1:{servers.free_port()}"
    monkeypatch.setattr(servers, "SHARED_POSTGRES_URL", f"postgresql://postgres@{closed}/postgres")
    monkeypatch.setattr(servers, "SHARED_REDIS_URL", f"redis://{closed}/0")
    with pytest.raises(RuntimeError, match=r"(?s)PostgreSQL at 127.0.0.1:5432 .*services\.sh"):
        with servers.shared_postgres_database():
            pass
    with pytest.raises(RuntimeError, match=r"(?s)Redis at 127.0.0.1:6379 .*services\.sh"):
        servers.shared_redis_url()


# --- Slack recorder with the real slack_sdk ---------------------------------------------------------


def test_slack_thread_post_reply_update(slack):
    client = WebClient(token=TOKEN, base_url=slack.base_url, timeout=5)
    assert client.auth_test()["team_id"] == "T0123"

    parent = client.chat_postMessage(channel="#ops", text="deploy started")
    assert parent["channel"] == "C0123"
    reply = client.chat_postMessage(channel=parent["channel"], thread_ts=parent["ts"], text="step 1 ok")
    assert reply["message"]["thread_ts"] == parent["ts"]
    assert float(reply["ts"]) > float(parent["ts"])
    client.chat_update(channel=parent["channel"], ts=parent["ts"], text="deploy done")

    thread = slack.threads()[parent["ts"]]
    assert thread["parent"]["text"] == "deploy started"
    assert [r["text"] for r in thread["replies"]] == ["step 1 ok"]
    assert [u["text"] for u in thread["updates"]] == ["deploy done"]
    assert [c.method for c in slack.calls] == ["auth.test", "chat.postMessage", "chat.postMessage", "chat.update"]
    assert slack.calls[1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_slack_rate_limit_is_retried_by_slack_sdk(slack):
    client = WebClient(
        token=TOKEN, base_url=slack.base_url, timeout=5, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)]
    )
    slack.fail_next("chat.postMessage", status=429, retry_after=1)
    started = time.monotonic()
    assert client.chat_postMessage(channel="C0999", text="hi")["ok"]
    assert time.monotonic() - started >= 1  # the handler honoured Retry-After
    assert [c.status for c in slack.calls] == [429, 200]
    assert slack.calls[0].response == {"ok": False, "error": "ratelimited"}


def test_slack_errors_look_like_slack(slack):
    client = WebClient(token=TOKEN, base_url=slack.base_url, timeout=5)
    slack.fail_next("chat.postMessage", error="channel_not_found")
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel="C0999", text="hi")
    assert e.value.response.status_code == 200 and e.value.response["error"] == "channel_not_found"

    slack.fail_next("chat.postMessage", status=500)
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel="C0999", text="hi")
    assert e.value.response.status_code == 500

    with pytest.raises(SlackApiError, match="invalid_auth"):
        WebClient(token="xoxb-wrong", base_url=slack.base_url, timeout=5).auth_test()
    with pytest.raises(SlackApiError, match="not_authed"):
        WebClient(base_url=slack.base_url, timeout=5).auth_test()
    with pytest.raises(SlackApiError, match="message_not_found"):
        client.chat_update(channel="C0999", ts="1.000001", text="x")
    assert client.chat_postMessage(channel="C0999", text="after the faults")["ok"]
    assert [c.status for c in slack.wait_for_calls(3, timeout=1, method="chat.postMessage")] == [200, 500, 200]


# --- Redis, PostgreSQL ------------------------------------------------------------------------------


def test_private_redis_keeps_aof_data_across_restart(private_redis):
    client = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    client.set("k", "v")
    private_redis.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    private_redis.start()
    assert client.get("k") == b"v"


def test_private_postgres_stop_start(private_postgres):
    with psycopg.connect(private_postgres.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    private_postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(private_postgres.url, connect_timeout=2)
    private_postgres.start()
    with psycopg.connect(private_postgres.url) as conn:
        assert conn.execute("SELECT x FROM t").fetchone() == (7,)


def test_shared_servers(shared_pg_url):
    name = shared_pg_url.rsplit("/", 1)[1]
    with psycopg.connect(shared_pg_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
    assert redis.Redis.from_url(shared_redis_url(), socket_timeout=2).ping()


def test_shared_postgres_database_is_dropped():
    with servers.shared_postgres_database(prefix="opsfleet_support") as url:
        name = url.rsplit("/", 1)[1]
        psycopg.connect(url, connect_timeout=5).close()  # a leaked connection: FORCE drops it anyway
    with psycopg.connect(servers.SHARED_POSTGRES_URL) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None


# --- Alertmanager -----------------------------------------------------------------------------------


class _Receiver:
    """A tiny webhook receiver recording (headers, json body) per request."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers.items()), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alertmanager"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = _Receiver()
    yield r
    r.close()


def test_alertmanager_delivers_firing_then_resolved(make_alertmanager, receiver):
    am = make_alertmanager(receiver.url, token="am-token", group_interval="1s")
    labels = {"alertname": "HighMemoryUsage", "instance": "node-a:9100", "severity": "warning"}
    am.fire(labels, {"summary": "High memory usage"})

    wait_for(lambda: len(receiver.requests) >= 1, timeout=15, what="Alertmanager's firing webhook")
    headers, body = receiver.requests[0]
    assert headers["Authorization"] == "Bearer am-token"
    assert body["version"] == "4" and body["status"] == "firing"
    assert body["groupLabels"] == {"alertname": "HighMemoryUsage"}
    assert body["alerts"][0]["labels"] == labels
    assert body["alerts"][0]["annotations"] == {"summary": "High memory usage"}
    assert body["externalURL"] == am.url

    am.resolve(labels)
    wait_for(lambda: receiver.requests[-1][1]["status"] == "resolved", timeout=15, what="the resolved webhook")
    resolved = receiver.requests[-1][1]["alerts"][0]
    assert resolved["status"] == "resolved" and resolved["annotations"] == {"summary": "High memory usage"}


def test_alertmanager_restart_keeps_serving(make_alertmanager, receiver):
    am = make_alertmanager(receiver.url)
    am.stop()
    am.start()
    am.fire({"alertname": "AfterRestart"})
    wait_for(lambda: receiver.requests, timeout=15, what="a webhook after restart")


# --- Docker -----------------------------------------------------------------------------------------


def test_run_test_container(dockerd, make_container):
    first = make_container("opsfleet-support-test", labels={"opsfleet.test": "1"})
    second = make_container("opsfleet-support-test", labels={"opsfleet.test": "2"})  # replaces first
    second.reload()
    assert second.status == "running"
    assert second.labels["opsfleet.test"] == "2"
    assert second.attrs["HostConfig"]["NetworkMode"] == "none"
    assert second.image.tags == [TEST_IMAGE]
    assert [c.id for c in dockerd.containers.list(all=True, filters={"name": "opsfleet-support-test"})] == [second.id]
    assert first.id != second.id
    assert second.exec_run(["echo", "hi"]).output == b"hi\n"


def test_missing_test_image_points_at_the_build_script(dockerd, monkeypatch):
    monkeypatch.setattr(servers, "TEST_IMAGE", "opsfleet-test/absent:0")
    with pytest.raises(RuntimeError, match=r"opsfleet-test/absent:0 is missing.*build-test-image\.sh"):
        servers.ensure_test_image(dockerd)
