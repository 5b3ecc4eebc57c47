"""`stream: true` and GET /v1/inference/{id}/events through the real stack: gunicorn (the
production configuration), a Celery worker, sandbox providers streaming over HTTP, PostgreSQL
and Redis. A raw SSE client reads the native stream as it arrives and drops its connection where
a test says so."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.billing.money import customer_charge, micros_to_usd
from app.infra.db import session_scope
from app.jobs import events
from app.models import Job, LedgerEntry
from tests.api.streaming_client import (
    SSE,
    WebServer,
    open_stream,
    request_json,
    start_web,
)
from tests.conftest import PROVIDERS

BODY = {"model": "llama-3.1-8b", "input": "Stream me a story.", "max_output_tokens": 200}


@pytest.fixture(scope="module")
def web(
    worker: Any, catalog: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebServer]:
    server = start_web(
        tmp_path_factory.mktemp("web") / "gunicorn.log",
        # Keep-alives every second (not 15), so that the tests see them without waiting long;
        # long enough for every provider's failure before a job's first token (early errors).
        {"FLOPEX_STREAM_KEEPALIVE_S": "1", "WEB_THREADS": "16"},
    )
    yield server
    server.stop()


def eventually(read: Any, timeout_s: float = 10.0) -> Any:
    """What ``read()`` returns once it is not None: the sandbox records a stream when it
    notices its client gone, at its next write."""
    deadline = time.monotonic() + timeout_s
    while (value := read()) is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)  # polling another process's observation, bounded by the deadline
    return value


def read_all(stream: Any) -> list[SSE]:
    return list(stream.events())


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        session.expunge(job)
        return job


def wait_final(web: WebServer, account: Any, job_id: str) -> dict[str, Any]:
    status, body, _ = request_json(web, "GET", f"/v1/inference/{job_id}?wait=30", account.headers)
    assert status == 200
    assert body["status"] in ("success", "failed", "cancelled"), body
    return body


def ledger(account: Any, job_id: str) -> dict[str, int]:
    with session_scope() as session:
        entries = session.scalars(
            select(LedgerEntry).where(
                LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.job_id == uuid.UUID(job_id)
            )
        )
        return {e.kind: e.amount_micros for e in entries}


def assert_billed_as(account: Any, job_id: str, billing: dict[str, Any]) -> None:
    """The ledger's capture equals the event's billing to the micro-dollar (none when free)."""
    captured = -ledger(account, job_id).get("capture", 0)
    assert micros_to_usd(captured) == billing["cost_usd"]
    job = job_row(job_id)
    assert job.charge_micros == captured
    assert micros_to_usd(job.balance_after_micros or 0) == billing["balance_remaining_usd"]


# -- the native stream -------------------------------------------------------------------------


def test_native_stream_sends_routing_deltas_then_the_completed_job(web, providers, make_account):
    account = make_account("10.00")
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["Cache-Control"] == "no-cache"
    job_id = stream.headers["X-Flopex-Job-Id"]
    got = read_all(stream)

    names = [e.event for e in got]
    assert names[0] == "routing" and names[-1] == "completed"
    assert set(names[1:-1]) == {"delta"}
    assert len(names) - 2 == 24  # one delta per token the provider sent
    routing = got[0].data
    assert routing["id"] == job_id and routing["provider"] == routing["order"][0]["provider"]
    # Every event can be resumed from: ids strictly increase.
    ids = [e.id for e in got]
    assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    completed = got[-1].data
    text = "".join(e.data["text"] for e in got if e.event == "delta")
    assert completed["output_text"] == text
    assert completed["status"] == "success" and completed["finish_reason"] == "stop"
    # The completed event is the job as GET shows it (plus the provider's finish_reason).
    status, polled, _ = request_json(web, "GET", f"/v1/inference/{job_id}", account.headers)
    assert status == 200
    assert {k: v for k, v in completed.items() if k != "finish_reason"} == polled
    assert_billed_as(account, job_id, completed["billing"])
    provider = next(p for n, p in providers.items() if n == completed["provider"])
    assert provider.streams_log()[-1]["outcome"] == "completed"


def test_keep_alive_comments_while_waiting(web, providers, make_account):
    account = make_account("10.00")
    for provider in providers.values():
        # 1.8 s before the first token (the worker's read timeout is 2 s in the tests).
        provider.configure(ttft_ms=1800)
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    got = read_all(stream)
    assert got[-1].event == "completed"
    assert len(stream.comments) >= 1  # after a second without an event


def test_a_provider_failing_before_the_first_token_falls_back(web, providers, make_account):
    account = make_account("10.00")
    providers["bravo"].configure(fault="error")  # `fast` ranks bravo first
    stream = open_stream(
        web,
        "POST",
        "/v1/inference",
        account.headers,
        {**BODY, "stream": True, "performance_profile": "fast"},
    )
    got = read_all(stream)
    routes = [e.data["provider"] for e in got if e.event == "routing"]
    assert routes[0] == "bravo" and len(routes) == 2  # one event per provider asked
    completed = got[-1].data
    assert got[-1].event == "completed" and completed["provider"] == routes[1] != "bravo"
    assert "".join(e.data["text"] for e in got if e.event == "delta") == completed["output_text"]
    assert_billed_as(account, completed["id"], completed["billing"])


def test_every_provider_failing_before_any_token_is_a_plain_error(web, providers, make_account):
    account = make_account("10.00")
    for provider in providers.values():
        provider.configure(fault="error")
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    assert stream.status == 502
    body = stream.body()
    assert body["error"]["code"] == "provider_error"
    job_id = body["error"]["job_id"]
    assert ledger(account, job_id).get("capture") is None


@pytest.mark.parametrize("fault", ["error", "disconnect", "stall"])
def test_a_provider_failing_mid_stream_ends_it_with_failed_billed_for_what_was_delivered(
    web, providers, make_account, fault
):
    account = make_account("10.00")
    for provider in providers.values():
        provider.configure(stream_fault=fault, stream_fault_after_tokens=5)
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    assert stream.status == 200
    got = read_all(stream)
    deltas = [e for e in got if e.event == "delta"]
    assert len(deltas) == 5
    assert got[-1].event == "failed"
    failed = got[-1].data
    assert failed["error"]["code"] == "provider_error"
    assert failed["status"] == "failed"
    # No fallback after the first token: one provider was asked.
    assert [e.event for e in got].count("routing") == 1
    assert sum(p.chat_calls for p in providers.values()) == 1
    # Charged for what was delivered: the provider reported no usage, so 5 output tokens and
    # the admission's input estimate, at the provider's price with the markup.
    job = job_row(failed["error"]["job_id"])
    assert (job.output_tokens, job.input_tokens) == (5, job.estimated_input_tokens)
    price_in, price_out = (Decimal(p) * 1_000_000 for p in PROVIDERS[failed["provider"]]["price"])
    expected = customer_charge(
        job.estimated_input_tokens, 5, int(price_in), int(price_out), Decimal("0.15")
    )
    assert job.charge_micros == min(expected, job.hold_micros)
    assert failed["billing"]["cost_usd"] == micros_to_usd(job.charge_micros)
    assert failed["output_text"] == "".join(e.data["text"] for e in deltas)
    assert_billed_as(account, job_id := failed["error"]["job_id"], failed["billing"])
    polled = wait_final(web, account, job_id)
    assert polled["status"] == "failed" and polled["billing"] == failed["billing"]


# -- a client that goes away ---------------------------------------------------------------------


def test_a_client_that_disconnects_stops_the_provider_and_pays_for_what_was_generated(
    web, providers, make_account
):
    account = make_account("10.00")
    for provider in providers.values():
        provider.configure(tokens_per_s=20, output_tokens=200)  # ten seconds of generation
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    job_id = stream.headers["X-Flopex-Job-Id"]
    seen = 0
    for event in stream.events():
        seen += event.event == "delta"
        if seen == 3:
            break
    stream.cut()

    final = wait_final(web, account, job_id)
    assert final["status"] == "cancelled"
    assert final["error"]["code"] == "job_cancelled"
    job = job_row(job_id)
    # The provider saw its client go long before the 200 tokens were out.
    served = providers[job.provider_name]
    log = eventually(lambda: (served.streams_log() or [None])[-1])
    assert log["outcome"] == "client_disconnected"
    assert 3 <= log["tokens_sent"] < 200
    # Charged exactly what the worker received from the provider (it stopped reading at once).
    assert 3 <= job.output_tokens <= log["tokens_sent"]
    assert final["usage"]["output_tokens"] == job.output_tokens
    assert_billed_as(account, job_id, final["billing"])


def test_an_async_stream_keeps_running_and_resumes_with_nothing_missing_or_repeated(
    web, providers, make_account
):
    account = make_account("10.00")
    for provider in providers.values():
        provider.configure(tokens_per_s=100, output_tokens=40)
    status, accepted, _ = request_json(
        web,
        "POST",
        "/v1/inference",
        {**account.headers, "Prefer": "respond-async"},
        {**BODY, "stream": True},
    )
    assert status == 202
    job_id = accepted["id"]

    # Attach, read a few events, and lose the connection: the job carries on.
    first = open_stream(web, "GET", f"/v1/inference/{job_id}/events", account.headers)
    assert first.status == 200
    part: list[SSE] = []
    for event in first.events():
        part.append(event)
        if len(part) == 4:
            break
    first.cut()
    rest_stream = open_stream(
        web,
        "GET",
        f"/v1/inference/{job_id}/events",
        {**account.headers, "Last-Event-ID": part[-1].id},
    )
    rest = read_all(rest_stream)
    whole = part + rest
    assert whole[-1].event == "completed"
    assert whole[-1].data["usage"]["output_tokens"] == 40
    assert len([e for e in whole if e.event == "delta"]) == 40
    assert (
        "".join(e.data["text"] for e in whole if e.event == "delta")
        == whole[-1].data["output_text"]
    )
    assert len({e.id for e in whole}) == len(whole)

    # The finished job's events replay identically from any point.
    replay = read_all(open_stream(web, "GET", f"/v1/inference/{job_id}/events", account.headers))
    assert [(e.id, e.event, e.data) for e in replay] == [(e.id, e.event, e.data) for e in whole]
    for cut in (1, 2, 17, len(whole) - 2, len(whole) - 1):
        resumed = read_all(
            open_stream(
                web,
                "GET",
                f"/v1/inference/{job_id}/events",
                {**account.headers, "Last-Event-ID": whole[cut - 1].id},
            )
        )
        assert [(e.id, e.event) for e in resumed] == [(e.id, e.event) for e in whole[cut:]]
    assert_billed_as(account, job_id, whole[-1].data["billing"])


def test_events_no_longer_kept_give_the_finished_job_as_one_event(
    web, providers, make_account, redis_client
):
    account = make_account("10.00")
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    job_id = stream.headers["X-Flopex-Job-Id"]
    completed = read_all(stream)[-1]
    redis_client.delete(events._key(job_id))  # as if FLOPEX_STREAM_EVENTS_TTL_S had passed
    again = read_all(open_stream(web, "GET", f"/v1/inference/{job_id}/events", account.headers))
    assert [e.event for e in again] == ["completed"]
    assert again[0].data == completed.data and again[0].id is None


def test_a_job_that_did_not_stream_can_be_attached_to(web, providers, make_account):
    account = make_account("10.00")
    status, accepted, _ = request_json(
        web, "POST", "/v1/inference", {**account.headers, "Prefer": "respond-async"}, BODY
    )
    assert status == 202
    got = read_all(
        open_stream(web, "GET", f"/v1/inference/{accepted['id']}/events", account.headers)
    )
    assert got[-1].event == "completed"
    assert got[-1].data["output_text"]


def test_bad_last_event_id_and_other_accounts_jobs(web, providers, make_account):
    account, other = make_account("10.00"), make_account("10.00")
    status, accepted, _ = request_json(
        web, "POST", "/v1/inference", {**account.headers, "Prefer": "respond-async"}, BODY
    )
    path = f"/v1/inference/{accepted['id']}/events"
    status, body, _ = request_json(web, "GET", path, {**account.headers, "Last-Event-ID": "x"})
    assert status == 400 and body["error"]["param"] == "Last-Event-ID"
    status, body, _ = request_json(web, "GET", path, other.headers)
    assert status == 404 and body["error"]["code"] == "job_not_found"


def test_stream_must_be_a_boolean(web, providers, make_account):
    account = make_account("10.00")
    status, body, _ = request_json(
        web, "POST", "/v1/inference", account.headers, {**BODY, "stream": "true"}
    )
    assert status == 400 and body["error"]["param"] == "stream"


def test_an_idempotent_retry_of_a_stream_replays_it_without_running_again(
    web, providers, make_account
):
    account = make_account("10.00")
    headers = {**account.headers, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = read_all(open_stream(web, "POST", "/v1/inference", headers, {**BODY, "stream": True}))
    retry = open_stream(web, "POST", "/v1/inference", headers, {**BODY, "stream": True})
    assert retry.headers["Idempotent-Replayed"] == "true"
    again = read_all(retry)
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in first]
    assert sum(p.chat_calls for p in providers.values()) == 1


def test_stream_events_are_bounded_and_expire(redis_client):
    from config.settings import get_settings

    settings = get_settings()
    job_id = str(uuid.uuid4())
    writer = events.EventWriter(redis_client, job_id, settings)
    assert writer.append("delta", {"text": "a"}) is False
    ttl = redis_client.ttl(events._key(job_id))
    assert 0 < ttl <= settings.stream_events_ttl_s
    events.request_stop(redis_client, job_id, 60)
    assert writer.append("delta", {"text": "b"}) is True
    got = events.read(redis_client, job_id, "0-0", None)
    assert [e.data["text"] for e in got] == ["a", "b"]
    assert events.read(redis_client, job_id, got[0].id, None)[0].data == {"text": "b"}
    assert events.delivered(redis_client, job_id) == ("ab", 2)

    small = events.EventWriter(
        redis_client, job_id, dataclasses.replace(settings, stream_max_events=16)
    )
    for i in range(40):
        small.append("delta", {"text": str(i)})
    assert redis_client.xlen(events._key(job_id)) == 16


def test_streams_are_counted_in_the_metrics(web, providers, make_account):
    from prometheus_client.parser import text_string_to_metric_families

    def closed(how: str) -> float:
        stream = open_stream(web, "GET", "/metrics", {})
        body = stream.response.read().decode()
        stream.conn.close()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "flopex_streams_closed_total" and sample.labels == {"how": how}:
                    return sample.value
        return 0.0

    account = make_account("10.00")
    before = closed("ended")
    read_all(open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True}))
    assert eventually(lambda: True if closed("ended") == before + 1 else None)


def test_last_event_id_takes_the_redis_id_forms(web, providers, make_account):
    """`<ms>-<seq>` or `<ms>` alone (0: from the start); longer than Redis's 64-bit parts is a
    400, never an error of ours."""
    account = make_account("10.00")
    stream = open_stream(web, "POST", "/v1/inference", account.headers, {**BODY, "stream": True})
    job_id = stream.headers["X-Flopex-Job-Id"]
    whole = read_all(stream)
    path = f"/v1/inference/{job_id}/events"
    from_zero = read_all(open_stream(web, "GET", path, {**account.headers, "Last-Event-ID": "0"}))
    assert [e.id for e in from_zero] == [e.id for e in whole]
    ms = whole[3].id.split("-")[0]
    after_ms = read_all(open_stream(web, "GET", path, {**account.headers, "Last-Event-ID": ms}))
    assert after_ms and after_ms[-1].event == "completed"
    assert {e.id for e in after_ms} <= {e.id for e in whole}
    status, body, _ = request_json(web, "GET", path, {**account.headers, "Last-Event-ID": "9" * 20})
    assert status == 400 and body["error"]["param"] == "Last-Event-ID"
