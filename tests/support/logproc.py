"""A process logging through opsfleet's logging, for the multi-process log test.

    python tests/support/logproc.py DATA_DIR ROLE COUNT
Logs COUNT events: mostly INFO with a run id, every 50th an ERROR with a long stack."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from worker.logs import configure_logging, run_context  # noqa: E402


def deep(n: int) -> None:
    if n == 0:
        raise ValueError("x" * 9000)  # one line > 8 KiB: more than one pipe or buffer write
    deep(n - 1)


def main() -> None:
    data_dir, role, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.getLogger().addHandler(logging.NullHandler())  # files only: no console noise in the test
    configure_logging(Path(data_dir), role=role)
    log = logging.getLogger("opsfleet.test")
    for i in range(count):
        with run_context(1000 + i % 7):
            if i % 50 == 0:
                try:
                    deep(60)
                except ValueError:
                    log.exception("event %s of %s", i, role)
            else:
                log.info("event %s of %s", i, role, extra={"seq": i})


if __name__ == "__main__":
    main()
