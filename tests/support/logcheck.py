"""Reads a log and every rotated file beside it back as sequence numbers: the rotation tests' and the bench's check."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from worker.adapters.logfiles import open_decompressed

_ROTATED = re.compile(r"\.\d{8}-\d{4,}(\.zst|\.gz)?$|\.\d+(\.gz)?$")


@dataclass
class Audit:
    files: list[str]
    lines: int
    missing: list[int]
    duplicated: list[int]
    nul_bytes: int
    garbled: int

    @property
    def clean(self) -> bool:
        return not (self.missing or self.duplicated or self.nul_bytes or self.garbled)


def audit(live: Path, expected: int) -> Audit:
    """Every line of `live` and its rotated siblings (decompressed): which of 0..expected-1 are missing or doubled."""
    files = [live] if live.exists() else []
    files += sorted(
        p
        for p in live.parent.iterdir()
        if p.name.startswith(live.name + ".") and _ROTATED.search(p.name[len(live.name) :])
    )
    seen: Counter[int] = Counter()
    nul = garbled = lines = 0
    for path in files:
        with open_decompressed(path) as reader:
            data = reader.read()
        nul += data.count(b"\0")
        for line in data.replace(b"\0", b"").split(b"\n"):
            if not line:
                continue
            lines += 1
            head = line.split(b" ", 1)[0]
            if head.isdigit() and len(line) == 70:
                seen[int(head)] += 1
            else:
                garbled += 1
    return Audit(
        files=[p.name for p in files],
        lines=lines,
        missing=[i for i in range(expected) if i not in seen],
        duplicated=sorted(i for i, n in seen.items() if n > 1),
        nul_bytes=nul,
        garbled=garbled,
    )
