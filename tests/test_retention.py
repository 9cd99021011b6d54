"""Retention as tables: each case lists backups (newest first, by instant) with the verdict
and the reasons the pure function must give. Read a table by eye against worker/retention.py's
rules: periods are local (policy time zone), rules overlap as in restic, only verified backups
fill slots, the newest verified backup and the newest `min_count` are always kept.

Row format:  set id | taken at (UTC) | v(erified) or x | keep/forget | reasons joined by "; "
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.retention import Backup, Policy, decide, decide_all, set_decisions


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _parse(table: str, series: str = "db") -> tuple[list[Backup], list[tuple[str, str, str]]]:
    backups, expected = [], []
    for line in table.strip().splitlines():
        set_id, taken, ok, verdict, reasons = (c.strip() for c in line.split("|"))
        backups.append(Backup(set_id, series, _utc(taken), ok == "v"))
        expected.append((set_id, verdict, reasons))
    return backups, expected


def check(policy: Policy, now: str, table: str) -> None:
    backups, expected = _parse(table)
    # The input order must not matter: feed it reversed and shuffled by name.
    got = decide(sorted(backups, key=lambda b: b.set_id), policy, _utc(now))
    actual = [(d.backup.set_id, "keep" if d.keep else "forget", "; ".join(d.reasons)) for d in got]
    assert actual == expected, "\n" + "\n".join(f"{a}\n   expected {e}" for a, e in zip(actual, expected, strict=False))


BERLIN_DAILY_3 = Policy(daily=3, weekly=0, monthly=0, min_count=0, timezone="Europe/Berlin")


def test_dst_spring_forward_berlin_2025_03_30_days_are_local_days():
    # 02:00 CET jumps to 03:00 CEST. "e" is 2025-03-30 in UTC but 03-31 00:30 in Berlin.
    check(
        BERLIN_DAILY_3,
        "2025-03-31T06:00Z",
        """
        e | 2025-03-30T22:30Z | v | keep   | daily 2025-03-31; newest verified
        d | 2025-03-30T01:30Z | v | keep   | daily 2025-03-30
        c | 2025-03-30T00:30Z | v | forget | no rule keeps it
        b | 2025-03-29T22:30Z | v | keep   | daily 2025-03-29
        a | 2025-03-28T23:30Z | v | forget | no rule keeps it
    """,
    )


def test_dst_fall_back_berlin_2025_10_26_repeated_hour_ordered_by_instant_not_name():
    # 03:00 CEST falls back to 02:00 CET: two backups at 02:30 local wall time.
    # Their names sort the wrong way round; the later instant is the day's newest.
    check(
        Policy(daily=2, weekly=0, monthly=0, min_count=0, timezone="Europe/Berlin"),
        "2025-10-27T06:00Z",
        """
        j             | 2025-10-26T23:00Z | v | keep   | daily 2025-10-27; newest verified
        a-0230-second | 2025-10-26T01:30Z | v | keep   | daily 2025-10-26
        b-0230-first  | 2025-10-26T00:30Z | v | forget | no rule keeps it
        f             | 2025-10-25T22:30Z | v | forget | no rule keeps it
    """,
    )


def test_iso_week_2026_w01_spans_two_years_and_rules_overlap():
    # 2026-W01 is Mon 2025-12-29 .. Sun 2026-01-04. 2025-12-31 is in week 2026-W01 but month 2025-12.
    # "o" fills a weekly and a monthly slot at once (overlap, as restic).
    check(
        Policy(daily=0, weekly=3, monthly=2, min_count=0, timezone="Europe/Berlin"),
        "2026-01-05T18:00Z",
        """
        o | 2026-01-05T11:00Z | v | keep   | weekly 2026-W02; monthly 2026-01; newest verified
        n | 2026-01-04T11:00Z | v | keep   | weekly 2026-W01
        m | 2025-12-31T11:00Z | v | keep   | monthly 2025-12
        l | 2025-12-29T11:00Z | v | forget | no rule keeps it
        k | 2025-12-28T11:00Z | v | keep   | weekly 2025-W52
    """,
    )


def test_rules_overlap_like_restic_not_add_like_borg():
    # daily 2 + weekly 2 over ten days Fri 06-06 .. Sun 06-15 (weeks W23, W24).
    # Overlap keeps 3 (06-15 counts for daily and weekly). Borg's adding rules would keep 4
    # (weekly would skip the days daily kept and take 06-13 as well).
    check(
        Policy(daily=2, weekly=2, monthly=0, min_count=0),
        "2025-06-15T12:00Z",
        """
        d15 | 2025-06-15T02:00Z | v | keep   | daily 2025-06-15; weekly 2025-W24; newest verified
        d14 | 2025-06-14T02:00Z | v | keep   | daily 2025-06-14
        d13 | 2025-06-13T02:00Z | v | forget | no rule keeps it
        d12 | 2025-06-12T02:00Z | v | forget | no rule keeps it
        d11 | 2025-06-11T02:00Z | v | forget | no rule keeps it
        d10 | 2025-06-10T02:00Z | v | forget | no rule keeps it
        d09 | 2025-06-09T02:00Z | v | forget | no rule keeps it
        d08 | 2025-06-08T02:00Z | v | keep   | weekly 2025-W23
        d07 | 2025-06-07T02:00Z | v | forget | no rule keeps it
        d06 | 2025-06-06T02:00Z | v | forget | no rule keeps it
    """,
    )


def test_month_end_with_a_backup_at_0100_local_belongs_to_the_local_month():
    # q is 2025-07-01 01:00 CEST = 2025-06-30 23:00 UTC: July, not June. June's newest is p.
    check(
        Policy(daily=0, weekly=0, monthly=2, min_count=0, timezone="Europe/Berlin"),
        "2025-07-02T06:00Z",
        """
        r | 2025-07-01T23:00Z | v | keep   | monthly 2025-07; newest verified
        q | 2025-06-30T23:00Z | v | forget | no rule keeps it
        p | 2025-06-29T23:00Z | v | keep   | monthly 2025-06
    """,
    )


def test_ten_missed_days_then_a_failed_backup_delete_nothing_more():
    # Backups 01-01..01-10, none 01-11..01-20, then 01-21's backup failed verification.
    # Days without backups use no slot; the failed one takes none and is kept for inspection.
    check(
        Policy(daily=5, weekly=0, monthly=0, min_count=3),
        "2025-01-21T03:00Z",
        """
        t21 | 2025-01-21T02:00Z | x | keep   | not verified, newer than the newest verified backup: kept for inspection
        t10 | 2025-01-10T02:00Z | v | keep   | daily 2025-01-10; newest verified
        t09 | 2025-01-09T02:00Z | v | keep   | daily 2025-01-09; minimum count (2 of 3)
        t08 | 2025-01-08T02:00Z | v | keep   | daily 2025-01-08; minimum count (3 of 3)
        t07 | 2025-01-07T02:00Z | v | keep   | daily 2025-01-07
        t06 | 2025-01-06T02:00Z | v | keep   | daily 2025-01-06
        t05 | 2025-01-05T02:00Z | x | forget | not verified, older than the newest verified backup
        t04 | 2025-01-04T02:00Z | v | forget | no rule keeps it
        t01 | 2025-01-01T02:00Z | v | forget | no rule keeps it
    """,
    )


def test_newest_verified_and_minimum_count_survive_rules_that_keep_nothing():
    check(
        Policy(daily=0, weekly=0, monthly=0, min_count=2),
        "2025-05-01T00:00Z",
        """
        c | 2025-04-03T02:00Z | x | keep   | not verified, newer than the newest verified backup: kept for inspection
        b | 2025-04-02T02:00Z | v | keep   | newest verified
        a | 2025-04-01T02:00Z | v | keep   | minimum count (2 of 2)
        z | 2025-03-01T02:00Z | v | forget | no rule keeps it
    """,
    )


def test_a_backup_dated_in_the_future_is_kept_and_takes_no_slot():
    check(
        Policy(daily=1, weekly=0, monthly=0, min_count=0),
        "2025-05-01T12:00Z",
        """
        f | 2025-05-02T02:00Z | v | keep   | dated after now (2025-05-01 12:00 UTC): clock skew? kept
        b | 2025-05-01T02:00Z | v | keep   | daily 2025-05-01; newest verified
        a | 2025-04-30T02:00Z | v | forget | no rule keeps it
    """,
    )


def test_three_series_in_one_directory_a_set_stays_while_any_item_is_kept():
    t = _utc
    sets = {
        "20250103T020000Z": ("db", "documents"),
        "20250102T020000Z": ("db", "documents"),
        "20250101T020000Z": ("db", "documents", "models"),
        "20241225T020000Z": ("db", "documents", "models"),
    }
    backups = [
        Backup(sid, series, t(f"{sid[:4]}-{sid[4:6]}-{sid[6:8]}T02:00Z"))
        for sid, items in sets.items()
        for series in items
    ]
    policies = {
        "db": Policy(daily=2, weekly=0, monthly=0, min_count=0),
        "documents": Policy(daily=1, weekly=0, monthly=0, min_count=0),
        "models": Policy(daily=0, weekly=1, monthly=0, min_count=0),
    }
    got = decide_all(backups, policies, Policy(), t("2025-01-03T12:00Z"))
    table = [(d.backup.series, d.backup.set_id, d.keep, "; ".join(d.reasons)) for d in got]
    assert table == [
        ("db",        "20250103T020000Z", True,  "daily 2025-01-03; newest verified"),
        ("db",        "20250102T020000Z", True,  "daily 2025-01-02"),
        ("db",        "20250101T020000Z", False, "no rule keeps it"),
        ("db",        "20241225T020000Z", False, "no rule keeps it"),
        ("documents", "20250103T020000Z", True,  "daily 2025-01-03; newest verified"),
        ("documents", "20250102T020000Z", False, "no rule keeps it"),
        ("documents", "20250101T020000Z", False, "no rule keeps it"),
        ("documents", "20241225T020000Z", False, "no rule keeps it"),
        ("models",    "20250101T020000Z", True,  "weekly 2025-W01; newest verified"),
        ("models",    "20241225T020000Z", False, "no rule keeps it"),
    ]  # fmt: skip
    assert set_decisions(got) == {
        "20250103T020000Z": True,
        "20250102T020000Z": True,   # db's item keeps it
        "20250101T020000Z": True,   # only models' item keeps it
        "20241225T020000Z": False,  # every item forgotten: the directory goes
    }  # fmt: skip


def test_defaults_are_the_seeds_30_12_12():
    p = Policy()
    assert (p.daily, p.weekly, p.monthly) == (30, 12, 12)


def test_one_series_at_a_time_and_aware_times_only():
    a = Backup("a", "db", _utc("2025-01-01T00:00Z"))
    with pytest.raises(ValueError, match="one series"):
        decide([a, Backup("b", "docs", _utc("2025-01-01T00:00Z"))], Policy(), _utc("2025-01-02T00:00Z"))
    with pytest.raises(ValueError, match="timezone-aware"):
        decide([a], Policy(), datetime(2025, 1, 2))
