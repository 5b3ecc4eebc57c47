"""app/jobs/quoting.py: the join of a job's quotes, read with every provider's recent success
rate in one round trip (Redis logic only: fakeredis)."""

from __future__ import annotations

import fakeredis
import pytest

from app.jobs.quoting import collect_quotes, store_quote
from app.providers import health
from app.routing import Quote
from tests.factories import route_option

WINDOW_S = 300


@pytest.fixture
def client(monkeypatch) -> fakeredis.FakeRedis:
    monkeypatch.setattr(health, "_bucket", lambda now=None: 29_000_000)
    return fakeredis.FakeRedis(decode_responses=True)


def test_collected_quotes_carry_each_providers_success_rate(client):
    for ok in (True, True, True, False):
        health.record_outcome(client, "alpha", ok, WINDOW_S)
    quoted = Quote(
        **{k: v for k, v in route_option("alpha").items() if k in Quote.__dataclass_fields__},
        live=True,
        estimated_latency_ms=7,
    )
    assert store_quote(client, "job-1", quoted) == 1

    quotes = collect_quotes(
        client, "job-1", [route_option("alpha"), route_option("bravo")], WINDOW_S
    )

    alpha, bravo = quotes
    assert (alpha.provider, alpha.live, alpha.estimated_latency_ms) == ("alpha", True, 7)
    assert alpha.success_rate == "0.7500"
    # bravo's task never reported: a not-live quote, still priced, with no history.
    assert (bravo.live, bravo.error, bravo.success_rate) == (False, "no_quote_by_deadline", None)
    assert bravo.estimated_charge_micros == 12
