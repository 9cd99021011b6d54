"""The README's Guarantees table names real tests: each `file.py::test_name` (and each bare
`file.py`) it cites exists, so a renamed or deleted test cannot leave a promise unproved."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def guarantees_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Guarantees")
    return text[start : text.index("\n## ", start + 1)]


def test_every_test_the_guarantees_cite_exists():
    section = guarantees_section()
    cited, current = [], None
    for match in re.finditer(r"`(?:(test_\w+\.py)(?:::(test_\w+))?|::(test_\w+))`", section):
        file, name, same_file = match.groups()
        current = file or current
        cited.append((current, name or same_file))
    assert len(cited) >= 25, cited
    for file, name in cited:
        source = (REPO / "tests" / file).read_text()
        if name:
            assert re.search(rf"^def {name}\(", source, re.M), f"README cites {file}::{name}, which does not exist"
