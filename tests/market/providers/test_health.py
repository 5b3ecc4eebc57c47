"""app/market/providers/health.py: per-provider success rates in one-minute Redis buckets."""

from __future__ import annotations

from decimal import Decimal

import fakeredis
import pytest

from app.market.providers import health

WINDOW_S = 300


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def minute(monkeypatch) -> list[int]:
    """Pins the current bucket so that no test straddles a minute boundary."""
    current = [29_000_000]
    monkeypatch.setattr(health, "_bucket", lambda now=None: current[0])
    return current


def record(
    client: fakeredis.FakeRedis, provider: str, ok: int, fail: int, window_s: int = WINDOW_S
) -> None:
    for _ in range(ok):
        health.record_outcome(client, provider, True, window_s)
    for _ in range(fail):
        health.record_outcome(client, provider, False, window_s)


def test_no_history_is_none(client, minute):
    assert health.success_rate(client, "alpha", WINDOW_S) is None


@pytest.mark.parametrize(
    ("ok", "fail", "rate"),
    [
        (1, 0, "1.0000"),
        (0, 1, "0.0000"),
        (3, 1, "0.7500"),
        (2, 1, "0.6667"),
        (1, 2, "0.3333"),
        (999, 1, "0.9990"),
    ],
)
def test_rate_is_ok_over_all_outcomes_to_four_places(client, minute, ok, fail, rate):
    record(client, "alpha", ok, fail)
    result = health.success_rate(client, "alpha", WINDOW_S)
    assert result == Decimal(rate)
    assert str(result) == rate


def test_providers_are_counted_separately(client, minute):
    record(client, "alpha", 1, 3)
    record(client, "bravo", 4, 0)
    assert health.success_rate(client, "alpha", WINDOW_S) == Decimal("0.2500")
    assert health.success_rate(client, "bravo", WINDOW_S) == Decimal("1.0000")
    assert health.success_rate(client, "charlie", WINDOW_S) is None


def test_buckets_expire_after_the_window(client, minute):
    record(client, "alpha", 2, 1)
    key = f"flopex:health:alpha:{minute[0]}"
    assert client.hgetall(key) == {"ok": "2", "fail": "1"}
    ttl = client.ttl(key)
    assert WINDOW_S < ttl <= WINDOW_S + 60
    assert client.ttl(key) > 0


def test_rate_sums_the_buckets_inside_the_window_only(client, minute):
    start = minute[0]
    record(client, "alpha", 0, 5)  # five minutes ago: outside a 300 s window
    minute[0] = start + 1
    record(client, "alpha", 1, 1)
    minute[0] = start + 3
    record(client, "alpha", 2, 0)
    minute[0] = start + 5
    record(client, "alpha", 1, 0)

    # Buckets start+1 .. start+5 are in the window: 4 ok, 1 fail.
    assert health.success_rate(client, "alpha", WINDOW_S) == Decimal("0.8000")
    # A one-minute window sees only the current bucket.
    assert health.success_rate(client, "alpha", 60) == Decimal("1.0000")

    minute[0] = start + 20
    assert health.success_rate(client, "alpha", WINDOW_S) is None


def test_real_clock_records_into_the_current_minute(client):
    record(client, "alpha", 1, 0)
    keys = client.keys("flopex:health:alpha:*")
    assert len(keys) == 1
    assert abs(int(keys[0].rsplit(":", 1)[1]) - health._bucket()) <= 1
