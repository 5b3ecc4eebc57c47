"""app/jobs/quoting.py and app/providers/board.py: a job's quotes from the live quote board, on
real Redis and real sandbox providers. Freshness (a fresh entry is used as is, a stale one is
checked first), single flight (one ping per provider however many routers want it), and the
estimate's components."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from app.jobs.quoting import quote_job
from app.providers import board, health, speed
from app.providers.breaker import Breaker
from config.settings import ProfilePolicy, get_settings
from tests.factories import route_option

WINDOW_S = 300
POLICY = ProfilePolicy(quote_deadline_ms=2000, queue="balanced", freshness_s=5.0)


@pytest.fixture
def fresh(pipeline: dict[str, Any], redis_client: redis.Redis) -> dict[str, Any]:
    """The sandboxes, with an empty board and no speed history (the pipeline fixture)."""
    return pipeline


def _breaker(client: redis.Redis) -> Breaker:
    return Breaker.from_settings(client, get_settings())


def test_a_fresh_entry_is_used_without_a_ping_and_its_age_is_shown(fresh, redis_client):
    alpha = fresh["alpha"]
    measured = time.time() - 3  # within balanced's 5 s
    board.write(redis_client, board.Entry("alpha", True, 42, measured))
    calls = alpha.models_calls

    (quote,) = quote_job(
        redis_client,
        _breaker(redis_client),
        [route_option("alpha", alpha.base_url)],
        POLICY,
        max_output_tokens=200,
        health_window_s=WINDOW_S,
    )

    assert alpha.models_calls == calls  # no ping: the board answered
    assert quote.live and quote.rtt_ms == 42
    # rtt + ttft (prior) + 200 tokens at 100 tokens/s
    assert quote.estimated_latency_ms == 42 + 30 + 2000
    assert (quote.ttft_ms, quote.tokens_per_s, quote.output_tokens) == (30, 100.0, 200)
    assert quote.speed_source == "prior" and quote.samples == 0
    assert 3000 <= (quote.age_ms or 0) < 5000


def test_a_stale_entry_is_checked_before_the_quote(fresh, redis_client):
    alpha = fresh["alpha"]  # answers after 200 ms
    board.write(redis_client, board.Entry("alpha", True, 1, time.time() - 6))  # past 5 s
    calls = alpha.models_calls

    (quote,) = quote_job(
        redis_client,
        _breaker(redis_client),
        [route_option("alpha", alpha.base_url)],
        POLICY,
        max_output_tokens=10,
        health_window_s=WINDOW_S,
    )

    assert alpha.models_calls == calls + 1
    assert quote.live and (quote.rtt_ms or 0) >= 200 and (quote.age_ms or 0) < 2000


def test_a_stale_live_entry_whose_check_fails_is_not_live(fresh, redis_client):
    """prefer_live means checked live within the bound: an old good check is not enough."""
    board.write(redis_client, board.Entry("ghost", True, 5, time.time() - 60))
    (quote,) = quote_job(
        redis_client,
        _breaker(redis_client),
        [route_option("ghost", "http://127.0.0.1:9/v1")],  # nothing listens on the discard port
        POLICY,
        max_output_tokens=10,
        health_window_s=WINDOW_S,
    )
    assert not quote.live and quote.estimated_latency_ms is None
    assert quote.error == "connect"


def test_one_ping_in_flight_per_provider_whatever_the_number_of_routers(fresh, redis_client):
    """Eight routers (each with its own Redis connection, as separate processes would have)
    find alpha's entry stale at once: alpha is pinged once, and every router gets its result."""
    alpha = fresh["alpha"]
    alpha.configure(latency_ms=600)  # the flight lasts long enough for every router to join
    target = board.Target("alpha", alpha.base_url, None)
    calls = alpha.models_calls
    start = threading.Barrier(8)
    results: list[board.Entry | None] = []

    def router() -> None:
        client = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
        start.wait()
        results.append(board.refresh_one(client, _breaker(client), target, timeout_s=2.0))

    threads = [threading.Thread(target=router) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert alpha.models_calls == calls + 1
    assert len(results) == 8 and all(e is not None and e.live for e in results)
    assert len({e.measured_at for e in results if e is not None}) == 1  # the same check


def test_quotes_carry_each_providers_success_rate_counting_every_attempt(fresh, redis_client):
    for ok in (True, True, True, False):
        health.record_outcome(redis_client, "alpha", ok, WINDOW_S)
    board.write(redis_client, board.Entry("alpha", True, 3, time.time()))
    board.write(redis_client, board.Entry("bravo", True, 3, time.time()))
    alpha, bravo = quote_job(
        redis_client,
        _breaker(redis_client),
        [route_option("alpha", offering_id=1), route_option("bravo", offering_id=2)],
        POLICY,
        max_output_tokens=10,
        health_window_s=WINDOW_S,
    )
    assert alpha.success_rate == "0.7500" and bravo.success_rate is None


def test_a_failed_execution_marks_the_provider_not_live_until_its_next_good_check(
    fresh, redis_client
):
    alpha = fresh["alpha"]
    board.write(redis_client, board.Entry("alpha", True, 3, time.time()))
    pipe = redis_client.pipeline()
    board.queue_execution_outcome(pipe, "alpha", False, error="http")
    pipe.execute()
    entry = board.read(redis_client, ["alpha"])["alpha"]
    assert not entry.live and entry.error == "http" and entry.source == "execution"

    target = board.Target("alpha", alpha.base_url, None)
    assert board.check(redis_client, _breaker(redis_client), target, 2.0).live


def test_a_429_keeps_the_provider_not_live_until_its_retry_after(fresh, redis_client):
    alpha = fresh["alpha"]
    pipe = redis_client.pipeline()
    board.queue_execution_outcome(pipe, "alpha", False, error="rate_limited", hold_s=30)
    pipe.execute()
    target = board.Target("alpha", alpha.base_url, None)
    entry = board.check(redis_client, _breaker(redis_client), target, 2.0)
    assert not entry.live and entry.error == "rate_limited"  # it answers pings, but asked
    later = time.time() + 31
    assert board.check(redis_client, _breaker(redis_client), target, 2.0, now=later).live


def test_learned_speed_replaces_the_prior_once_measured(fresh, redis_client):
    board.write(redis_client, board.Entry("alpha", True, 10, time.time()))
    prior = speed.Prior(30, 100.0)
    # 80 ms to the first token, 50 tokens/s (20 ms per token), with one outlier.
    for tokens, ms in [(10, 280), (20, 480), (40, 880), (5, 180), (30, 680), (10, 5000)]:
        speed.record(redis_client, 1, tokens, ms, prior)
    (quote,) = quote_job(
        redis_client,
        _breaker(redis_client),
        [route_option("alpha")],
        POLICY,
        max_output_tokens=100,
        health_window_s=WINDOW_S,
    )
    assert quote.speed_source == "learned" and quote.samples == 6
    assert (quote.ttft_ms, quote.tokens_per_s) == (80, 50.0)
    assert quote.estimated_latency_ms == 10 + 80 + 2000
