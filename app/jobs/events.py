"""A job's events: one Redis Stream per job, written by the worker, relayed by the web.

The worker appends ``routing`` (the decision), a ``delta`` per chunk of output and one terminal
event (``completed`` with the full response object, or ``failed`` with the error), each in one
pipelined round trip that also tells it whether the client asked the generation to stop. The
web relays them to any number of readers, from the start or from an event id (SSE
``Last-Event-ID``), so a client that lost its connection gets the rest, nothing missing or
repeated. The stream is bounded (``FLOPEX_STREAM_MAX_EVENTS``) and expires
``FLOPEX_STREAM_EVENTS_TTL_S`` after its last event; after that the job row is the answer.
Nothing here lives in process memory: web and worker share only Redis and PostgreSQL.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis
import simplejson
from redis.client import Pipeline

from config.settings import Settings, get_settings

ROUTING = "routing"
DELTA = "delta"
COMPLETED = "completed"
FAILED = "failed"
TERMINAL = frozenset({COMPLETED, FAILED})

# A Redis Stream entry id, as sent to clients in SSE `id:` lines and read back from
# Last-Event-ID: `<ms>-<seq>`, or `<ms>` alone (Redis reads it as `<ms>-0`); at most 19 digits
# each, so that any value fits Redis's 64-bit parts.
EVENT_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
_START = "0-0"


def _dumps(data: dict[str, Any]) -> str:
    """Compact JSON, every Decimal amount written digit for digit (as app/json.py does)."""
    return str(simplejson.dumps(data, use_decimal=True, separators=(",", ":"), default=str))


def _key(job_id: uuid.UUID | str) -> str:
    return f"flopex:events:{job_id}"


def _stop_key(job_id: uuid.UUID | str) -> str:
    return f"flopex:stop:{job_id}"


class Event:
    """One event: ``id`` (the Redis Stream entry id; "" for one made from the job row),
    ``name`` and its data, kept as the JSON text it was stored as (``raw``) and parsed only when
    read (``data``): relaying a native event needs no parse and no second encoding."""

    __slots__ = ("_data", "_raw", "id", "name")

    def __init__(
        self, id: str, name: str, data: dict[str, Any] | None = None, raw: str | None = None
    ) -> None:
        self.id = id
        self.name = name
        self._data = data
        self._raw = raw

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = simplejson.loads(self._raw or "{}", use_decimal=True)
        return self._data

    @property
    def raw(self) -> str:
        if self._raw is None:
            self._raw = _dumps(self._data or {})
        return self._raw

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


def queue_append(
    pipe: Pipeline,
    job_id: uuid.UUID | str,
    name: str,
    data: dict[str, Any],
    settings: Settings,
    ttl_s: int | None = None,
) -> None:
    """An event's commands, added to the caller's pipeline: appended (the stream trimmed to its
    bound), and the stream's expiry pushed back to ``ttl_s`` (default ``stream_events_ttl_s``)
    from now."""
    key = _key(job_id)
    pipe.xadd(
        key,
        {"e": name, "d": _dumps(data)},
        maxlen=settings.stream_max_events,
        approximate=False,
    )
    pipe.expire(key, ttl_s or settings.stream_events_ttl_s)


class EventWriter:
    """The worker's side of one job's stream."""

    def __init__(self, client: redis.Redis, job_id: uuid.UUID | str, settings: Settings) -> None:
        self.client = client
        self.job_id = job_id
        self.settings = settings

    def append(self, name: str, data: dict[str, Any]) -> bool:
        """Appends an event; True when the client has asked the generation to stop (learned in
        the same round trip)."""
        pipe = self.client.pipeline(transaction=False)
        queue_append(pipe, self.job_id, name, data, self.settings)
        pipe.exists(_stop_key(self.job_id))
        return bool(pipe.execute()[-1])

    def stop_requested(self) -> bool:
        return bool(self.client.exists(_stop_key(self.job_id)))


def request_stop(client: redis.Redis, job_id: uuid.UUID | str, ttl_s: int) -> None:
    """Asks the worker streaming this job to close the provider's stream: it sees it at its next
    append (or next check), closes the connection and settles for what was generated."""
    client.set(_stop_key(job_id), "1", ex=max(int(ttl_s), 1))


def _decode(entry_id: str, fields: dict[str, str]) -> Event:
    return Event(entry_id, fields.get("e", ""), raw=fields.get("d", "{}"))


def read(
    client: redis.Redis, job_id: uuid.UUID | str, after: str, block_ms: int | None
) -> list[Event]:
    """The events after ``after`` (an event id, or ``0-0`` for all), waiting up to ``block_ms``
    for one (None: not at all); [] when none came."""
    answer: Any = client.xread({_key(job_id): after}, count=512, block=block_ms)
    if not answer:
        return []
    _, entries = answer[0]
    return [_decode(entry_id, fields) for entry_id, fields in entries]


def exists(client: redis.Redis, job_id: uuid.UUID | str) -> bool:
    return bool(client.exists(_key(job_id)))


def delivered(client: redis.Redis, job_id: uuid.UUID | str) -> tuple[str, int] | None:
    """The text and the number of deltas a job's stream holds (None when it has no stream): what
    a client of a job whose worker died mid-stream has received."""
    entries: Any = client.xrange(_key(job_id))
    if not entries:
        return None
    deltas = [_decode(i, f) for i, f in entries if f.get("e") == DELTA]
    return "".join(str(e.data.get("text", "")) for e in deltas), len(deltas)


def follow(
    client: redis.Redis,
    job_id: uuid.UUID | str,
    after: str | None,
    keepalive_s: float,
    finished: Callable[[], Event | None],
) -> Iterator[list[Event] | None]:
    """Every event after ``after`` (None: from the start), in the batches Redis returns them as
    they are appended, until the terminal one (the last of its batch); ``None`` is yielded
    after each ``keepalive_s`` with nothing new (send a keep-alive).

    ``finished()`` reads the job row: the job as its terminal event once it is final, else
    None. It answers when the stream holds nothing to relay: expired (kept
    ``stream_events_ttl_s``), or never written because the job ended without a worker (a
    cancellation, the sweeper)."""
    last = after or _START
    if not exists(client, job_id):
        final = finished()
        if final is not None:
            yield [final]
            return
    block_ms = max(int(keepalive_s * 1000), 1)
    while True:
        batch = read(client, job_id, last, block_ms)
        if not batch:
            final = finished()
            if final is None:
                yield None
                continue
            # The terminal event may have been appended since the read timed out.
            batch = read(client, job_id, last, None) or [final]
        ended = next((i for i, e in enumerate(batch) if e.terminal), None)
        if ended is not None:
            yield batch[: ended + 1]
            return
        yield batch
        last = batch[-1].id


_relay: redis.Redis | None = None
_relay_pid: int | None = None


def relay_client() -> redis.Redis:
    """The web's client for relaying streams: each open stream blocks one connection in XREAD,
    so these connections are a pool of their own (``stream_redis_connections`` per process),
    apart from the request path's."""
    global _relay, _relay_pid
    if _relay is None or _relay_pid != os.getpid():
        settings = get_settings()
        _relay = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            health_check_interval=30,
            socket_connect_timeout=5,
            socket_timeout=settings.stream_keepalive_s + 30,
            max_connections=settings.stream_redis_connections,
        )
        _relay_pid = os.getpid()
    return _relay
