"""Backup sets on disk: `<root>/<UTC timestamp>/manifest.json` plus one or
more files per series item. A set being written is `<id>.partial` and is
never listed; it is renamed into place only after verification passed.

The manifest is the truth about a set: times (ordering is by its
timestamps, never by directory name), items with their files, sizes and
sha256, row counts and file counts, verification result.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.adapters.archive import fsync_dir
from worker.retention import Backup

MANIFEST = "manifest.json"
PARTIAL = ".partial"
FORMAT = 1


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_id_for(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class BackupSet:
    id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("items", {})

    @property
    def taken_at(self) -> datetime:
        return parse_iso(self.manifest["taken_at"])

    def item_taken_at(self, series: str) -> datetime:
        return parse_iso(self.items[series].get("taken_at") or self.manifest["taken_at"])

    def verified(self, series: str) -> bool:
        return bool(self.items[series].get("verified"))

    def size(self, series: str | None = None) -> int:
        items = [self.items[series]] if series else self.items.values()
        return sum(f["size"] for item in items for f in item.get("files", []))


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomically: a temporary file written whole and fsynced, renamed over the old one.
    On a full disk os.write() writes what fits and says so by its count, not an error: the
    file object writes to the end or raises (ENOSPC), and the old manifest stays."""
    tmp = folder / (MANIFEST + ".tmp")
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def list_sets(root: Path) -> list[BackupSet]:
    """Complete sets holding at least one item, newest first by manifest time."""
    found = []
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name.endswith(PARTIAL) or entry.name.startswith("."):
            continue
        try:
            manifest = read_manifest(entry)
        except (OSError, ValueError):
            continue  # not a set (or a damaged manifest: `backup verify` reports it)
        if manifest.get("state") != "complete" or not manifest.get("items"):
            continue
        found.append(BackupSet(entry.name, entry, manifest))
    found.sort(key=lambda s: (s.taken_at, s.id), reverse=True)
    return found


def partial_sets(root: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.endswith(PARTIAL):
            try:
                out.append((entry, read_manifest(entry)))
            except (OSError, ValueError):
                out.append((entry, None))
    return out


def get_set(root: Path, set_id: str) -> BackupSet | None:
    for s in list_sets(root):
        if s.id == set_id:
            return s
    return None


def retention_inputs(sets: list[BackupSet]) -> list[Backup]:
    return [Backup(s.id, series, s.item_taken_at(series), s.verified(series)) for s in sets for series in s.items]


def forget_item(backup_set: BackupSet, series: str, reasons: str, now: datetime) -> bool:
    """Delete one series' files from a set; the set directory goes with its
    last item. Returns True when the directory was removed."""
    item = backup_set.items.get(series)
    if item is None:
        return False
    remaining = {k: v for k, v in backup_set.items.items() if k != series}
    if not remaining:
        # Last item: the manifest first, so a crash halfway leaves no set that lists missing files.
        (backup_set.path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(backup_set.path, ignore_errors=True)
        fsync_dir(backup_set.path.parent)
        return True
    manifest = dict(backup_set.manifest)
    manifest["items"] = remaining
    manifest.setdefault("pruned", {})[series] = {"at": iso(now), "reasons": reasons}
    write_manifest(backup_set.path, manifest)  # the item leaves the manifest before its files go
    for top in {f["name"].split("/")[0] for f in item.get("files", [])}:
        target = backup_set.path / top
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    backup_set.manifest = manifest
    return False


def mark_unverified(backup_set: BackupSet, series: str, detail: str, now: datetime) -> None:
    """Record that an item did not read back (a restore's check, the drill): `restore --latest`
    passes it over from then on, and retention no longer counts it as the newest verified
    backup; `opsfleet backup verify` judges it again. The manifest is read afresh first, so
    what prune or verify wrote since the set was listed is kept. OSError: not recorded."""
    manifest = read_manifest(backup_set.path)
    item = manifest.get("items", {}).get(series)
    if item is None:
        return
    item["verified"] = False
    item["verification"] = {"at": iso(now), "detail": detail}
    write_manifest(backup_set.path, manifest)
    backup_set.manifest = manifest


def newest_holding(sets: list[BackupSet], series: str, verified_only: bool = True) -> BackupSet | None:
    for s in sets:  # newest first
        if series in s.items and (s.verified(series) or not verified_only):
            return s
    return None
