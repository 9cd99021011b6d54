"""The CLI shows ledger text (alert labels, reasons, step output) without letting it drive
the terminal: control characters are printed as escapes."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from opsfleet.cli import cli
from worker.adapters.ledger import Ledger, NewRun, ledger_url

HOSTILE = "api\x1b]0;pwned\x07\r\nFAKE LINE\x1b[2J\u2028x"
ENV = {"DATABASE_URL": "", "REDIS_URL": ""}  # the embedded ledger in the data dir


def embedded_site(tmp_path):
    """(a configuration file naming a data dir, the migrated SQLite ledger in it)."""
    data = tmp_path / "data"
    config = tmp_path / "opsfleet.yaml"
    config.write_text(yaml.safe_dump({"fleet": {"data_dir": str(data)}}))
    ledger = Ledger(ledger_url(None, data))
    ledger.migrate()
    return config, ledger


def test_runs_table_and_run_detail_escape_control_characters(tmp_path):
    config, ledger = embedded_site(tmp_path)
    recorded = ledger.record_event(
        source="t",
        summary="",
        body="",
        new_runs=[
            NewRun(trigger="alert", playbook="restart_service", status="skipped", target=HOSTILE, reason=HOSTILE)
        ],
    )
    run_id = recorded.runs[0].id
    ledger.dispose()
    runner = CliRunner()
    env = ENV
    for args in (["runs"], ["runs", str(run_id)]):
        result = runner.invoke(cli, ["--config", str(config), *args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output and "\r" not in result.output
        assert "\u2028" not in result.output
        assert "\\x1b]0;pwned\\x07\\x0d\\x0aFAKE LINE" in result.output
        assert not any(line.startswith("FAKE LINE") for line in result.output.splitlines())


def test_the_banners_commands_name_the_configuration_file_they_need(tmp_path, monkeypatch):
    from opsfleet.cli import _config_flag
    from worker.config import load_config, parse_config

    monkeypatch.delenv("OPSFLEET_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "conf" / "my fleet.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("{}\n")
    assert _config_flag(load_config(str(elsewhere))) == f" --config '{elsewhere}'"  # quoted for a shell
    (tmp_path / "opsfleet.yaml").write_text("{}\n")
    assert _config_flag(load_config(str(tmp_path / "opsfleet.yaml"))) == ""  # found by itself
    assert _config_flag(parse_config({}, source="embedded defaults", base_dir=tmp_path, environ={})) == ""


def test_backup_list_refuses_an_unknown_kind(tmp_path):
    path = tmp_path / "opsfleet.yaml"
    path.write_text(yaml.safe_dump({"fleet": {"data_dir": str(tmp_path)}}))
    result = CliRunner().invoke(cli, ["--config", str(path), "backup", "list", "--kind", "photos"])
    assert result.exit_code == 2 and "unknown kind 'photos'" in result.output


def test_a_dry_run_says_what_every_step_would_do_even_when_one_would_fail(tmp_path):
    # No Docker daemon: the image steps would fail; the log, run and backup steps still say
    # what they would remove, and the exit status says something would fail.
    data = tmp_path / "data"
    config = tmp_path / "opsfleet.yaml"
    config.write_text(yaml.safe_dump({"fleet": {"data_dir": str(data)}}))
    env = {**ENV, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    result = CliRunner().invoke(cli, ["--config", str(config), "cleanup", "--dry-run"], env=env, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "dangling_images: would fail" in result.output
    for step in ("old_logs", "old_runs", "backups"):
        assert f"{step} (dry run):" in result.output, result.output
    assert "would fail (a real run does the other steps, then fails)" in result.output


def test_a_runs_steps_are_numbered_from_one_as_the_live_progress_numbers_them(tmp_path):
    config, ledger = embedded_site(tmp_path)
    run_id = (
        ledger.record_event(
            source="t",
            summary="",
            body="",
            new_runs=[NewRun(trigger="manual", playbook="restart_service", target="api")],
        )
        .runs[0]
        .id
    )
    ledger.claim_run(run_id, "w", 60)
    assert ledger.begin_step(run_id, 0, "locate", 60) == "start"
    ledger.end_step(run_id, 0, "succeeded", "found it", 60)
    ledger.dispose()
    env = ENV
    result = CliRunner().invoke(cli, ["--config", str(config), "runs", str(run_id)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "  step 1 locate: succeeded" in result.output and "step 0" not in result.output


def test_reading_commands_work_with_a_managed_system_s_credential_unset_others_refuse(tmp_path):
    """At 3 a.m. in a shell without the fleet's environment: `runs`, `releases` and `backup
    list` read the ledger and the backup folder only, so an unset ${VAR} is a warning there."""
    config, ledger = embedded_site(tmp_path)
    ledger.record_event(
        source="t", summary="", body="", new_runs=[NewRun(trigger="manual", playbook="restart_service", target="api")]
    )
    ledger.dispose()
    raw = yaml.safe_load(config.read_text())
    raw["backup"] = {
        "root": str(tmp_path / "backups"),
        "series": {"db": {"kind": "database", "database_url": "postgresql://app:${OPS_TEST_DB_PASSWORD}@db/app"}},
    }
    config.write_text(yaml.safe_dump(raw))
    unset = "backup.series.db.database_url: environment variable OPS_TEST_DB_PASSWORD is not set"
    runner = CliRunner()
    for args in (["runs"], ["releases"], ["backup", "list"]):
        result = runner.invoke(cli, ["--config", str(config), *args], env=ENV, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
        assert f"opsfleet: warning: {unset}" in result.output
        assert "unset-OPS_TEST_DB_PASSWORD" not in result.output
    assert "restart_service" in runner.invoke(cli, ["--config", str(config), "runs"], env=ENV).output
    # A command that would use it, and config check, still refuse, naming the key.
    for args in (["config", "check"], ["backup", "run"]):
        result = runner.invoke(cli, ["--config", str(config), *args], env=ENV)
        assert result.exit_code == 2 and unset in result.output and "warning" not in result.output, result.output
    # Any other mistake is still an error for a reading command.
    raw["backup"]["series"]["db"]["kind"] = "databse"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(cli, ["--config", str(config), "runs"], env=ENV)
    assert result.exit_code == 2 and "backup.series.db" in result.output, result.output


def test_an_unset_var_whose_placeholder_would_not_validate_is_reported_as_unset(tmp_path):
    from worker.config import ConfigError, parse_config

    raw = {"services": {"api": {"container": "api", "health_url": "${OPS_TEST_HEALTH_URL}"}}}
    with pytest.raises(ConfigError) as refused:
        parse_config(raw, source="t", base_dir=tmp_path, environ={}, missing_ok=True)
    # The cause, not what the placeholder made of the URL pattern.
    assert (
        str(refused.value)
        == "t is invalid:\n  services.api.health_url: environment variable OPS_TEST_HEALTH_URL is not set"
    )


def test_reading_commands_refuse_when_the_unset_var_locates_the_ledger_or_the_backups(tmp_path):
    runner = CliRunner()
    for raw, key in (
        ({"fleet": {"data_dir": "${OPS_TEST_DATA}"}}, "fleet.data_dir"),
        ({"fleet": {"data_dir": str(tmp_path / "d")}, "backup": {"root": "${OPS_TEST_ROOT}/b"}}, "backup.root"),
    ):
        config = tmp_path / "opsfleet.yaml"
        config.write_text(yaml.safe_dump(raw))
        for args in (["runs"], ["releases"], ["backup", "list"]):
            result = runner.invoke(cli, ["--config", str(config), *args], env=ENV)
            assert result.exit_code == 2 and f"{key}: environment variable" in result.output, (args, result.output)
            assert "warning" not in result.output
    assert not list(tmp_path.glob("unset-*"))  # nothing made at a placeholder's path


def test_a_placeholder_never_becomes_one_of_the_environment_s_own_secrets(tmp_path):
    config, ledger = embedded_site(tmp_path)
    ledger.dispose()
    raw = yaml.safe_load(config.read_text())
    raw["services"] = {"api": {"container": "api-${DATABASE_URL}"}}  # contrived, but it must not reach the ledger
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(
        cli, ["--config", str(config), "runs"], env={"DATABASE_URL": None, "REDIS_URL": None}, catch_exceptions=False
    )
    assert result.exit_code == 0 and "environment variable DATABASE_URL is not set" in result.output, result.output
