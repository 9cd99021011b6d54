"""Backup retention, grandfather-father-son: a pure decision, (backups, policy, now) -> keep/forget.

Exactly what it does, per series (each series is decided on its own):

1. Backups are ordered by the manifest's timestamp (`taken_at`, an instant),
   newest first; never by file or directory name. Ties: the larger id first.
2. Only *verified* backups fill the rules below. A backup whose verification
   failed is forgotten, except when it is newer than the newest verified one
   (kept for inspection, it never takes a rule's slot).
3. Periods are calendar periods in the policy's time zone (IANA, e.g.
   Europe/Berlin): a day is the local date, a week an ISO week (Monday to
   Sunday, `%G-W%V`), a month the local year-month. A backup taken at 01:00
   local on the 1st belongs to the 1st, whatever UTC says.
4. `daily: N` keeps the newest backup of each of the newest N days **that have
   a backup** (as restic's --keep-daily): a day without backups (ten missed
   days) does not use up a slot, so a gap in backups never deletes more.
   `weekly` and `monthly` likewise with ISO weeks and months.
5. The rules **overlap, as in restic** (not add, as in Borg): every rule
   looks at all verified backups; one backup kept by the daily and the weekly
   rule uses a slot of each. Keep counts are therefore at most
   daily + weekly + monthly, usually fewer.
6. Whatever the rules say, the newest verified backup is kept, and so are the
   newest `min_count` verified backups.
7. A backup dated after `now` (clock skew) is kept and takes no slot.

A set (one directory holding several series) is deleted only when every item
in it is forgotten: `set_decisions` says which sets go.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Backup:
    """One series' item in a backup set, as its manifest describes it."""

    set_id: str
    series: str
    taken_at: datetime  # timezone-aware, from the manifest
    verified: bool = True


@dataclass(frozen=True)
class Policy:
    daily: int = 30
    weekly: int = 12
    monthly: int = 12
    min_count: int = 3
    timezone: str = "UTC"


@dataclass(frozen=True)
class Decision:
    backup: Backup
    keep: bool
    reasons: tuple[str, ...] = field(default=())

    def describe(self, tz: str = "UTC") -> str:
        local = self.backup.taken_at.astimezone(ZoneInfo(tz))
        verdict = "keep  " if self.keep else "forget"
        return f"{verdict} {self.backup.series} {self.backup.set_id} ({local:%Y-%m-%d %H:%M %Z}): {'; '.join(self.reasons)}"


def _periods(moment: datetime, tz: ZoneInfo) -> dict[str, str]:
    local = moment.astimezone(tz)
    year, week, _ = local.isocalendar()
    return {"daily": f"{local:%Y-%m-%d}", "weekly": f"{year}-W{week:02d}", "monthly": f"{local:%Y-%m}"}


def decide(backups: Iterable[Backup], policy: Policy, now: datetime) -> list[Decision]:
    """Keep/forget for the backups of ONE series, newest first, each with its reasons."""
    items = sorted(backups, key=lambda b: (b.taken_at, b.set_id), reverse=True)
    series = {b.series for b in items}
    if len(series) > 1:
        raise ValueError(f"decide() takes one series at a time, got {sorted(series)}")
    if now.tzinfo is None or any(b.taken_at.tzinfo is None for b in items):
        raise ValueError("retention needs timezone-aware timestamps")
    tz = ZoneInfo(policy.timezone)
    reasons: dict[int, list[str]] = defaultdict(list)

    verified = [i for i, b in enumerate(items) if b.verified and b.taken_at <= now]
    newest_verified = verified[0] if verified else None

    for i, b in enumerate(items):
        if b.taken_at > now:
            reasons[i].append(f"dated after now ({now:%Y-%m-%d %H:%M} UTC): clock skew? kept")
        elif not b.verified:
            if newest_verified is None or b.taken_at > items[newest_verified].taken_at:
                reasons[i].append("not verified, newer than the newest verified backup: kept for inspection")

    for rule, count in (("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly)):
        last = None
        left = count
        for i in verified:
            if left <= 0:
                break
            period = _periods(items[i].taken_at, tz)[rule]
            if period != last:
                reasons[i].append(f"{rule} {period}")
                last = period
                left -= 1

    if newest_verified is not None:
        reasons[newest_verified].append("newest verified")
    for rank, i in enumerate(verified[: policy.min_count], start=1):
        if rank > 1 or newest_verified != i:
            reasons[i].append(f"minimum count ({rank} of {policy.min_count})")

    decisions = []
    for i, b in enumerate(items):
        if reasons[i]:
            decisions.append(Decision(b, True, tuple(reasons[i])))
        elif not b.verified:
            decisions.append(Decision(b, False, ("not verified, older than the newest verified backup",)))
        else:
            decisions.append(Decision(b, False, ("no rule keeps it",)))
    return decisions


def decide_all(
    backups: Iterable[Backup], policies: Mapping[str, Policy], default: Policy, now: datetime
) -> list[Decision]:
    """Every series decided with its own policy; newest first within each series, series by name."""
    by_series: dict[str, list[Backup]] = defaultdict(list)
    for b in backups:
        by_series[b.series].append(b)
    out: list[Decision] = []
    for name in sorted(by_series):
        out.extend(decide(by_series[name], policies.get(name, default), now))
    return out


def set_decisions(decisions: Iterable[Decision]) -> dict[str, bool]:
    """set id -> True when the set stays (any of its items is kept)."""
    stays: dict[str, bool] = {}
    for d in decisions:
        stays[d.backup.set_id] = stays.get(d.backup.set_id, False) or d.keep
    return stays
