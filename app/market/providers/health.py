"""Recent execution outcomes per provider, in Redis, shared by every worker.

Counters live in one-minute buckets that expire after the window, so the success rate is over
roughly the last ``window_s`` seconds without any process keeping state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

_PREFIX = "flopex:health"


def _bucket(now: float | None = None) -> int:
    return int((now if now is not None else time.time()) // 60)


def record_outcome(client: redis.Redis, provider: str, ok: bool, window_s: int) -> None:
    pipe = client.pipeline(transaction=False)
    queue_outcome(pipe, provider, ok, window_s)
    pipe.execute()


def queue_outcome(pipe: Pipeline, provider: str, ok: bool, window_s: int) -> None:
    """record_outcome's commands, added to the caller's pipeline (one round trip for several)."""
    key = f"{_PREFIX}:{provider}:{_bucket()}"
    pipe.hincrby(key, "ok" if ok else "fail", 1)
    pipe.expire(key, window_s + 60)


def success_rate(client: redis.Redis, provider: str, window_s: int) -> Decimal | None:
    """ok / (ok + fail) over the window, to four places; None when there is no history."""
    pipe = client.pipeline(transaction=False)
    read = queue_success_rates(pipe, [provider], window_s)
    return read(pipe.execute())[provider]


def queue_success_rates(
    pipe: Pipeline, providers: list[str], window_s: int
) -> Callable[[list[Any]], dict[str, Decimal | None]]:
    """Adds the reads to ``pipe``; the returned function turns the pipeline's results (all of
    them, these reads last) into the rates."""
    now = _bucket()
    buckets = range(now - max(1, window_s // 60) + 1, now + 1)
    for provider in providers:
        for b in buckets:
            pipe.hmget(f"{_PREFIX}:{provider}:{b}", "ok", "fail")
    count = len(providers) * len(buckets)

    def read(results: list[Any]) -> dict[str, Decimal | None]:
        pairs = iter(results[len(results) - count :])
        rates: dict[str, Decimal | None] = {}
        for provider in providers:
            ok = fail = 0
            for _ in buckets:
                pair = next(pairs)
                ok += int(pair[0] or 0)
                fail += int(pair[1] or 0)
            rates[provider] = (
                None
                if ok + fail == 0
                else (Decimal(ok) / Decimal(ok + fail)).quantize(Decimal("0.0001"))
            )
        return rates

    return read
