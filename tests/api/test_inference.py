"""POST /v1/inference through the real pipeline: Flask -> Celery on Redis -> quote tasks ->
route -> sandbox providers over HTTP -> wallet settled in PostgreSQL."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from app import wallet
from app.db import session_scope
from app.models import Job, LedgerEntry, Provider
from app.money import customer_charge, micros_to_usd, usd_to_micros
from app.pricing import estimate_input_tokens
from tests.api_document import DOC_REQUEST
from tests.conftest import PROVIDERS, chat_calls, decimal_json


def post(client: Any, account: Any, body: dict[str, Any]) -> Any:
    return client.post("/v1/inference", json=body, headers=account.headers)


def balance(account: Any) -> int:
    with session_scope() as session:
        return wallet.get_state(session, account.wallet_id).balance_micros


def ledger(account: Any) -> list[LedgerEntry]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.wallet_id == account.wallet_id)
                .order_by(LedgerEntry.id)
            )
        )


def test_documented_request_returns_every_documented_field(client, pipeline, make_account):
    account = make_account("10.00")
    resp = post(client, account, DOC_REQUEST)
    assert resp.status_code == 200, resp.text
    body = decimal_json(resp.data)

    uuid.UUID(body["id"])
    assert body["object"] == "inference"
    assert body["model"] == "llama-3.1-8b"
    assert isinstance(body["output_text"], str) and body["output_text"]
    assert body["status"] == "success"
    usage = body["usage"]
    assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    assert isinstance(body["performance"]["latency_ms"], int)
    billing = body["billing"]
    assert isinstance(billing["cost_usd"], Decimal) and billing["cost_usd"] > 0
    assert billing["cost_display"] == f"${billing['cost_usd']}"
    assert (billing["input_tokens"], billing["output_tokens"], billing["total_tokens"]) == (
        usage["input_tokens"],
        usage["output_tokens"],
        usage["total_tokens"],
    )
    assert billing["cost_per_million_tokens_usd"] == (
        billing["cost_usd"] * 1_000_000 / usage["total_tokens"]
    ).quantize(Decimal("0.000001"))
    assert billing["balance_remaining_usd"] == Decimal("10") - billing["cost_usd"]
    assert body["customer_ref"] == "order-9921"
    assert body["metadata"] == {"env": "staging"}
    assert body["provider"] in PROVIDERS


def test_charge_matches_ledger_and_usage_exactly(client, pipeline, make_account):
    account = make_account("10.00")
    before = balance(account)
    first = decimal_json(post(client, account, DOC_REQUEST).data)
    second = decimal_json(post(client, account, {**DOC_REQUEST, "input": "Another prompt."}).data)
    after = balance(account)

    assert before - after == (first["billing"]["cost_usd"] + second["billing"]["cost_usd"]) * 10**6
    assert second["billing"]["balance_remaining_usd"] == (
        first["billing"]["balance_remaining_usd"] - second["billing"]["cost_usd"]
    )
    entries = ledger(account)
    captures = [e for e in entries if e.kind == "capture"]
    assert [-e.amount_micros for e in captures] == [
        int(first["billing"]["cost_usd"] * 10**6),
        int(second["billing"]["cost_usd"] * 10**6),
    ]
    with session_scope() as session:
        sums = wallet.ledger_sums(session, account.wallet_id)
        state = wallet.get_state(session, account.wallet_id)
        job = session.get(Job, uuid.UUID(first["id"]))
    assert sums == state and state.held_micros == 0
    # The charge follows from the serving provider's own usage report and its price.
    price_in, price_out = PROVIDERS[first["provider"]]["price"]
    expected = customer_charge(
        first["usage"]["input_tokens"],
        first["usage"]["output_tokens"],
        int(Decimal(price_in) * 10**6),
        int(Decimal(price_out) * 10**6),
        Decimal("0.15"),
    )
    assert (
        micros_to_usd(expected) == first["billing"]["cost_usd"] == micros_to_usd(job.charge_micros)
    )


@pytest.mark.parametrize(
    ("profile", "strategy", "winner"),
    [
        ("economy", "lowest_cost", "alpha"),
        ("fast", "lowest_cost", "bravo"),
        ("balanced", "lowest_cost", "charlie"),
        ("economy", "prefer_live", "alpha"),
        ("fast", "prefer_live", "bravo"),
    ],
)
def test_each_profile_picks_the_provider_its_rule_says(
    client, pipeline, make_account, profile, strategy, winner
):
    account = make_account()
    body = {
        "model": "llama-3.1-8b",
        "input": "Route me.",
        "max_output_tokens": 64,
        "performance_profile": profile,
        "routing_strategy": strategy,
    }
    resp = post(client, account, body)
    assert resp.status_code == 200, resp.text
    data = resp.get_json()
    assert data["provider"] == winner
    assert data["routing"]["winner"] == winner
    assert len(data["routing"]["quotes"]) == 3


def test_prefer_live_ranks_a_live_provider_over_a_cheaper_dead_one(client, pipeline, make_account):
    account = make_account()
    pipeline["alpha"].configure(fault="error", fault_scope="all")
    body = {"model": "llama-3.1-8b", "input": "x", "max_output_tokens": 32}
    live = post(
        client,
        account,
        {**body, "performance_profile": "economy", "routing_strategy": "prefer_live"},
    )
    assert live.status_code == 200
    assert live.get_json()["provider"] == "charlie"  # cheapest of the live ones
    assert pipeline["alpha"].chat_calls == 0

    # lowest_cost ranks by price alone: the dead alpha is tried first, then the next one serves.
    cheapest = post(
        client,
        account,
        {**body, "performance_profile": "economy", "routing_strategy": "lowest_cost"},
    )
    assert cheapest.status_code == 200
    data = cheapest.get_json()
    assert data["provider"] == "charlie"
    assert [a["provider"] for a in data["routing"]["attempts"]] == ["alpha", "charlie"]


def test_max_price_rejects_with_no_provider_call_and_no_charge(client, pipeline, make_account):
    account = make_account()
    calls = chat_calls(pipeline)
    before = ledger(account)
    resp = post(client, account, {**DOC_REQUEST, "max_price_usd": 0.0000001})
    assert resp.status_code == 422
    err = resp.get_json()["error"]
    assert err["code"] == "max_price_exceeded" and err["param"] == "max_price_usd"
    assert chat_calls(pipeline) == calls
    assert [(e.id, e.kind) for e in ledger(account)] == [(e.id, e.kind) for e in before]


def test_max_price_drops_only_the_quotes_above_it(client, pipeline, make_account):
    account = make_account()
    body = {**DOC_REQUEST, "performance_profile": "fast", "max_latency_ms": None}
    # Between alpha's and charlie's worst case: only alpha fits, though bravo is fastest.
    body["max_price_usd"] = 0.000035
    resp = post(client, account, body)
    assert resp.status_code == 200, resp.text
    data = decimal_json(resp.data)
    assert data["provider"] == "alpha"
    assert data["billing"]["cost_usd"] <= Decimal("0.000035")
    dropped = {d["provider"]: d["reason"] for d in data["routing"]["dropped"]}
    assert dropped == {"bravo": "over_max_price", "charlie": "over_max_price"}


def test_max_latency_rejects_with_no_provider_call_and_no_charge(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=60)
    calls = chat_calls(pipeline)
    before_balance = balance(account)
    resp = post(client, account, {**DOC_REQUEST, "max_latency_ms": 5})
    assert resp.status_code == 422, resp.text
    err = resp.get_json()["error"]
    assert err["code"] == "max_latency_exceeded" and err["param"] == "max_latency_ms"
    assert chat_calls(pipeline) == calls
    assert balance(account) == before_balance
    # The admission hold is released in full: no money moved.
    assert [e.kind for e in ledger(account)] == ["topup", "hold", "release"]


def test_failing_provider_falls_over_and_only_the_server_is_billed(client, pipeline, make_account):
    account = make_account()
    pipeline["alpha"].configure(fault="error")  # pings fine, executions fail
    resp = post(
        client, account, {**DOC_REQUEST, "performance_profile": "economy", "max_latency_ms": None}
    )
    assert resp.status_code == 200, resp.text
    data = decimal_json(resp.data)
    assert data["provider"] == "charlie"
    assert [a["provider"] for a in data["routing"]["attempts"]] == ["alpha", "charlie"]
    assert pipeline["alpha"].chat_calls >= 1 and pipeline["charlie"].chat_calls == 1
    price_in, price_out = PROVIDERS["charlie"]["price"]
    expected = customer_charge(
        data["usage"]["input_tokens"],
        data["usage"]["output_tokens"],
        int(Decimal(price_in) * 10**6),
        int(Decimal(price_out) * 10**6),
        Decimal("0.15"),
    )
    assert data["billing"]["cost_usd"] == micros_to_usd(expected)
    captures = [e for e in ledger(account) if e.kind == "capture"]
    assert len(captures) == 1 and -captures[0].amount_micros == expected


def test_executions_reach_each_providers_health_and_breaker(
    client, pipeline, make_account, redis_client
):
    from app.providers import health
    from app.providers.breaker import Breaker
    from config.settings import get_settings

    settings = get_settings()
    account = make_account()
    pipeline["alpha"].configure(fault="error")
    # charlie's breaker is half-open: its cool-down is over, no trial taken yet.
    redis_client.hset("flopex:breaker:charlie", mapping={"open_until": time.time() - 1})
    resp = post(
        client, account, {**DOC_REQUEST, "performance_profile": "economy", "max_latency_ms": None}
    )
    assert resp.status_code == 200, resp.text
    assert resp.get_json()["provider"] == "charlie"
    window = settings.health_window_s
    assert health.success_rate(redis_client, "alpha", window) == 0
    assert health.success_rate(redis_client, "charlie", window) == 1
    assert Breaker.from_settings(redis_client, settings).state("charlie") == "closed"


def test_a_provider_whose_executions_keep_failing_is_cut_off_by_its_breaker(
    client, pipeline, make_account, redis_client
):
    from app.providers.breaker import Breaker
    from config.settings import get_settings

    settings = get_settings()
    account = make_account()
    pipeline["alpha"].configure(fault="error")  # answers its pings, fails every completion
    body = {**DOC_REQUEST, "performance_profile": "economy", "max_latency_ms": None}
    for _ in range(settings.breaker_threshold):
        assert post(client, account, body).get_json()["provider"] == "charlie"
    assert Breaker.from_settings(redis_client, settings).state("alpha") == "open"
    calls = pipeline["alpha"].chat_calls
    data = post(client, account, body).get_json()
    assert {"provider": "alpha", "reason": "circuit_open"} in data["routing"]["dropped"]
    assert [a["provider"] for a in data["routing"]["attempts"]] == ["charlie"]
    assert pipeline["alpha"].chat_calls == calls


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ("error", "provider_error", 502),
        ("malformed", "provider_error", 502),
        ("bad_usage", "provider_error", 502),
    ],
)
def test_all_providers_failing_charges_nothing(client, pipeline, make_account, fault, code, status):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(fault=fault)
    before = balance(account)
    resp = post(client, account, {**DOC_REQUEST, "max_latency_ms": None})
    assert resp.status_code == status, resp.text
    err = resp.get_json()["error"]
    assert err["code"] == code and uuid.UUID(err["job_id"])
    assert balance(account) == before
    with session_scope() as session:
        state = wallet.get_state(session, account.wallet_id)
        assert state.held_micros == 0
        assert wallet.ledger_sums(session, account.wallet_id) == state
    kinds = [e.kind for e in ledger(account)]
    assert "capture" not in kinds and kinds.count("hold") >= 1 and kinds.count("release") == 1


def test_provider_timeouts_end_in_504_and_release_the_hold(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(fault="hang")
    resp = post(client, account, {**DOC_REQUEST, "max_latency_ms": None, "model": "qwen-7b"})
    assert resp.status_code == 504, resp.text
    assert resp.get_json()["error"]["code"] == "timeout"
    with session_scope() as session:
        assert wallet.get_state(session, account.wallet_id).held_micros == 0


def test_unreachable_providers_answer_503(client, flask_app, pipeline, make_account):
    account = make_account()
    models = flask_app.extensions["flopex_models"]  # a catalog change is seen after its TTL
    models.clear()
    with session_scope() as session:
        saved = {p.name: p.base_url for p in session.scalars(select(Provider))}
        for p in session.scalars(select(Provider)):
            p.base_url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    try:
        resp = post(client, account, {**DOC_REQUEST, "max_latency_ms": None})
    finally:
        with session_scope() as session:
            for p in session.scalars(select(Provider)):
                p.base_url = saved[p.name]
        models.clear()
    assert resp.status_code == 503, resp.text
    assert resp.get_json()["error"]["code"] == "no_provider_available"
    assert balance(account) == 10 * 10**6


def test_dropped_connections_are_provider_errors(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(fault="disconnect")
    resp = post(client, account, {**DOC_REQUEST, "max_latency_ms": None})
    assert resp.status_code == 502, resp.text
    assert resp.get_json()["error"]["code"] == "provider_error"
    # A dropped request may have reached the provider: it is never sent twice.
    assert chat_calls(pipeline) == {"alpha": 1, "bravo": 1, "charlie": 1}


def test_insufficient_balance_is_rejected_before_any_work(client, pipeline, make_account):
    account = make_account("0.000001")
    calls = chat_calls(pipeline)
    resp = post(client, account, DOC_REQUEST)
    assert resp.status_code == 402
    assert resp.get_json()["error"]["code"] == "insufficient_balance"
    assert chat_calls(pipeline) == calls
    with session_scope() as session:
        assert session.scalar(select(Job.id).where(Job.account_id == account.account_id)) is None


def test_model_without_providers_is_503_and_changes_nothing(client, pipeline, make_account):
    account = make_account()
    resp = post(client, account, {**DOC_REQUEST, "model": "orphan-1b"})
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "no_provider_available"


def test_job_row_records_quotes_winner_and_attempts(client, pipeline, make_account):
    account = make_account()
    data = post(client, account, DOC_REQUEST).get_json()
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(data["id"]))
        assert job.status == "success"
        assert job.customer_ref == "order-9921" and job.metadata_ == {"env": "staging"}
        assert job.request["input"] == DOC_REQUEST["input"]
        assert {q["provider"] for q in job.quotes} == {"alpha", "bravo", "charlie"}
        assert job.routing["winner"] == job.provider_name == data["provider"]
        assert job.attempts[-1]["outcome"] == "success"
        assert job.charge_micros <= job.hold_micros
        assert job.provider_cost_micros <= job.charge_micros


def test_a_wallet_that_covers_only_the_cheapest_routes_there_and_says_so(
    client, pipeline, make_account
):
    body = {**DOC_REQUEST, "max_latency_ms": None, "max_price_usd": None}
    probe = post(client, make_account(), body).get_json()
    with session_scope() as session:
        quotes = session.get(Job, uuid.UUID(probe["id"])).quotes
    charges = {q["provider"]: q["estimated_charge_micros"] for q in quotes}
    cheapest = min(charges, key=charges.get)
    assert probe["provider"] != cheapest  # balanced prefers another when the money allows

    account = make_account(f"{charges[cheapest] / 1_000_000:.6f}")
    resp = post(client, account, body)
    assert resp.status_code == 200, resp.text
    data = resp.get_json()
    assert data["provider"] == data["routing"]["winner"] == cheapest
    assert [a["provider"] for a in data["routing"]["attempts"]] == [cheapest]
    assert sorted(d["provider"] for d in data["routing"]["dropped"]) == sorted(
        p for p, c in charges.items() if c > charges[cheapest]
    )
    assert {d["reason"] for d in data["routing"]["dropped"]} == {"insufficient_balance"}


# The black-box report's request: worst cases alpha 47, charlie 71 and bravo 118 micro-USD.
SMALL_BODY = {"model": "llama-3.1-8b", "input": "hello", "max_output_tokens": 500}


def worst_cases(body: dict[str, Any]) -> dict[str, int]:
    estimated_input = estimate_input_tokens(body["input"])
    return {
        name: customer_charge(
            estimated_input,
            body["max_output_tokens"],
            usd_to_micros(spec["price"][0]),
            usd_to_micros(spec["price"][1]),
            Decimal("0.15"),
        )
        for name, spec in PROVIDERS.items()
    }


def test_a_wallet_that_covers_only_the_middle_provider_is_served_by_it(
    client, pipeline, make_account
):
    cases = worst_cases(SMALL_BODY)
    assert cases == {"alpha": 47, "charlie": 71, "bravo": 118}
    # alpha is too slow for the limit; charlie answers its ping at once.
    pipeline["alpha"].configure(latency_ms=400)
    pipeline["charlie"].configure(latency_ms=0)
    account = make_account("0.000097")  # covers charlie's worst case, not bravo's
    resp = post(client, account, {**SMALL_BODY, "max_latency_ms": 150})
    assert resp.status_code == 200, resp.text
    data = decimal_json(resp.data)
    assert data["provider"] == data["routing"]["winner"] == "charlie"
    assert sorted(data["routing"]["dropped"], key=lambda d: d["provider"]) == [
        {"provider": "alpha", "reason": "over_max_latency"},
        {"provider": "bravo", "reason": "insufficient_balance"},
    ]
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(data["id"]))
        assert job.hold_micros == cases["charlie"]
        assert job.charge_micros <= job.hold_micros
    assert [(e.kind, e.held_delta_micros) for e in ledger(account)] == [
        ("topup", 0),
        ("hold", cases["charlie"]),
        ("capture", -job.charge_micros),
        ("release", -(cases["charlie"] - job.charge_micros)),
    ]
    assert balance(account) == 97 - job.charge_micros


def test_fast_profile_gets_the_fastest_provider_the_wallet_can_pay_for(
    client, pipeline, make_account
):
    cases = worst_cases(SMALL_BODY)
    account = make_account("0.000097")
    resp = post(client, account, {**SMALL_BODY, "performance_profile": "fast"})
    assert resp.status_code == 200, resp.text
    data = decimal_json(resp.data)
    # bravo (fastest) is beyond the wallet; charlie (next fastest) is not, so the hold covers
    # it and it wins over the slower, cheaper alpha.
    assert data["provider"] == data["routing"]["winner"] == "charlie"
    assert data["routing"]["dropped"] == [{"provider": "bravo", "reason": "insufficient_balance"}]
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(data["id"]))
        assert job.hold_micros == cases["charlie"]
        assert [r["provider"] for r in job.routing["order"]] == ["charlie", "alpha"]


def test_legacy_prompt_is_accepted_when_input_is_empty(client, pipeline, make_account):
    account = make_account()
    body = {
        "model": "qwen-7b",
        "prompt": "Legacy prompt text.",
        "max_output_tokens": 8,
        "input": "",
    }
    resp = post(client, account, body)
    assert resp.status_code == 200, resp.text
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(resp.get_json()["id"]))
        assert job.request["input"] == "Legacy prompt text."
    sent = [r for p in pipeline.values() for r in p.requests_log()]
    assert any(r["messages"][0]["content"] == "Legacy prompt text." for r in sent)
