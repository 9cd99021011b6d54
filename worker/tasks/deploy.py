"""The deploy playbook: put an environment's services on new images, never half-way.

Steps (target: the environment; params: sha, ref, images, order; a dead deploy's repair
adds repair_of, live_release and, for a first deploy's, goes_live: False — plan_repair):

1. `lock`: take the ledger lock `deploy:<env>` (TTL deploy.lock_ttl_seconds,
   so a dead worker's lock lapses; a lock whose holder run has ended is taken
   over at once). While waiting, and once more with the lock, newest wins
   (worker.deploys.judge_deploy): an older push than the live release, or
   than another waiting deploy, ends `superseded`; so does a repair once another
   release went live after the deploy it repairs died.
2. `validate`: Docker answers; free space on its data root above the floor;
   every service's container is found (with a compose file: every service's
   definition builds; a missing container is created by the recreate).
3. `pull`: every new image is here (pulled when not, the pull stream checked
   for errors). Nothing has been stopped yet: a bad tag stops the run here.
4. `recreate`: the release row is written (with what ran before, the
   rollback target), then each service, dependencies first, is recreated with
   its new image: from the compose file's definition (worker.compose), else
   with its current configuration. A failure rolls back.
5. `health`: each service passes its check `health.passes` times in a row
   within `health.timeout_seconds`. A failure rolls back: the previous images
   are recreated and gated again → the run ends `rolled_back`, or
   `rollback_failed` and an `escalate` run is recorded.
6. `record`: the release is current; the lock is released. (A repair that puts back what
   ran before opsfleet's first deploy makes no release current: see repair_dead_deploys.)

The lock is released on every exit path of every step (a failure, a
supersede, a rollback); a crash inside a step leaves it to its TTL, or to the
next deploy once the sweeper has ended the dead run.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

from worker.adapters import metrics
from worker.adapters.docker import DockerError
from worker.adapters.ledger import FINAL_STATUSES, NewRun, utcnow
from worker.compose import (
    COMPOSE_CONFIG_HASH,
    ComposeError,
    ContainerDefinition,
    container_definition,
    waits_for_healthy,
)
from worker.deploys import judge_deploy
from worker.tasks import backup as backups
from worker.tasks import cleanup, restore
from worker.tasks.gate import pass_gate, running_image
from worker.tasks.remediate import _container
from worker.tasks.steps import Step, StepContext, StepEnded, StepFailed, StepRequeued, StepSkipped, hold_if_asked

log = logging.getLogger("opsfleet.deploy")


def _env(ctx: StepContext):
    name = ctx.run["target"] or ""
    env = ctx.config.deploy.environments.get(name)
    if env is None:
        raise StepFailed(f'environment "{name}" is no longer configured (deploy.environments)')
    return name, env


def lock_name(environment: str) -> str:
    return f"deploy:{environment}"


def _holder(ctx: StepContext) -> str:
    return f"run:{ctx.run['id']}"


def _release_lock(ctx: StepContext) -> None:
    ctx.runtime.ledger.release_lock(lock_name(ctx.run["target"]), _holder(ctx))


def _renew_lock(ctx: StepContext, step_name: str) -> None:
    """Each step after `lock` extends the environment lock to cover itself (a pre-deploy
    backup may outlast deploy.lock_ttl_seconds); a lock that lapsed and went to another
    deploy stops this one here."""
    ledger = ctx.runtime.ledger
    name = lock_name(ctx.run["target"])
    [step] = [s for s in PLAYBOOKS["deploy"] if s.name == step_name]
    ttl = ctx.config.deploy.lock_ttl_seconds + step.hard_limit(ctx.config)
    if not ledger.acquire_lock(name, _holder(ctx), ttl):
        holder = (ledger.get_lock(name) or {}).get("holder", "someone")
        raise StepFailed(f"{name} lapsed and is held by {holder} now: this deploy stops before its {step_name} step")


def _rollback_kind(ctx: StepContext) -> str | None:
    """A deploy run that is itself a rollback: asked for (manual), or a dead deploy's repair."""
    if ctx.params.get("repair_of"):
        return "repair"
    if ctx.params.get("rollback_to"):
        return "manual"
    return None


def _frees_lock_on_failure(fn):
    """Every way out of a step but success releases the environment lock; every step but
    `lock` renews it first."""

    @functools.wraps(fn)
    def step(ctx: StepContext) -> str:
        try:
            if fn.__name__ != "lock":
                _renew_lock(ctx, fn.__name__)
            return fn(ctx)
        except BaseException as err:
            if not isinstance(err, StepEnded | StepRequeued):  # those count themselves, or are not an end
                metrics.DEPLOYS.labels(ctx.run["target"] or "", "failed").inc()
                if _rollback_kind(ctx):
                    metrics.ROLLBACKS.labels(ctx.run["target"] or "", _rollback_kind(ctx), "failed").inc()
                if _rollback_kind(ctx) == "repair" and isinstance(err, Exception):
                    _page_failed_repair(ctx, fn.__name__, err)
            try:
                _release_lock(ctx)
            except Exception as err:  # the TTL frees it
                log.warning("run %s: could not release the deploy lock: %s", ctx.run["id"], err)
            raise

    return step


