"""Pure deploy decisions, tested as tables (tests/test_deploy_decisions.py).

- `decide_push`: a GitHub push payload → which environments deploy which
  commit with which images, or why it is ignored.
- `judge_deploy`: newest wins. A webhook deploy older than (or equal to) the
  live release never overrides it; of several waiting deploys only the
  newest runs, the others end `superseded`.

Order of pushes: `repository.pushed_at` (GitHub's push time, seconds), then
`head_commit.timestamp` (commit time) for two pushes in one second. Both are
GitHub's times, not the order deliveries happen to arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.adapters.github import REPOSITORY_NAME
from worker.config import Config, DeployEnvironment

ZERO_SHA = "0" * 40


class MalformedPayload(ValueError):
    """A field of a (signed) payload has the wrong type: the edge answers 400 with this."""


def _object(parent: dict, key: str, where: str = "") -> dict:
    """parent[key] as a dict ({} when absent or null); any other type is malformed."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedPayload(f"{where}{key} must be an object, not {type(value).__name__}")
    return value


def _text(parent: dict, key: str, where: str = "") -> str:
    """parent[key] as a str ("" when absent or null); any other type is malformed."""
    value = parent.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedPayload(f"{where}{key} must be a string, not {type(value).__name__}")
    return value


def repository_name(payload: dict) -> str:
    name = _text(_object(payload, "repository"), "full_name", "repository.")
    if name and not REPOSITORY_NAME.fullmatch(name):
        # It becomes part of GitHub API paths (deployments, statuses): owner/name only.
        raise MalformedPayload(f"repository.full_name {name[:100]!r} is not owner/name")
    return name


def sender_name(payload: dict) -> str:
    """Who caused the event: the pusher's name, else the sender's login."""
    pusher = _object(payload, "pusher")
    sender = _object(payload, "sender")
    return _text(pusher, "name", "pusher.") or _text(sender, "name", "sender.") or _text(sender, "login", "sender.")


@dataclass(frozen=True)
class PushDeploy:
    environment: str
    sha: str
    ref: str
    tag: str  # the image tag, from the environment's tag_template
    images: dict[str, str]  # service → image reference (repository:tag)
    order: tuple[float, float]  # (pushed_at, commit time), seconds since the epoch
    github_deployment_id: int | None = None  # when a Deployments API event asked for it


@dataclass(frozen=True)
class PushDecision:
    deploys: tuple[PushDeploy, ...]
    ignored: str = ""  # why nothing deploys (when deploys is empty)


