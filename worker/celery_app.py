"""The Celery app that `celery -A worker.celery_app worker|beat` runs.

Configuration comes from --config's environment twin, OPSFLEET_CONFIG (or
./opsfleet.yaml, or the embedded defaults), and is validated here, at start.
"""

import sys

from worker.adapters.metrics_multiproc import use_multiprocess_dir
from worker.config import ConfigError, load_config
from worker.logs import configure_logging

configure_logging()
try:
    loaded = load_config()
except ConfigError as err:
    # A clear message and a non-zero exit, not a traceback from deep in Celery.
    raise SystemExit(f"opsfleet: {err}") from None
if loaded.config.logging.files:
    configure_logging(loaded.data_dir, role="beat" if "beat" in sys.argv else "worker")
use_multiprocess_dir(loaded.data_dir / "metrics")

from worker.celery_factory import create_celery  # noqa: E402  (metrics dir first)
from worker.signals import connect_worker_signals  # noqa: E402

app = create_celery(loaded)
connect_worker_signals(app)
