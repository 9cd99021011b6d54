"""The operator's commands end to end against the real shared PostgreSQL, real files and the
private dockerd: backup run/list/verify/prune, restore (fresh database checked against the
manifest, then swapped in; documents moved aside; config with .env back at 0600), the
restore drill, and recover --latest bringing busybox services back through the health gate."""

from __future__ import annotations

import json
import stat

import psycopg
import pytest
import yaml
from click.testing import CliRunner

from opsfleet.cli import cli
from tests.backup_support import ROWS, fill_database, make_config_files, make_documents
from tests.support.servers import SHARED_POSTGRES_URL, TEST_DOCKER_HOST, shared_postgres_database
from worker.adapters.postgres import Postgres


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A configuration file naming a real database, a documents tree and config files."""
    with shared_postgres_database("opsfleet_rs") as url:
        fill_database(url)
        docs = make_documents(tmp_path)
        env_file, compose = make_config_files(tmp_path)
        config = {
            "fleet": {"data_dir": str(tmp_path / "data")},
            "backup": {
                "root": str(tmp_path / "backups"),
                "timezone": "Europe/Berlin",
                "min_free_bytes": 0,
                "series": {
                    # Every table with rows in a dump of its own (as large ones are): restores here
                    # load table files side by side; set_table_files(site, 0) for one file.
                    "db": {"kind": "database", "database_url": "${SHOP_DB_URL}", "table_file_min_bytes": 1},
                    "documents": {"kind": "documents", "path": str(docs)},
                    "config": {"kind": "config", "paths": [str(env_file), str(compose)]},
                },
            },
        }
        path = tmp_path / "opsfleet.yaml"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("SHOP_DB_URL", url)  # credentials only through ${VAR}
        monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        monkeypatch.delenv("DATABASE_URL", raising=False)
        monkeypatch.delenv("REDIS_URL", raising=False)
        live = Postgres(url).dbname
        yield {"path": path, "url": url, "docs": docs, "env": env_file, "tmp": tmp_path, "live": live, "config": config}
        with psycopg.connect(SHARED_POSTGRES_URL, autocommit=True) as admin:  # databases a restore left behind
            for (name,) in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (live + "_%",)
            ).fetchall():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_table_files(site, min_bytes: int) -> None:
    site["config"]["backup"]["series"]["db"]["table_file_min_bytes"] = min_bytes
    site["path"].write_text(yaml.safe_dump(site["config"]))


def opsfleet(site, *args, ok=True):
    result = CliRunner().invoke(cli, ["--config", str(site["path"]), *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def counts(url):
    return Postgres(url).row_counts()


def test_backup_then_restore_into_a_new_database_then_swap(site):
    out = opsfleet(site, "backup", "run").output
    assert "prepare: succeeded" in out and "retention: succeeded" in out and "succeeded in" in out
    listing = opsfleet(site, "backup", "list").output
    assert "db" in listing and "documents" in listing and "config" in listing and "NO" not in listing
    set_id = listing.splitlines()[1].split()[0]
    assert "db: OK" in opsfleet(site, "backup", "verify", set_id).output

    # The live database drifts after the backup.
    with psycopg.connect(site["url"], autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id > 100")
        conn.execute("INSERT INTO customers (name) VALUES ('late')")

    dry = opsfleet(site, "restore", "--latest", "--database", "--dry-run").output
    assert f"db (database) from set {set_id}" in dry and "3 tables, 427 rows" in dry and "dry run" in dry
    assert counts(site["url"])["public.orders"] == 100

    # Into a named new database: checked against the manifest, live one untouched.
    side = site["live"] + "_side"
    out = opsfleet(site, "restore", set_id, "--database", "--target-db", side, "--yes").output
    assert "match the manifest" in out
    assert counts(site["url"].rsplit("/", 1)[0] + "/" + side) == ROWS
    assert counts(site["url"])["public.orders"] == 100

    # Swap: fresh database, checked, renamed into place; the previous one is kept.
    out = opsfleet(site, "restore", "--latest", "--database", "--yes").output
    assert "is now " + site["live"] in out
    assert counts(site["url"]) == ROWS
    with psycopg.connect(SHARED_POSTGRES_URL) as admin:
        kept = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (site["live"] + "_before_%",)
        ).fetchall()
    assert len(kept) == 1
    base = site["url"].rsplit("/", 1)[0]
    assert counts(f"{base}/{kept[0][0]}")["public.orders"] == 100  # the drifted one, kept

    runs = opsfleet(site, "runs", "--json").output
    assert '"playbook": "restore"' in runs and '"trigger": "manual"' in runs


def test_documents_restore_moves_the_current_tree_aside_and_config_comes_back_0600(site):
    opsfleet(site, "backup", "run", "--kind", "documents", "--kind", "config")
    docs, env = site["docs"], site["env"]
    (docs / "readme.md").unlink()
    (docs / "new.txt").write_text("after the backup\n")
    env.write_text("DB_PASSWORD=changed\n")

    out = opsfleet(site, "restore", "--latest", "--documents", "--config-files", "--yes").output
    assert "21 files restored" in out
    assert (docs / "readme.md").read_text() == "documents\n" and not (docs / "new.txt").exists()
    aside = [p for p in docs.parent.iterdir() if p.name.startswith("documents.before-restore-")]
    assert len(aside) == 1 and (aside[0] / "new.txt").exists()
    assert env.read_text() == "DB_PASSWORD=s3cret\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert list(env.parent.glob(".env.before-restore-*"))
    backups = [r for r in json.loads(opsfleet(site, "runs", "--json").output) if r["playbook"] == "backup_set"]
    assert [r["target"] for r in backups] == ["documents,config"]  # what was asked for, not "all"


def test_models_series_backs_up_weekly_and_restores_its_tree_on_demand(site):
    models = site["tmp"] / "models"
    (models / "llm").mkdir(parents=True)
    (models / "llm" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    (models / "llm" / "config.json").write_text('{"layers": 2}\n')
    site["config"]["backup"]["series"]["models"] = {"kind": "models", "path": str(models)}
    site["path"].write_text(yaml.safe_dump(site["config"]))

    opsfleet(site, "backup", "run", "--kind", "models")
    listing = opsfleet(site, "backup", "list", "--kind", "models").output
    assert "models" in listing and "NO" not in listing
    (models / "llm" / "weights.bin").write_bytes(b"corrupted by a bad download")
    (models / "llm" / "extra.bin").write_text("new\n")

    plain = opsfleet(site, "restore", "--latest", "--yes", "--dry-run", ok=False)  # models only by name
    assert plain.exit_code == 1 and "hold no verified item of kind database, documents" in plain.output
    assert "  models" not in plain.output  # a kind not asked for is not a gap
    out = opsfleet(site, "restore", "--latest", "--models", "--yes").output
    assert "2 files restored" in out, out
    assert (models / "llm" / "weights.bin").read_bytes() == bytes(range(256)) * 4096
    assert not (models / "llm" / "extra.bin").exists()
    (aside,) = [p for p in models.parent.iterdir() if p.name.startswith("models.before-restore-")]
    assert (aside / "llm" / "extra.bin").exists()


def test_restore_without_yes_shows_the_manifest_and_asks_and_no_changes_nothing(site):
    opsfleet(site, "backup", "run")
    with psycopg.connect(site["url"], autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id > 10")
    drifted = counts(site["url"])
    (site["docs"] / "new.txt").write_text("after the backup\n")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]

    for answer in ("n\n", "\n"):  # no, and the default (no)
        result = CliRunner().invoke(
            cli, ["--config", str(site["path"]), "restore", "--latest"], input=answer, catch_exceptions=False
        )
        assert result.exit_code == 1
        plan = result.output
        assert f"db (database) from set {set_id}" in plan and "3 tables, 427 rows" in plan
        assert "documents (documents) from set" in plan and "21 files" in plan
        assert "restore now? [y/N]" in plan and "not restored: nothing changed" in plan
        assert "databases: restored into a fresh database" in plan
        assert f"the current tree is moved aside to {site['docs']}.before-restore-<run>, kept" in plan
        assert "different sets" not in plan  # one set holds both
    assert counts(site["url"]) == drifted and (site["docs"] / "new.txt").exists()
    assert '"playbook": "restore"' not in opsfleet(site, "runs", "--json").output

    result = CliRunner().invoke(
        cli, ["--config", str(site["path"]), "restore", "--latest"], input="y\n", catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert counts(site["url"]) == ROWS and not (site["docs"] / "new.txt").exists()


def test_recover_without_yes_asks_before_it_stops_anything(site, make_container, monkeypatch):
    api = make_container("opsfleet-bk-api")
    make_container("opsfleet-bk-worker")
    recover_site(site, monkeypatch)
    opsfleet(site, "backup", "run")  # stops and starts them (the db series' stop_services)
    api.reload()
    started = api.attrs["State"]["StartedAt"]
    result = CliRunner().invoke(
        cli, ["--config", str(site["path"]), "recover", "--latest"], input="n\n", catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "services stopped in this order: api, worker" in result.output
    assert "stop the services and recover now? [y/N]" in result.output
    api.reload()
    assert api.status == "running" and api.attrs["State"]["StartedAt"] == started


def test_a_documents_only_plan_says_nothing_about_databases(site):
    opsfleet(site, "backup", "run", "--kind", "documents")
    plan = opsfleet(site, "restore", "--latest", "--documents", "--dry-run").output
    assert "documents (documents) from set" in plan and "databases" not in plan


def test_a_plan_from_several_sets_says_so(site):
    opsfleet(site, "backup", "run", "--kind", "database")
    opsfleet(site, "backup", "run", "--kind", "documents")
    plan = opsfleet(site, "restore", "--latest", "--dry-run").output
    assert "note: these items come from different sets, taken at different times" in plan


def test_prune_dry_run_says_why_each_stays_and_deletes_nothing(site):
    opsfleet(site, "backup", "run", "--kind", "documents")
    out = opsfleet(site, "backup", "prune", "--dry-run").output
    assert "keep   documents" in out and "daily" in out and "newest verified" in out
    assert "0 backup items would be deleted" in out


def test_restore_drill_restores_into_scratch_and_records_its_time(site):
    opsfleet(site, "backup", "run")
    out = opsfleet(site, "backup", "drill").output
    assert "match the manifest" in out and "drill passed in" in out and "21 files extracted" in out
    with psycopg.connect(SHARED_POSTGRES_URL) as admin:
        assert not admin.execute("SELECT 1 FROM pg_database WHERE datname LIKE 'opsfleet_drill_%'").fetchall()
    from tests.support.fleet import metric_value
    from worker.adapters import metrics

    metrics.RESTORE_DRILL_SECONDS.set(0)
    metrics.RESTORE_DRILL_RESULT.set(0)
    opsfleet(site, "backup", "drill")  # again, the gauges reset: this drill sets them
    text = metrics.scrape().decode()
    assert metric_value(text, "opsfleet_restore_drill_seconds") > 0
    assert metric_value(text, "opsfleet_restore_drill_success") == 1


def test_restore_refuses_without_a_set_and_a_missing_set(site):
    assert opsfleet(site, "restore", "--database", "--yes", ok=False).exit_code == 2
    result = opsfleet(site, "restore", "20990101T000000Z", "--yes", ok=False)
    assert result.exit_code == 1 and "no backup set 20990101T000000Z in" in result.output
    assert "`opsfleet backup list` shows the sets" in result.output
    # A set that exists but holds nothing of the kinds asked for says that instead.
    opsfleet(site, "backup", "run", "--kind", "documents")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    result = opsfleet(site, "restore", set_id, "--database", "--yes", ok=False)
    assert result.exit_code == 1 and f"set {set_id} holds no verified item of kind database" in result.output
    assert f"  db: set {set_id} does not hold it; no set holds a verified one" in result.output


def test_restore_to_a_side_database_leaves_everything_live_alone_and_names_are_checked_first(site):
    opsfleet(site, "backup", "run")
    docs = site["docs"]
    (docs / "added-after.txt").write_text("live\n")
    bad = opsfleet(site, "restore", "--latest", "--target-db", "bad-name", "--yes", ok=False)
    assert bad.exit_code == 2 and "--target-db:" in bad.output and "Traceback" not in bad.output
    plan = opsfleet(site, "restore", "--latest", "--target-db", "side_copy", "--dry-run").output
    assert "documents" not in plan.split("restore plan:")[1]
    assert (docs / "added-after.txt").exists()


def test_a_side_restore_into_a_database_that_exists_is_refused_at_the_plan_dry_run_or_not(site):
    opsfleet(site, "backup", "run", "--kind", "database")
    for extra in (["--dry-run"], ["--yes"]):
        result = opsfleet(site, "restore", "--latest", "--target-db", site["live"], *extra, ok=False)
        assert result.exit_code == 1, result.output
        assert (
            f"database {site['live']} exists already on" in result.output
            and "name another --target-db" in result.output
        )
        assert "dry run: nothing changed" not in result.output
    assert '"playbook": "restore"' not in opsfleet(site, "runs", "--json").output


def test_backup_run_refuses_unknown_series_and_kinds_up_front(site):
    for args, says in (
        (("--series", "nope"), "--series nope: no such series"),
        (("--kind", "bogus"), "--kind bogus: no series of that kind"),
    ):
        result = opsfleet(site, "backup", "run", *args, ok=False)
        assert result.exit_code == 2 and says in result.output
    assert "backup_set" not in opsfleet(site, "runs", "--json").output


def recover_site(site, monkeypatch, health_url=None, environment=None):
    config = site["config"]
    config["services"] = {
        "api": {"container": "opsfleet-bk-api", **({"health_url": health_url} if health_url else {})},
        "worker": {"container": "opsfleet-bk-worker"},
    }
    config["backup"]["recover_stop_order"] = ["api", "worker"]
    config["backup"]["health_timeout_seconds"] = 30
    config["backup"]["stop_timeout_seconds"] = 1  # busybox sleep as PID 1 ignores SIGTERM
    config["backup"]["series"]["db"]["stop_services"] = ["api", "worker"]
    if environment:
        config["deploy"] = {"environments": {"prod": environment}}
    site["path"].write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DOCKER_HOST", TEST_DOCKER_HOST)


def test_recover_latest_brings_busybox_services_back_through_the_health_gate(site, make_container, monkeypatch):
    api = make_container("opsfleet-bk-api")
    worker = make_container("opsfleet-bk-worker")
    before = {c.name: c.attrs["State"]["StartedAt"] for c in (api, worker)}
    recover_site(site, monkeypatch)

    opsfleet(site, "backup", "run")
    with psycopg.connect(site["url"], autocommit=True) as conn:
        conn.execute("TRUNCATE orders")
    out = opsfleet(site, "recover", "--latest", "--yes").output
    assert "stopped api" in out and "stopped worker" in out
    assert out.index("started worker") < out.index("started api")  # reverse order
    assert "api, worker healthy 3 times in a row" in out  # the deploy gate's default passes
    assert counts(site["url"]) == ROWS
    for c in (api, worker):
        c.reload()
        assert c.status == "running" and c.attrs["State"]["StartedAt"] != before[c.name]


def test_recover_passes_the_deploy_gate_of_the_services_environment(site, make_container, monkeypatch, health):
    # The same gate as a deploy: the environment's passes and its business checks, after
    # the services this recovery started are healthy.
    make_container("opsfleet-bk-api")
    make_container("opsfleet-bk-worker")
    recover_site(site, monkeypatch, health_url=health.url, environment={
        "branch": "main", "services": ["api", "worker"], "image": "registry.local/shop",
        "health": {"passes": 4, "interval_seconds": 0.2, "timeout_seconds": 5},
        "checks": [{"name": "orders", "url": health.url, "expect_text": "ok"}],
    })  # fmt: skip
    opsfleet(site, "backup", "run")
    out = opsfleet(site, "recover", "--latest", "--yes").output
    assert "api, worker healthy 4 times in a row" in out and "check orders: 200, has 'ok'" in out
    assert health.hits >= 5  # four passes through api's health_url, then the check


@pytest.mark.parametrize(
    "status, body, says",
    [
        (503, b"ok", "health gate failed after 3s: api: {url} answered 503"),
        (200, b"maintenance", "health gate failed after 3s: check orders: {url} answered without 'ok'"),
    ],
)
def test_recover_fails_when_the_gate_does_not_pass_and_says_why(
    site, make_container, monkeypatch, health, status, body, says
):
    make_container("opsfleet-bk-api")
    make_container("opsfleet-bk-worker")
    recover_site(site, monkeypatch, health_url=health.url, environment={
        "branch": "main", "services": ["api"], "image": "registry.local/shop",
        "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 5},
        "checks": [{"name": "orders", "url": health.url, "expect_text": "ok"}],
    })  # fmt: skip
    site["config"]["backup"]["health_timeout_seconds"] = 3
    site["path"].write_text(yaml.safe_dump(site["config"]))
    opsfleet(site, "backup", "run")
    health.status, health.body = status, body
    result = opsfleet(site, "recover", "--latest", "--yes", ok=False)
    assert result.exit_code == 1
    assert says.format(url=health.url) in result.output
    assert "run " in result.output and " failed in " in result.output


def test_database_in_a_container_is_backed_up_and_restored_through_docker_exec(tmp_path, dockerd, monkeypatch):
    from tests.backup_support import engine, postgres_in_container, postgres_uid_gid, run_playbook
    from worker.adapters.backupstore import list_sets

    monkeypatch.setenv("DOCKER_HOST", TEST_DOCKER_HOST)
    with postgres_in_container(dockerd) as (container, port, bin_dir):
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE shop")
        fill_database(f"postgresql://postgres@127.0.0.1:{port}/shop")
        app = engine(tmp_path, {
            "root": str(tmp_path / "backups"), "min_free_bytes": 0,
            "series": {"db": {
                "kind": "database", "service": "postgres", "bin_dir": bin_dir, "exec_user": postgres_uid_gid(),
                # As seen inside the container: its socket directory and port.
                "database_url": f"postgresql://postgres@/shop?host=/pg&port={port}",
            }},
        }, services={"postgres": {"container": container.name}})  # fmt: skip
        run = run_playbook(app, "backup_set")
        assert run["status"] == "succeeded", (run["reason"], [s["output"] for s in run["steps"]])
        (only,) = list_sets(tmp_path / "backups")
        item = only.items["db"]
        assert item["row_counts"] == ROWS and item["source"] == f"container {container.name}, database shop"
        assert any(f["name"] == "db.roles.sql" for f in item["files"])
        assert item["pg_dump"].startswith("pg_dump (PostgreSQL) 15")  # the container's own tool

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/shop", autocommit=True) as conn:
            conn.execute("TRUNCATE orders")
        restored = run_playbook(app, "restore", {"plan": {"db": only.id}, "swap": True})
        assert restored["status"] == "succeeded", (restored["reason"], [s["output"] for s in restored["steps"]])
        assert Postgres(f"postgresql://postgres@127.0.0.1:{port}/shop").row_counts() == ROWS

        # A set dumped over a connection, each table apart, restores through docker exec too
        # (the series moved into a container since): the tables' data between pre- and post-data.
        host_side = engine(tmp_path, {
            "root": str(tmp_path / "backups"), "min_free_bytes": 0,
            "series": {"db": {"kind": "database", "database_url": f"postgresql://postgres@127.0.0.1:{port}/shop",
                              "table_file_min_bytes": 1}},
        })  # fmt: skip
        assert run_playbook(host_side, "backup_set")["status"] == "succeeded"
        split = max(list_sets(tmp_path / "backups"), key=lambda s: s.id)
        assert sorted(f["table"] for f in split.items["db"]["files"] if "table" in f) == sorted(ROWS)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/shop", autocommit=True) as conn:
            conn.execute("TRUNCATE orders")
        restored = run_playbook(app, "restore", {"plan": {"db": split.id}, "swap": True})
        assert restored["status"] == "succeeded", (restored["reason"], [s["output"] for s in restored["steps"]])
        assert Postgres(f"postgresql://postgres@127.0.0.1:{port}/shop").row_counts() == ROWS


def test_inventory_series_records_images_and_containers(tmp_path, make_container, monkeypatch):
    import json as jsonlib

    from tests.backup_support import engine, run_playbook
    from worker.adapters.archive import iter_decompressed
    from worker.adapters.backupstore import list_sets

    make_container("opsfleet-bk-inventory")
    monkeypatch.setenv("DOCKER_HOST", TEST_DOCKER_HOST)
    app = engine(
        tmp_path, {"root": str(tmp_path / "backups"), "min_free_bytes": 0, "series": {"images": {"kind": "inventory"}}}
    )
    assert app.opsfleet.config.backup.series["images"].cadence == "monthly"
    run = run_playbook(app, "backup_set", {"series": ["inventory"]})
    assert run["status"] == "succeeded", run["reason"]
    (only,) = list_sets(tmp_path / "backups")
    facts = jsonlib.loads(b"".join(iter_decompressed(only.path / "images.json.zst", "zstd")))
    assert "opsfleet-bk-inventory" in [c["name"] for c in facts["containers"]]
    assert any("opsfleet-test/busybox:1" in i["tags"] for i in facts["images"])
    assert only.manifest["host"]["docker"]["version"]


def test_cleanup_applies_backup_retention_through_the_backup_jobs_prune(tmp_path):
    from tests.backup_support import engine, make_documents, run_playbook
    from worker.tasks.cleanup import backups
    from worker.tasks.steps import StepContext

    docs = make_documents(tmp_path)
    app = engine(
        tmp_path, {"root": str(tmp_path / "backup"), "series": {"documents": {"kind": "documents", "path": str(docs)}}}
    )
    assert run_playbook(app, "backup_set")["status"] == "succeeded"
    run = {"id": 0, "target": "all", "params": {"dry_run": True}}
    out = backups(StepContext(app.opsfleet, run))
    assert out.startswith("backup retention:") and "keep   documents" in out and "newest verified" in out


def test_prune_deletes_what_retention_forgets_and_says_how_much_came_back(site):
    """Four daily documents backups on four days, retention daily: 2, min_count 1: the two
    oldest go (their set directories with them), the two newest stay and are listed."""
    import json as jsonlib
    from datetime import timedelta

    from worker.adapters.backupstore import MANIFEST, list_sets
    from worker.adapters.ledger import utcnow

    root = site["tmp"] / "backups"
    for days in (3, 2, 1, 0):  # each backup dated on its own day, oldest first (default retention keeps all)
        opsfleet(site, "backup", "run", "--kind", "documents")
        newest = max(list_sets(root), key=lambda s: s.id)
        manifest = jsonlib.loads((newest.path / MANIFEST).read_text())
        taken = (utcnow() - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest["taken_at"] = taken
        for item in manifest["items"].values():
            item["taken_at"] = taken
        (newest.path / MANIFEST).write_text(jsonlib.dumps(manifest))
    sets = list_sets(root)  # newest first
    assert len(sets) == 4
    site["config"]["backup"]["retention"] = {"daily": 2, "weekly": 0, "monthly": 0, "min_count": 1}
    site["path"].write_text(yaml.safe_dump(site["config"]))
    oldest = [s.path for s in sets[2:]]
    size = sum(s.size() for s in sets[2:])

    dry = opsfleet(site, "backup", "prune", "--dry-run").output
    assert dry.count("would forget") == 2 and f"would free {size} B" in dry
    assert all(p.exists() for p in oldest)
    from worker.adapters import metrics

    pruned_before = metrics.BACKUP_PRUNED.labels("documents")._value.get()
    out = opsfleet(site, "backup", "prune", "--yes").output
    assert "deleted 2 backup items" in out
    assert metrics.BACKUP_PRUNED.labels("documents")._value.get() == pruned_before + 2
    assert not any(p.exists() for p in oldest)
    assert [s.path for s in list_sets(root)] == [s.path for s in sets[:2]]
    listed = jsonlib.loads(opsfleet(site, "backup", "list", "--json").output)
    assert sorted(str(entry["id"]) for entry in listed) == sorted(s.id for s in sets[:2]), listed


def test_a_backup_taken_by_hand_counts_in_the_fleets_metrics_and_survives_a_metrics_restart(site):
    """`opsfleet backup run` in its own process writes to <data_dir>/metrics like a worker, so
    the web's /metrics sees it; and the backup gauges are read back from the sets on disk when
    the web starts with an empty metrics folder."""
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from tests.support.fleet import REPO, metric_value
    from worker.adapters import metrics
    from worker.config import load_config
    from worker.tasks.backup import export_backup_state

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "opsfleet.cli", "--config", str(site["path"]), "backup", "run", "--kind", "documents"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(site["tmp"] / "data" / "metrics"))
    text = generate_latest(registry).decode()
    taken = metric_value(text, "opsfleet_backup_last_success_timestamp_seconds", kind="documents", series="documents")
    assert taken > 0, text

    metrics.BACKUP_LAST_SUCCESS.labels("documents", "documents").set(0)  # as if forgotten
    export_backup_state(load_config(str(site["path"])))
    assert abs(metrics.BACKUP_LAST_SUCCESS.labels("documents", "documents")._value.get() - taken) < 5


def test_a_restore_swapped_into_place_keeps_the_owners_of_the_database_and_its_tables(site):
    """The live database and its tables belong to the application's role: the restored one,
    swapped in, must too (a restore owned by the restoring superuser locks the app out)."""
    import uuid

    role = f"opsfleet_app_{uuid.uuid4().hex[:8]}"
    live = site["live"]
    with psycopg.connect(SHARED_POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}"')
    try:
        with psycopg.connect(site["url"], autocommit=True) as conn:
            for table in ("orders", "customers"):
                conn.execute(f'ALTER TABLE {table} OWNER TO "{role}"')
        with psycopg.connect(SHARED_POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{live}" OWNER TO "{role}"')
        opsfleet(site, "backup", "run", "--kind", "database")
        out = opsfleet(site, "restore", "--latest", "--database", "--yes").output
        assert "is now " + live in out
        with psycopg.connect(SHARED_POSTGRES_URL) as admin:
            owner = admin.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (live,)
            ).fetchone()[0]
        with psycopg.connect(site["url"]) as conn:
            owners = dict(
                conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()
            )
        assert owner == role
        assert owners["orders"] == role and owners["customers"] == role, owners
    finally:
        with psycopg.connect(SHARED_POSTGRES_URL, autocommit=True) as admin:
            for (name,) in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (live + "%",)
            ).fetchall():
                admin.execute(f'ALTER DATABASE "{name}" OWNER TO postgres')
                with psycopg.connect(site["url"].rsplit("/", 1)[0] + "/" + name, autocommit=True) as conn:
                    conn.execute(f'REASSIGN OWNED BY "{role}" TO postgres')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


LISTING = """;
; Archive created at 2026-12-04 02:19:01 UTC
;     dbname: shop
;
218; 1259 17858 TABLE public notes postgres
216; 1259 17842 TABLE public pgbench_accounts postgres
3364; 0 17858 TABLE DATA public notes postgres
3362; 0 17842 TABLE DATA public pgbench_accounts postgres
3363; 0 17845 TABLE DATA public pgbench_branches postgres
3360; 0 17836 TABLE DATA public pgbench_history postgres
3370; 0 0 SEQUENCE SET public pgbench_history_id_seq postgres
3215; 2606 17857 CONSTRAINT public pgbench_accounts pgbench_accounts_pkey postgres
"""
SIZES = {"public.notes": 300, "public.pgbench_accounts": 900, "public.pgbench_branches": 1, "public.pgbench_history": 0}


@pytest.mark.parametrize(
    "jobs, weights, expected",
    [
        # the largest table alone; the rest (and every non-data entry) beside it
        (2, SIZES, [["pgbench_accounts"], ["notes", "pgbench_branches", "pgbench_history"]]),
        (3, SIZES, [["pgbench_accounts"], ["notes"], ["pgbench_branches", "pgbench_history"]]),
        # rows as weights when a manifest has no sizes: the same largest-first order
        (
            2,
            {"public.notes": 307_200, "public.pgbench_accounts": 7_000_000},
            [["pgbench_accounts"], ["notes", "pgbench_branches", "pgbench_history"]],
        ),
    ],
)
def test_table_data_is_shared_out_largest_first(jobs, weights, expected):
    from worker.adapters.postgres import split_table_data

    lists = split_table_data(LISTING, weights, jobs)
    data = [[line.split()[6] for line in one if " TABLE DATA " in line] for one in lists]
    assert [sorted(d) for d in data] == [sorted(e) for e in expected]
    others = [line for line in lists[0] if " TABLE DATA " not in line]
    assert [line.split()[3] for line in others] == ["TABLE", "TABLE", "SEQUENCE", "CONSTRAINT"]
    assert all(" TABLE DATA " in line for one in lists[1:] for line in one)
    # each list in the dump's own order: a pg_restore reading the stream cannot go back
    order = LISTING.splitlines()
    assert all([order.index(line) for line in one] == sorted(order.index(line) for line in one) for one in lists)


def _sizes(**bytes_by_name):
    from worker.adapters.postgres import TableSize

    return [TableSize("public", name, size) for name, size in bytes_by_name.items()]


@pytest.mark.parametrize(
    "min_bytes, most, expected",
    [
        (100, 32, ["accounts", "notes"]),  # the large ones, largest first
        (100, 1, ["accounts"]),  # at most `most`: the largest
        (1, 32, ["accounts", "notes", "branches"]),  # an empty table has nothing to put apart
        (0, 32, []),  # 0: one file
        (10_000, 32, []),
    ],
)
def test_tables_of_the_configured_size_get_a_dump_of_their_own(min_bytes, most, expected):
    from worker.adapters.postgres import tables_to_split

    tables = _sizes(branches=8, notes=300, accounts=900, history=0)
    assert [t.name for t in tables_to_split(tables, min_bytes, most)] == expected


def test_a_tables_pattern_names_it_exactly_whatever_its_name_holds():
    from worker.adapters.postgres import TableSize

    assert TableSize("shop", "Line Items", 1).pattern == '"shop"."Line Items"'
    # A quote is doubled; a dot, star or question mark inside quotes is no wildcard for pg_dump.
    assert TableSize('we"ird', "a.b*?", 1).pattern == '"we""ird"."a.b*?"'


def test_tables_with_names_pg_dump_could_misread_are_dumped_apart_and_restored(site):
    odd = ['"Odd ""quoted"" name"', '"dot.ted*"', '"UPPER"', '"ünïcode"']
    with psycopg.connect(site["url"], autocommit=True) as conn:
        for name in odd:
            conn.execute(f"CREATE TABLE shop.{name} (id int PRIMARY KEY, v text)")
            conn.execute(f"INSERT INTO shop.{name} SELECT g, repeat('v', g) FROM generate_series(1, 40) g")
        # A table whose name a pattern would match were it not quoted: it must keep its own rows.
        conn.execute('CREATE TABLE shop."dotXted_" (id int)')
        conn.execute('INSERT INTO shop."dotXted_" SELECT generate_series(1, 3)')
    opsfleet(site, "backup", "run", "--kind", "database")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    from worker.adapters.backupstore import get_set

    item = get_set(site["tmp"] / "backups", set_id).items["db"]
    apart = sorted(f["table"] for f in item["files"] if "table" in f)
    assert apart == sorted(
        [*ROWS, 'shop.Odd "quoted" name', "shop.dot.ted*", "shop.UPPER", "shop.ünïcode", "shop.dotXted_"]
    )
    out = opsfleet(site, "restore", set_id, "--target-db", f"{site['live']}_odd", "--yes").output
    assert "match the manifest" in out
    restored = counts(f"{site['url'].rsplit('/', 1)[0]}/{site['live']}_odd")
    assert restored == {**ROWS, 'shop.Odd "quoted" name': 40, "shop.dot.ted*": 40, "shop.UPPER": 40,
                        "shop.ünïcode": 40, "shop.dotXted_": 3}  # fmt: skip


@pytest.mark.parametrize("min_bytes", [1, 65536, 0], ids=["table files", "children apart", "one dump"])
def test_inheritance_parents_and_names_a_listing_splits_are_counted_right(site, min_bytes):
    """A parent's count includes its children's rows (the manifest's does): never its own
    COPY's, and never before every child is loaded. "Line" beside "Line Items" (pg_restore
    --list shows the latter as `shop Line Items`) is no one else's count either."""
    set_table_files(site, min_bytes)
    with psycopg.connect(site["url"], autocommit=True) as conn:
        conn.execute("CREATE TABLE shop.events (id bigserial PRIMARY KEY, payload text)")
        conn.execute("INSERT INTO shop.events (payload) SELECT repeat('e', g % 50) FROM generate_series(1, 900) g")
        conn.execute("CREATE TABLE shop.events_old () INHERITS (shop.events)")
        # Large enough for a file of its own at 64 KiB, while the parent stays in the main dump.
        conn.execute("INSERT INTO shop.events_old (payload) SELECT repeat('o', 300) FROM generate_series(1, 500)")
        conn.execute('CREATE TABLE shop."Line" (id int, v text)')
        conn.execute("INSERT INTO shop.\"Line\" SELECT g, repeat('l', 30) FROM generate_series(1, 2000) g")
    expected = {**ROWS, "shop.events": 1400, "shop.events_old": 500, "shop.Line": 2000}
    opsfleet(site, "backup", "run", "--kind", "database")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    from worker.adapters.backupstore import get_set

    assert get_set(site["tmp"] / "backups", set_id).items["db"]["row_counts"] == expected
    for n in range(2):  # the loads finish in another order from run to run
        out = opsfleet(site, "restore", set_id, "--target-db", f"{site['live']}_inh{n}", "--yes").output
        assert "match the manifest" in out
        assert counts(f"{site['url'].rsplit('/', 1)[0]}/{site['live']}_inh{n}") == expected


