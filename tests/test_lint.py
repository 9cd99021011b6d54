"""The repository is ruff-clean and ruff-formatted, with pyproject's [tool.ruff]
(the same check .github/workflows/ci.yml runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    done = ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, (
        f"ruff check found problems (fix with `ruff check --fix .`):\n{done.stdout}{done.stderr}"
    )


def test_ruff_format_is_applied():
    done = ruff("format", "--no-cache", "--check", ".")
    assert done.returncode == 0, f"files need `ruff format .`:\n{done.stdout}{done.stderr}"