def _page_failed_repair(ctx: StepContext, step: str, err: Exception) -> None:
    """A repair that fails (an image that is not here and cannot be pulled, Docker down, a
    lock it never got) leaves the dead deploy's half-done stack, maybe on two versions: page."""
    environment = ctx.run["target"] or ""
    reason = f"{_what(ctx)} failed in {step}: {err}; its services may run two versions " + (
        f"(to put back by hand: {_listed(ctx.params.get('images') or {})})"
    )
    try:
        _escalate(ctx, environment, reason)
    except Exception as failed:  # the run's own failure is what counts; the log says this
        log.error("run %s: could not record the escalation (%s): %s", ctx.run["id"], reason, failed)


def _what(ctx: StepContext) -> str:
    """The run, for people: `deploy of abc1234 to prod`, `repair of run 7 in prod`."""
    environment = ctx.run["target"] or ""
    if ctx.params.get("repair_of"):
        return f"repair of run {ctx.params['repair_of']} in {environment}"
    return f"deploy of {str(ctx.params.get('sha', ''))[:7]} to {environment}"


def _listed(images: dict[str, str]) -> str:
    return ", ".join(f"{s} on {i}" if i else f"{s} removed" for s, i in images.items())


def _order(run: dict) -> tuple[float, float]:
    order = run["params"].get("order") or (0, 0)
    return (float(order[0]), float(order[1]))


def _judge(ctx: StepContext, environment: str):
    ledger = ctx.runtime.ledger
    live = ledger.current_release(environment)
    waiting = {r["id"]: _order(r) for r in ledger.active_deploys(environment) if r["id"] != ctx.run["id"]}
    return judge_deploy(
        run_id=ctx.run["id"],
        order=_order(ctx.run),
        deliberate=ctx.run["trigger"] == "manual",
        live_order=(live["pushed_at"], live["committed_at"]) if live else None,
        live_sha=live["sha"] if live else None,
        sha=ctx.params["sha"],
        waiting=waiting,
    )


def _take_lock(ctx: StepContext, environment: str) -> tuple[bool, str]:
    """(taken, note): the note names the holder we wait for, or the ended run we took over from."""
    ledger = ctx.runtime.ledger
    name, ttl = lock_name(environment), ctx.config.deploy.lock_ttl_seconds
    if ledger.acquire_lock(name, _holder(ctx), ttl):
        return True, ""
    held = ledger.get_lock(name)
    holder = (held or {}).get("holder", "")
    if holder.startswith("run:") and ledger.run_status(int(holder[4:])) in FINAL_STATUSES:
        # Its run ended without releasing (the sweeper failed it): take it over now.
        ledger.release_lock(name, holder)
        if ledger.acquire_lock(name, _holder(ctx), ttl):
            return True, f"taken over from {holder}, which had ended"
    return False, holder


def _superseded(ctx: StepContext, reason: str) -> StepEnded:
    metrics.DEPLOYS.labels(ctx.run["target"], "superseded").inc()
    return StepEnded("superseded", reason, step_status="skipped")


def _repair_overtaken(ctx: StepContext, environment: str) -> str:
    """A repair is recorded for the release live when its deploy died (`live_release`: its id,
    None for a first deploy). Another release that went live since, both services gated on it,
    left nothing to repair: putting the old one back would undo it. "" when still to do."""
    if not ctx.params.get("repair_of") or "live_release" not in ctx.params:
        return ""
    live = ctx.runtime.ledger.current_release(environment)
    if live is None or live["id"] == ctx.params["live_release"]:
        return ""  # (None with an id asked for: no release was made current since, so still to do)
    return (
        f"superseded: release {live['id']} ({live['sha'][:7]}) went live after run "
        f"{ctx.params['repair_of']} died; nothing left to repair"
    )


