"""app/infra/ratelimit.py: the GCRA bucket in Redis, exact to the microsecond."""

from __future__ import annotations

import uuid

from app.infra.ratelimit import RateLimiter


def test_each_request_costs_exactly_a_minute_over_the_rate(redis_client):
    limiter = RateLimiter(redis_client)
    account = uuid.uuid4()
    key = f"flopex:rl:us:{account}"
    stamps = []
    for _ in range(3):  # 7/min: an interval of 8.571429 s, so these three are one burst
        assert limiter.hit(account, per_minute=7, burst=5).allowed
        stamps.append(int(redis_client.get(key)))
    # 60,000,000 µs / 7, rounded up; milliseconds rounded down gave 8,571,000 (7,000/min let
    # 7,500 through).
    assert stamps[2] - stamps[1] == stamps[1] - stamps[0] == 8_571_429
    redis_client.delete(key)


def test_a_burst_is_the_limit_and_the_answer_says_when_to_come_back(redis_client):
    limiter = RateLimiter(redis_client)
    account = uuid.uuid4()
    assert [limiter.hit(account, per_minute=1, burst=2).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    refused = limiter.hit(account, per_minute=1, burst=2)
    assert not refused.allowed and 0 < refused.retry_after_ms <= 60_000
    assert not limiter.hit(uuid.uuid4(), per_minute=0, burst=10).allowed  # zero: nothing
    redis_client.delete(f"flopex:rl:us:{account}")


def test_failed_authentications_are_counted_per_address(redis_client):
    limiter = RateLimiter(redis_client)
    address = f"192.0.2.{uuid.uuid4().int % 250}"
    assert limiter.record_auth_failure(address, per_minute=2).allowed
    assert limiter.record_auth_failure(address, per_minute=2).allowed
    refused = limiter.record_auth_failure(address, per_minute=2)
    assert not refused.allowed and 0 < refused.retry_after_ms <= 30_000
    assert limiter.record_auth_failure("198.51.100.7", per_minute=2).allowed  # another address
    redis_client.delete(f"flopex:rl:authfail:{address}", "flopex:rl:authfail:198.51.100.7")
