"""Logging for every opsfleet process (web, worker, beat, CLI).

- Console (stderr): one readable line per event, `LOG_LEVEL` (default INFO).
- Files in <data_dir>/logs: `opsfleet.jsonl`, one JSON object per line per
  event (time, level, logger, message, process role and pid, run id when a
  run is being worked on, the stack for exceptions, and any structured
  fields such as a request's), and `opsfleet-errors.jsonl` with ERROR and
  above only.
- Safe from gunicorn workers and Celery children together: every process
  opens the files with O_APPEND and writes each event, stack included, as one
  write() of one whole line, so lines from different processes never mix.
- Rotated by opsfleet's own rotation (the built-in log set "opsfleet", mode
  rename, `watched`): before each line a process checks whether the path
  still names the file it has open, and reopens it when it was renamed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]%(run)s %(message)s"
LOG_FILE = "opsfleet.jsonl"
ERROR_FILE = "opsfleet-errors.jsonl"

# json.dumps escapes C0 controls, but with ensure_ascii=False leaves these raw: C1 controls
# (NEL ends a line for Unicode-aware readers), LINE and PARAGRAPH SEPARATOR, and the bidi
# overrides and isolates (which reorder how a line reads). From a payload (an alert's
# groupKey, a header) they could forge or disguise a log line; written as \uXXXX they
# are the same JSON value.
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_unsafe(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Outside text (a request's path) for a console line: controls, line separators and bidi
    characters as \\n, \\xNN, \\uXXXX, so it cannot end the line and forge the next."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


current_run: contextvars.ContextVar[int | None] = contextvars.ContextVar("opsfleet_run_id", default=None)
_role = "opsfleet"
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "run"}


@contextlib.contextmanager
def run_context(run_id: int | None) -> Iterator[None]:
    """Every event logged inside carries this run id."""
    token = current_run.set(run_id)
    try:
        yield
    finally:
        current_run.reset(token)


class _RunFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        run_id = getattr(record, "run_id", None) or current_run.get()
        record.run_id = run_id
        record.run = f" run={run_id}" if run_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "role": _role,
            "pid": record.process,
        }
        if getattr(record, "run_id", None):
            event["run_id"] = record.run_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "run_id" and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            event["stack"] = record.stack_info
        return _escape_unsafe(json.dumps(event, default=str, ensure_ascii=False))


class AppendLineHandler(logging.Handler):
    """One O_APPEND write() per event; reopens the path when rotation renamed it."""

    def __init__(self, path: Path, level: int = logging.NOTSET):
        super().__init__(level)
        self.path = Path(path)
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._pid = os.getpid()
        self._lock_io = threading.Lock()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._ident, self._pid = fd, (st.st_dev, st.st_ino), os.getpid()

    def _current(self) -> int:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._ident
        except FileNotFoundError:
            moved = True
        if self._fd is None or moved or os.getpid() != self._pid:
            self._open()
        return self._fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record).replace("\n", "\\n") + "\n").encode("utf-8", "replace")
            with self._lock_io:
                os.write(self._current(), line)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self._lock_io:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()


def log_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "logs"


def configure_logging(data_dir: Path | None = None, role: str | None = None) -> None:
    """Idempotent. The console handler only when nobody configured the root logger
    (gunicorn, pytest); the JSON files whenever `data_dir` is given."""
    global _role
    if role:
        _role = role
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(FORMAT))
        console.addFilter(_RunFilter())
        console._opsfleet = True
        root.addHandler(console)
        root.setLevel(level)
    logging.getLogger("opsfleet").setLevel(level)
    folder = log_dir(data_dir) if data_dir is not None else None
    for old in [h for h in root.handlers if getattr(h, "_opsfleet_file", False)]:
        if folder is not None and old.path.parent != folder:  # another configuration (tests build many)
            root.removeHandler(old)
            old.close()
    if folder is not None and not any(getattr(h, "_opsfleet_file", False) for h in root.handlers):
        for name, handler_level in ((LOG_FILE, logging.getLevelName(level)), (ERROR_FILE, logging.ERROR)):
            handler = AppendLineHandler(folder / name, handler_level)
            handler.setFormatter(JsonFormatter())
            handler.addFilter(_RunFilter())
            handler._opsfleet_file = True
            root.addHandler(handler)
        if root.level > logging.getLevelName(level) or root.level == logging.NOTSET:
            root.setLevel(level)
        _log_uncaught()
    for handler in root.handlers:
        if not any(isinstance(f, _RunFilter) for f in handler.filters):
            handler.addFilter(_RunFilter())


def _log_uncaught() -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            logging.getLogger("opsfleet").critical("uncaught exception", exc_info=(kind, value, tb))
        previous(kind, value, tb)

    sys.excepthook = hook
    threading.excepthook = lambda args: logging.getLogger("opsfleet").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
