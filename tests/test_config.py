import subprocess
import sys

import pytest

from worker.config import ConfigError, load_config, parse_config, redacted_view

GOOD = {
    "services": {"api": {"container": "shop-api"}},
    "remediation": {
        "rules": [
            {"name": "r", "match": ['alertname="X"'], "playbook": "restart_service", "target": {"service": "api"}}
        ]
    },
}


def problems(raw, environ=None):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, source="t", base_dir=".", environ=environ or {})
    return caught.value.problems


def rule(**over):
    return {
        "name": "r",
        "match": ['alertname="X"'],
        "playbook": "restart_service",
        "target": {"service": "api"},
        **over,
    }


def with_rules(*rules):
    return {"services": {"api": {"container": "shop-api"}}, "remediation": {"rules": list(rules)}}


def test_empty_file_is_the_embedded_defaults():
    loaded = parse_config(None, source="t", base_dir=".", environ={})
    assert loaded.config.web.port == 8080 and loaded.config.remediation.rules == ()


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            with_rules(rule(), rule(name="b"), rule(name="c", match=['alertname=="x"'])),
            'remediation.rules[2].match: unknown operator "=="',
        ),
        (with_rules(rule(match=['x=~"("'])), "remediation.rules[0].match: bad regular expression"),
        (with_rules(rule(playbook="reboot_everything")), "remediation.rules[0].playbook:"),
        (with_rules(rule(target={"service": "ghost"})), 'remediation.rules[0].target.service: unknown service "ghost"'),
        (with_rules(rule(target={})), "remediation.rules[0].target: set exactly one"),
        (with_rules(rule(), rule()), 'remediation.rules: rule name "r" is used twice'),
        ({"web": {"port": 0}}, "web.port: Input should be greater than or equal to 1"),
        ({"web": {"prot": 1}}, "web.prot: unknown key"),
        ({"services": {"api": {}}}, "services.api: set exactly one of container or compose_service"),
        ({"worker": {"step_soft_timeout_seconds": 10, "step_hard_timeout_seconds": 5}}, "worker: step_hard"),
        ([1, 2], "(top level): expected a mapping"),
        ({"fleet": {"public_url": "javascript:alert(1)"}}, "fleet.public_url: String should match pattern"),
        (
            {"broker": {"visibility_timeout_seconds": 100}, "worker": {"step_hard_timeout_seconds": 200}},
            "broker.visibility_timeout_seconds: must be above worker.step_hard_timeout_seconds",
        ),
    ],
)
def test_errors_name_the_key(raw, expected):
    found = problems(raw)
    assert any(p.startswith(expected) or expected in p for p in found), found


def test_variables_are_substituted_and_redacted():
    raw = {**GOOD, "services": {"api": {"container": "shop-api", "health_url": "${API_HEALTH}"}}}
    loaded = parse_config(raw, source="t", base_dir=".", environ={"API_HEALTH": "http://u:pw@api/health"})
    assert loaded.config.services["api"].health_url == "http://u:pw@api/health"
    view = redacted_view(loaded)
    assert "pw" not in str(view)
    assert view["config"]["services"]["api"]["health_url"] == "${API_HEALTH} (set, redacted)"


def test_missing_variable_names_key_and_variable():
    raw = {**GOOD, "services": {"api": {"container": "${NOPE}"}}}
    assert problems(raw) == ["services.api.container: environment variable NOPE is not set"]


def test_an_unset_variable_and_other_mistakes_are_reported_together():
    raw = {
        **GOOD,
        "services": {"api": {"container": "shop-api", "health_url": "${NOPE}"}},
        "worker": {"concurency": 2},
        "backup": {"series": {"db": {"kind": "database", "database_url": "${ALSO_UNSET}", "jobs": 0}}},
    }
    assert sorted(problems(raw)) == sorted([
        "services.api.health_url: environment variable NOPE is not set",
        "backup.series.db.database_url: environment variable ALSO_UNSET is not set",
        "worker.concurency: unknown key",
        "backup.series.db.jobs: Input should be greater than or equal to 1",
    ])  # fmt: skip


