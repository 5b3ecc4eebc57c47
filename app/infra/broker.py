"""kombu's Redis transport, with one Redis client per channel instead of one per command.

The stock channel builds a new ``redis.Redis`` object (on its existing connection pool) for every
publish, every unacked-message bookkeeping write and every acknowledgement. With redis-py 8 that
object is costly to build, a measurable share of a worker's CPU per message (docs/performance.md
has the figures). A ``redis.Redis`` object is thread-safe (each
command takes a connection from the pool), so the channel keeps one. Everything else, including
the asynchronous client that the worker's event loop uses for BRPOP, is the stock transport.

Selected with Celery's ``broker_transport`` setting for ``redis://`` and ``rediss://`` brokers
(app/infra/celery_app.py); any other broker URL keeps its own transport.

It also fixes kombu's stock transport (5.7, the same in earlier versions; celery/kombu#582 and
#970 are the same family) killing the worker when Redis restarts. On a lost connection Celery
collects it (``Connection.collect``: close the channels, then detach the transport,
``transport.client = None``) and closes it again. The first close of the default channel stops
at its pending BRPOP read (a connection error, swallowed) before it marks itself closed, so the
second close runs the rest of it: ``restore_unacked`` asks for a client, the channel's pool is
gone, and building a new one reads ``self.connection.client.hostname`` from the detached
transport: ``AttributeError``, which Celery does not count as a connection error, so the worker
stops ("Unrecoverable error"). A late acknowledgement of a task that finished meanwhile takes the
same path. Only a channel holding unacknowledged messages restores them, which is why our
configuration reaches it (``task_acks_late`` with a prefetch of 4: a busy worker always holds
some) and a minimal app (acknowledging on receipt) does not. Here that client request raises
the transport's own connection error instead: the close and the late ack are then ignored or
logged as connection errors, and the worker reconnects. The unacknowledged messages stay in
Redis's unacked set (restored after the visibility timeout) and their jobs are in PostgreSQL:
the sweeper finishes any a lost message would leave (app/jobs/recovery.py).
"""

from __future__ import annotations

import threading
from typing import Any

import redis

# celery-types' kombu stubs lack BatchPublishError and the channel's private methods.
from kombu.exceptions import BatchPublishError, OperationalError  # type: ignore[attr-defined]
from kombu.transport import redis as kombu_redis

TRANSPORT = "app.infra.broker:Transport"

# What a publish raises when the broker cannot take it: OperationalError when no connection
# can be made (after kombu's retries), BatchPublishError when a publish batch's pipeline fails
# (delivery of its messages uncertain). Either way the job row is already committed and the
# sweeper quotes it again (app/jobs/recovery.py).
PUBLISH_ERRORS = (OperationalError, BatchPublishError)


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # The transport was detached from its connection (see the module docstring).
            raise redis.exceptions.ConnectionError(
                "the broker connection was closed; this channel is no longer usable"
            )
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self.__dict__.get("_flopex_client")
        if client is None:
            with _lock:
                client = self.__dict__.get("_flopex_client")
                if client is None:
                    client = self.__dict__["_flopex_client"] = super()._create_client()  # type: ignore[misc]
        return client

    def _disconnect_pools(self) -> None:
        # The cached client belongs to the pool being dropped (after a fork, or on close):
        # the next command builds one on the new pool.
        self.__dict__.pop("_flopex_client", None)
        super()._disconnect_pools()  # type: ignore[misc]

    def close(self) -> None:
        self.__dict__.pop("_flopex_client", None)
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel


_lock = threading.Lock()
