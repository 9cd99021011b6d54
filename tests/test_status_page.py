"""GET /, /runs/<id>, /backups, /deploys, /rules: the status page, server-rendered, in-process.

The same access rule as /api; everything the ledger, the configuration or a
manifest says is escaped. The headless-browser test on a live fleet is
tests/test_e2e_status_page.py.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from webhooks import create_app
from worker.adapters.backupstore import iso, set_id_for, write_manifest
from worker.adapters.ledger import NewRun, utcnow
from worker.config import parse_config

HOSTILE = '<script>alert("x")</script> & <@U123> <!channel>'


def make_set(root, moment, items: dict[str, bool]):
    folder = root / set_id_for(moment)
    folder.mkdir(parents=True)
    write_manifest(
        folder,
        {
            "id": folder.name,
            "state": "complete",
            "taken_at": iso(moment),
            "items": {
                name: {"kind": "documents", "verified": ok, "files": [{"size": 2_500_000}]}
                for name, ok in items.items()
            },
        },
    )


@pytest.fixture
def make_client(tmp_path):
    def make(**environ):
        env = {"ALERTMANAGER_TOKEN": "am", **environ}
        config = {
            "fleet": {"data_dir": str(tmp_path)},
            "services": {"api": {"container": "shop-api"}, "api-staging": {"container": "staging-api"}},
            "deploy": {
                "environments": {
                    "production": {"branch": "main", "services": ["api"], "image": "shop/api"},
                    "staging": {"deployments": True, "services": ["api-staging"], "image": "shop/api"},
                }
            },
            "remediation": {
                "rules": [
                    {
                        "name": "service-down",
                        "match": ['alertname="ServiceDown"'],
                        "playbook": "restart_service",
                        "target": {"service_label": "service"},
                    },
                    {
                        "name": "disk-low",
                        "match": ['alertname="DiskSpaceLow"'],
                        "playbook": "free_disk",
                        "dry_run": True,
                    },
                ]
            },
            "backup": {
                "root": str(tmp_path / "backups"),
                "series": {
                    "documents": {"kind": "documents", "path": str(tmp_path)},
                    "old": {"kind": "documents", "path": str(tmp_path)},
                    "never": {"kind": "documents", "path": str(tmp_path)},
                },
            },
        }
        loaded = parse_config(config, source="t", base_dir=tmp_path, environ=env)
        app = create_app(loaded=loaded)
        ledger = app.extensions["opsfleet"].ledger
        ledger.record_event(
            source="api",
            summary="",
            body="",
            new_runs=[
                NewRun(
                    trigger="alert",
                    rule="service-down",
                    playbook="restart_service",
                    target="api",
                    dedup_key="a",
                    summary=HOSTILE,
                ),
                NewRun(trigger="manual", triggered_by="alice", playbook="verify", target="api", dedup_key="b"),
                NewRun(
                    trigger="alert",
                    rule="service-down",
                    playbook="restart_service",
                    status="skipped",
                    reason=f"unknown target {HOSTILE}",
                    dedup_key="c",
                ),
            ],
        )
        ledger.claim_run(1, "w@h", 60)
        ledger.begin_step(1, 0, "locate", 60)
        ledger.end_step(1, 0, "failed", f"container not found: {HOSTILE}", 60)
        ledger.finish_run(1, "failed", "locate failed")
        now = utcnow()
        make_set(tmp_path / "backups", now - timedelta(hours=2), {"documents": True})
        make_set(tmp_path / "backups", now - timedelta(days=3), {"old": True, "documents": False})
        return app.test_client()

    return make


def test_without_token_loopback_only(make_client):
    client = make_client()
    assert client.get("/").status_code == 200
    far = client.get("/", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert far.status_code == 403 and b"OPSFLEET_API_TOKEN" in far.data


def test_with_token_bearer_or_basic_password_from_anywhere(make_client):
    client = make_client(OPSFLEET_API_TOKEN="s3cret")
    far = {"REMOTE_ADDR": "10.1.2.3"}
    denied = client.get("/", environ_base=far)
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic ")
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}, environ_base=far).status_code == 200
    basic = base64.b64encode(b"ops:s3cret").decode()
    assert client.get("/rules", headers={"Authorization": f"Basic {basic}"}, environ_base=far).status_code == 200
    wrong = base64.b64encode(b"ops:nope").decode()
    assert client.get("/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Basic %%%"}).status_code == 401
    # The token is not a way around loopback-only for anyone else: without it, 401 even locally.
    assert client.get("/backups").status_code == 401


def test_runs_list_filters_and_escapes(make_client):
    client = make_client()
    page = client.get("/").get_data(as_text=True)
    assert all(f'href="/runs/{i}"' in page for i in (1, 2, 3))
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;!channel&gt;" in page
    assert 'name="viewport"' in page
    skipped = client.get("/?status=skipped").get_data(as_text=True)
    assert 'href="/runs/3"' in skipped and 'href="/runs/1"' not in skipped
    manual = client.get("/?trigger=manual&target=api").get_data(as_text=True)
    assert 'href="/runs/2"' in manual and "alice" in manual and 'href="/runs/1"' not in manual
    assert "No runs match these filters" in client.get("/?target=nothing").get_data(as_text=True)
    assert client.get("/?status=bogus").status_code == 400
    assert client.get("/?target=a%00b").status_code == 400


def test_a_runs_steps_and_output(make_client):
    client = make_client()
    page = client.get("/runs/1").get_data(as_text=True)
    assert "Run #1: restart_service on api" in page and "locate failed" in page
    assert "1. locate" in page and "container not found: &lt;script&gt;" in page and "<script>" not in page
    assert client.get("/runs/999").status_code == 404
    assert client.get("/runs/99999999999999999999").status_code == 404
    response = client.get("/runs/2")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_backups_per_series_with_age_and_verification(make_client):
    page = make_client().get("/backups").get_data(as_text=True)
    rows = {
        line.split("</td>")[0].split("<td>")[-1].split(" ")[0]: line
        for line in page.split("<tr>")
        if "s-fresh" in line or "s-stale" in line or "s-missing" in line
    }
    assert "s-fresh" in rows["documents"] and "2h ago" in rows["documents"] and "2.5 MB" in rows["documents"]
    assert "s-stale" in rows["old"] and "3d ago" in rows["old"]  # daily series, 3 days old
    assert "s-missing" in rows["never"]
    assert "✗ not verified" in page and "✓ verified" in page


def test_rules_with_their_recent_actions(make_client):
    page = make_client().get("/rules").get_data(as_text=True)
    service_down = page.split('id="rule-service-down"')[1].split("</section>")[0]
    assert 'href="/runs/1"' in service_down and 'href="/runs/3"' in service_down
    assert 'href="/runs/2"' not in service_down  # a manual run belongs to no rule
    assert "the service named by label <code>service</code>" in service_down
    disk = page.split('id="rule-disk-low"')[1].split("</section>")[0]
    assert "(dry run)" in disk and "No actions recorded." in disk


def test_runs_since_and_paging(make_client, tmp_path):
    client = make_client()
    assert 'href="/runs/1"' in client.get("/?since=1h").get_data(as_text=True)
    assert client.get("/?since=forever").status_code == 400
    assert client.get("/?before=abc").status_code == 400
    ledger = client.application.extensions["opsfleet"].ledger
    ledger.record_event(
        source="api",
        summary="",
        body="",
        new_runs=[
            NewRun(trigger="manual", triggered_by="bob", playbook="verify", target="api", dedup_key=f"p{i}")
            for i in range(60)
        ],
    )
    first = client.get("/?trigger=manual").get_data(as_text=True)
    assert first.count('<tr>\n      <td><a href="/runs/') == 50
    assert 'id="older" href="/?trigger=manual&amp;before=14"' in first
    second = client.get("/?trigger=manual&before=14").get_data(as_text=True)
    # 61 manual runs: 50 on the first page, the other 11 (ids 13..4 and 2) on the second.
    assert second.count('<tr>\n      <td><a href="/runs/') == 11 and 'id="older"' not in second


def test_deploys_per_environment_live_release_and_history(make_client):
    client = make_client()
    ledger = client.application.extensions["opsfleet"].ledger
    recorded = ledger.record_event(
        source="api",
        summary="",
        body="",
        new_runs=[
            NewRun(trigger="manual", triggered_by="bob", playbook="deploy", target="production", dedup_key=f"d{i}")
            for i in range(3)
        ],
    )
    run_ids = [r.id for r in recorded.runs]
    for sha, run_id, ref in zip("abc", run_ids, ["refs/heads/main", "refs/heads/main", HOSTILE], strict=True):
        ledger.start_release(
            environment="production",
            sha=sha * 40,
            ref=ref,
            images={"api": f"shop/api:{sha}"},
            previous_images={},
            run_id=run_id,
            order=(0.0, 0.0),
        )
    ledger.make_current(run_ids[0])
    ledger.make_current(run_ids[1])
    ledger.set_release_status(run_ids[2], "rolled_back")

    page = client.get("/deploys").get_data(as_text=True)
    production = page.split('id="env-production"')[1].split("</section>")[0]
    live = production.split('class="live"')[1].split("</dd>")[0]
    assert "b" * 12 in live and f'href="/runs/{run_ids[1]}"' in live
    assert "a push to <code>main</code>" in production
    table = production.split("<table>")[1]
    assert table.index("c" * 12) < table.index("b" * 12) < table.index("a" * 12)  # newest first
    assert "s-rolled_back" in production and "shop/api:c" in production
    assert HOSTILE not in page and "&lt;script&gt;" in page
    staging = page.split('id="env-staging"')[1].split("</section>")[0]
    assert "a GitHub deployment" in staging and "nothing deployed by opsfleet yet" in staging
    assert client.get("/deploys", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