def test_environment_secrets_are_never_shown():
    environ = {
        "SLACK_BOT_TOKEN": "xoxb-secret-1",
        "DATABASE_URL": "postgresql://user:hunter2@db/ops",
        "ALERTMANAGER_TOKEN": "am-secret",
    }
    view = str(redacted_view(parse_config(GOOD, source="t", base_dir=".", environ=environ)))
    for secret in ("xoxb-secret-1", "hunter2", "am-secret"):
        assert secret not in view
    assert "postgresql://user:***@db/ops" in view


def test_yaml_error_is_reported(tmp_path):
    path = tmp_path / "opsfleet.yaml"
    path.write_text("web: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})


def _cli(*args, env_extra=None, cwd=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPSFLEET_CONFIG"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "opsfleet.cli", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_config_check_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  api: {container: shop-api}\n")
    done = _cli("--config", str(good), "config", "check", env_extra={"SLACK_BOT_TOKEN": "xoxb-zzz"})
    assert done.returncode == 0, done.stderr
    assert "container: shop-api" in done.stdout and "xoxb-zzz" not in done.stdout + done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "remediation:\n  rules:\n    - {name: a, match: ['a==\"b\"'], playbook: restart_service, target: {service: x}}\n"
    )
    done = _cli("--config", str(bad), "config", "check")
    assert done.returncode == 2
    assert 'remediation.rules[0].match: unknown operator "=="' in done.stderr


def test_example_configuration_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "opsfleet.example.yaml"
    loaded = load_config(example, environ={})
    assert loaded.config.remediation.rules, "the example should show rules"


@pytest.mark.parametrize(
    "rule_over,expected",
    [
        ({"params": {"stop_timeout_secs": 10}}, "remediation.rules[0].params: stop_timeout_secs: unknown key"),
        (
            {"params": {"verify_timeout_seconds": "soon"}},
            "remediation.rules[0].params: verify_timeout_seconds: Input should be a valid integer",
        ),
        (
            {"params": {"stop_timeout_seconds": -1}},
            "remediation.rules[0].params: stop_timeout_seconds: Input should be greater than or equal to 0",
        ),
        (
            {"params": {"verify_timeout_seconds": 500}},
            "remediation.rules[0].params.verify_timeout_seconds: must be below worker.step_soft_timeout_seconds (120)",
        ),
        ({"match": [{"alertname": "x"}]}, "remediation.rules[0].match: a list of label matcher strings"),
        ({"match": ['a="\\q"']}, "remediation.rules[0].match: bad quoted value"),
    ],
)
def test_rule_params_and_matchers_are_checked(rule_over, expected):
    found = problems(with_rules(rule(**rule_over)))
    assert any(p.startswith(expected) for p in found), found


def test_dotted_service_names_redact_fine():
    raw = {"services": {"s.v2": {"container": "c", "health_url": "http://u:${PW}@h/"}}}
    view = redacted_view(parse_config(raw, source="t", base_dir=".", environ={"PW": "hunter2"}))
    assert view["config"]["services"]["s.v2"]["health_url"] == "http://u:${PW}@h/ (set, redacted)"


def test_config_file_problems_are_named(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("web: {port: 1}\nweb: {port: 2}\n")
    with pytest.raises(ConfigError, match="key 'web' is given twice") as caught:
        load_config(dup, environ={})
    assert "<unicode string>" not in str(caught.value) and "line 2, column 1" in str(caught.value)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfeweb: {}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary, environ={})


