"""Which images cleanup removes, as a table."""

from __future__ import annotations

import pytest

from worker.cleanup_policy import Image, images_to_remove, repository_of


def img(n: int, *tags: str) -> Image:
    return Image(f"sha256:{n:064x}", tags, f"2026-11-{n:02d}T10:00:00.000000000Z")


IMAGES = [
    img(1, "shop/api:v1"),
    img(2, "shop/api:v2"),
    img(3, "shop/api:v3"),
    img(4, "shop/api:v4"),
    img(5, "shop/api:v5"),
    img(6, "shop/api:v6", "shop/api:latest"),
]


def test_keep_newest_running_and_protected_remove_the_rest():
    verdicts = images_to_remove(
        IMAGES,
        keep=2,
        in_use={img(4).id: "shop_api_1"},
        protected={"shop/api:v2"},
    )
    assert [(v.label, v.action, v.reason) for v in verdicts] == [
        ("shop/api:v6, shop/api:latest", "keep", "#1 newest (keep=2)"),
        ("shop/api:v5", "keep", "#2 newest (keep=2)"),
        ("shop/api:v4", "keep", "used by container shop_api_1"),  # the current release, after a rollback
        ("shop/api:v3", "remove", "#4 newest, beyond keep=2"),
        ("shop/api:v2", "keep", "protected (shop/api:v2)"),  # a rollback target
        ("shop/api:v1", "remove", "#6 newest, beyond keep=2"),
    ]


@pytest.mark.parametrize(
    "reference, protects",
    [
        ("shop/api:v1", True),
        (img(1).id, True),  # full id
        (img(1).id[7:19], True),  # short id (12 hex)
        ("shop/api", False),  # means shop/api:latest, which is v6
        ("shop/api:v10", False),
        ("0000", False),  # too short to be an id
    ],
)
def test_protected_references(reference, protects):
    verdict = images_to_remove(
        [img(1, "shop/api:v1"), img(6, "shop/api:latest")], keep=1, in_use={}, protected={reference}
    )
    assert (verdict[1].action == "keep") is protects


@pytest.mark.parametrize(
    "reference, repository",
    [
        ("shop/api:1.2", "shop/api"),
        ("127.0.0.1:5000/shop/api:1.2", "127.0.0.1:5000/shop/api"),
        ("127.0.0.1:5000/shop/api", "127.0.0.1:5000/shop/api"),
        ("api", "api"),
        ("api@sha256:abc", "api"),
    ],
)
def test_repository_of(reference, repository):
    assert repository_of(reference) == repository
