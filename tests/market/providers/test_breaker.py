"""The circuit breaker's transitions, on the test run's real Redis."""

from __future__ import annotations

import uuid

import pytest

from app.market.providers.breaker import Breaker, BreakerConfig

CONFIG = BreakerConfig(threshold=3, window_s=60, cooldown_s=30)


@pytest.fixture
def breaker(redis_client):
    return Breaker(redis_client, CONFIG)


@pytest.fixture
def provider():
    return f"p-{uuid.uuid4().hex[:8]}"


def test_opens_after_threshold_failures_in_the_window(breaker, provider):
    t = 1_000.0
    for i in range(CONFIG.threshold - 1):
        breaker.record_failure(provider, t + i)
        assert breaker.state(provider, t + i) == "closed" and breaker.allow(provider, t + i)
    breaker.record_failure(provider, t + 5)
    assert breaker.state(provider, t + 5) == "open"
    assert not breaker.allow(provider, t + 6)


def test_failures_outside_the_window_do_not_add_up(breaker, provider):
    breaker.record_failure(provider, 1_000)
    breaker.record_failure(provider, 1_001)
    breaker.record_failure(provider, 1_000 + CONFIG.window_s + 5)  # a new window starts
    assert breaker.state(provider, 1_100) == "closed"


def test_half_open_lets_exactly_one_trial_through(breaker, provider):
    for i in range(CONFIG.threshold):
        breaker.record_failure(provider, 1_000 + i)
    later = 1_000 + CONFIG.cooldown_s + 10
    assert breaker.state(provider, later) == "half_open"
    assert breaker.allow(provider, later) is True
    assert breaker.allow(provider, later + 1) is False  # the trial is under way


def test_trial_success_closes_and_failure_reopens(breaker, provider):
    for i in range(CONFIG.threshold):
        breaker.record_failure(provider, 1_000 + i)
    later = 1_000 + CONFIG.cooldown_s + 10
    assert breaker.allow(provider, later)
    breaker.record_failure(provider, later + 1)
    assert breaker.state(provider, later + 2) == "open"
    again = later + 1 + CONFIG.cooldown_s + 1
    assert breaker.allow(provider, again)
    breaker.record_success(provider)
    assert breaker.state(provider, again) == "closed" and breaker.allow(provider, again)


def test_success_resets_the_failure_count(breaker, provider):
    for i in range(CONFIG.threshold - 1):
        breaker.record_failure(provider, 1_000 + i)
    breaker.record_success(provider)
    breaker.record_failure(provider, 1_010)
    assert breaker.state(provider, 1_010) == "closed"


def test_breakers_of_one_client_share_its_scripts_and_keep_no_client_alive():
    import gc
    import weakref

    import fakeredis

    client = fakeredis.FakeRedis()  # registering a script does not reach the server
    first, second = Breaker(client, CONFIG), Breaker(client, CONFIG)
    assert first._allow is second._allow and first._fail is second._fail
    gone = weakref.ref(client)
    del client, first, second
    gc.collect()
    assert gone() is None