@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"services": {"s\n": {"container": "c"}}}, "services: service name"),
        ({"broker": {"key_prefix": ""}}, "broker.key_prefix: String should have at least 1 character"),
        ({"slack": {"channel": ""}}, "slack.channel: String should have at least 1 character"),
        (
            {"services": {"a": {"container": "c", "health_url": "not a url"}}},
            "services.a.health_url: String should match",
        ),
    ],
)
def test_more_holes_are_closed(raw, expected):
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_a_database_url_that_is_no_connection_is_a_config_error_that_quotes_no_part_of_it():
    raw = {"backup": {"series": {"db": {"kind": "database", "database_url": "${SHOP_DB}"}}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="t", base_dir=".", environ={"SHOP_DB": "not a url s3cretpw"})
    text = str(err.value)
    assert "backup.series.db: database_url is not a PostgreSQL connection" in text
    assert "s3cretpw" not in text and "not a url" not in text
    ok = parse_config(raw, source="t", base_dir=".", environ={"SHOP_DB": "postgresql://app:pw@db:5432/shop"})
    assert ok.config.backup.series["db"].database_url.endswith("/shop")


def test_redis_password_without_user_is_masked():
    environ = {"REDIS_URL": "redis://:redispw@127.0.0.1:6379/0"}
    assert "redispw" not in str(redacted_view(parse_config({}, source="t", base_dir=".", environ=environ)))


def test_redact_hides_interpolated_values_and_credentials():
    raw = {"services": {"api": {"container": "c", "health_url": "http://u:${API_PW}@h/health"}}}
    loaded = parse_config(
        raw, source="t", base_dir=".", environ={"API_PW": "s3cret-pw", "SLACK_BOT_TOKEN": "xoxb-1234"}
    )
    text = "http://u:s3cret-pw@h/health did not answer; token xoxb-1234; redis://:pw@r:6379/0"
    assert loaded.redact(text) == "http://u:***@h/health did not answer; token ***; redis://:***@r:6379/0"


def test_host_playbooks_take_no_target():
    found = problems(with_rules(rule(playbook="free_disk")))
    assert any(p.startswith("remediation.rules[0]: free_disk acts on the host") for p in found), found
    untargeted = {k: v for k, v in rule(playbook="rotate_logs").items() if k != "target"}
    assert parse_config(with_rules(untargeted), source="t", base_dir=".", environ={})


def test_warnings_for_no_rules_and_for_escalations_that_reach_nobody(tmp_path):
    from worker.config import Secrets, config_warnings

    bare = parse_config({}, source="t", base_dir=tmp_path, environ={})
    [warning] = config_warnings(bare.config, bare.secrets)
    assert warning.startswith("remediation.rules: none configured") and "opsfleet.example.yaml" in warning
    rules = {"remediation": {"rules": [{"name": "r", "match": ['alertname="X"'], "playbook": "escalate"}]}}
    loaded = parse_config(rules, source="t", base_dir=tmp_path, environ={})
    [warning] = config_warnings(loaded.config, loaded.secrets)
    assert warning.startswith("escalation: neither escalation.alertmanager_url nor SLACK_BOT_TOKEN")
    assert config_warnings(loaded.config, Secrets.from_env({"SLACK_BOT_TOKEN": "xoxb-1"})) == []
    with_am = parse_config(
        {**rules, "escalation": {"alertmanager_url": "http://am:9093"}}, source="t", base_dir=tmp_path, environ={}
    )
    assert config_warnings(with_am.config, with_am.secrets) == []


def test_registry_passwords_come_from_the_environment(tmp_path):
    literal = {"deploy": {"registries": {"registry.local:5000": {"username": "d", "password": "hunter22"}}}}
    with pytest.raises(ConfigError) as err:
        parse_config(literal, source="t", base_dir=tmp_path, environ={})
    assert "deploy.registries.registry.local:5000.password: give it as ${VAR}" in str(err.value)
    from_env = {"deploy": {"registries": {"registry.local:5000": {"username": "d", "password": "${REG_PW}"}}}}
    loaded = parse_config(from_env, source="t", base_dir=tmp_path, environ={"REG_PW": "hunter22"})
    assert loaded.config.deploy.registries["registry.local:5000"].password == "hunter22"
    shown = str(redacted_view(loaded))
    assert "hunter22" not in shown and "${REG_PW} (set, redacted)" in shown
    assert loaded.redact("pull failed with hunter22") == "pull failed with ***"


def test_every_bad_matcher_of_a_rule_and_no_echo_of_an_unset_database_url():
    raw = {
        **GOOD,
        "backup": {"series": {"db": {"kind": "database", "database_url": "${NOPE_DB}"}}},
        "remediation": {
            "rules": [
                {
                    "name": "r1",
                    "match": ['alertname=~"(unclosed"', 'severity=="x"', 'job=~"[z-a]"'],
                    "playbook": "restart_service",
                }
            ]
        },
    }
    found = problems(raw)
    assert "backup.series.db.database_url: environment variable NOPE_DB is not set" in found
    assert not [p for p in found if p.startswith("backup.series.db:")], found  # its fallout, not said twice
    [matchers] = [p for p in found if p.startswith("remediation.rules[0].match:")]
    assert "[0] bad regular expression '(unclosed'" in matchers and '[1] unknown operator "=="' in matchers
    assert "[2] bad regular expression '[z-a]'" in matchers
