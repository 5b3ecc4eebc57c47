"""The quote board on the whole stack (web, real worker, PostgreSQL, Redis, sandboxes): the one
hop, single flight across concurrent requests, learning from executions, replaying stored
decisions, and how execution failures feed the board."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from app.db import session_scope
from app.models import Job
from app.providers import board, health, speed
from app.providers.breaker import Breaker
from app.providers.probe import probe_all
from app.routing import Quote, select
from config.settings import get_settings
from tests.conftest import chat_calls

BODY = {"model": "llama-3.1-8b", "input": "board me", "max_output_tokens": 16}


def post(client: Any, account: Any, body: dict[str, Any]) -> Any:
    return client.post("/v1/inference", json=body, headers=account.headers)


def fill_board(redis_client: Any) -> None:
    settings = get_settings()
    with session_scope() as session:
        probe_all(
            session, redis_client, Breaker.from_settings(redis_client, settings), timeout_s=1.0
        )


def load(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def models_calls(sandboxes: dict[str, Any]) -> dict[str, int]:
    return {name: p.models_calls for name, p in sandboxes.items()}


def test_a_fresh_board_means_no_provider_round_trip_before_execution(
    client, pipeline, make_account, redis_client
):
    fill_board(redis_client)
    before = models_calls(pipeline)
    data = post(client, make_account(), {**BODY, "performance_profile": "fast"}).get_json()
    assert data["status"] == "success"
    assert models_calls(pipeline) == before  # nobody was pinged for this job
    quotes = {q["provider"]: q for q in data["routing"]["quotes"]}
    # The trace shows each quote's components and age.
    bravo = quotes["bravo"]
    assert bravo["estimated_latency"]["output_tokens"] == 16
    assert bravo["estimated_latency"]["speed_source"] == "prior"
    assert set(bravo["estimated_latency"]) >= {"rtt_ms", "ttft_ms", "tokens_per_s", "samples"}
    assert bravo["age_ms"] >= 0 and bravo["checked_at"].endswith("Z")
    parts = bravo["estimated_latency"]
    expected = parts["rtt_ms"] + parts["ttft_ms"] + -(-16 * 1000 // 100000)
    assert bravo["estimated_latency_ms"] == expected


def test_concurrent_requests_on_a_stale_board_ping_each_provider_once(
    flask_app, pipeline, make_account, redis_client
):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=400)  # each refresh lasts long enough to be shared
    before = models_calls(pipeline)
    start = threading.Barrier(6)
    statuses: list[int] = []

    def request() -> None:
        test_client = flask_app.test_client()
        start.wait()
        statuses.append(post(test_client, account, BODY).status_code)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    after = models_calls(pipeline)
    assert {name: after[name] - before[name] for name in after} == {
        "alpha": 1,
        "bravo": 1,
        "charlie": 1,
    }


def test_speed_is_learned_from_executions(client, pipeline, make_account, redis_client):
    account = make_account()
    body = {**BODY, "performance_profile": "economy"}  # alpha, the cheapest, serves each
    for _ in range(5):
        assert post(client, account, body).get_json()["provider"] == "alpha"
    data = post(client, account, body).get_json()
    alpha = {q["provider"]: q for q in data["routing"]["quotes"]}["alpha"]
    assert alpha["estimated_latency"]["speed_source"] == "learned"
    assert alpha["estimated_latency"]["samples"] == 5
    # alpha answers 200 ms after the request: its learned time to first token is about that,
    # less the round trip the board measured (the sandbox delays its ping as much).
    assert alpha["estimated_latency"]["ttft_ms"] < 150


def test_every_stored_decision_replays_from_the_job_row(client, pipeline, make_account):
    account = make_account()
    ids = []
    for profile in ("economy", "balanced", "fast"):
        for strategy in ("lowest_cost", "prefer_live"):
            body = {**BODY, "performance_profile": profile, "routing_strategy": strategy}
            ids.append(post(client, account, body).get_json()["id"])
    settings = get_settings()
    for job_id in ids:
        job = load(job_id)
        quotes = [Quote.from_dict(q) for q in job.quotes]
        replayed = select(
            quotes,
            profile=job.performance_profile,
            strategy=job.routing_strategy,
            max_price_micros=job.max_price_micros,
            max_latency_ms=job.max_latency_ms,
            weights=settings.balanced_weights,
            hold_micros=job.hold_micros,
            estimated_input_tokens=job.estimated_input_tokens,
            max_output_tokens=job.max_output_tokens,
            explore=bool(job.routing.get("explored")),
            explore_below=speed.MIN_SAMPLES,
        )
        assert replayed.to_dict() == job.routing, job.performance_profile


def test_a_429_falls_through_at_once_and_holds_the_provider_off(
    client, pipeline, make_account, redis_client
):
    pipeline["alpha"].configure(fault="rate_limit", fault_count=5)
    data = post(client, make_account(), {**BODY, "performance_profile": "economy"}).get_json()
    assert data["provider"] == "charlie"
    # Asked once, not retried within its Retry-After (the worker allows one retry).
    assert chat_calls(pipeline)["alpha"] == 1
    entry = board.read(redis_client, ["alpha"])["alpha"]
    assert not entry.live and entry.error == "rate_limited"
    # The next economy job does not try alpha while it asked us to wait: its quote is not
    # live, and prefer_live puts it last.
    body = {**BODY, "performance_profile": "economy", "routing_strategy": "prefer_live"}
    data = post(client, make_account(), body).get_json()
    assert data["provider"] == "charlie" and chat_calls(pipeline)["alpha"] == 1


def test_the_success_rate_counts_every_failed_try(client, pipeline, make_account, redis_client):
    # Two 500s: the first try and its one retry, then the fallback serves.
    pipeline["alpha"].configure(fault="error", fault_count=2)
    data = post(client, make_account(), {**BODY, "performance_profile": "economy"}).get_json()
    assert data["provider"] == "charlie" and chat_calls(pipeline)["alpha"] == 2
    # Both failed tries count, not only the last one.
    assert health.success_rate(redis_client, "alpha", get_settings().health_window_s) == 0
    fails = sum(
        int(redis_client.hget(key, "fail") or 0)
        for key in redis_client.scan_iter("flopex:health:alpha:*")
    )
    assert fails == 2
