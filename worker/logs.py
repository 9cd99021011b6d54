"""Logging for every opsfleet process: LOG_LEVEL from the environment, one line per event."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging() -> None:
    """Idempotent; leaves alone a root logger someone else configured (gunicorn, pytest)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("opsfleet").setLevel(level)
