"""The health gate a deploy and a recovery both pass: every service running (on its
image, when one is expected) and healthy, `passes` checks in a row before the timeout,
then the business checks; a failing business check sends the services back through.
"""

from __future__ import annotations

import time
from datetime import datetime

import requests

from worker.config import BusinessCheck, Config, HealthGate
from worker.tasks.remediate import _container, _health_problem
from worker.tasks.steps import StepContext, StepFailed


def running_image(container) -> str:
    """The image reference the container was created from (its tag, not its id)."""
    return (container.attrs.get("Config") or {}).get("Image") or container.attrs.get("Image", "")


def business_checks(checks: tuple[BusinessCheck, ...] | list[BusinessCheck]) -> tuple[str, list[str]]:
    """("", what passed) when every check passes, else (the first failure, [])."""
    passed = []
    for check in checks:
        try:
            answer = requests.get(check.url, timeout=check.timeout_seconds, allow_redirects=False)
        except requests.RequestException as err:
            return f"check {check.name}: {check.url} did not answer ({err.__class__.__name__})", []
        if answer.status_code != check.expect_status:
            return f"check {check.name}: {check.url} answered {answer.status_code}, expected {check.expect_status}", []
        if check.expect_text is not None and check.expect_text not in answer.text:
            return f"check {check.name}: {check.url} answered without {check.expect_text!r}", []
        passed.append(
            f"{check.name}: {answer.status_code}" + (f", has {check.expect_text!r}" if check.expect_text else "")
        )
    return "", passed


def pass_gate(
    ctx: StepContext,
    services: list[str],
    gate: HealthGate,
    checks: tuple[BusinessCheck, ...] | list[BusinessCheck] = (),
    *,
    images: dict[str, str] | None = None,
    since: datetime | None = None,
) -> str:
    """Wait until the gate passes; StepFailed with the last problem when it does not in time.

    images: the reference each service must run. since: each container must have
    been started after this (a recovery started them)."""
    deadline = time.monotonic() + gate.timeout_seconds
    streak, problem, failed_check = 0, "", ""
    while True:
        problem = ""
        for service in services:
            try:
                reference = (images or {}).get(service)
                container = _container(ctx, service)
                if reference and running_image(container) != reference:
                    problem = f"{service} runs {running_image(container)}, not {reference}"
                else:
                    problem, _ = _health_problem(ctx, since, service)
            except StepFailed as err:
                problem = str(err)
            if problem:
                problem = problem if problem.startswith(service) else f"{service}: {problem}"
                break
        streak = 0 if problem else streak + 1
        if streak >= gate.passes:
            failed_check, passed = business_checks(checks)
            if not failed_check:
                return f"{', '.join(services)} healthy {gate.passes} times in a row" + "".join(
                    f"\ncheck {line}" for line in passed
                )
            streak = 0
        if time.monotonic() + gate.interval_seconds > deadline:
            raise StepFailed(
                f"health gate failed after {gate.timeout_seconds}s: "
                f"{problem or failed_check or f'only {streak} passes in a row'}"
            )
        time.sleep(gate.interval_seconds)


def recovery_gate(config: Config, services: list[str], timeout_seconds: int) -> tuple[HealthGate, list[BusinessCheck]]:
    """The gate for services a recovery started: the strictest of the deploy gates of the
    environments they belong to (most passes, shortest interval) and all their business
    checks, within the recovery's own timeout (backup.health_timeout_seconds)."""
    owners = [env for env in config.deploy.environments.values() if set(env.services) & set(services)]
    passes = max((env.health.passes for env in owners), default=HealthGate().passes)
    interval = min((env.health.interval_seconds for env in owners), default=HealthGate().interval_seconds)
    checks: dict[str, BusinessCheck] = {}
    for env in owners:
        for check in env.checks:
            checks.setdefault(check.name, check)
    # Built from validated values; the recovery's timeout may exceed a deploy gate's cap.
    gate = HealthGate.model_construct(passes=passes, interval_seconds=interval, timeout_seconds=timeout_seconds)
    return gate, list(checks.values())
