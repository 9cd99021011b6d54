"""Cleanup's pure decision: which images of a repository to remove.

Keep the newest `keep` images; keep, whatever their age, every image a
container uses (running or stopped: Docker would refuse anyway) and every
protected reference (the current release, rollback targets: fed by the deploy
job through worker.tasks.cleanup.PROTECTED_IMAGE_PROVIDERS, plus
cleanup.images.protect). Everything else goes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Image:
    id: str  # sha256:...
    tags: tuple[str, ...]
    created: str  # ISO 8601 as Docker gives it: sorts by time
    size: int = 0


@dataclass(frozen=True)
class ImageVerdict:
    image: Image
    action: str  # keep | remove
    reason: str

    @property
    def label(self) -> str:
        return ", ".join(self.image.tags) or self.image.id[:19]


def repository_of(reference: str) -> str:
    """ "reg:5000/shop/api:1.2" → "reg:5000/shop/api" (a colon after the last slash is the tag)."""
    name = reference.partition("@")[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def _matches(image: Image, reference: str) -> bool:
    ref = reference if ":" in reference.rsplit("/", 1)[-1] or reference.startswith("sha256:") else reference + ":latest"
    if ref in image.tags:
        return True
    bare = image.id.removeprefix("sha256:")
    want = reference.removeprefix("sha256:")
    return len(want) >= 12 and bare.startswith(want)


def images_to_remove(
    images: list[Image], *, keep: int, in_use: dict[str, str], protected: set[str]
) -> list[ImageVerdict]:
    """Verdicts for one repository's images, newest first."""
    out = []
    for rank, image in enumerate(sorted(images, key=lambda i: i.created, reverse=True), start=1):
        guard = next((ref for ref in sorted(protected) if _matches(image, ref)), None)
        if image.id in in_use:
            out.append(ImageVerdict(image, "keep", f"used by container {in_use[image.id]}"))
        elif guard:
            out.append(ImageVerdict(image, "keep", f"protected ({guard})"))
        elif rank <= keep:
            out.append(ImageVerdict(image, "keep", f"#{rank} newest (keep={keep})"))
        else:
            out.append(ImageVerdict(image, "remove", f"#{rank} newest, beyond keep={keep}"))
    return out