@_frees_lock_on_failure
def lock(ctx: StepContext) -> str:
    environment, _ = _env(ctx)
    deadline = time.monotonic() + ctx.config.deploy.lock_wait_seconds
    waited_for = ""
    while True:
        verdict = _judge(ctx, environment)
        if not verdict.go:
            raise _superseded(ctx, verdict.reason)
        taken, note = _take_lock(ctx, environment)
        if taken:
            break
        waited_for = note
        if time.monotonic() >= deadline:
            waited = (utcnow() - ctx.run["created_at"]).total_seconds()
            if waited >= ctx.config.deploy.max_wait_seconds:
                raise StepFailed(
                    f"{lock_name(environment)} is held by {waited_for}; waited {waited:.0f}s, more than "
                    f"deploy.max_wait_seconds ({ctx.config.deploy.max_wait_seconds}s)"
                )
            # Not hold a worker for a long deploy: back to the queue, tried again by the sweeper.
            raise StepRequeued(
                f"waiting for {lock_name(environment)}, held by {waited_for} (waited {waited:.0f}s of "
                f"deploy.max_wait_seconds {ctx.config.deploy.max_wait_seconds}s)"
            )
        time.sleep(1)
    verdict = _judge(ctx, environment)  # what changed while we waited
    if not verdict.go:
        raise _superseded(ctx, verdict.reason)
    moved_on = _repair_overtaken(ctx, environment)
    if moved_on:
        raise _superseded(ctx, moved_on)
    return (
        f"locked {lock_name(environment)}"
        + (f" after waiting for {waited_for}" if waited_for else "")
        + (f" ({note})" if note else "")
    )


@_frees_lock_on_failure
def validate(ctx: StepContext) -> str:
    _, env = _env(ctx)
    docker = ctx.runtime.docker
    try:
        docker.ping()
        root, free = docker.root_dir_free()
    except DockerError as err:
        raise StepFailed(str(err)) from None
    lines = []
    memory = docker.memory_available()
    if memory is None:
        lines.append("available memory: not checked (Docker is not on this host)")
    elif memory < env.min_free_memory_bytes:
        raise StepFailed(
            f"{memory // (1 << 20)} MiB of memory available, below min_free_memory_bytes "
            f"({env.min_free_memory_bytes // (1 << 20)} MiB); nothing was stopped"
        )
    else:
        lines.append(
            f"memory: {memory // (1 << 20)} MiB available (floor {env.min_free_memory_bytes // (1 << 20)} MiB)"
        )
    if free is None:
        lines.append(f"free space on {root}: not checked (not a path on this host)")
    elif free < env.min_free_bytes:
        raise StepFailed(f"{root} has {free} bytes free, below min_free_bytes ({env.min_free_bytes})")
    else:
        lines.append(f"{root}: {free // (1 << 20)} MiB free (floor {env.min_free_bytes // (1 << 20)} MiB)")
    # What a deploy that died half-way through a recreate left: the original put back or removed.
    for service in env.services:
        name = _container_name(ctx, service)
        if name:
            try:
                lines += docker.repair_leftovers(name)
            except DockerError as err:
                raise StepFailed(str(err)) from None
    # A compose file that cannot be used fails here, before anything is stopped.
    definitions = _definitions(ctx, ctx.params["images"], _compose(ctx))
    for service in env.services:
        container = _container(ctx, service, missing_ok=definitions is not None)
        if container is None and service in definitions:
            lines.append(f"{service}: no container yet; created as {definitions[service].name} from the compose file")
        elif container is None:
            lines.append(f"{service}: no container, and none to create (there was none before)")
        else:
            lines.append(f"{service}: container {container.name} ({container.status})")
    return "\n".join(lines)


def registry_of(reference: str) -> str | None:
    """The registry host an image reference names ("registry.local:5000/shop/api:1" →
    "registry.local:5000"); None for Docker Hub's short names ("busybox", "shop/api")."""
    first, slash, _ = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def _registry_auth(ctx: StepContext, reference: str) -> dict | None:
    auth = ctx.config.deploy.registries.get(registry_of(reference) or "")
    return {"username": auth.username, "password": auth.password} if auth else None


def tags_are_immutable(tag_template: str) -> bool:
    """A tag naming the commit ({sha}, {short_sha}) is taken to be pushed once; one naming a
    branch or a git tag alone may be pushed again, so a copy here may be stale."""
    return "{sha}" in tag_template or "{short_sha}" in tag_template


@_frees_lock_on_failure
def pull(ctx: StepContext) -> str:
    docker = ctx.runtime.docker
    _, env = _env(ctx)
    always = not tags_are_immutable(env.tag_template)
    lines = []
    for service, reference in ctx.params["images"].items():
        if not reference:
            lines.append(f"{service}: had no container before; nothing to pull")
            continue
        try:
            image_id = docker.pull(reference, auth_config=_registry_auth(ctx, reference), always=always)
        except DockerError as err:
            raise StepFailed(f"{service}: {err}; nothing was stopped") from None
        lines.append(f"{service}: {reference} is {image_id[:19]}" + (" (pulled: its tag may move)" if always else ""))
    return "\n".join(lines)


def _pre_deploy_set(ctx: StepContext):
    """The backup set this deploy run took (its manifest carries the run's id), if committed."""
    root = backups.backup_root(ctx)
    if not root.is_dir():
        return None
    return next((s for s in backups.list_sets(root) if s.manifest.get("run_id") == ctx.run["id"]), None)


