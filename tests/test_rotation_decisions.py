"""Rotation's pure decisions, as tables a reader can check by eye."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.rotation import (
    Rotated,
    next_rotated_name,
    parse_rotated,
    parse_size,
    parse_span,
    retention,
    rotation_due,
    to_compress,
)

NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
H, D = timedelta(hours=1), timedelta(days=1)


@pytest.mark.parametrize(
    "existing, now, expected",
    [
        ([], NOW, "app.log.20261203-0001"),
        (["app.log.20261203-0001.zst"], NOW, "app.log.20261203-0002"),  # compressed ones count
        (["app.log.20261203-0001.zst", "app.log.20261203-0002"], NOW, "app.log.20261203-0003"),
        (["app.log.20261202-0007.gz"], NOW, "app.log.20261203-0001"),  # a new day starts at 1
        (["app.log.20261203-0009", "other.log.20261203-0042"], NOW, "app.log.20261203-0010"),
        (["app.log.20261203-9999"], NOW, "app.log.20261203-10000"),  # past 4 digits: still unique
    ],
)
def test_next_rotated_name(existing, now, expected):
    assert next_rotated_name("app.log", existing, now) == expected


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("app.log.20261203-0002", ("20261203", 2, "")),
        ("app.log.20261203-0002.zst", ("20261203", 2, ".zst")),
        ("app.log.20261203-0002.gz", ("20261203", 2, ".gz")),
        ("app.log.20261203-0002.zst.partial", None),
        ("app.log.1", None),  # logrotate's names are not ours
        ("app.log", None),
        ("xapp.log.20261203-0002", None),
    ],
)
def test_parse_rotated(name, parsed):
    got = parse_rotated("app.log", name)
    assert (got and (got.day, got.seq, got.suffix)) == parsed


def test_names_sort_in_rotation_order():
    names = ["app.log.20261203-0010", "app.log.20261203-0002", "app.log.20261130-0001", "app.log.20261203-0001"]
    assert sorted(names) == [
        "app.log.20261130-0001",
        "app.log.20261203-0001",
        "app.log.20261203-0002",
        "app.log.20261203-0010",
    ]


@pytest.mark.parametrize(
    "size, last, max_size, every, due",
    [
        (0, NOW - 2 * D, 100, D, None),  # empty: never (a writer that did not reopen)
        (99, NOW, 100, None, None),
        (100, NOW, 100, None, "size 100 B ≥ max_size 100 B"),
        (5, NOW - D, None, D, "last rotated 2026-12-02 18:00:00 UTC, every 1d"),
        (5, NOW - D + timedelta(seconds=1), None, D, None),
        (5, None, None, D, None),  # never seen before: the age counts from now
        (500, NOW - 2 * D, 100, D, "size 500 B ≥ max_size 100 B"),  # either trigger suffices
        (5, NOW - 2 * H, 100, H, "last rotated 2026-12-03 16:00:00 UTC, every 1h"),
    ],
)
def test_rotation_due(size, last, max_size, every, due):
    assert rotation_due(size=size, last_rotated=last, now=NOW, max_size=max_size, every=every) == due


def _files(*specs):
    return [Rotated(name, NOW - age, held) for name, age, held in specs]


def test_compress_skips_held_and_newest_when_delayed():
    files = _files(
        ("app.log.20261203-0003", H, False),  # newest
        ("app.log.20261203-0002", 2 * H, True),  # its writer has not let go
        ("app.log.20261203-0001", 3 * H, False),
        ("app.log.20261202-0001.zst", D, False),  # done already
    )
    assert [
        (v.name, v.action, v.reason) for v in to_compress("app.log", files, method="zstd", compress_newest=False)
    ] == [
        ("app.log.20261203-0003", "keep", "newest rotated file: compressed next cycle"),
        ("app.log.20261203-0002", "keep", "still held open by its writer"),
        ("app.log.20261203-0001", "compress", "zstd"),
    ]
    assert [v.action for v in to_compress("app.log", files, method="zstd", compress_newest=True)] == [
        "compress",
        "keep",
        "compress",
    ]
    assert to_compress("app.log", files, method="none", compress_newest=True) == []


def test_retention_by_count_and_age():
    files = _files(
        ("app.log.20261203-0002", 1 * H, False),
        ("app.log.20261203-0001.zst", 5 * H, False),
        ("app.log.20261201-0001.zst", 2 * D + H, False),  # older than max_age
        ("app.log.20261130-0001.zst", 3 * D, True),  # beyond keep, but still held open
        ("app.log.20261129-0001.zst", 4 * D, False),  # beyond keep
        ("unrelated.log.20261129-0001", 9 * D, False),  # not this file's
    )
    got = [(v.name, v.action, v.reason) for v in retention("app.log", files, keep=4, max_age=2 * D, now=NOW)]
    assert got == [
        ("app.log.20261203-0002", "keep", "#1 newest, within 2d"),
        ("app.log.20261203-0001.zst", "keep", "#2 newest, within 2d"),
        ("app.log.20261201-0001.zst", "remove", "older than max_age 2d (2026-12-01 17:00 UTC)"),
        ("app.log.20261130-0001.zst", "keep", "would be removed, but a process still holds it open"),
        ("app.log.20261129-0001.zst", "remove", "beyond keep=4 (#5 newest)"),
    ]


@pytest.mark.parametrize(
    "text, size",
    [
        (1024, 1024),
        ("100", 100),
        ("1K", 1024),
        ("100M", 100 * 1024**2),
        ("100MiB", 100 * 1024**2),
        ("1.5G", 1536 * 1024**2),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, seconds", [(3600, 3600), ("30s", 30), ("15m", 900), ("12h", 43200), ("1d", 86400), ("2w", 1209600)]
)
def test_parse_span(text, seconds):
    assert parse_span(text).total_seconds() == seconds


@pytest.mark.parametrize("bad", ["10Q", "", "-1", "1 day"])
def test_bad_sizes_and_spans_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="is not a"):
        parse_size(bad) if bad != "1 day" else parse_span(bad)
