"""Metrics read at scrape time by the web: worker liveness and queue lengths.

Liveness comes from the heartbeat rows workers write to the ledger
(`worker.heartbeat`), never from broadcast inspect calls; queue lengths from
the broker directly (Redis LLEN of the prefixed list keys, or a count of the
filesystem transport's message files), each with a short timeout. A part
that cannot be read is left out of the scrape and shows as 0 in
`opsfleet_ledger_up` / `opsfleet_broker_up`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from worker.adapters.ledger import Ledger, LedgerUnavailable, utcnow

log = logging.getLogger("opsfleet.metrics")

# Missed beats before a worker is reported down.
MISSED_BEATS = 3
# kombu's Redis transport keeps priorities 3, 6 and 9 in lists of their own,
# named queue + "\x06\x16" + priority.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (3, 6, 9)


def worker_is_up(row: dict[str, Any], now) -> bool:
    return (now - row["last_seen"]).total_seconds() <= MISSED_BEATS * row["interval_seconds"]


class FleetCollector:
    def __init__(
        self,
        ledger: Ledger,
        broker_url: str,
        transport_options: dict,
        queues: Iterable[str],
        forget_after_seconds: float,
        timeout_seconds: float = 1.0,
    ):
        self.ledger = ledger
        self.broker_url = broker_url
        self.options = transport_options
        self.queues = list(queues)
        self.forget_after = forget_after_seconds
        self.timeout = timeout_seconds
        self._redis = None
        self._redis_pid = None

    # -- prometheus_client collector protocol ------------------------------------

    def describe(self):
        return []  # collected fresh on each scrape; no names registered up front

    def collect(self):
        yield from self._workers()
        yield from self._queue_lengths()

    # -- workers --------------------------------------------------------------------

    def _workers(self):
        ledger_up = GaugeMetricFamily("opsfleet_ledger_up", "1 when the ledger answered this scrape.")
        now = utcnow()
        try:
            rows = self.ledger.worker_heartbeats(now - timedelta(seconds=self.forget_after))
        except LedgerUnavailable as err:
            log.warning("metrics: heartbeats not read: %s", err)
            ledger_up.add_metric([], 0)
            yield ledger_up
            return
        ledger_up.add_metric([], 1)
        yield ledger_up
        up = GaugeMetricFamily(
            "celery_worker_up", "Indicates if a worker has recently sent a heartbeat.", labels=["hostname"]
        )
        last_seen = GaugeMetricFamily(
            "opsfleet_worker_last_heartbeat_timestamp_seconds",
            "When the worker last wrote its heartbeat (Unix time).",
            labels=["hostname"],
        )
        active = GaugeMetricFamily(
            "celery_active_worker_count", "The number of active workers in broker queue.", labels=["queue_name"]
        )
        per_queue = dict.fromkeys(self.queues, 0)
        for row in rows:
            alive = worker_is_up(row, now)
            up.add_metric([row["hostname"]], 1 if alive else 0)
            last_seen.add_metric([row["hostname"]], row["last_seen"].timestamp())
            for queue in filter(None, row["queues"].split(",")):
                per_queue[queue] = per_queue.get(queue, 0) + (1 if alive else 0)
        for queue, count in sorted(per_queue.items()):
            active.add_metric([queue], count)
        yield from (up, last_seen, active)

    # -- queues ---------------------------------------------------------------------

    def _queue_lengths(self):
        broker_up = GaugeMetricFamily("opsfleet_broker_up", "1 when the broker answered this scrape.")
        try:
            lengths = self.queue_lengths()
        except Exception as err:  # noqa: BLE001  (redis and OS errors alike: broker not readable)
            log.warning("metrics: queue lengths not read: %s: %s", err.__class__.__name__, err)
            broker_up.add_metric([], 0)
            yield broker_up
            return
        broker_up.add_metric([], 1)
        family = GaugeMetricFamily(
            "celery_queue_length", "The number of message in broker queue.", labels=["queue_name"]
        )
        for queue, length in sorted(lengths.items()):
            family.add_metric([queue], length)
        yield broker_up
        yield family

    def queue_lengths(self) -> dict[str, int]:
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self._redis_lengths()
        if self.broker_url.startswith("filesystem://"):
            return self._folder_lengths(Path(self.options["data_folder_in"]))
        raise RuntimeError(f"queue length not implemented for {self.broker_url.split(':', 1)[0]}")

    def _redis_client(self):
        import redis

        if self._redis is None or self._redis_pid != os.getpid():
            self._redis = redis.Redis.from_url(
                self.broker_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
            self._redis_pid = os.getpid()
        return self._redis

    def _redis_lengths(self) -> dict[str, int]:
        prefix = self.options.get("global_keyprefix", "")
        pipe = self._redis_client().pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(prefix + queue)
            for priority in REDIS_PRIORITY_STEPS:
                pipe.llen(f"{prefix}{queue}{REDIS_PRIORITY_SEP}{priority}")
        answers = pipe.execute()
        per = 1 + len(REDIS_PRIORITY_STEPS)
        return {queue: sum(answers[i * per : (i + 1) * per]) for i, queue in enumerate(self.queues)}

    def _folder_lengths(self, folder: Path) -> dict[str, int]:
        # kombu names each message "<ms>_<uuid>.<queue>.msg".
        counts = dict.fromkeys(self.queues, 0)
        with os.scandir(folder) as entries:
            for entry in entries:
                queue = entry.name.partition(".")[2].removesuffix(".msg")
                if entry.name.endswith(".msg") and queue in counts:
                    counts[queue] += 1
        return counts