def _epoch(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def image_tag(env: DeployEnvironment, *, sha: str, branch: str = "", tag: str = "") -> str:
    return env.tag_template.format(sha=sha, short_sha=sha[:7], branch=branch.replace("/", "-"), tag=tag)


def images_for(env: DeployEnvironment, tag: str) -> dict[str, str]:
    return {service: f"{env.image_repository(service)}:{tag}" for service in env.services}


def push_order(payload: dict) -> tuple[float, float]:
    repo = _object(payload, "repository")
    head = _object(payload, "head_commit")
    return (_epoch(repo.get("pushed_at")), _epoch(head.get("timestamp")))


def decide_push(payload: dict, config: Config) -> PushDecision:
    """Which environments a push deploys. Pure: the payload and the configuration only."""
    ref = payload.get("ref")
    after = payload.get("after")
    if not isinstance(ref, str) or not isinstance(after, str):
        raise MalformedPayload("ref and after must be strings (a push payload has both)")
    if payload.get("deleted") or after == ZERO_SHA:
        return PushDecision((), f"ref deleted: {ref}")
    if not (len(after) == 40 and all(c in "0123456789abcdef" for c in after)):
        return PushDecision((), f"after is not a commit sha: {after[:50]!r}")
    repo = repository_name(payload)
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    tag = ref.removeprefix("refs/tags/") if ref.startswith("refs/tags/") else None
    order = push_order(payload)
    deploys, reasons = [], []
    for name, env in sorted(config.deploy.environments.items()):
        if env.repository and env.repository.lower() != repo.lower():
            reasons.append(f"{name}: repository {repo or '(none)'} is not {env.repository}")
            continue
        if branch is not None and env.branch == branch and env.workflow:
            reasons.append(f"{name}: waits for workflow {env.workflow} to pass on {branch}")
            continue
        if branch is not None and env.branch == branch:
            image = image_tag(env, sha=after, branch=branch)
        elif tag is not None and env.tags and tag.startswith("v"):
            image = image_tag(env, sha=after, tag=tag)
        else:
            wants = " or ".join(([f"branch {env.branch}"] if env.branch else []) + (["v* tags"] if env.tags else []))
            reasons.append(f"{name}: {ref} is not {wants}")
            continue
        if "{tag}" in env.tag_template and tag is None or "{branch}" in env.tag_template and branch is None:
            field = "{tag}" if tag is None else "{branch}"
            reasons.append(f"{name}: tag_template {env.tag_template} needs {field}, which {ref} does not give")
            continue
        deploys.append(PushDeploy(name, after, ref, image, images_for(env, image), order))
    if deploys:
        return PushDecision(tuple(deploys))
    return PushDecision((), "; ".join(reasons) or "no deploy environments configured")


def decide_deployment(payload: dict, config: Config) -> PushDecision:
    """A `deployment` event (Deployments API): its sha to the environment it names,
    when that environment takes deployments. One opsfleet created itself (its
    payload carries `opsfleet_run`) is GitHub echoing it: never deployed again."""
    if payload.get("action", "created") != "created":
        return PushDecision((), f"deployment {payload.get('action')!r}: only created deployments deploy")
    deployment = payload.get("deployment")
    if not isinstance(deployment, dict):
        raise MalformedPayload("deployment must be an object (a deployment payload has one)")
    name, sha, ref = deployment.get("environment"), deployment.get("sha"), deployment.get("ref") or ""
    extra = deployment.get("payload")
    if isinstance(extra, dict) and "opsfleet_run" in extra:
        return PushDecision((), f"created by opsfleet (run {extra['opsfleet_run']}): not deployed again")
    if not isinstance(sha, str) or not (len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)):
        return PushDecision((), f"deployment sha is not a commit sha: {str(sha)[:50]!r}")
    env = config.deploy.environments.get(name) if isinstance(name, str) else None
    if env is None or not env.deployments:
        return PushDecision(
            (), f"environment {str(name)[:64]!r} does not take deployments (deploy.environments.<name>.deployments)"
        )
    repo = repository_name(payload)
    if env.repository and env.repository.lower() != repo.lower():
        return PushDecision((), f"{name}: repository {repo or '(none)'} is not {env.repository}")
    tag = ref if isinstance(ref, str) and ref.startswith("v") else ""
    if "{tag}" in env.tag_template and not tag:
        return PushDecision(
            (), f"{name}: tag_template {env.tag_template} needs {{tag}}, which ref {ref!r} does not give"
        )
    image = image_tag(env, sha=sha, branch=str(ref), tag=tag)
    when = _epoch(deployment.get("created_at"))
    deployment_id = deployment.get("id") if isinstance(deployment.get("id"), int) else None
    return PushDecision((PushDeploy(name, sha, str(ref), image, images_for(env, image), (when, when), deployment_id),))


