"""One quote: ping the provider live, attach its price, and hand it to the join. Quotes travel
through a Redis hash per job; the last quote to arrive triggers routing, which reads every
quoted provider's recent reliability along with the quotes, in the same round trip. A
ping never outlives the quote deadline, so every quote task finishes by then; one lost with a
crashed worker is covered by the sweeper, which quotes the job again."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from redis.client import Pipeline

from app.metrics import QUOTE_LATENCY
from app.providers import health
from app.providers.breaker import Breaker
from app.providers.openai_compat import ProviderFailure, ping, resolve_api_key
from app.routing import Quote

_TTL_S = 900


def _key(job_id: str) -> str:
    return f"flopex:quotes:{job_id}"


def make_quote(option: dict[str, Any], deadline_at: float, breaker: Breaker) -> Quote:
    remaining = deadline_at - time.time()
    live, latency, error = False, None, None
    started = time.perf_counter()
    circuit_open = not breaker.allow(option["provider"])
    if circuit_open:
        error = "circuit_open"
    elif remaining <= 0.005:
        error = "deadline_passed"
    else:
        try:
            latency = ping(option["base_url"], resolve_api_key(option["api_key_env"]), remaining)
            live = True
        except ProviderFailure as exc:
            error = exc.kind
    QUOTE_LATENCY.labels(option["provider"], "live" if live else error).observe(
        time.perf_counter() - started
    )
    return _quote(
        option,
        live=live,
        estimated_latency_ms=latency,
        error=error,
        circuit_open=circuit_open,
    )


def _quote(option: dict[str, Any], **observed: Any) -> Quote:
    """An option's catalog facts (price, estimate) with what was observed about it now."""
    return Quote(
        provider=option["provider"],
        offering_id=option["offering_id"],
        provider_model_id=option["provider_model_id"],
        input_price_micros_per_m=option["input_price_micros_per_m"],
        output_price_micros_per_m=option["output_price_micros_per_m"],
        estimated_charge_micros=option["estimated_charge_micros"],
        **observed,
    )


def store_quote(client: redis.Redis, job_id: str, quote: Quote) -> int:
    """Adds the quote to the job's set and returns how many quotes the job has now."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(_key(job_id), quote.provider, json.dumps(quote.to_dict()))
    pipe.hlen(_key(job_id))
    pipe.expire(_key(job_id), _TTL_S)
    return int(pipe.execute()[1])


def collect_quotes(
    client: redis.Redis, job_id: str, options: list[dict[str, Any]], health_window_s: int
) -> list[Quote]:
    """Every option gets a quote: the one its task stored, or a not-live one when its task did
    not report by the deadline (it stays rankable by price, as `lowest_cost` promises); each
    with its provider's success rate over the health window."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(_key(job_id))
    read_rates = health.queue_success_rates(pipe, [o["provider"] for o in options], health_window_s)
    results = pipe.execute()
    stored, rates = results[0], read_rates(results)
    quotes = []
    for option in options:
        raw = stored.get(option["provider"])
        rate = rates[option["provider"]]
        observed = {"success_rate": None if rate is None else str(rate)}
        if raw is not None:
            quotes.append(Quote.from_dict({**json.loads(raw), **observed}))
        else:
            quotes.append(
                _quote(
                    option,
                    live=False,
                    estimated_latency_ms=None,
                    error="no_quote_by_deadline",
                    **observed,
                )
            )
    return quotes


def discard_quotes(client: redis.Redis | Pipeline, job_id: str) -> None:
    client.delete(_key(job_id))


def quotes_from_probes(
    client: redis.Redis,
    options: list[dict[str, Any]],
    breaker: Breaker,
    *,
    max_age_s: float,
    now: float | None = None,
) -> list[Quote] | None:
    """Quotes from the beat probe's latest results instead of a live ping per request
    (FLOPEX_QUOTE_SOURCE=probe): no quote tasks, no wait on provider round trips. None when any
    option lacks a probe younger than ``max_age_s``: the caller then quotes live. Success rates
    are added by the route step (collect_quotes), as for live quotes."""
    now = now or time.time()
    raws = client.mget([f"flopex:probe:{o['provider']}" for o in options])
    quotes = []
    for option, raw in zip(options, raws, strict=True):
        probe = json.loads(raw) if raw else None
        if probe is None or now - probe["checked_at"] > max_age_s:
            return None
        circuit_open = not breaker.allow(option["provider"], now)
        quotes.append(
            _quote(
                option,
                live=probe["live"] and not circuit_open,
                estimated_latency_ms=probe["latency_ms"] if probe["live"] else None,
                error="circuit_open"
                if circuit_open
                else (None if probe["live"] else probe["error"]),
                circuit_open=circuit_open,
            )
        )
    return quotes


def store_quotes(client: redis.Redis, job_id: str, quotes: list[Quote]) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hset(_key(job_id), mapping={q.provider: json.dumps(q.to_dict()) for q in quotes})
    pipe.expire(_key(job_id), _TTL_S)
    pipe.execute()
