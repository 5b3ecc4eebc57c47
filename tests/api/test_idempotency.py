"""Idempotency-Key on POST /v1/inference, through the real pipeline."""

from __future__ import annotations

import json
import threading
from typing import Any

from sqlalchemy import select

from app.db import session_scope
from app.models import IdempotencyKey, LedgerEntry
from tests.conftest import chat_calls

BODY = {
    "model": "llama-3.1-8b",
    "input": "Idempotent hello.",
    "max_output_tokens": 32,
    "performance_profile": "economy",
}


def post(client: Any, account: Any, body: Any, key: str | None, raw: bytes | None = None) -> Any:
    headers = dict(account.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return client.post("/v1/inference", data=raw, headers=headers)
    return client.post("/v1/inference", json=body, headers=headers)


def captures(account: Any) -> list[int]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(LedgerEntry.amount_micros).where(
                    LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "capture"
                )
            )
        )


def total_calls(sandboxes: dict[str, Any]) -> int:
    return sum(chat_calls(sandboxes).values())


def test_same_key_and_body_replays_byte_for_byte(client, pipeline, make_account):
    account = make_account()
    first = post(client, account, BODY, "key-1")
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    calls = total_calls(pipeline)
    second = post(client, account, BODY, "key-1")
    assert second.status_code == first.status_code
    assert second.data == first.data
    assert second.headers["Idempotent-Replayed"] == "true"
    assert total_calls(pipeline) == calls == 1
    assert len(captures(account)) == 1


def test_key_order_and_whitespace_do_not_matter(client, pipeline, make_account):
    account = make_account()
    first = post(client, account, BODY, "key-order")
    reordered = json.dumps(dict(reversed(list(BODY.items()))), indent=4).encode()
    second = post(client, account, None, "key-order", raw=reordered)
    assert second.status_code == 200 and second.data == first.data
    assert second.headers["Idempotent-Replayed"] == "true"
    assert total_calls(pipeline) == 1


def test_a_number_and_a_string_are_different_requests_but_spellings_of_a_number_are_not(
    client, pipeline, make_account
):
    account = make_account()
    raw = json.dumps({**BODY, "metadata": {"score": 0}}).encode()
    first = post(client, account, None, "key-num", raw=raw.replace(b"0}", b"1.5}"))
    assert first.status_code == 200, first.text
    for spelling in (b"1.50}", b"15e-1}"):
        same = post(client, account, None, "key-num", raw=raw.replace(b"0}", spelling))
        assert same.data == first.data and same.headers["Idempotent-Replayed"] == "true"
    text = post(client, account, None, "key-num", raw=raw.replace(b"0}", b'"1.5"}'))
    assert text.status_code == 422
    assert text.get_json()["error"]["code"] == "idempotency_key_reused_with_different_request"
    assert total_calls(pipeline) == 1


def _rewrite_key(key: str, **values: Any) -> None:
    from sqlalchemy import update

    with session_scope() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == key).values(**values))


def test_same_key_different_body_is_422_and_keeps_the_original(client, pipeline, make_account):
    account = make_account()
    first = post(client, account, BODY, "key-2")
    other = post(client, account, {**BODY, "input": "Something else."}, "key-2")
    assert other.status_code == 422
    err = other.get_json()["error"]
    assert err["code"] == "idempotency_key_reused_with_different_request"
    assert err["type"] == "idempotency_error"
    assert total_calls(pipeline) == 1
    again = post(client, account, BODY, "key-2")
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"


def test_key_reused_after_a_validation_error_runs_normally(client, pipeline, make_account):
    account = make_account()
    bad = post(client, account, {**BODY, "max_output_tokens": 0}, "key-3")
    assert bad.status_code == 400
    good = post(client, account, BODY, "key-3")
    assert good.status_code == 200 and "Idempotent-Replayed" not in good.headers
    assert total_calls(pipeline) == 1


def test_key_reused_after_insufficient_balance_runs_after_top_up(client, pipeline, make_account):
    from app import wallet

    account = make_account("0.000001")
    assert post(client, account, BODY, "key-4").status_code == 402
    with session_scope() as session:
        wallet.top_up(session, account.wallet_id, 1_000_000)
    resp = post(client, account, BODY, "key-4")
    assert resp.status_code == 200 and "Idempotent-Replayed" not in resp.headers


def test_two_accounts_with_one_key_string_are_apart(client, pipeline, make_account):
    a, b = make_account(), make_account()
    ra = post(client, a, BODY, "shared-key")
    rb = post(client, b, {**BODY, "input": "Account B's own prompt."}, "shared-key")
    assert ra.status_code == rb.status_code == 200
    assert ra.get_json()["id"] != rb.get_json()["id"]
    assert "Idempotent-Replayed" not in rb.headers
    assert total_calls(pipeline) == 2


