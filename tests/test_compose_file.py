"""worker/compose.py: a compose file read as docker-compose reads it, into container definitions (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.compose import (
    COMPOSE_CONFIG_HASH,
    ComposeError,
    ComposeProject,
    container_definition,
    default_project_name,
    duration_ns,
    image_repository,
    interpolate,
    load_project,
    parse_env_file,
)


def project(services: dict, volumes: dict | None = None, networks: dict | None = None, env_files=None):
    return ComposeProject(
        name="shop",
        path=Path("/srv/shop/docker-compose.yml"),
        services=services,
        volumes=volumes or {},
        networks=networks or {},
        env_files=env_files or {},
    )


def define(service: dict, environ: dict | None = None, **kwargs):
    return container_definition(project({"api": service}, **kwargs), "api", "reg:5000/shop/api:main-abc", environ or {})


@pytest.mark.parametrize(
    "text,variables,expected",
    [
        ("${TAG}", {"TAG": "1.2"}, "1.2"),
        ("$TAG-x", {"TAG": "1.2"}, "1.2-x"),
        ("${TAG:-latest}", {"TAG": ""}, "latest"),
        ("${TAG-latest}", {"TAG": ""}, ""),
        ("${TAG-latest}", {}, "latest"),
        ("${TAG:-latest}", {"TAG": "v2"}, "v2"),
        ("$$HOME stays", {"HOME": "/root"}, "$HOME stays"),
        ("${MISSING}", {}, ""),
    ],
)
def test_interpolation_as_compose_does_it(text, variables, expected):
    assert interpolate({"a": [text]}, variables).value == {"a": [expected]}


def test_an_unset_variable_is_blank_and_said_a_required_one_is_an_error():
    assert interpolate({"x": "${A}${B:-b}"}, {}).unset == ("A",)
    with pytest.raises(ComposeError, match=r"services.api.image: variable TAG is required: set the tag"):
        interpolate({"services": {"api": {"image": "x:${TAG:?set the tag}"}}}, {})


def test_env_files_parse_like_compose():
    text = "# comment\n\nA=1\nexport B=\"two words\"\nC='x=y'\nBARE\nD=\n"
    assert parse_env_file(text) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}


def test_environment_env_file_then_environment_and_bare_names_from_opsfleets_environment():
    definition = container_definition(
        project(
            {"api": {"env_file": ".env.api", "environment": {"B": "from-compose", "SECRET": None, "GONE": None}}},
            env_files={"/srv/shop/.env.api": {"A": "file", "B": "file"}},
        ),
        "api",
        "img:1",
        {"SECRET": "s3"},
    )
    assert definition.config["environment"] == ["A=file", "B=from-compose", "SECRET=s3"]
    listed = define({"environment": ["X=1", "FLAG=true", "Y"]}, {"Y": "y"})
    assert listed.config["environment"] == ["X=1", "FLAG=true", "Y=y"]


@pytest.mark.parametrize(
    "volumes,binds,named,anonymous",
    [
        (["./data:/data"], ["/srv/shop/data:/data:rw"], (), ()),
        (["/etc/shop:/etc/shop:ro"], ["/etc/shop:/etc/shop:ro"], (), ()),
        (
            ["pgdata:/var/lib/postgresql/data"],
            ["shop_pgdata:/var/lib/postgresql/data:rw"],
            (("shop_pgdata", "pgdata", False),),
            (),
        ),
        (["models:/models:ro"], ["team-models:/models:ro"], (("team-models", "models", True),), ()),
        (["/cache"], None, (), ("/cache",)),
        (
            [{"type": "bind", "source": "./conf", "target": "/conf", "read_only": True}],
            ["/srv/shop/conf:/conf:ro"],
            (),
            (),
        ),
        ([{"type": "volume", "target": "/scratch"}], None, (), ("/scratch",)),
    ],
)
def test_volumes(volumes, binds, named, anonymous):
    declared = {"pgdata": None, "models": {"external": True, "name": "team-models"}}
    definition = define({"volumes": volumes}, volumes=declared)
    assert definition.host.get("binds") == binds
    assert definition.volumes == named
    assert definition.anonymous == anonymous


def test_an_undeclared_named_volume_is_an_error():
    with pytest.raises(ComposeError, match='volume "data" is not declared under the top-level volumes'):
        define({"volumes": ["data:/data"]})


@pytest.mark.parametrize(
    "service,mode,networks",
    [
        ({"network_mode": "host"}, "host", ()),
        ({}, "shop_default", (("shop_default", ("api",), False),)),
        (
            {"networks": {"back": {"aliases": ["api-internal"]}, "front": None}},
            "shop_back",
            (("shop_back", ("api", "api-internal"), False), ("edge", ("api",), True)),
        ),
    ],
)
def test_networks(service, mode, networks):
    definition = define(service, networks={"back": None, "front": {"external": True, "name": "edge"}})
    assert definition.host["network_mode"] == mode
    assert definition.networks == networks


def test_healthcheck_restart_ports_and_the_rest():
    definition = define(
        {
            "command": "httpd -f -p '127.0.0.1:8080'",
            "entrypoint": ["/bin/sh", "-c"],
            "healthcheck": {
                "test": "wget -q -O- http://127.0.0.1:8080/health",
                "interval": "1m30s",
                "timeout": "500ms",
                "retries": 3,
                "start_period": 5,
            },
            "restart": "on-failure:5",
            "ports": ["127.0.0.1:8080:80", "9090:90/udp", {"target": 443, "published": 8443}],
            "stop_grace_period": "1m",
            "labels": ["team=shop"],
            "user": 1000,
            "working_dir": "/app",
            "extra_hosts": ["db.local:10.0.0.5"],
            "logging": {"driver": "json-file", "options": {"max-size": "10m"}},
        }
    )
    config, host = definition.config, definition.host
    assert config["command"] == ["httpd", "-f", "-p", "127.0.0.1:8080"]
    assert config["entrypoint"] == ["/bin/sh", "-c"]
    assert config["healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- http://127.0.0.1:8080/health"],
        "Interval": 90_000_000_000,
        "Timeout": 500_000_000,
        "StartPeriod": 5_000_000_000,
        "Retries": 3,
    }
    assert host["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 5}
    assert config["ports"] == [80, (90, "udp"), 443]
    assert host["port_bindings"] == {"80/tcp": [("127.0.0.1", 8080)], "90/udp": [9090], "443/tcp": [8443]}
    assert config["stop_timeout"] == 60 and config["user"] == "1000" and config["working_dir"] == "/app"
    assert host["extra_hosts"] == {"db.local": "10.0.0.5"}
    assert host["log_config"] == {"Type": "json-file", "Config": {"max-size": "10m"}}
    assert config["labels"]["team"] == "shop"


def test_compose_labels_and_the_default_name():
    definition = define({"image": "shop/api:old"})
    assert definition.name == "shop_api_1" and definition.image == "reg:5000/shop/api:main-abc"
    labels = definition.labels
    assert labels["com.docker.compose.project"] == "shop"
    assert labels["com.docker.compose.service"] == "api"
    assert labels["com.docker.compose.oneoff"] == "False"
    assert labels["com.docker.compose.container-number"] == "1"
    assert labels["com.docker.compose.project.config_files"] == "/srv/shop/docker-compose.yml"
    assert define({"container_name": "shop-api"}).name == "shop-api"


def test_the_config_hash_follows_what_the_container_is_made_of():
    base = define({"environment": {"A": "1"}})
    assert define({"environment": {"A": "1"}}).config_hash == base.config_hash
    assert define({"environment": {"A": "2"}}).config_hash != base.config_hash
    assert base.labels[COMPOSE_CONFIG_HASH] == base.config_hash


@pytest.mark.parametrize(
    "service,message",
    [
        (
            {"ulimits": {"nofile": 1024}, "devices": []},
            "services.api: devices, ulimits not applied by opsfleet's deploy",
        ),
        ({"network_mode": "service:db"}, "is not applied by opsfleet (use container:NAME)"),
        ({"restart": "sometimes"}, 'services.api.restart: "sometimes"'),
        ({"healthcheck": {"interval": "soon"}}, 'services.api.healthcheck.interval: not a duration: "soon"'),
        ({"ports": ["8000-8010:8000-8010"]}, "ranges are not applied by opsfleet"),
        ({"networks": ["nowhere"]}, '"nowhere" is not declared under the top-level networks'),
        ({"command": "echo 'unterminated"}, "services.api.command: No closing quotation"),
    ],
)
def test_what_opsfleet_cannot_apply_is_an_error_naming_it(service, message):
    with pytest.raises(ComposeError) as err:
        define(service)
    assert message in str(err.value)


def test_build_profiles_and_extensions_are_ignored():
    assert define({"build": ".", "profiles": ["prod"], "x-team": "shop", "depends_on": ["db"]}).image


@pytest.mark.parametrize(
    "value,ns", [("10s", 10**10), ("1h", 3600 * 10**9), ("1m30s", 90 * 10**9), (2, 2 * 10**9), ("250ms", 250_000_000)]
)
def test_durations(value, ns):
    assert duration_ns(value, "x") == ns


@pytest.mark.parametrize(
    "image,repository",
    [
        ("registry.local:5000/shop/api:1.2", "registry.local:5000/shop/api"),
        ("registry.local:5000/shop/api", "registry.local:5000/shop/api"),
        ("shop/api@sha256:abc", "shop/api"),
        ("postgres:15", "postgres"),
    ],
)
def test_image_repository(image, repository):
    assert image_repository(project({"api": {"image": image}}), "api") == repository


def test_load_project_reads_dotenv_env_files_and_names_the_project(tmp_path):
    folder = tmp_path / "My Shop"
    folder.mkdir()
    (folder / ".env").write_text("TAG=from-dotenv\nPORT=8080\n")
    (folder / "api.env").write_text("A=1\n")
    (folder / "docker-compose.yml").write_text(
        "services:\n  api:\n    image: shop/api:${TAG}\n    env_file: api.env\n    command: serve ${PORT} ${NOPE}\n"
    )
    loaded = load_project(folder / "docker-compose.yml", {"PORT": "9000"})
    assert loaded.name == default_project_name(folder) == "myshop"
    assert loaded.services["api"]["image"] == "shop/api:from-dotenv"
    assert loaded.services["api"]["command"] == "serve 9000 "  # the environment wins over .env
    assert loaded.unset == ("NOPE",)
    assert container_definition(loaded, "api", "x:1", {}).config["environment"] == ["A=1"]
    (folder / "docker-compose.yml").write_text("services:\n  api:\n    env_file: missing.env\n")
    with pytest.raises(ComposeError, match="services.api.env_file: .*missing.env does not exist"):
        load_project(folder / "docker-compose.yml", {})


def test_the_project_name_follows_composes_precedence(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "docker-compose.yml").write_text("name: from-file\nservices:\n  api: {}\n")
    path = folder / "docker-compose.yml"
    assert load_project(path, {}).name == "from-file"
    (folder / ".env").write_text("COMPOSE_PROJECT_NAME=from-dotenv\n")
    assert load_project(path, {}).name == "from-dotenv"
    assert load_project(path, {"COMPOSE_PROJECT_NAME": "from-env"}).name == "from-env"
    assert load_project(path, {"COMPOSE_PROJECT_NAME": "from-env"}, project_name="given").name == "given"