@_frees_lock_on_failure
def backup(ctx: StepContext) -> str:
    """The environment's backup series, through the backup job's own steps (prepare, dump,
    verify, commit): a verified set before anything is stopped. Its set carries this run's id."""
    environment, env = _env(ctx)
    if not env.backup:
        return f"no pre-deploy backup (deploy.environments.{environment}.backup is empty)"
    done = _pre_deploy_set(ctx)
    if done is not None:
        return f"set {done.id} of this run is there already: {', '.join(sorted(done.items))}"
    root = backups.backup_root(ctx)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, manifest in backups.partial_sets(root):
        if manifest and manifest.get("run_id") == ctx.run["id"]:  # this step, restarted after a crash
            shutil.rmtree(path, ignore_errors=True)
            for series in manifest.get("series", []):
                ctx.runtime.ledger.release_lock(backups.lock_name(series), backups.holder(ctx.run))
    job = StepContext(ctx.runtime, {**ctx.run, "params": {"series": list(env.backup)}})
    try:
        lines = [backups.prepare(job)]
    except StepSkipped as err:
        raise StepFailed(f"pre-deploy backup could not start: {err}; nothing was stopped") from None
    _, manifest = backups.partial_of_run(job)
    if manifest.get("skipped"):
        # Abandoned as a failing backup step abandons its set: partial removed, locks released.
        with backups.abandon_set_on_failure(job, "prepare"):
            raise StepFailed(
                "pre-deploy backup incomplete: "
                + "; ".join(f"{s}: {why}" for s, why in manifest["skipped"].items())
                + "; nothing was stopped"
            )
    for step in (backups.dump, backups.verify, backups.commit):
        try:
            lines.append(step(job))
        except StepFailed as err:
            raise StepFailed(f"pre-deploy backup failed: {err}; nothing was stopped") from None
    return "\n".join(lines)


def _restore_database(ctx: StepContext, env) -> list[str]:
    """A migrating deploy's rollback: the database series of its pre-deploy set restored
    (the restore job's own step: a fresh database, row counts checked, swapped in; the
    migrated one kept as <db>_before_<run>)."""
    found = _pre_deploy_set(ctx)
    if found is None:
        raise StepFailed("no pre-deploy backup set of this run to restore the database from")
    plan = {s: found.id for s in env.backup if ctx.config.backup.series[s].kind == "database" and s in found.items}
    job = StepContext(ctx.runtime, {**ctx.run, "params": {"plan": plan}})
    try:
        return [f"database restored from pre-deploy set {found.id}:", restore.database(job)]
    finally:
        restore.cleanup(job)


def _marker(ctx: StepContext, service: str, what: str = "deploy") -> str:
    return f"opsfleet-run-{ctx.run['id']}-{what}-{service}"


def _compose(ctx: StepContext):
    """(the environment's compose file, read now; its services' compose names), or None
    for an environment without one."""
    environment, env = _env(ctx)
    if not env.compose_file:
        return None
    loaded = ctx.runtime.loaded
    try:
        return loaded.compose_project(environment), loaded.compose_names(environment)
    except ComposeError as err:
        raise StepFailed(f"deploy.environments.{environment}.compose_file: {err}") from None


def _in_deploy_order(ctx: StepContext, images: dict[str, str], compose) -> list[tuple[str, str]]:
    """(service, image) dependencies first (the compose file's depends_on), else in `services` order."""
    environment, _ = _env(ctx)
    try:
        order = ctx.runtime.loaded.deploy_order(environment, compose[0] if compose else None)
    except ComposeError as err:
        raise StepFailed(f"deploy.environments.{environment}.compose_file: {err}") from None
    rank = {service: i for i, service in enumerate(order)}
    return sorted(images.items(), key=lambda item: rank.get(item[0], len(rank)))


# A deploy's recreate renames the original `<name>.<marker>-old` until the new one runs.
_LEFT_BY_RECREATE = re.compile(r"^(?P<name>.+)\.opsfleet-run-\d+-[a-z]+-.+-old$")


def _container_name(ctx: StepContext, service: str) -> str | None:
    """The name the service's container goes by: the configured one, else its container's now
    (without the suffix a half-done recreate left on it); None when it has no container yet."""
    spec = ctx.config.services.get(service)
    if spec is not None and spec.container:
        return spec.container
    current = _container(ctx, service, missing_ok=True)
    if current is None:
        return None
    left = _LEFT_BY_RECREATE.match(current.name)
    return left["name"] if left else current.name