def test_provider_failure_outcome_is_recorded_and_replayed(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(fault="error")
    first = post(client, account, BODY, "key-fail")
    assert first.status_code == 502
    calls = total_calls(pipeline)
    for provider in pipeline.values():
        provider.configure(fault=None)
    second = post(client, account, BODY, "key-fail")
    assert second.status_code == 502 and second.data == first.data
    assert second.headers["Idempotent-Replayed"] == "true"
    assert total_calls(pipeline) == calls
    assert captures(account) == []


def test_invalid_keys_are_rejected(client, pipeline, make_account):
    account = make_account()
    resp = post(client, account, BODY, "k" * 256)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["param"] == "Idempotency-Key"
    assert total_calls(pipeline) == 0


def test_fifty_concurrent_requests_with_one_key_execute_once(flask_app, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=150)  # keep the first request in flight while the rest arrive
    barrier = threading.Barrier(50)
    results: list[tuple[int, bytes, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        client = flask_app.test_client()
        barrier.wait()
        resp = post(client, account, BODY, "key-concurrent")
        with lock:
            results.append((resp.status_code, resp.data, resp.headers.get("Idempotent-Replayed")))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 50
    assert total_calls(pipeline) == 1
    assert len(captures(account)) == 1
    successes = [r for r in results if r[0] == 200]
    assert successes, results
    assert all(r[0] in (200, 409) for r in results)
    assert len({r[1] for r in successes}) == 1
    assert sum(1 for r in successes if r[2] is None) <= 1
    with session_scope() as session:
        rows = session.scalars(
            select(IdempotencyKey).where(IdempotencyKey.key == "key-concurrent")
        ).all()
        assert len(rows) == 1 and rows[0].response_status == 200


def test_expired_keys_are_purged_and_can_be_used_anew(client, pipeline, make_account):
    from datetime import UTC, datetime, timedelta

    from app import idempotency

    account = make_account()
    first = post(client, account, BODY, "key-expiring")
    _rewrite_key("key-expiring", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    # An expired record no longer binds the key, even before the purge ran.
    other = post(client, account, {**BODY, "input": "A new request."}, "key-expiring")
    assert other.status_code == 200 and "Idempotent-Replayed" not in other.headers
    assert other.get_json()["id"] != first.get_json()["id"]
    _rewrite_key("key-expiring", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with session_scope() as session:
        assert idempotency.purge_expired(session) >= 1
        assert (
            session.scalar(select(IdempotencyKey).where(IdempotencyKey.key == "key-expiring"))
            is None
        )


def test_retries_of_a_key_whose_job_runs_or_finished_never_wait_for_nothing(
    client, pipeline, make_account, redis_client, monkeypatch
):
    from app.api import inference
    from app.jobs import command

    waits: list[str] = []
    real_wait = inference.wait_done

    def spy(client_, job_id, timeout_s):  # type: ignore[no-untyped-def]
        waits.append(str(job_id))
        return real_wait(client_, job_id, timeout_s)

    monkeypatch.setattr(inference, "wait_done", spy)
    monkeypatch.setattr(command, "wait_done", spy)
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)  # the job is still running during the retries
    headers = {**account.headers, "Idempotency-Key": "key-retry"}
    first = client.post("/v1/inference", json=BODY, headers={**headers, "Prefer": "wait=0"})
    assert first.status_code == 202, first.text
    job_id = first.get_json()["id"]

    # Asked not to wait: the running job to poll, at once.
    waits.clear()
    running = client.post(
        "/v1/inference", json=BODY, headers={**headers, "Prefer": "respond-async"}
    )
    assert running.status_code == 202 and running.get_json()["id"] == job_id
    assert running.headers["Location"] == f"/v1/inference/{job_id}"
    assert running.headers["Preference-Applied"] == "respond-async"
    # Not a new execution: the first request's job, marked as such (docs/idempotency.md).
    assert running.headers["Idempotent-Replayed"] == "true"
    assert waits == []

    # Willing to wait, but not long enough: 409 that names the job to poll.
    busy = client.post("/v1/inference", json=BODY, headers={**headers, "Prefer": "wait=0"})
    assert busy.status_code == 409
    error = busy.get_json()["error"]
    assert error["code"] == "idempotency_key_in_use" and error["job_id"] == job_id
    assert busy.headers["Location"] == f"/v1/inference/{job_id}"
    assert busy.headers["Retry-After"] == "1"
    assert busy.headers["Preference-Applied"] == "wait=0"  # it waited, as long as asked
    assert "Idempotent-Replayed" not in busy.headers  # an error about the key, not a replay

    final = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers).get_json()
    assert final["status"] == "success"
    # Minutes later the completion signal has expired; the retry answers from the row at once.
    redis_client.delete(f"flopex:done:{job_id}")
    waits.clear()
    later = client.post("/v1/inference", json=BODY, headers=headers)
    assert later.status_code == 200 and later.headers["Idempotent-Replayed"] == "true"
    assert later.get_json()["id"] == job_id and later.get_json()["output_text"]
    assert waits == []
    again = client.post("/v1/inference", json=BODY, headers=headers)
    assert again.data == later.data
    assert total_calls(pipeline) == 1 and len(captures(account)) == 1


def test_an_async_acceptance_replays_with_its_headers(client, pipeline, make_account):
    account = make_account()
    headers = {**account.headers, "Idempotency-Key": "key-async", "Prefer": "respond-async"}
    first = client.post("/v1/inference", json=BODY, headers=headers)
    second = client.post("/v1/inference", json=BODY, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.data == first.data and second.headers["Idempotent-Replayed"] == "true"
    for header in ("Location", "Preference-Applied"):
        assert second.headers[header] == first.headers[header]
