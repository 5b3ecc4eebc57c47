"""A short, bounded history per provider in Redis (the console's market charts): the board's
checks counted per minute (checks, how many found it live, their round trips), one hash per
provider and minute expiring after ``WINDOW_MIN`` minutes, as the success rates are kept
(app/providers/health.py). Bounded whatever the check rate (FLOPEX_QUOTE_REFRESH_S).

Recorded where the board writes a check's entry (app/providers/board.py ``check``), in the same
pipelined round trip: nothing more on any path."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from redis.client import Pipeline

WINDOW_MIN = 60
_PREFIX = "flopex:history"


@dataclass(frozen=True)
class Sample:
    at: float  # the minute's start, Unix time
    checks: int
    live: int  # checks that found the provider live
    latency_ms: int | None  # the live checks' mean round trip

    @property
    def all_live(self) -> bool:
        return self.live == self.checks


def _key(provider: str, minute: int) -> str:
    return f"{_PREFIX}:{provider}:{minute}"


def record(
    client: redis.Redis, provider: str, at: float, live: bool, latency_ms: int | None
) -> None:
    pipe = client.pipeline(transaction=False)
    queue_record(pipe, provider, at, live, latency_ms)
    pipe.execute()


def queue_record(
    pipe: Pipeline, provider: str, at: float, live: bool, latency_ms: int | None
) -> None:
    """record's commands, added to the caller's pipeline (the board's check: one round trip
    for its entry and this sample)."""
    key = _key(provider, int(at // 60))
    pipe.hincrby(key, "checks", 1)
    if live:
        pipe.hincrby(key, "live", 1)
        if latency_ms is not None:
            pipe.hincrby(key, "rtt_sum", latency_ms)
            pipe.hincrby(key, "rtt_n", 1)
    pipe.expire(key, WINDOW_MIN * 60 + 60)


def read(
    client: redis.Redis, providers: list[str], now: float | None = None
) -> dict[str, list[Sample]]:
    """Each provider's minutes with checks in the last ``WINDOW_MIN``, oldest first, in one
    round trip."""
    last = int((time.time() if now is None else now) // 60)
    minutes = range(last - WINDOW_MIN + 1, last + 1)
    pipe = client.pipeline(transaction=False)
    for name in providers:
        for minute in minutes:
            pipe.hmget(_key(name, minute), "checks", "live", "rtt_sum", "rtt_n")
    results = iter(pipe.execute())
    out: dict[str, list[Sample]] = {}
    for name in providers:
        samples = []
        for minute in minutes:
            checks, live, rtt_sum, rtt_n = (int(v or 0) for v in next(results))
            if checks:
                mean = round(rtt_sum / rtt_n) if rtt_n else None
                samples.append(Sample(minute * 60.0, checks, live, mean))
        out[name] = samples
    return out
