"""A writer of sequence-numbered lines, for rotation tests and bench/rotation.

    python tests/support/seqwriter.py PATH --rate 20000 --seconds 10 [--no-append] [--reopen-on-hup]

Line i is written at start + i/rate, one write() per line. With --reopen-on-hup
it reopens PATH after SIGHUP (a rename+reopen writer); without it, it never
reopens (a copytruncate writer). --no-append opens without O_APPEND (seeking to
the end once, as many loggers do). On exit it prints the number of lines written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

PAD = "x" * 60


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--rate", type=float, default=20000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--reopen-on-hup", action="store_true")
    args = parser.parse_args()
    flags = os.O_WRONLY | os.O_CREAT | (0 if args.no_append else os.O_APPEND)

    def open_log() -> int:
        fd = os.open(args.path, flags, 0o644)
        if args.no_append:
            os.lseek(fd, 0, os.SEEK_END)
        return fd

    reopen = False

    def on_hup(_signum, _frame) -> None:
        nonlocal reopen
        reopen = True

    signal.signal(signal.SIGHUP, on_hup if args.reopen_on_hup else signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = open_log()
    Path(args.path + ".ready").touch()
    total = int(args.rate * args.seconds)
    start = time.monotonic()
    i = 0
    try:
        while i < total:
            due = min(total, int((time.monotonic() - start) * args.rate) + 1)
            while i < due:
                if reopen:
                    reopen = False
                    new = open_log()
                    os.close(fd)
                    fd = new
                os.write(fd, f"{i:09d} {PAD}\n".encode())
                i += 1
            time.sleep(0.001)
    finally:
        os.close(fd)
        print(i, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
