"""gunicorn settings for the web process (`gunicorn -c python:opsfleet.gunicorn_conf`).

Bind address, worker and thread counts come from opsfleet.yaml's `web` section;
command-line options still override them.
"""

from worker.adapters.metrics_multiproc import use_multiprocess_dir
from worker.config import load_config

_loaded = load_config()
use_multiprocess_dir(_loaded.data_dir / "metrics")

bind = f"{_loaded.config.web.host}:{_loaded.config.web.port}"
workers = _loaded.config.web.workers
# Threads, so that notifications arriving together wait in one process for one
# group commit (webhooks.batching) instead of queueing for a worker each.
worker_class = "gthread"
threads = _loaded.config.web.threads
# The edge answers in milliseconds; a request still open after this is stuck.
timeout = 30
graceful_timeout = 20
accesslog = None  # opsfleet logs each request itself, with its outcome
# gunicorn's control socket sits at one path per user: two fleets on one
# machine (or a test beside a running fleet) would fight over it.
control_socket_disable = True


def child_exit(server, worker):
    # Multiprocess metrics: a dead worker's live gauges must not be summed.
    from worker.adapters.metrics import mark_process_dead

    mark_process_dead(worker.pid)
