"""Recent execution outcomes per provider, in Redis, shared by every worker.

Counters live in one-minute buckets that expire after the window, so the success rate is over
roughly the last ``window_s`` seconds without any process keeping state.
"""

from __future__ import annotations

import time
from decimal import Decimal

import redis

_PREFIX = "flopex:health"


def _bucket(now: float | None = None) -> int:
    return int((now if now is not None else time.time()) // 60)


def record_outcome(client: redis.Redis, provider: str, ok: bool, window_s: int) -> None:
    key = f"{_PREFIX}:{provider}:{_bucket()}"
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(key, "ok" if ok else "fail", 1)
    pipe.expire(key, window_s + 60)
    pipe.execute()


def success_rate(client: redis.Redis, provider: str, window_s: int) -> Decimal | None:
    """ok / (ok + fail) over the window, to four places; None when there is no history."""
    now = _bucket()
    buckets = range(now - max(1, window_s // 60) + 1, now + 1)
    pipe = client.pipeline(transaction=False)
    for b in buckets:
        pipe.hmget(f"{_PREFIX}:{provider}:{b}", "ok", "fail")
    ok = fail = 0
    for pair in pipe.execute():
        ok += int(pair[0] or 0)
        fail += int(pair[1] or 0)
    if ok + fail == 0:
        return None
    return (Decimal(ok) / Decimal(ok + fail)).quantize(Decimal("0.0001"))
