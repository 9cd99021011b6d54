"""Where prometheus-client's multiprocess mode keeps its files.

Kept apart from `metrics` because it must run before prometheus_client is
first imported: the library picks its value class at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(path: Path, wipe: bool = False) -> Path:
    """Point this process (and its children) at a metrics directory.

    An explicit PROMETHEUS_MULTIPROC_DIR in the environment wins. `wipe`
    clears samples of processes from an earlier start of the fleet.
    """
    chosen = Path(os.environ.setdefault(MULTIPROC_ENV, str(path)))
    chosen.mkdir(parents=True, exist_ok=True)
    if wipe:
        for stale in chosen.glob("*.db"):
            stale.unlink(missing_ok=True)
    return chosen
