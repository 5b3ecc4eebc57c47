"""FLOPEX_QUOTE_SOURCE=probe: quotes come from the beat probe's fresh results, no quote tasks and
no live pings; without fresh probes the job is quoted live as usual."""

from __future__ import annotations

import dataclasses

import pytest

from app.api import inference
from app.db import session_scope
from app.providers.breaker import Breaker
from app.providers.probe import probe_all
from config.settings import get_settings

BODY = {
    "model": "llama-3.1-8b",
    "input": "probe me",
    "max_output_tokens": 16,
    "performance_profile": "economy",
}


@pytest.fixture
def probe_mode(monkeypatch):
    settings = dataclasses.replace(get_settings(), quote_source="probe")
    monkeypatch.setattr(inference, "get_settings", lambda: settings)
    return settings


def probe(redis_client):
    settings = get_settings()
    with session_scope() as session:
        probe_all(
            session,
            redis_client,
            Breaker(redis_client, settings.breaker),
            timeout_s=1.0,
            health_window_s=settings.health_window_s,
        )


def test_fresh_probes_answer_the_quotes(client, pipeline, make_account, redis_client, probe_mode):
    account = make_account()
    probe(redis_client)
    pings = {name: p.models_calls for name, p in pipeline.items()}
    resp = client.post("/v1/inference", json=BODY, headers=account.headers)
    assert resp.status_code == 200, resp.text
    data = resp.get_json()
    assert data["provider"] == "alpha"  # economy: the cheapest, as with live quotes
    assert {name: p.models_calls for name, p in pipeline.items()} == pings  # no live ping
    quotes = {q["provider"]: q for q in data["routing"]["quotes"]}
    assert (
        all(q["live"] for q in quotes.values()) and quotes["alpha"]["estimated_latency_ms"] >= 200
    )


def test_a_provider_the_probe_saw_down_is_not_live(
    client, pipeline, make_account, redis_client, probe_mode
):
    account = make_account()
    pipeline["alpha"].configure(fault="error", fault_scope="models")
    probe(redis_client)
    body = {**BODY, "routing_strategy": "prefer_live"}
    data = client.post("/v1/inference", json=body, headers=account.headers).get_json()
    assert data["provider"] == "charlie"
    quotes = {q["provider"]: q for q in data["routing"]["quotes"]}
    assert quotes["alpha"]["live"] is False


def test_without_fresh_probes_the_job_is_quoted_live(client, pipeline, make_account, probe_mode):
    account = make_account()
    pings = sum(p.models_calls for p in pipeline.values())
    resp = client.post("/v1/inference", json=BODY, headers=account.headers)
    assert resp.status_code == 200
    assert sum(p.models_calls for p in pipeline.values()) == pings + 3