def test_the_snapshot_locks_every_table_until_the_set_is_dumped(site, monkeypatch):
    """A table dumped by a later pg_dump of the set cannot be dropped or renamed in between."""
    import threading

    from worker.adapters import postgres

    counted = threading.Event()  # the row counts lock what they count: held back, so they lock nothing here
    real = postgres._count_rows
    monkeypatch.setattr(postgres, "_count_rows", lambda conn, skip=(): (counted.wait(30), real(conn, skip))[1])
    pg = Postgres(site["url"])
    with pg.snapshot() as snap, psycopg.connect(site["url"], autocommit=True) as other:
        assert sorted(t.key for t in snap.tables) == sorted(ROWS)
        locked = other.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.mode = 'AccessShareLock' AND l.granted "
            "AND l.pid <> pg_backend_pid() AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
        assert set(ROWS) <= {name for (name,) in locked}
        other.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute('ALTER TABLE shop."Line Items" RENAME TO gone')
        counted.set()


def test_a_single_table_is_not_shared_out():
    from worker.adapters.postgres import split_table_data

    one = "\n".join(
        line
        for line in LISTING.splitlines()
        if "notes" not in line and "branches" not in line and "history" not in line
    )
    assert split_table_data(one, SIZES, 2) is None


def test_a_restore_loads_each_table_once_with_the_manifests_sizes(site):
    # The site's database restored through the shared-out path (jobs 2, sizes in the manifest).
    opsfleet(site, "backup", "run", "--kind", "database")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    from worker.adapters.backupstore import get_set

    item = get_set(site["tmp"] / "backups", set_id).items["db"]
    assert set(item["table_bytes"]) == set(item["row_counts"]) and all(v > 0 for v in item["table_bytes"].values())
    out = opsfleet(site, "restore", set_id, "--target-db", f"{site['live']}_side", "--yes").output
    assert "match the manifest" in out
    base = site["url"].rsplit("/", 1)[0]
    assert counts(f"{base}/{site['live']}_side") == ROWS


