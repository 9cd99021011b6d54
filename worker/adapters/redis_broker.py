"""kombu's Redis transport with one fix: a worker survives Redis going away mid-task.

When the worker's consumer loses Redis it collects the connection (kombu then drops the
transport's `client`, the broker's URL and options) and closes it; the channel's close, or the
ack of a task that was running, then needs a fresh Redis client to put back or acknowledge
its unacked messages, and kombu 5.7 builds that client's parameters from the dropped
`client`: AttributeError, which Celery 5.7 does not catch, and the worker exits
("Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")").
Any Redis restart while a step ran took the worker down with it.

Here a channel keeps the broker's parameters it was opened with, so those late calls reach
Redis: when it is still down they fail with a connection error, which kombu and Celery
handle (the message stays in Redis's unacked set, redelivered after the visibility timeout;
every task checks the ledger first, so that is harmless), and the consumer reconnects.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def __init__(self, connection, *args, **kwargs):
        self._broker = connection.client  # the kombu Connection: URL and transport options
        super().__init__(connection, *args, **kwargs)

    def _connparams(self, asynchronous=False):
        transport = self.connection
        if transport.client is not None:
            return super()._connparams(asynchronous=asynchronous)
        transport.client = self._broker  # only while the parameters are read
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            transport.client = None


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
