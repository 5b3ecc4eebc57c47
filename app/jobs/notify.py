"""Completion signal from the worker to a waiting web request.

A Redis list per job rather than pub/sub: the worker may finish before the web process starts
waiting, and a list keeps the signal until it is read (or expires). The signal carries nothing
but "look again": the job row in PostgreSQL is the answer.
"""

from __future__ import annotations

import uuid

import redis
from redis.client import Pipeline

_TTL_S = 300


def _key(job_id: uuid.UUID | str) -> str:
    return f"flopex:done:{job_id}"


def signal_done(client: redis.Redis, job_id: uuid.UUID | str) -> None:
    pipe = client.pipeline(transaction=False)
    queue_signal(pipe, job_id)
    pipe.execute()


def queue_signal(pipe: Pipeline, job_id: uuid.UUID | str) -> None:
    """signal_done's commands, added to the caller's pipeline."""
    pipe.lpush(_key(job_id), "1")
    pipe.expire(_key(job_id), _TTL_S)


def wait_done(client: redis.Redis, job_id: uuid.UUID | str, timeout_s: float) -> bool:
    """Blocks up to ``timeout_s``; True when the job signalled completion.

    Several requests may wait on one job (idempotent duplicates, long polls): the token is
    never taken, only rotated within its list (BLMOVE from the list to itself, Redis >= 6.2),
    so every waiter wakes, in one round trip each.
    """
    key = _key(job_id)
    # redis-py annotates the timeout as int; BLMOVE takes seconds as a double.
    timeout = max(timeout_s, 0.01)
    return client.blmove(key, key, timeout, "RIGHT", "LEFT") is not None  # type: ignore[arg-type]