def _definitions(ctx: StepContext, images: dict[str, str], compose) -> dict[str, ContainerDefinition] | None:
    """For an environment with a compose file: each service's container as the file defines it,
    on its image from `images` (services without an image are left out), named as its container
    is now (or as compose names a new one). None for an environment without a compose file."""
    if compose is None:
        return None
    project, names = compose
    try:
        return {
            service: container_definition(
                project, names[service], reference, dict(os.environ), _container_name(ctx, service)
            )
            for service, reference in images.items()
            if reference
        }
    except ComposeError as err:
        raise StepFailed(f"deploy.environments.{_env(ctx)[0]}.compose_file: {err}") from None


def _put(ctx: StepContext, images: dict[str, str], what: str, stop_timeout: int) -> list[str]:
    """Each service on its image from `images`, dependencies first (those already on it are
    left alone). With a compose file, each container is made from its definition there; a
    service whose image is "" had no container before this deploy: its rollback removes the
    one the deploy made."""
    docker = ctx.runtime.docker
    compose = _compose(ctx)  # read once for the whole step
    definitions = _definitions(ctx, images, compose)
    awaited = _awaited(images, compose)
    lines = []
    for service, reference in _in_deploy_order(ctx, images, compose):
        marker = _marker(ctx, service, what)
        spec = ctx.config.services[service]
        definition = (definitions or {}).get(service)
        name = spec.container or (definition.name if definition else None)
        if not reference:
            made = _container(ctx, service, missing_ok=True)
            if made is not None and (made.labels or {}).get("opsfleet.recreated-by") == _marker(ctx, service, "deploy"):
                docker.remove(made, stop_timeout)
                lines.append(f"{service}: {made.name} removed (there was none before this deploy)")
            else:
                lines.append(f"{service}: had no container before this deploy; none to remove")
            continue
        if what == "rollback" and name:
            # A deploy recreate that failed half-way left the original stopped and renamed.
            restored = docker.undo_recreate(name, _marker(ctx, service, "deploy"))
            if restored is not None:
                lines.append(f"{service}: original container {restored.id[:12]} put back")
        if name and docker.finish_recreate(name, marker) is not None:
            lines.append(f"{service}: already on {reference}")
            continue
        container = _container(ctx, service, missing_ok=definition is not None)
        if container is None:
            fresh = docker.create(definition, marker)
            lines.append(f"{service}: {fresh.name} ({fresh.id[:12]}) created on {reference} from the compose file")
            if service in awaited:
                lines.append(_wait_healthy(ctx, service, fresh))
            continue
        same = definition is None or (container.labels or {}).get(COMPOSE_CONFIG_HASH) == definition.config_hash
        # The same reference is not enough: a moving tag may name a newer image now.
        on_it = running_image(container) == reference and container.attrs.get("Image") == docker.image_id(reference)
        if on_it and container.status == "running" and same:
            lines.append(f"{service}: already runs {reference}")
            continue
        fresh = docker.recreate(container, marker, stop_timeout, image=reference, definition=definition)
        lines.append(f"{service}: {container.id[:12]} → {fresh.id[:12]} on {reference}")
        if service in awaited:
            lines.append(_wait_healthy(ctx, service, fresh))
        if what == "deploy":  # fault tests: a worker killed between two services' recreations
            hold_if_asked(ctx.run["playbook"], f"recreate.{service}", ctx.run["id"])
    return lines


def _awaited(images: dict[str, str], compose) -> set[str]:
    """Services another one of this deploy depends on with `condition: service_healthy`."""
    if compose is None:
        return set()
    project, names = compose
    healthy = waits_for_healthy({"services": project.services}, [names[s] for s in images if s in names])
    return {s for s in images if names.get(s) in healthy}


def _wait_healthy(ctx: StepContext, service: str, container) -> str:
    """As compose's `condition: service_healthy`: the dependency's Docker health check passes
    before its dependents are recreated (within the health gate's timeout)."""
    _, env = _env(ctx)
    deadline = time.monotonic() + env.health.timeout_seconds
    while True:
        state = ctx.runtime.docker.state(container)
        if state.health == "healthy":
            return f"{service}: healthy (its dependents wait for it)"
        if state.health is None:
            return f"{service}: no health check to wait for (depends_on asks for service_healthy)"
        if not state.running or time.monotonic() > deadline:
            raise StepFailed(
                f"{service} is {state.health if state.running else state.status} after "
                f"{env.health.timeout_seconds}s; its dependents (depends_on: service_healthy) were not recreated"
            )
        time.sleep(min(env.health.interval_seconds, 1))


