"""Cleanup playbook: Docker images, old rotated logs, old ledger runs, backups.

Each step says what it removed and how much space came back; with the run
param `dry_run` it says what it would remove and removes nothing.

Images: dangling ones, and in each configured repository (cleanup.images.
repositories, plus the repository of each cleanup.images.services container)
those beyond the newest `keep`, never one a container uses, never a protected
reference. Protected references are cleanup.images.protect plus whatever the
functions in PROTECTED_IMAGE_PROVIDERS return: the deploy job registers one
there that names the current release and the rollback targets.

Backups: their retention belongs to the backup job; this step calls its prune
(worker.tasks.backup.prune), which never deletes beyond the retention policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from worker.adapters import metrics
from worker.adapters.docker import DockerError
from worker.adapters.ledger import LedgerUnavailable, utcnow
from worker.cleanup_policy import Image, images_to_remove, repository_of
from worker.tasks.steps import Step, StepContext, StepFailed

# Functions (StepContext) -> image references (repo:tag or id) that must never be removed.
PROTECTED_IMAGE_PROVIDERS: list[Callable[[StepContext], Iterable[str]]] = []


def protected_images(ctx: StepContext) -> set[str]:
    refs = set(ctx.config.cleanup.images.protect)
    for provider in PROTECTED_IMAGE_PROVIDERS:
        refs.update(provider(ctx))
    return refs


def _dry(ctx: StepContext) -> bool:
    return bool(ctx.params.get("dry_run"))


def _layers_size(ctx: StepContext) -> int:
    """The image store's size on disk as the daemon counts it (shared layers once)."""
    return int(ctx.runtime.docker.client.api.df().get("LayersSize") or 0)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def dangling_images(ctx: StepContext) -> str:
    if not ctx.config.cleanup.images.dangling:
        return "dangling images: off (cleanup.images.dangling)"
    docker = ctx.runtime.docker
    try:
        in_use = docker.images_in_use()
        found = [i for i in docker.dangling_images() if i.id not in in_use]
        if _dry(ctx):
            lines = [f"would remove dangling {i.id[:19]} ({_mib(i.size)})" for i in found]
            return "\n".join(lines + [f"would remove {len(found)} dangling images"])
        removed, reclaimed = docker.prune_dangling()  # the daemon skips any a container uses
    except DockerError as err:
        raise StepFailed(str(err)) from None
    gone = set(removed)  # image ids and their layers' ids
    images = [i.id for i in found if i.id in gone]
    metrics.CLEANUP_REMOVED.labels("dangling_image").inc(len(images))
    metrics.CLEANUP_RECLAIMED_BYTES.labels("dangling_image").inc(reclaimed)
    lines = [f"removed dangling {i[:19]}" for i in images]
    return "\n".join(lines + [f"removed {len(images)} dangling images, reclaimed {reclaimed} B ({_mib(reclaimed)})"])


def _repositories(ctx: StepContext) -> list[str]:
    settings = ctx.config.cleanup.images
    repos = list(settings.repositories)
    for service in settings.services:
        docker = ctx.runtime.docker
        container = docker.find_container(service, ctx.config.services[service])
        for tag in docker.container_image(container).tags:
            repos.append(repository_of(tag))
    return sorted(set(repos))


def old_images(ctx: StepContext) -> str:
    try:
        repos = _repositories(ctx)
    except DockerError as err:
        raise StepFailed(str(err)) from None
    if not repos:
        return "old images: no repositories configured (cleanup.images.repositories / services)"
    return remove_old_images(ctx, repos, keep=ctx.config.cleanup.images.keep, dry=_dry(ctx))


def remove_old_images(ctx: StepContext, repos: Iterable[str], *, keep: int, dry: bool = False) -> str:
    """In each repository, remove the images beyond the newest `keep` that no container
    uses and no protected reference names (every environment's release and rollback
    targets among them). One line per image and a total; DockerError → StepFailed.
    The scheduled cleanup and a deploy's own image cleanup both come here."""
    docker = ctx.runtime.docker
    out, doomed = [], []
    try:
        in_use = docker.images_in_use()
        protected = protected_images(ctx)
        for repo in repos:
            images = [
                Image(i.id, tuple(t for t in i.tags if repository_of(t) == repo) or i.tags, i.created, i.size)
                for i in docker.images(repo)
            ]
            for v in images_to_remove(images, keep=keep, in_use=in_use, protected=protected):
                out.append(f"{repo}: {'keep' if v.action == 'keep' else 'remove'} {v.label}: {v.reason}")
                if v.action == "remove":
                    doomed.append(v.image)
        if dry:
            return "\n".join(out + [f"would remove {len(doomed)} images"])
        before = _layers_size(ctx)
        removed = 0
        for image in doomed:
            try:
                # Only this repository's tags: the image stays if another repository still names it.
                for tag in image.tags:
                    docker.untag(tag)
                removed += 1
            except DockerError as err:
                out.append(f"kept {', '.join(image.tags)}: {err}")
        reclaimed = max(0, before - _layers_size(ctx))
    except DockerError as err:
        raise StepFailed(str(err)) from None
    metrics.CLEANUP_REMOVED.labels("image").inc(removed)
    metrics.CLEANUP_RECLAIMED_BYTES.labels("image").inc(reclaimed)
    return "\n".join(out + [f"removed {removed} images, reclaimed {reclaimed} B ({_mib(reclaimed)})"])


def old_logs(ctx: StepContext) -> str:
    """Retention of every log set's rotated files: the rotation job's own step, for all sets."""
    from worker.tasks.rotate import all_sets, log_sets, retain_sets

    sets = log_sets(ctx, sorted(all_sets(ctx.config, ctx.runtime.loaded.data_dir).items()))
    return retain_sets(sets, _dry(ctx))


def old_runs(ctx: StepContext) -> str:
    max_age = ctx.config.cleanup.runs_max_age
    if max_age is None:
        return "old runs: kept forever (cleanup.runs_max_age: null)"
    cutoff = utcnow() - timedelta(seconds=max_age)
    try:
        pruned = ctx.runtime.ledger.prune_runs(cutoff, dry_run=_dry(ctx))
    except LedgerUnavailable as err:
        raise StepFailed(str(err)) from None
    if _dry(ctx):
        return f"would remove finished runs that ended before {cutoff:%Y-%m-%d %H:%M} UTC (first batch: {pruned.runs} runs)"
    metrics.CLEANUP_REMOVED.labels("ledger_run").inc(pruned.runs)
    return (
        f"removed {pruned.runs} runs, {pruned.steps} steps and {pruned.events} events that ended before "
        f"{cutoff:%Y-%m-%d %H:%M} UTC; their counts stay in run_archive"
    )


def backups(ctx: StepContext) -> str:
    """Backup retention, by the backup job's own prune: never a copy of it, so
    cleanup can never delete beyond the retention policy."""
    from worker.tasks import backup

    if not ctx.config.backup.series:
        return "backup retention: no backup series configured"
    lines = backup.prune(ctx.config, backup.backup_root(ctx), dry_run=_dry(ctx))
    return "backup retention:\n" + ("\n".join(lines) or "no backups yet")


PLAYBOOKS = {
    # Each kind of old thing on its own: a Docker daemon that is down keeps no log, run or
    # backup from its cleanup (the run still ends failed, naming the step).
    "cleanup": (
        Step("dangling_images", dangling_images, carry_on=True),
        Step("old_images", old_images, carry_on=True),
        Step("old_logs", old_logs, carry_on=True),
        Step("old_runs", old_runs, carry_on=True),
        Step("backups", backups, carry_on=True),
    ),
}