@pytest.mark.parametrize(
    "damage, damaged",
    [
        ("none", None),
        ("truncated", "main"),
        ("truncated", "table"),
        ("other sha256", "main"),
        ("other sha256", "table"),
    ],
)
def test_dumps_are_loaded_as_they_unpack_and_a_damaged_one_fails_with_why(site, damage, damaged):
    """pg_restore reads the main dump as it is decompressed, and each table's own dump
    straight from its compressed file; one that turns out truncated or not the manifest's
    fails the restore with that reason, not with pg_restore's."""
    from worker.adapters.archive import Unpacking, decompressing_feeder, iter_decompressed
    from worker.adapters.backupstore import get_set
    from worker.adapters.postgres import PostgresError, TableData

    opsfleet(site, "backup", "run", "--kind", "database")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    found = get_set(site["tmp"] / "backups", set_id)
    item = found.items["db"]
    [main] = [f for f in item["files"] if ".dump" in f["name"] and "table" not in f]
    apart = [f for f in item["files"] if "table" in f]
    assert sorted(f["table"] for f in apart) == sorted(ROWS)  # every table with rows has a dump of its own
    victim = main if damaged == "main" else apart[0]

    def source_and_sha(f):
        if f is not victim or damage == "none":
            return found.path / f["name"], f["sha256"]
        if damage == "other sha256":
            return found.path / f["name"], "0" * 64
        half = site["tmp"] / f"half-{f['name']}"
        half.write_bytes((found.path / f["name"]).read_bytes()[: f["size"] // 2])
        return half, f["sha256"]

    plain = site["tmp"] / "db.dump"
    tables = []
    for f in apart:
        path, sha = source_and_sha(f)
        tables.append(TableData(f["table"], f["size"], decompressing_feeder(path, "zstd", sha)))
    main_path, main_sha = source_and_sha(main)
    with shared_postgres_database("opsfleet_rs_unpack") as url:
        pg = Postgres(url)
        with Unpacking(main_path, "zstd", plain, expect_sha256=main_sha) as unpacking:
            restoring = lambda: pg.restore(  # noqa: E731
                plain, pg.dbname, jobs=2, timeout=120, weights=item["table_bytes"], unpacking=unpacking, tables=tables
            )
            if damage == "none":
                assert restoring() == item["row_counts"] == pg.row_counts()
                assert plain.read_bytes() == b"".join(iter_decompressed(found.path / main["name"], "zstd"))
            else:
                with pytest.raises(PostgresError, match="truncated" if damage == "truncated" else "sha256 differs"):
                    restoring()


def test_a_dump_in_one_file_is_shared_out_by_the_manifests_sizes(site):
    """A set made with every table in the one dump (as before table files, or
    table_file_min_bytes 0) is loaded by `jobs` pg_restores, each its share."""
    set_table_files(site, 0)
    opsfleet(site, "backup", "run", "--kind", "database")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    from worker.adapters.backupstore import get_set

    item = get_set(site["tmp"] / "backups", set_id).items["db"]
    assert [f["name"] for f in item["files"]] == ["db.dump.zst", "db.roles.sql"]
    out = opsfleet(site, "restore", set_id, "--target-db", f"{site['live']}_one", "--yes").output
    assert "match the manifest" in out
    assert counts(f"{site['url'].rsplit('/', 1)[0]}/{site['live']}_one") == ROWS


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _dump_of(site, set_id):
    from worker.adapters.backupstore import get_set

    found = get_set(site["tmp"] / "backups", set_id)
    return found.path / next(f["name"] for f in found.items["db"]["files"] if ".dump" in f["name"])


def test_a_set_that_does_not_read_back_is_marked_unverified_and_latest_falls_back_with_why(site):
    opsfleet(site, "backup", "run", "--kind", "database")
    older = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    opsfleet(site, "backup", "run", "--kind", "database")
    newest = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    assert newest != older
    _flip_a_byte(_dump_of(site, newest))

    side = site["live"] + "_side"
    failed = opsfleet(site, "restore", "--latest", "--target-db", side, "--yes", ok=False)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert f"db in set {newest} does not read back" in failed.output and "the file is damaged" in failed.output
    assert f"it is marked unverified: `opsfleet restore --latest` now takes set {older}" in failed.output
    assert f"{newest}  " in opsfleet(site, "backup", "list").output  # still listed ...
    row = next(line for line in opsfleet(site, "backup", "list").output.splitlines() if line.startswith(newest))
    assert row.endswith("NO")  # ... as not verified

    # --latest now plans the older set; naming the damaged one says why it is not planned, and what to run.
    assert f"db (database) from set {older}" in opsfleet(site, "restore", "--latest", "--dry-run").output
    named = opsfleet(site, "restore", newest, "--database", "--dry-run", ok=False)
    assert (
        named.exit_code == 1 and "differs from the manifest's" in named.output and "the file is damaged" in named.output
    )
    assert (
        f"`opsfleet backup verify {newest}` checks it again; the newest verified one is in set {older}" in named.output
    )
    out = opsfleet(site, "restore", "--latest", "--target-db", side, "--yes").output
    assert "match the manifest" in out and counts(site["url"].rsplit("/", 1)[0] + "/" + side) == ROWS


def test_the_drill_drills_every_series_past_a_damaged_one_and_marks_that_one(site):
    opsfleet(site, "backup", "run")
    set_id = opsfleet(site, "backup", "list").output.splitlines()[1].split()[0]
    from worker.adapters.backupstore import get_set

    found = get_set(site["tmp"] / "backups", set_id)
    _flip_a_byte(found.path / found.items["documents"]["files"][0]["name"])
    failed = opsfleet(site, "backup", "drill", ok=False)
    assert failed.exit_code == 1 and "drill failed for 1 of 3 series" in failed.output
    assert f"documents in {set_id}:" in failed.output and "no verified backup of it is left" in failed.output
    assert "passed: " in failed.output and "match the manifest" in failed.output  # the database was drilled
    assert "config: " in failed.output.split("passed:", 1)[1]  # and the config series after it
    assert not get_set(site["tmp"] / "backups", set_id).verified("documents")
    assert get_set(site["tmp"] / "backups", set_id).verified("db")
    from tests.support.fleet import metric_value
    from worker.adapters import metrics

    assert metric_value(metrics.scrape().decode(), "opsfleet_restore_drill_success") == 0
    # The next drill says so at once instead of drilling the damaged copy again.
    again = opsfleet(site, "backup", "drill", ok=False).output
    assert "no verified backup in" in again and "of documents" in again


def test_a_restore_from_a_read_only_backup_root_unpacks_in_the_temp_dir_and_leaves_nothing(site, monkeypatch):
    import subprocess
    import tempfile

    opsfleet(site, "backup", "run")
    root = site["tmp"] / "backups"
    temp = site["tmp"] / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # A mounted copy of the backups, read-only (root ignores file modes; a read-only mount it does not).
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        with pytest.raises(OSError):
            (root / "probe").write_text("x")
        side = site["live"] + "_ro"
        out = opsfleet(site, "restore", "--latest", "--target-db", side, "--yes").output
        assert "match the manifest" in out and counts(site["url"].rsplit("/", 1)[0] + "/" + side) == ROWS
        drill = opsfleet(site, "backup", "drill").output
        assert "drill passed in" in drill and "21 files extracted" in drill
        assert sorted(p.name for p in temp.iterdir()) == ["opsfleet-drill", "opsfleet-restore"]
        assert [list(p.iterdir()) for p in temp.iterdir()] == [[], []]  # every run's scratch removed
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert not (root / ".restore").exists()


def test_a_configured_scratch_dir_is_used_and_a_failed_restore_removes_its_scratch(site, monkeypatch):
    from worker.adapters.postgres import Postgres as PostgresAdapter
    from worker.adapters.postgres import PostgresError

    scratch = site["tmp"] / "scratch"
    site["config"]["backup"]["scratch_dir"] = str(scratch)
    site["path"].write_text(yaml.safe_dump(site["config"]))
    opsfleet(site, "backup", "run", "--kind", "database")
    seen = []

    def refuse(self, name, owner=None):
        seen.append([p.name for p in scratch.iterdir()])  # the run's folder, while it restores
        raise PostgresError(f"could not create database {name}: no room (fault injected)")

    monkeypatch.setattr(PostgresAdapter, "create_database", refuse)
    failed = opsfleet(site, "restore", "--latest", "--target-db", site["live"] + "_x", "--yes", ok=False)
    assert "no room (fault injected)" in failed.output and "Traceback" not in failed.output
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].isdigit()
    assert list(scratch.iterdir()) == []
    assert not (site["tmp"] / "backups" / ".restore").exists()
