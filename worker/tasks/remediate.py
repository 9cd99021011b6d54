"""Remediation playbooks' steps. Each step is idempotent and bounded in time.

A step is a function (StepContext) -> output text; it raises StepFailed with
a message for the on-call engineer when the step did not achieve its aim.
"""

from __future__ import annotations

import time
from datetime import datetime

import requests

from worker.adapters.docker import DockerError
from worker.tasks import backup, cleanup, rotate
from worker.tasks.steps import Step, StepContext, StepFailed


def _container(ctx: StepContext, service: str | None = None, missing_ok: bool = False):
    """The container of `service` (default: the run's target); with `missing_ok`, None when
    the service has no container (yet)."""
    name = service or ctx.run["target"] or ""
    spec = ctx.config.services.get(name)
    if spec is None:
        # The configuration changed since the run was accepted.
        raise StepFailed(f'service "{name}" is no longer configured')
    try:
        return ctx.runtime.docker.find_container(name, spec, missing_ok=missing_ok)
    except DockerError as err:
        raise StepFailed(str(err)) from None


def locate(ctx: StepContext) -> str:
    container = _container(ctx)
    state = ctx.runtime.docker.state(container)
    return f"container {state.name} ({state.id[:12]}): {state.status}, started {state.started_at}"


def restart(ctx: StepContext) -> str:
    container = _container(ctx)
    stop_timeout = int(ctx.params.get("stop_timeout_seconds", 10))
    began = time.monotonic()
    try:
        ctx.runtime.docker.restart(container, stop_timeout)
    except DockerError as err:
        raise StepFailed(str(err)) from None
    return f"restarted {container.name} in {time.monotonic() - began:.1f}s (stop timeout {stop_timeout}s)"


def recreate(ctx: StepContext) -> str:
    """Same image, same configuration, a fresh container (no state left from the old one)."""
    marker = f"opsfleet-run-{ctx.run['id']}"
    spec = ctx.config.services[ctx.run["target"]]
    if spec.container:
        done = ctx.runtime.docker.finish_recreate(spec.container, marker)
        if done is not None:
            return f"already recreated as {done.name} ({done.id[:12]})"
    container = _container(ctx)
    old_id = container.id
    stop_timeout = int(ctx.params.get("stop_timeout_seconds", 10))
    try:
        fresh = ctx.runtime.docker.recreate(container, marker, stop_timeout)
    except DockerError as err:
        raise StepFailed(str(err)) from None
    return f"recreated {fresh.name}: {old_id[:12]} → {fresh.id[:12]} (image {fresh.attrs['Image'][:19]})"


def _wait_healthy(ctx: StepContext, since: datetime | None) -> str:
    deadline = time.monotonic() + float(ctx.params.get("verify_timeout_seconds", 30))
    while True:
        problem, detail = _health_problem(ctx, since)
        if not problem:
            return detail
        if time.monotonic() >= deadline:
            raise StepFailed(problem)
        time.sleep(1)


def verify_running(ctx: StepContext) -> str:
    """After acting: the container runs again, was (re)started by this run, is
    healthy if it has a health check, and answers its health URL if configured."""
    return _wait_healthy(ctx, since=ctx.run["started_at"])


def verify_healthy(ctx: StepContext) -> str:
    """Re-check the condition without acting (the `verify` playbook)."""
    return _wait_healthy(ctx, since=None)


def _health_problem(ctx: StepContext, since: datetime | None, service: str | None = None) -> tuple[str, str]:
    """("", detail) when healthy, else (problem, ""). `service` defaults to the run's target."""
    spec = ctx.config.services[service or ctx.run["target"]]
    container = _container(ctx, service)
    state = ctx.runtime.docker.state(container)
    started = _parse_docker_time(state.started_at)
    if not state.running:
        return f"container {state.name} is {state.status}", ""
    if since is not None and (started is None or started < since):
        return f"container {state.name} was not restarted by this run (started {state.started_at})", ""
    if state.health not in (None, "healthy"):
        return f"container {state.name} health is {state.health}", ""
    if spec.health_url:
        try:
            answer = requests.get(spec.health_url, timeout=5)
        except requests.RequestException as err:
            return f"{spec.health_url} did not answer: {err.__class__.__name__}", ""
        if not answer.ok:
            return f"{spec.health_url} answered {answer.status_code}", ""
    detail = f"container {state.name} running since {state.started_at}"
    return "", detail + (f"; {spec.health_url} OK" if spec.health_url else "")


def _parse_docker_time(text: str) -> datetime | None:
    # Docker gives nanoseconds ("2026-12-03T18:44:29.678702744Z"); keep microseconds.
    if not text or text.startswith("0001-"):
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


PLAYBOOKS = {
    "restart_service": (
        Step("locate", locate),
        Step("restart", restart),
        Step("verify", verify_running),
    ),
    "recreate_service": (
        Step("locate", locate),
        Step("recreate", recreate),
        Step("verify", verify_running),
    ),
    "verify": (Step("verify", verify_healthy),),
    # Free disk space with the jobs that own each kind of file, never copies of
    # them: the cleanup job's dangling-image prune, the rotation job's rotate and
    # compress (`force` rotates what is not due yet), the backup job's retention
    # (which never deletes beyond its policy).
    # On a filling disk, each frees what it can whatever the others did (carry_on).
    "free_disk": (
        Step("dangling_images", cleanup.dangling_images, carry_on=True),
        Step("rotate_logs", rotate.rotate, carry_on=True),
        Step("compress_logs", rotate.compress, carry_on=True),
        Step("backup_retention", cleanup.backups, carry_on=True),
    ),
    # A rule's backup is the scheduled backup set, now.
    "run_backup": backup.PLAYBOOKS["backup_set"],
}
