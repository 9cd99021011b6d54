"""Remediation playbooks' steps. Each step is idempotent and bounded in time.

A step is a function (StepContext) -> output text; it raises StepFailed with
a message for the on-call engineer when the step did not achieve its aim.
"""

from __future__ import annotations

import time
from datetime import datetime

import requests

from worker.adapters.docker import DockerError
from worker.tasks.steps import Step, StepContext, StepFailed


def _container(ctx: StepContext):
    spec = ctx.config.services.get(ctx.run["target"] or "")
    if spec is None:
        # The configuration changed since the run was accepted.
        raise StepFailed(f'service "{ctx.run["target"]}" is no longer configured')
    try:
        return ctx.runtime.docker.find_container(ctx.run["target"], spec)
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


def _parse_docker_time(text: str) -> datetime | None:
    # Docker gives nanoseconds ("2026-12-03T18:44:29.678702744Z"); keep microseconds.
    if not text or text.startswith("0001-"):
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


def verify_running(ctx: StepContext) -> str:
    """The container runs again, was started by this run, is healthy if it has a
    health check, and answers its health URL if one is configured."""
    deadline = time.monotonic() + float(ctx.params.get("verify_timeout_seconds", 30))
    spec = ctx.config.services[ctx.run["target"]]
    problem = "not checked"
    while True:
        container = _container(ctx)
        state = ctx.runtime.docker.state(container)
        started = _parse_docker_time(state.started_at)
        if not state.running:
            problem = f"container {state.name} is {state.status}"
        elif started is None or started < ctx.run["started_at"]:
            problem = f"container {state.name} was not restarted by this run (started {state.started_at})"
        elif state.health not in (None, "healthy"):
            problem = f"container {state.name} health is {state.health}"
        elif spec.health_url:
            try:
                answer = requests.get(spec.health_url, timeout=5)
                problem = "" if answer.ok else f"{spec.health_url} answered {answer.status_code}"
            except requests.RequestException as err:
                problem = f"{spec.health_url} did not answer: {err.__class__.__name__}"
        else:
            problem = ""
        if not problem:
            return f"container {state.name} running since {state.started_at}" + (
                f"; {spec.health_url} OK" if spec.health_url else ""
            )
        if time.monotonic() >= deadline:
            raise StepFailed(problem)
        time.sleep(1)


PLAYBOOKS = {
    "restart_service": (
        Step("locate", locate),
        Step("restart", restart),
        Step("verify", verify_running),
    ),
}
