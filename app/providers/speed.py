"""Learned speed per offering, from our own executions (passive: no extra traffic).

A completion of ``n`` output tokens takes about ``ttft + n / tokens_per_s`` on the provider
(time to first token, or the fixed overhead of a request, then generation). Each successful
execution adds one sample (its output tokens, and its time less the board's round trip to the
provider) to a short list per offering in Redis (the last ``WINDOW`` samples younger than
``HORIZON_S``); the estimate is recomputed from that list at once and stored beside it, so
routing reads two numbers per offering.

The estimate is a Theil-Sen line through the samples: the slope (ms per token) is the median of
the slopes between every two samples with different token counts, the intercept the median of
``time - slope * tokens``. Medians ignore a few outliers (a stall, a cold start) and follow a
provider that changes speed within about half a window. When the samples' token counts are all
equal the slope is not observable: the prior's (or the default's) speed is kept and only the
fixed part is learned.

An offering with fewer than ``MIN_SAMPLES`` samples is judged on its catalog priors
(``expected_ttft_ms``, ``expected_tokens_per_s``) or, without them, on the conservative default
below: slower than anything we list, so that a provider nobody has measured never wins ``fast``
or passes a ``max_latency_ms`` on a guess. Exploration (app/routing.py) sends it a few jobs so it
gets measured.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

# The conservative default for an offering with neither history nor priors.
DEFAULT_TTFT_MS = 1000
DEFAULT_TOKENS_PER_S = 20.0
MIN_SAMPLES = 5
WINDOW = 24
HORIZON_S = 900
# Bounds that keep one absurd sample set from producing an absurd line.
_MIN_MS_PER_TOKEN = 0.05  # 20,000 tokens/s
_MAX_MS_PER_TOKEN = 1000.0  # 1 token/s


def _samples_key(offering_id: int) -> str:
    return f"flopex:speed:{offering_id}:samples"


def _estimate_key(offering_id: int) -> str:
    return f"flopex:speed:{offering_id}"


@dataclass(frozen=True)
class Prior:
    ttft_ms: int | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class Speed:
    ttft_ms: int
    tokens_per_s: float
    samples: int
    # learned, prior or default
    source: str

    def generation_ms(self, tokens: int) -> int:
        return math.ceil(tokens * 1000 / self.tokens_per_s)


def fallback(prior: Prior, samples: int = 0) -> Speed:
    """What an offering without enough history is judged on."""
    if prior.ttft_ms is not None or prior.tokens_per_s is not None:
        return Speed(
            prior.ttft_ms if prior.ttft_ms is not None else DEFAULT_TTFT_MS,
            prior.tokens_per_s if prior.tokens_per_s is not None else DEFAULT_TOKENS_PER_S,
            samples,
            "prior",
        )
    return Speed(DEFAULT_TTFT_MS, DEFAULT_TOKENS_PER_S, samples, "default")


def fit(samples: Sequence[tuple[int, float]], prior: Prior) -> Speed:
    """The Theil-Sen estimate from ``(output tokens, ms)`` samples (see the module docstring);
    the fallback below ``MIN_SAMPLES``."""
    if len(samples) < MIN_SAMPLES:
        return fallback(prior, len(samples))
    slopes = [
        (t2 - t1) / (n2 - n1)
        for i, (n1, t1) in enumerate(samples)
        for n2, t2 in samples[i + 1 :]
        if n2 != n1
    ]
    if slopes:
        ms_per_token = min(max(statistics.median(slopes), _MIN_MS_PER_TOKEN), _MAX_MS_PER_TOKEN)
    else:
        ms_per_token = 1000 / fallback(prior).tokens_per_s
    ttft = statistics.median(t - ms_per_token * n for n, t in samples)
    return Speed(max(0, round(ttft)), round(1000 / ms_per_token, 1), len(samples), "learned")


def record(
    client: redis.Redis,
    offering_id: int,
    output_tokens: int,
    service_ms: float,
    prior: Prior,
    now: float | None = None,
) -> Speed:
    """Adds one execution's sample and stores the offering's new estimate (two round trips,
    after the job's outcome was signalled: off the request's path)."""
    now = now or time.time()
    key = _samples_key(offering_id)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, f"{now:.3f}:{output_tokens}:{max(0.0, service_ms):.1f}")
    pipe.ltrim(key, 0, WINDOW - 1)
    pipe.expire(key, HORIZON_S)
    pipe.lrange(key, 0, WINDOW - 1)
    raw = pipe.execute()[-1]
    samples = []
    for item in raw:
        at, tokens, ms = item.split(":")
        if now - float(at) <= HORIZON_S:
            samples.append((int(tokens), float(ms)))
    speed = fit(samples, prior)
    client.hset(
        _estimate_key(offering_id),
        mapping={
            "ttft_ms": speed.ttft_ms,
            "tokens_per_s": repr(speed.tokens_per_s),
            "samples": speed.samples,
            "source": speed.source,
            "updated_at": repr(now),
        },
    )
    client.expire(_estimate_key(offering_id), HORIZON_S)
    return speed


def queue_read(
    pipe: Pipeline, offerings: Sequence[tuple[int, Prior]]
) -> Callable[[list[Any]], dict[int, Speed]]:
    """Adds the reads to ``pipe``; the returned function takes exactly these reads' results and
    gives each offering's speed: learned, or its fallback."""
    for offering_id, _ in offerings:
        pipe.hgetall(_estimate_key(offering_id))

    def read(results: list[Any]) -> dict[int, Speed]:
        speeds = {}
        for (offering_id, prior), raw in zip(offerings, results, strict=True):
            if raw and raw.get("source") == "learned":
                speeds[offering_id] = Speed(
                    int(raw["ttft_ms"]),
                    float(raw["tokens_per_s"]),
                    int(raw["samples"]),
                    "learned",
                )
            else:
                speeds[offering_id] = fallback(prior, int(raw.get("samples", 0)) if raw else 0)
        return speeds

    return read