@_frees_lock_on_failure
def recreate(ctx: StepContext) -> str:
    environment, env = _env(ctx)
    ledger = ctx.runtime.ledger
    release = ledger.release_of_run(ctx.run["id"])
    if release is None:
        # The rollback target: what each service runs now ("" for one a compose file creates afresh).
        try:
            found = {s: _container(ctx, s, missing_ok=bool(env.compose_file)) for s in env.services}
        except StepFailed as err:
            raise StepFailed(f"{err}; nothing was stopped") from None
        previous = {service: running_image(c) if c is not None else "" for service, c in found.items()}
        release = ledger.start_release(
            environment=environment,
            sha=ctx.params["sha"],
            ref=ctx.params.get("ref", ""),
            images=ctx.params["images"],
            previous_images=previous,
            run_id=ctx.run["id"],
            order=_order(ctx.run),
        )
    try:
        lines = _put(ctx, release["images"], "deploy", env.stop_timeout_seconds)
    except (DockerError, StepFailed) as err:
        _roll_back(ctx, release, f"recreate failed: {err}")
    return "\n".join(lines)


def _gate(ctx: StepContext, images: dict[str, str]) -> str:
    """Every service on its image, running, healthy: `passes` times in a row, before the timeout."""
    _, env = _env(ctx)
    images = {service: reference for service, reference in images.items() if reference}
    return pass_gate(ctx, list(images), env.health, env.checks, images=images)


def _roll_back(ctx: StepContext, release: dict, why: str):
    """Back to what ran before; gate again. Always raises StepEnded (and frees the lock)."""
    environment, env = _env(ctx)
    ledger = ctx.runtime.ledger
    previous = release["previous_images"]
    back = _listed(previous)
    if _rollback_kind(ctx) == "repair":
        # What ran before a repair is the dead deploy's half-done stack: going back to it would
        # leave two versions, the one thing a repair is for. It stays as it is; a person is paged.
        failed = (
            f"{why}; a repair is not rolled back (what ran before it is the half-done deploy of run "
            f"{ctx.params['repair_of']}: {back}); to put back by hand: {_listed(release['images'])}"
        )
        ledger.set_release_status(ctx.run["id"], "failed")
        _escalate(ctx, environment, f"{_what(ctx)}: {failed}")
        _release_lock(ctx)
        metrics.DEPLOYS.labels(environment, "rollback_failed").inc()
        metrics.ROLLBACKS.labels(environment, "repair", "failed").inc()
        raise StepEnded("rollback_failed", failed)
    began = time.monotonic()
    try:
        lines = _restore_database(ctx, env) if env.migrating else []
        lines += _put(ctx, previous, "rollback", env.stop_timeout_seconds)
        if any(previous.values()):
            lines.append(_gate(ctx, previous))
        else:
            lines.append("nothing ran before this deploy: the stack is back to no containers, nothing to gate")
    except (DockerError, StepFailed) as err:
        # The person paged needs what ran before: the rollback target, to put back by hand.
        failed = f"{why}; rollback failed: {err} (rollback target: {back})"
        ledger.set_release_status(ctx.run["id"], "failed")
        _escalate(ctx, environment, f"{_what(ctx)}: {failed}")
        _release_lock(ctx)
        metrics.DEPLOYS.labels(environment, "rollback_failed").inc()
        metrics.ROLLBACKS.labels(environment, "automatic", "failed").inc()
        raise StepEnded("rollback_failed", failed) from None
    ledger.set_release_status(ctx.run["id"], "rolled_back")
    _release_lock(ctx)
    metrics.DEPLOYS.labels(environment, "rolled_back").inc()
    metrics.ROLLBACKS.labels(environment, "automatic", "succeeded").inc()
    took = time.monotonic() - began
    raise StepEnded("rolled_back", f"{why}; rolled back in {took:.2f}s: {back}\n" + "\n".join(lines))


def _record_and_send(app, ledger, reason: str, new: NewRun) -> list[int]:
    """A run this job starts (an escalation, a repair): recorded under `reason`, then enqueued;
    when the broker cannot take it now, the sweeper sends it. The ids of runs newly recorded."""
    recorded = ledger.record_event(source="deploy", summary=reason, body="", new_runs=[new])
    created = [r.id for r in recorded.runs if r.created]
    try:
        from worker.tasks.runs import enqueue_runs

        enqueue_runs(app, ledger, created)
    except Exception as err:
        log.warning("%s: recorded, not enqueued (the sweeper sends it): %s", new.summary, err)
    return created


def _escalate(ctx: StepContext, environment: str, reason: str) -> None:
    """An escalate run about this deploy."""
    from celery import current_app

    escalate_deploy(current_app, ctx.runtime.ledger, ctx.run, environment, reason)


def escalate_deploy(app, ledger, run: dict, environment: str, reason: str) -> list[int]:
    """An escalate run about deploy `run` (one per run: a repeat is the same escalation)."""
    new = NewRun(
        trigger=run["trigger"],
        playbook="escalate",
        target=None,
        rule=f"deploy:{environment}",
        params={"reason": reason, "alert": f"deploy run #{run['id']}"},
        summary=f"escalation: {reason}",
        dedup_key=f"escalate:deploy:{run['id']}",
    )
    return _record_and_send(app, ledger, reason, new)


