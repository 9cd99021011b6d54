"""kombu's filesystem transport (the embedded broker) with messages that appear whole.

kombu creates a message's file under its final name and then writes into it; a worker
polling the folder in between moves the empty or half-written file away, cannot decode
it, and exits (seen here: 72 of 3,000 messages lost, and the worker gone, so every later
run waited in `queued`). Here a message is written under a hidden name and renamed into
place, so a reader sees all of it or nothing; so is an exchange's table of bindings. A file that still does not decode, or is
not shaped like a kombu message (a disk that filled up, an older opsfleet's leftover, a
hand-written file), is logged and dropped, not fatal: the ledger's sweeper re-sends its run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem as kombu_filesystem
from kombu.utils.json import dumps

log = logging.getLogger("opsfleet.broker")


class Channel(kombu_filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # The name kombu gives a message (its readers sort and filter on it), with the
        # milliseconds zero-padded: kombu sorts names as text, and unpadded, 1000000_ sorts
        # before 999999_ (each power of ten of the uptime would serve newer messages first).
        name = f"{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")  # never matches `<queue>.msg`
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        # kombu creates the exchange's table file, then locks and writes it: a publisher
        # reading it in between got an empty file (JSONDecodeError, the publish failed).
        # Here binders take turns on a lock file and the table is replaced whole.
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = kombu_filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with open(self.control_folder / ".bindings.lock", "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                queues = self.get_table(exchange)
                if entry not in queues:
                    partial = file.with_name(f".{file.name}.partial")
                    partial.write_text(dumps([entry, *queues]))
                    os.replace(partial, file)
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc

    def _get(self, queue):
        try:
            payload = super()._get(queue)  # the file is gone once read: kombu moved and removed it
            self.Message(payload, channel=self)  # what kombu does next; a malformed one raised there, uncaught
            return payload
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # binascii.Error is a ValueError
            log.warning(
                "dropped an unreadable message of queue %s (the sweeper re-sends its run): %s: %s",
                queue, type(err).__name__, err,
            )  # fmt: skip
            raise Empty() from None


class Transport(kombu_filesystem.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
