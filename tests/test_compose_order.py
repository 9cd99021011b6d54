"""worker/compose.py: the order a deploy recreates services in, from depends_on (pure)."""

from __future__ import annotations

import pytest

from worker.compose import ComposeError, dependency_order, read_compose


def compose(**services) -> dict:
    return {"services": services}


@pytest.mark.parametrize(
    "wanted,services,expected",
    [
        (["api", "db"], {"api": {"depends_on": ["db"]}, "db": {}}, ["db", "api"]),
        # compose's long form
        (["api", "db"], {"api": {"depends_on": {"db": {"condition": "service_healthy"}}}, "db": {}}, ["db", "api"]),
        # independent services keep the order given
        (["web", "api"], {"web": {}, "api": {}}, ["web", "api"]),
        # through a service the environment does not deploy (cache), still ordered
        (["web", "db"], {"web": {"depends_on": ["cache"]}, "cache": {"depends_on": ["db"]}, "db": {}}, ["db", "web"]),
        (
            ["frontend", "backend", "db"],
            {"frontend": {"depends_on": ["backend"]}, "backend": {"depends_on": ["db"]}, "db": None},
            ["db", "backend", "frontend"],
        ),
    ],
)
def test_dependencies_first(wanted, services, expected):
    assert dependency_order(wanted, compose(**services)) == expected


@pytest.mark.parametrize(
    "wanted,services,message",
    [
        (["api"], {"web": {}}, 'service "api" is not in the compose file (it has: web)'),
        (
            ["api"],
            {"api": {"depends_on": ["db"]}},
            'service "api" depends on "db", which the compose file does not define',
        ),
        (["a"], {"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}}, "depends_on has a cycle: a → b → a"),
        (["a"], {"a": {"depends_on": "b"}, "b": {}}, "depends_on must be a list or a mapping, not str"),
    ],
)
def test_what_cannot_be_ordered_says_why(wanted, services, message):
    with pytest.raises(ComposeError) as err:
        dependency_order(wanted, compose(**services))
    assert str(err.value) == message


def test_reading_a_compose_file(tmp_path):
    good = tmp_path / "docker-compose.yml"
    good.write_text("services:\n  api:\n    image: x\n")
    assert list(read_compose(good)["services"]) == ["api"]
    for text, message in (("- a\n", "has no services mapping"), ("services: [\n", "is not YAML")):
        bad = tmp_path / "bad.yml"
        bad.write_text(text)
        with pytest.raises(ComposeError, match=message):
            read_compose(bad)
    with pytest.raises(ComposeError, match="cannot read"):
        read_compose(tmp_path / "missing.yml")


def test_a_compose_file_that_cannot_order_the_environment_is_a_config_error(tmp_path):
    from worker.config import ConfigError, parse_config

    (tmp_path / "stack.yml").write_text("services:\n  api:\n    depends_on: [api]\n")
    raw = {
        "services": {"api": {"container": "shop-api"}},
        "deploy": {
            "environments": {
                "prod": {"branch": "main", "services": ["api"], "image": "shop/api", "compose_file": "stack.yml"}
            }
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="t", base_dir=tmp_path, environ={})
    assert "deploy.environments.prod.compose_file: depends_on has a cycle: api → api" in str(err.value)
    (tmp_path / "stack.yml").write_text("services:\n  api: {}\n")
    assert parse_config(raw, source="t", base_dir=tmp_path, environ={}).deploy_order("prod") == ["api"]


def test_which_dependencies_a_deploy_waits_to_be_healthy():
    from worker.compose import waits_for_healthy

    services = {
        "app": {"depends_on": {"db": {"condition": "service_healthy"}, "cache": {"condition": "service_started"}}},
        "worker": {"depends_on": ["db"]},
        "db": {},
        "cache": {},
    }
    assert waits_for_healthy(compose(**services), ["app", "db", "cache", "worker"]) == {"db"}
    assert waits_for_healthy(compose(**services), ["app", "cache"]) == set()  # db is not deployed here