@_frees_lock_on_failure
def health(ctx: StepContext) -> str:
    release = ctx.runtime.ledger.release_of_run(ctx.run["id"])
    if release is None:
        raise StepFailed("no release recorded for this run (the recreate step did not run)")
    try:
        return _gate(ctx, release["images"])
    except StepFailed as err:
        _roll_back(ctx, release, str(err))


@_frees_lock_on_failure
def record(ctx: StepContext) -> str:
    environment, _ = _env(ctx)
    ledger = ctx.runtime.ledger
    if ctx.params.get("goes_live") is False:
        # A dead first deploy's repair: the images that ran before opsfleet's first deploy are
        # back, gated; they are no opsfleet release, so none is current (the next push deploys
        # as a first deploy again, its rollback target those same images).
        ledger.set_release_status(ctx.run["id"], "restored")
        release = ledger.release_of_run(ctx.run["id"])
        _release_lock(ctx)
        metrics.DEPLOYS.labels(environment, "succeeded").inc()
        metrics.ROLLBACKS.labels(environment, "repair", "succeeded").inc()
        return (
            f"{environment} is back on what ran before opsfleet's first deploy: {_listed(release['images'])}; "
            "no release is current"
        )
    before = ledger.current_release(environment)
    ledger.make_current(ctx.run["id"])
    if before is not None and before["sha"] != ctx.params["sha"]:
        metrics.RELEASE_INFO.labels(environment, before["sha"]).set(0)
    metrics.RELEASE_INFO.labels(environment, ctx.params["sha"]).set(1)
    release = ledger.release_of_run(ctx.run["id"])
    _release_lock(ctx)
    metrics.DEPLOYS.labels(environment, "succeeded").inc()
    if _rollback_kind(ctx):
        metrics.ROLLBACKS.labels(environment, _rollback_kind(ctx), "succeeded").inc()
    if ctx.run.get("started_at") and release.get("live_at"):
        metrics.DEPLOY_DURATION.labels(environment).observe(
            (release["live_at"] - ctx.run["started_at"]).total_seconds()
        )
    return f"{environment} is on {ctx.params['sha'][:7]}: " + ", ".join(
        f"{s} {i}" for s, i in release["images"].items()
    )


@dataclass(frozen=True)
class RepairPlan:
    """What the sweeper does about a deploy that died after it began recreating."""

    params: dict | None  # the repair run's params; None: no repair
    summary: str  # the repair run's summary, or why there is none
    page: bool = False  # no repair, and the stack may be half-way: a person must look


def plan_repair(dead: dict, dead_params: dict, live: dict | None, configured: bool) -> RepairPlan:
    """The repair of the dead deploy whose release is `dead` (run params `dead_params`), with
    `live` the environment's current release (None: nothing opsfleet deployed is live).

    - A dead repair: the same repair again (what it was putting back; not what ran when it
      began, which is the half-done stack it was repairing).
    - A release live: a deploy of what ran before the dead one (its previous images: the live
      release's, unless someone changed the stack by hand), ordered as the live release.
    - Nothing live (a first deploy): a deploy of the images every service ran before it, which
      makes no release current (`goes_live: False`), ordered before any push.
    - Nothing live, and a service had no container before (a compose file creates it afresh:
      previous image ""): no image to put it back on, so no whole stack of one version to go
      back to. No repair; the release is marked failed and a person is paged (escalate, as for
      a failed rollback) with what ran before, to push again or put back by hand.
    - The environment is no longer configured: no repair (it cannot be deployed), a warning.

    Every repair names the release live when it was recorded (`live_release`); one that went
    live since supersedes it (worker.tasks.deploy._repair_overtaken)."""
    run_id, environment = dead["run_id"], dead["environment"]
    sha = str(dead["sha"])[:7]
    if not configured:
        return RepairPlan(None, f"deploy run {run_id} died mid-deploy; {environment} is no longer configured")
    if dead_params.get("repair_of"):
        return RepairPlan(
            {**dead_params, "repair_of": run_id},
            f"run {run_id} died while repairing run {dead_params['repair_of']}: repairing again",
        )
    base = {"environment": environment, "tag": "", "images": dead["previous_images"], "repair_of": run_id}
    if live is not None:
        return RepairPlan(
            {
                **base,
                "sha": live["sha"],
                "ref": live["ref"],
                "order": [live["pushed_at"], live["committed_at"]],
                "live_release": live["id"],
            },
            f"run {run_id} died while deploying {sha}: putting back {live['sha'][:7]}",
        )
    fresh = sorted(service for service, image in dead["previous_images"].items() if not image)
    if fresh or not dead["previous_images"]:
        return RepairPlan(
            None,
            f"deploy run {run_id} died while deploying {sha} to {environment}, its first deploy: no repair, "
            f"{', '.join(fresh) or 'no service'} had no container before it (nothing to put back), so "
            f"services may run {sha} or not at all beside the ones before it "
            f"({_listed(dead['previous_images'])}); push again, or put them back by hand",
            page=True,
        )
    return RepairPlan(
        {**base, "sha": "", "ref": "", "order": [0, 0], "live_release": None, "goes_live": False},
        f"run {run_id} died while deploying {sha}, the first deploy of {environment}: putting back what ran "
        f"before it ({_listed(dead['previous_images'])}); no release goes live",
    )


