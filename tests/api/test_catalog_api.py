"""GET /v1/models, GET /v1/providers and the health probe feeding routing."""

from __future__ import annotations

import time
from decimal import Decimal

from app.db import session_scope
from config.settings import get_settings
from tests.conftest import decimal_json
from tests.factories import make_probe_results


def test_models_lists_caps_and_price_ranges(client, catalog, make_account):
    account = make_account()
    body = decimal_json(client.get("/v1/models", headers=account.headers).data)
    models = {m["id"]: m for m in body["data"]}
    llama = models["llama-3.1-8b"]
    assert llama["max_output_tokens"] == 4096 and llama["context_length"] == 16384
    assert llama["providers"] == 3
    assert llama["pricing"]["input_usd_per_million"] == {
        "min": Decimal("0.05"),
        "max": Decimal("0.18"),
    }
    assert llama["pricing"]["output_usd_per_million"] == {
        "min": Decimal("0.08"),
        "max": Decimal("0.2"),
    }
    assert models["orphan-1b"]["providers"] == 0 and models["orphan-1b"]["pricing"] is None
    assert client.get("/v1/models").status_code == 401


def test_providers_show_probe_state_and_breaker(client, pipeline, make_account, redis_client):
    account = make_account()
    make_probe_results(redis_client)
    data = {
        p["id"]: p for p in client.get("/v1/providers", headers=account.headers).get_json()["data"]
    }
    assert set(data) == {"alpha", "bravo", "charlie"}
    alpha = data["alpha"]
    assert alpha["live"] is True and alpha["latency_ms"] >= 80 and alpha["circuit"] == "closed"
    assert alpha["models"] == ["llama-3.1-8b", "qwen-7b"]


def test_a_killed_provider_is_marked_down_avoided_and_recovers(
    client, pipeline, make_account, redis_client
):
    from sandbox import SandboxProvider

    settings = get_settings()
    account = make_account()
    body = {
        "model": "llama-3.1-8b",
        "input": "route around",
        "max_output_tokens": 16,
        "performance_profile": "economy",
    }
    alpha = pipeline["alpha"]
    port, config = alpha.port, alpha.config
    alpha.stop()
    try:
        for _ in range(settings.breaker_threshold):
            results = {r.provider: r for r in make_probe_results(redis_client)}
            assert results["alpha"].live is False
        providers = {
            p["id"]: p
            for p in client.get("/v1/providers", headers=account.headers).get_json()["data"]
        }
        assert providers["alpha"]["live"] is False and providers["alpha"]["circuit"] == "open"

        # Cheapest is alpha, but its breaker is open: every strategy routes around it.
        data = client.post("/v1/inference", json=body, headers=account.headers).get_json()
        assert data["provider"] == "charlie"
        assert {"provider": "alpha", "reason": "circuit_open"} in data["routing"]["dropped"]
        assert [a["provider"] for a in data["routing"]["attempts"]] == ["charlie"]
    finally:
        pipeline["alpha"] = SandboxProvider(config, port=port).start()

    # After the cool-down the breaker is half-open; the next successful probe closes it.
    later = time.time() + settings.breaker_cooldown_s + 1
    assert {r.provider: r.live for r in make_probe_results(redis_client, now=later)}[
        "alpha"
    ] is True
    providers = {
        p["id"]: p for p in client.get("/v1/providers", headers=account.headers).get_json()["data"]
    }
    assert providers["alpha"]["circuit"] == "closed"
    data = client.post("/v1/inference", json=body, headers=account.headers).get_json()
    assert data["provider"] == "alpha"


def test_models_and_providers_agree_with_what_routing_would_use(client, catalog, make_account):
    from sqlalchemy import select, update

    from app.models import ModelAlias, Offering, Provider

    account = make_account()

    def listed() -> tuple[dict, dict]:
        models = client.get("/v1/models", headers=account.headers).get_json()["data"]
        providers = client.get("/v1/providers", headers=account.headers).get_json()["data"]
        return {m["id"]: m for m in models}, {p["id"]: p for p in providers}

    with session_scope() as session:
        qwen = session.scalar(select(ModelAlias).where(ModelAlias.alias == "qwen-7b"))
        serving = set(
            session.scalars(
                select(Offering.provider_id).where(Offering.alias_id == qwen.id, Offering.enabled)
            )
        )
    try:
        with session_scope() as session:  # every provider of qwen-7b switched off
            session.execute(update(Provider).where(Provider.id.in_(serving)).values(enabled=False))
        models, _ = listed()
        assert models["qwen-7b"]["providers"] == 0 and models["qwen-7b"]["pricing"] is None
        with session_scope() as session:  # providers back, the model itself switched off
            session.execute(update(Provider).where(Provider.id.in_(serving)).values(enabled=True))
            session.execute(
                update(ModelAlias).where(ModelAlias.id == qwen.id).values(enabled=False)
            )
        models, providers = listed()
        assert "qwen-7b" not in models
        assert all("qwen-7b" not in p["models"] for p in providers.values())
    finally:
        with session_scope() as session:
            session.execute(update(Provider).where(Provider.id.in_(serving)).values(enabled=True))
            session.execute(update(ModelAlias).where(ModelAlias.id == qwen.id).values(enabled=True))
