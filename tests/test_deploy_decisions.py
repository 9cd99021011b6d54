"""The pure deploy decisions as tables: which push deploys what, and newest wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, parse_config
from worker.deploys import decide_push, judge_deploy

SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
CONFIG = parse_config(
    {
        "services": {
            "api": {"container": "a"},
            "web": {"container": "w"},
            "worker": {"container": "k"},
            "batch": {"container": "b"},
        },
        "deploy": {
            "environments": {
                "production": {
                    "branch": "main",
                    "tags": True,
                    "services": ["api", "web"],
                    "image": "reg/shop",
                    "tag_template": "{short_sha}",
                },
                "tags-only": {
                    "tags": True,
                    "services": ["batch"],
                    "image": "reg/batch",
                    "tag_template": "{branch}-{sha}",
                },
                "staging": {
                    "branch": "develop",
                    "services": ["worker"],
                    "images": {"worker": "reg/worker"},
                    "tag_template": "{sha}",
                    "repository": "acme/shop",
                },
            }
        },
    },
    source="t",
    base_dir=Path("."),
    environ={},
).config


def push(ref, after=SHA, repo="acme/shop", deleted=False, pushed_at=100, ts="2026-01-01T00:00:00Z"):
    return {
        "ref": ref,
        "after": after,
        "deleted": deleted,
        "repository": {"full_name": repo, "pushed_at": pushed_at},
        "head_commit": {"timestamp": ts},
    }


@pytest.mark.parametrize(
    ("payload", "deploys", "ignored"),
    [
        (push("refs/heads/main"), {"production": {"api": "reg/shop:6113728", "web": "reg/shop:6113728"}}, ""),
        (push("refs/heads/develop"), {"staging": {"worker": f"reg/worker:{SHA}"}}, ""),
        (
            push("refs/heads/develop", repo="evil/fork"),
            {},
            "production: refs/heads/develop is not branch main or v* tags; "
            "staging: repository evil/fork is not acme/shop; "
            "tags-only: refs/heads/develop is not v* tags",
        ),
        (push("refs/tags/v2.0"), {"production": {"api": "reg/shop:6113728", "web": "reg/shop:6113728"}}, ""),
        (
            push("refs/tags/release-1"),
            {},
            "production: refs/tags/release-1 is not branch main or v* tags; "
            "staging: refs/tags/release-1 is not branch develop; "
            "tags-only: refs/tags/release-1 is not v* tags",
        ),
        (push("refs/heads/main", after="0" * 40, deleted=True), {}, "ref deleted: refs/heads/main"),
        (push("refs/heads/main", after="0" * 40), {}, "ref deleted: refs/heads/main"),
        (push("refs/heads/main", after="abc"), {}, "after is not a commit sha: 'abc'"),
        (
            push("refs/heads/feature/x"),
            {},
            "production: refs/heads/feature/x is not branch main or v* tags; "
            "staging: refs/heads/feature/x is not branch develop; "
            "tags-only: refs/heads/feature/x is not v* tags",
        ),
    ],
)
def test_decide_push(payload, deploys, ignored):
    decision = decide_push(payload, CONFIG)
    assert {d.environment: d.images for d in decision.deploys} == deploys
    assert decision.ignored == ignored


def test_a_template_field_the_ref_does_not_give_is_a_reason_not_a_broken_tag():
    only = CONFIG.model_copy(
        update={
            "deploy": CONFIG.deploy.model_copy(
                update={"environments": {"tags-only": CONFIG.deploy.environments["tags-only"]}}
            )
        }
    )
    decision = decide_push(push("refs/tags/v2.0"), only)
    assert decision.deploys == ()
    assert (
        decision.ignored == "tags-only: tag_template {branch}-{sha} needs {branch}, which refs/tags/v2.0 does not give"
    )


def test_push_order_is_pushed_at_then_commit_time():
    d = decide_push(push("refs/heads/main", pushed_at=1557933657, ts="2019-05-15T15:19:25Z"), CONFIG).deploys[0]
    assert d.order == (1557933657.0, 1557933565.0)


def judge(order, *, run_id=10, live=None, live_sha=None, sha="b" * 40, waiting=None, deliberate=False):
    return judge_deploy(
        run_id=run_id,
        order=order,
        deliberate=deliberate,
        live_order=live,
        live_sha=live_sha,
        sha=sha,
        waiting=waiting or {},
    )


@pytest.mark.parametrize(
    ("case", "kwargs", "go", "reason"),
    [
        ("nothing live, nothing waiting", dict(order=(5, 0)), True, ""),
        ("newer than live", dict(order=(5, 0), live=(4, 0), live_sha="a" * 40), True, ""),
        (
            "older than live",
            dict(order=(3, 0), live=(4, 0), live_sha="a" * 40),
            False,
            "superseded: the live release aaaaaaa was pushed after bbbbbbb",
        ),
        (
            "same second, older commit",
            dict(order=(4, 1), live=(4, 2), live_sha="a" * 40),
            False,
            "superseded: the live release aaaaaaa was pushed after bbbbbbb",
        ),
        (
            "same commit as live",
            dict(order=(5, 0), live=(4, 0), live_sha="b" * 40),
            False,
            "superseded: bbbbbbb is live already",
        ),
        (
            "a newer one waits",
            dict(order=(5, 0), waiting={11: (6, 0), 9: (4, 0)}),
            False,
            "superseded by run 11, a newer push",
        ),
        ("only older ones wait", dict(order=(5, 0), waiting={11: (4, 0), 9: (3, 0)}), True, ""),
        (
            "tie: the later run wins",
            dict(order=(5, 0), waiting={11: (5, 0)}),
            False,
            "superseded by run 11, a newer push",
        ),
        ("tie: I am the later run", dict(order=(5, 0), run_id=12, waiting={11: (5, 0)}), True, ""),
        (
            "deliberate may go back",
            dict(order=(1, 0), live=(4, 0), live_sha="a" * 40, deliberate=True, waiting={11: (9, 0)}),
            True,
            "",
        ),
    ],
)
def test_newest_wins(case, kwargs, go, reason):
    verdict = judge(**kwargs)
    assert (verdict.go, verdict.reason) == (go, reason), case


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"services": ["api"], "image": "r"}, "deploy.environments.prod: set branch, tags: true or deployments: true"),
        (
            {"branch": "main", "services": ["nope"], "image": "r"},
            'deploy.environments.prod.services[0]: unknown service "nope"',
        ),
        ({"branch": "main", "services": ["api"]}, "deploy.environments.prod.images.api: no image repository"),
        (
            {"branch": "main", "services": ["api"], "image": "r", "images": {"web": "w"}},
            "deploy.environments.prod.images.web: not one of this environment's services",
        ),
        (
            {"branch": "main", "services": ["api"], "image": "r", "tag_template": "{nope}"},
            'deploy.environments.prod.tag_template: unknown field "{nope}"',
        ),
        (
            {"branch": "main", "services": ["api"], "image": "r", "health": {"timeout_seconds": 60}},
            "deploy.environments.prod.health.timeout_seconds: 2 × timeout_seconds",
        ),
        (
            {"tags": True, "workflow": "CI", "services": ["api"], "image": "r"},
            "deploy.environments.prod: workflow needs branch",
        ),
        (
            {"branch": "main", "services": ["api"], "image": "r", "colour": "blue"},
            "deploy.environments.prod.colour: unknown key",
        ),
    ],
)
def test_deploy_config_errors_name_the_key(env, problem):
    raw = {
        "services": {"api": {"container": "a"}, "web": {"container": "w"}},
        "deploy": {"environments": {"prod": env}},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="t", base_dir=Path("."), environ={})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_a_service_deployed_by_two_environments_is_an_error():
    raw = {
        "services": {"api": {"container": "a"}},
        "deploy": {
            "environments": {
                "one": {"branch": "main", "services": ["api"], "image": "r"},
                "two": {"branch": "dev", "services": ["api"], "image": "r"},
            }
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="t", base_dir=Path("."), environ={})
    assert err.value.problems == [
        'deploy.environments.two.services[0]: "api" is deployed by deploy.environments.one already'
    ]


def deployment_event(environment="staging", sha=SHA, ref="develop", extra=None, action="created", repo="acme/shop"):
    return {
        "action": action,
        "repository": {"full_name": repo},
        "deployment": {
            "id": 7,
            "sha": sha,
            "ref": ref,
            "environment": environment,
            "payload": extra or {},
            "created_at": "2026-01-01T00:00:10Z",
        },
    }


DEPLOYMENTS = CONFIG.model_copy(
    update={
        "deploy": CONFIG.deploy.model_copy(
            update={
                "environments": {
                    **CONFIG.deploy.environments,
                    "staging": CONFIG.deploy.environments["staging"].model_copy(update={"deployments": True}),
                }
            }
        )
    }
)


@pytest.mark.parametrize(
    ("payload", "deploys", "ignored"),
    [
        (deployment_event(), {"staging": {"worker": f"reg/worker:{SHA}"}}, ""),
        (deployment_event(extra={"opsfleet_run": 5}), {}, "created by opsfleet (run 5): not deployed again"),
        (
            deployment_event("production"),
            {},
            "environment 'production' does not take deployments (deploy.environments.<name>.deployments)",
        ),
        (
            deployment_event("nowhere"),
            {},
            "environment 'nowhere' does not take deployments (deploy.environments.<name>.deployments)",
        ),
        (deployment_event(repo="evil/fork"), {}, "staging: repository evil/fork is not acme/shop"),
        (deployment_event(sha="HEAD"), {}, "deployment sha is not a commit sha: 'HEAD'"),
        (deployment_event(action="deleted"), {}, "deployment 'deleted': only created deployments deploy"),
    ],
)
def test_decide_deployment(payload, deploys, ignored):
    from worker.deploys import decide_deployment

    decision = decide_deployment(payload, DEPLOYMENTS)
    assert {d.environment: d.images for d in decision.deploys} == deploys
    assert decision.ignored == ignored
    if deploys:
        assert decision.deploys[0].github_deployment_id == 7
        assert decision.deploys[0].order == (1767225610.0, 1767225610.0)


def workflow_event(name="CI", branch="main", conclusion="success", action="completed", sha=SHA):
    return {
        "action": action,
        "repository": {"full_name": "acme/shop"},
        "workflow": {"name": name},
        "workflow_run": {
            "head_sha": sha,
            "head_branch": branch,
            "conclusion": conclusion,
            "name": name,
            "path": ".github/workflows/ci.yml",
            "created_at": "2026-01-01T00:00:10Z",
            "head_commit": {"timestamp": "2026-01-01T00:00:00Z"},
        },
    }


WORKFLOW = CONFIG.model_copy(
    update={
        "deploy": CONFIG.deploy.model_copy(
            update={
                "environments": {
                    "production": CONFIG.deploy.environments["production"].model_copy(update={"workflow": "CI"}),
                }
            }
        )
    }
)


@pytest.mark.parametrize(
    ("payload", "deploys", "ignored"),
    [
        (workflow_event(), {"production": {"api": "reg/shop:6113728", "web": "reg/shop:6113728"}}, ""),
        (
            workflow_event(conclusion="failure"),
            {},
            "workflow run completed, conclusion failure: only completed successful runs deploy",
        ),
        (
            workflow_event(action="in_progress", conclusion=None),
            {},
            "workflow run in_progress, conclusion None: only completed successful runs deploy",
        ),
        (workflow_event(name="Lint"), {}, "production: workflow .github/workflows/ci.yml/Lint is not CI"),
        (workflow_event(branch="feature"), {}, "production: branch feature is not main"),
        (workflow_event(sha="x"), {}, "head_sha is not a commit sha: 'x'"),
    ],
)
def test_decide_workflow_run(payload, deploys, ignored):
    from worker.deploys import decide_workflow_run

    decision = decide_workflow_run(payload, WORKFLOW)
    assert {d.environment: d.images for d in decision.deploys} == deploys
    assert decision.ignored == ignored


def test_a_push_to_a_branch_that_waits_for_ci_deploys_nothing():
    decision = decide_push(push("refs/heads/main"), WORKFLOW)
    assert decision.deploys == () and decision.ignored == "production: waits for workflow CI to pass on main"


@pytest.mark.parametrize(
    "decide,payload,message",
    [
        ("decide_push", {"ref": 1, "after": SHA}, "ref and after must be strings"),
        ("decide_push", {}, "ref and after must be strings"),
        ("decide_deployment", {"action": "created"}, "deployment must be an object"),
        ("decide_deployment", {"deployment": "x"}, "deployment must be an object"),
        ("decide_workflow_run", {"workflow_run": [1]}, "workflow_run must be an object"),
    ],
)
def test_a_payload_that_is_not_its_events_shape_is_malformed(decide, payload, message):
    """Signed, but not what GitHub sends for the event: 400 at the edge, not an ignored 202."""
    import worker.deploys as deploys

    with pytest.raises(deploys.MalformedPayload, match=message):
        getattr(deploys, decide)(payload, DEPLOYMENTS)
