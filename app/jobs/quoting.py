"""A job's quotes, from the live quote board (app/providers/board.py) and the learned speeds
(app/providers/speed.py): no provider is pinged for the job unless its board entry is older
than the profile's freshness bound, and then only under single flight.

A quote's estimated latency is this job's: the provider's round trip, plus its time to first
token, plus the job's ``max_output_tokens`` at its generation speed (docs/routing.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from app.providers import board, health, speed
from app.providers.breaker import Breaker
from app.routing import Quote
from config.settings import ProfilePolicy

NOT_CHECKED = "not_checked"


def _target(option: dict[str, Any]) -> board.Target:
    return board.Target(option["provider"], option["base_url"], option.get("api_key_env"))


def _prior(option: dict[str, Any]) -> speed.Prior:
    return speed.Prior(option.get("expected_ttft_ms"), option.get("expected_tokens_per_s"))


def quote_job(
    client: redis.Redis,
    breaker: Breaker,
    options: Sequence[dict[str, Any]],
    policy: ProfilePolicy,
    max_output_tokens: int,
    health_window_s: int,
    now: float | None = None,
) -> list[Quote]:
    """One quote per option (each option as stored on the job: provider, endpoint, prices,
    estimate, speed priors). One Redis round trip reads the board, the speeds, the breakers and
    the success rates; stale entries are refreshed before the quotes are made."""
    providers = [o["provider"] for o in options]
    offerings = [(int(o["offering_id"]), _prior(o)) for o in options]
    pipe = client.pipeline(transaction=False)
    read_board = board.queue_read(pipe, providers)
    read_speeds = speed.queue_read(pipe, offerings)
    read_breakers = breaker.queue_states(pipe, providers)
    read_rates = health.queue_success_rates(pipe, providers, health_window_s)
    results = pipe.execute()
    n, m = len(providers), len(offerings)
    entries = read_board(results[:n])
    speeds = read_speeds(results[n : n + m])
    rates = read_rates(results)
    now = now or time.time()
    breakers = read_breakers(results[n + m : n + m + n], now)

    stale = [
        _target(o)
        for o in options
        if (e := entries.get(o["provider"])) is None or e.age_s(now) > policy.freshness_s
    ]
    if stale:
        entries.update(
            board.refresh(
                client,
                breaker,
                stale,
                policy.quote_deadline_ms / 1000,
                fresh_after=now - policy.freshness_s,
            )
        )
        now = time.time()

    quotes = []
    for option in options:
        name = option["provider"]
        entry = entries.get(name)
        state = breakers[name]
        # A half-open breaker lets one trial through: this job takes it, or the provider stays
        # closed to it.
        circuit_open = state == "open" or (state == "half_open" and not breaker.allow(name, now))
        fresh = entry is not None and entry.age_s(now) <= policy.freshness_s
        live = bool(fresh and entry is not None and entry.live and not circuit_open)
        learned = speeds[int(option["offering_id"])]
        rtt = entry.rtt_ms if entry is not None else None
        latency = None
        if live and rtt is not None:
            latency = rtt + learned.ttft_ms + learned.generation_ms(max_output_tokens)
        error: str | None
        if circuit_open:
            error = "circuit_open"
        elif entry is None:
            error = NOT_CHECKED
        elif not fresh:
            error = "stale"
        else:
            error = entry.error
        quotes.append(
            Quote(
                provider=name,
                offering_id=option["offering_id"],
                provider_model_id=option["provider_model_id"],
                input_price_micros_per_m=option["input_price_micros_per_m"],
                output_price_micros_per_m=option["output_price_micros_per_m"],
                estimated_charge_micros=option["estimated_charge_micros"],
                live=live,
                estimated_latency_ms=latency,
                success_rate=None if rates[name] is None else str(rates[name]),
                error=None if live else error,
                circuit_open=circuit_open,
                rtt_ms=rtt,
                ttft_ms=learned.ttft_ms,
                tokens_per_s=learned.tokens_per_s,
                output_tokens=max_output_tokens,
                speed_source=learned.source,
                samples=learned.samples,
                checked_at=None if entry is None else round(entry.measured_at, 3),
                age_ms=None if entry is None else int(entry.age_s(now) * 1000),
            )
        )
    return quotes
