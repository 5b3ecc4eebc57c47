"""A short, bounded history per provider in Redis (the console's market charts): each board
check's result, newest first, capped at ``KEEP`` samples and expiring when checks stop.

Recorded by one call where a check writes the provider's board entry (app/providers/board.py:
check), so the history costs one pipelined round trip per check and nothing on the request
path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

KEEP = 360  # the last checks; how long that covers is FLOPEX_QUOTE_REFRESH_S times KEEP
_KEY = "flopex:history:{}"


@dataclass(frozen=True)
class Sample:
    at: float  # Unix time
    live: bool
    latency_ms: int | None


def record(
    client: redis.Redis, provider: str, at: float, live: bool, latency_ms: int | None
) -> None:
    key = _KEY.format(provider)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, json.dumps([round(at, 3), int(live), latency_ms]))
    pipe.ltrim(key, 0, KEEP - 1)
    pipe.expire(key, 86_400)
    pipe.execute()


def read(client: redis.Redis, providers: list[str]) -> dict[str, list[Sample]]:
    """Each provider's samples, oldest first, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for name in providers:
        pipe.lrange(_KEY.format(name), 0, KEEP - 1)
    out: dict[str, list[Sample]] = {}
    for name, raw in zip(providers, pipe.execute(), strict=True):
        samples = []
        for item in reversed(raw):
            at, live, latency = _parse(item)
            samples.append(Sample(at, bool(live), latency))
        out[name] = samples
    return out


def _parse(item: Any) -> tuple[float, int, int | None]:
    at, live, latency = json.loads(item)
    return float(at), int(live), None if latency is None else int(latency)