def repair_dead_deploys(app) -> list[int]:
    """Deploys that died after they began recreating (the sweeper failed them: worker lost)
    may have left the stack half on the new images. Each gets one repair (plan_repair): a
    deploy of what ran before it, recorded like a rollback and reported like every deploy run
    (Slack; no GitHub deployment of its own: it is no push). A dead first deploy's repair puts
    back the images that ran before opsfleet and makes no release current. Where none can be
    made (a first deploy with a service that had no container before), an escalation pages.
    A repair that then fails pages too (worker.tasks.deploy._page_failed_repair), and is never
    rolled back to the half-done stack it found. Returns the repair runs recorded."""
    ledger = app.opsfleet.ledger
    configured = app.opsfleet.config.deploy.environments
    repairs = []
    for dead in ledger.releases_of_dead_deploys():
        environment = dead["environment"]
        run = ledger.get_run(dead["run_id"]) or {"id": dead["run_id"], "trigger": "manual", "params": {}}
        plan = plan_repair(
            dead, run.get("params") or {}, ledger.current_release(environment), environment in configured
        )
        # Recorded before the release is marked failed: a sweep that stops between the two
        # finds the release again, and the dedup keys make the second recording the same run.
        if plan.params is None:
            log.warning("%s", plan.summary)
            if plan.page:
                escalate_deploy(app, ledger, run, environment, plan.summary)
        else:
            new = NewRun(
                trigger="manual",
                triggered_by=f"opsfleet (repair of run {dead['run_id']})",
                playbook="deploy",
                target=environment,
                params=plan.params,
                summary=plan.summary,
                dedup_key=f"repair:deploy:{dead['run_id']}",
            )
            repairs += _record_and_send(app, ledger, plan.summary, new)
        ledger.set_release_status(dead["run_id"], "failed")
    return repairs


def protected_release_images(ctx: StepContext) -> set[str]:
    """For cleanup: every environment's current release and its keep_releases
    rollback targets (the newest earlier releases that went live), and the images of
    deploys queued or running (one may have pulled its images and not yet started them)."""
    refs: set[str] = set()
    ledger = ctx.runtime.ledger
    for environment, env in ctx.config.deploy.environments.items():
        for run in ledger.active_deploys(environment):
            refs.update((run["params"].get("images") or {}).values())
        went_live = [r for r in ledger.list_releases(environment, limit=200) if r["live_at"] is not None]
        current = [r for r in went_live if r["current"]]
        earlier = [r for r in went_live if not r["current"]][: env.keep_releases]
        for release in current + earlier:
            refs.update(release["images"].values())
        for release in current:
            refs.update(release["previous_images"].values())
    return refs - {""}


cleanup.PROTECTED_IMAGE_PROVIDERS.append(protected_release_images)


def prune_images(ctx: StepContext) -> str:
    """After the release is live: remove this environment's images beyond the current
    release and its keep_releases rollback targets (never another environment's: every
    environment's are protected, and only this one's repositories are looked at).
    The release is live already, so a Docker error here is said, not failed on."""
    environment, env = _env(ctx)
    if not env.prune_images:
        return f"image cleanup: off (deploy.environments.{environment}.prune_images)"
    repos = sorted({r for r in (env.image_repository(s) for s in env.services) if r})
    try:
        return cleanup.remove_old_images(ctx, repos, keep=0)
    except StepFailed as err:
        return f"image cleanup skipped: {err} (the release is live; the next deploy or cleanup run tries again)"


def _health_timeout(config) -> int:
    """A migrating environment's rollback restores its database inside the health step."""
    if any(env.migrating for env in config.deploy.environments.values()):
        return max(config.worker.step_soft_timeout_seconds, config.backup.step_timeout_seconds)
    return config.worker.step_soft_timeout_seconds


PLAYBOOKS = {
    "deploy": (
        Step("lock", lock),
        Step("validate", validate),
        Step("backup", backup, timeout=lambda config: config.backup.step_timeout_seconds),
        Step("pull", pull),
        Step("recreate", recreate),
        Step("health", health, timeout=_health_timeout),
        Step("record", record),
        Step("prune_images", prune_images),
    ),
}