def decide_workflow_run(payload: dict, config: Config) -> PushDecision:
    """A `workflow_run` event: a configured workflow that completed with success on an
    environment's branch deploys its head commit ("deploy after CI passed")."""
    run = payload.get("workflow_run")
    if not isinstance(run, dict):
        raise MalformedPayload("workflow_run must be an object (a workflow_run payload has one)")
    if payload.get("action") != "completed" or run.get("conclusion") != "success":
        return PushDecision(
            (),
            f"workflow run {payload.get('action')}, conclusion {run.get('conclusion')}: "
            "only completed successful runs deploy",
        )
    sha, branch = run.get("head_sha"), run.get("head_branch")
    if not isinstance(sha, str) or not (len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)):
        return PushDecision((), f"head_sha is not a commit sha: {str(sha)[:50]!r}")
    workflow = _object(payload, "workflow")
    names = {
        n
        for n in (
            _text(workflow, "name", "workflow."),
            _text(run, "name", "workflow_run."),
            _text(run, "path", "workflow_run."),
        )
        if n
    }
    repo = repository_name(payload)
    head = _object(run, "head_commit", "workflow_run.")
    order = (_epoch(run.get("created_at")), _epoch(head.get("timestamp")))
    deploys, reasons = [], []
    for name, env in sorted(config.deploy.environments.items()):
        if not env.workflow:
            reasons.append(f"{name}: takes no workflow runs")
        elif env.repository and env.repository.lower() != repo.lower():
            reasons.append(f"{name}: repository {repo or '(none)'} is not {env.repository}")
        elif env.workflow not in names:
            reasons.append(f"{name}: workflow {'/'.join(sorted(names)) or '(unnamed)'} is not {env.workflow}")
        elif branch != env.branch:
            reasons.append(f"{name}: branch {branch} is not {env.branch}")
        elif "{tag}" in env.tag_template:
            reasons.append(f"{name}: tag_template {env.tag_template} needs {{tag}}, which a workflow run does not give")
        else:
            image = image_tag(env, sha=sha, branch=branch)
            deploys.append(PushDeploy(name, sha, f"refs/heads/{branch}", image, images_for(env, image), order))
    if deploys:
        return PushDecision(tuple(deploys))
    return PushDecision((), "; ".join(reasons) or "no deploy environments configured")


@dataclass(frozen=True)
class Verdict:
    go: bool
    reason: str = ""


def judge_deploy(
    *,
    run_id: int,
    order: tuple[float, float],
    deliberate: bool,
    live_order: tuple[float, float] | None,
    live_sha: str | None,
    sha: str,
    waiting: dict[int, tuple[float, float]],
) -> Verdict:
    """May this deploy go ahead? `waiting`: the other queued or running deploys
    of the environment (run id → order). `deliberate`: a CLI or API deploy,
    which may go back to an older commit (and is never superseded by order)."""
    if not deliberate:
        if live_order is not None and tuple(order) < tuple(live_order):
            return Verdict(False, f"superseded: the live release {(live_sha or '')[:7]} was pushed after {sha[:7]}")
        if live_sha == sha:
            return Verdict(False, f"superseded: {sha[:7]} is live already")
        # A newer waiting deploy wins; two with the same order: the later run.
        newer = [rid for rid, o in waiting.items() if (tuple(o), rid) > (tuple(order), run_id)]
        if newer:
            return Verdict(False, f"superseded by run {max(newer)}, a newer push")
    return Verdict(True)


def manual_deploy_params(environment: str, env: DeployEnvironment, sha: str, git_tag: str, now: float) -> dict:
    """Run params of a deliberate deploy (CLI, API): its order is the time it was asked."""
    tag = image_tag(env, sha=sha, branch=env.branch or "", tag=git_tag)
    return {
        "environment": environment,
        "sha": sha,
        "ref": git_tag or env.branch or "",
        "tag": tag,
        "images": images_for(env, tag),
        "order": [now, now],
    }


def rollback_target(releases: list[dict], release_id: int | None) -> tuple[dict | None, str]:
    """The release a rollback puts live (releases newest first): `release_id`, else
    the newest that went live and is not current. (release, "") or (None, why not)."""
    if release_id is not None:
        found = next((r for r in releases if r["id"] == release_id), None)
        return (found, "") if found else (None, f"no release {release_id} in this environment")
    found = next((r for r in releases if not r["current"] and r["live_at"] is not None), None)
    return (found, "") if found else (None, "no earlier release to roll back to")


def rollback_params(environment: str, release: dict, now: float) -> dict:
    return {
        "environment": environment,
        "sha": release["sha"],
        "ref": release["ref"],
        "tag": "",
        "images": release["images"],
        "order": [now, now],
        "rollback_to": release["id"],
    }
