"""Metrics, request ids, structured logs and protection (rate limits, body size)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from sqlalchemy import func, select, update

from app.infra.db import session_scope
from app.models import Account, Job

BODY = {"model": "qwen-7b", "input": "observe me", "max_output_tokens": 8}


def test_metrics_expose_the_named_series_after_a_request(client, pipeline, make_account):
    account = make_account()
    assert client.post("/v1/inference", json=BODY, headers=account.headers).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    for series in (
        "flopex_http_request_duration_seconds_bucket",
        "flopex_quote_duration_seconds_bucket",
        "flopex_provider_execution_duration_seconds_bucket",
        "flopex_jobs_finished_total",
        "flopex_wallet_captures_total",
        'flopex_queue_depth{queue="fast"}',
    ):
        assert series in text, series
    assert 'endpoint="/v1/inference"' in text and 'status="success"' in text


def test_request_metrics_labels_come_from_closed_sets(client, pipeline, make_account):
    account = make_account()
    body = {**BODY, "performance_profile": "fast"}
    assert client.post("/v1/inference", json=body, headers=account.headers).status_code == 200
    for method in ("AAAA", "BBBB"):
        assert client.open("/healthz", method=method).status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert 'endpoint="/v1/inference",method="POST",profile="fast"' in text.replace(
        ',status="200"', ""
    )
    assert "AAAA" not in text and "BBBB" not in text and 'method="other"' in text


def test_request_id_round_trips_into_the_tasks_logs(client, pipeline, make_account, worker):
    account = make_account()
    rid = f"test-{uuid.uuid4().hex}"
    resp = client.post("/v1/inference", json=BODY, headers={**account.headers, "X-Request-ID": rid})
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == rid
    job_id = resp.get_json()["id"]
    with session_scope() as session:
        assert session.get(Job, uuid.UUID(job_id)).request_id == rid
    lines = [json.loads(line) for line in worker.output().splitlines() if rid in line]
    assert lines, "the worker logged nothing with the request id"
    assert all(entry["request_id"] == rid for entry in lines)
    assert any(
        entry.get("job_id") == job_id and entry.get("status") == "success" for entry in lines
    )


def test_a_request_id_is_generated_when_absent_or_unsafe(client, database):
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id <script>"}).headers[
        "X-Request-ID"
    ]
    assert unsafe != "bad id <script>" and len(unsafe) == 32


def test_the_access_log_names_the_client_through_trusted_proxies_only(
    database, redis_client, monkeypatch, caplog
):
    """FLOPEX_TRUSTED_PROXY_HOPS: 0 logs the connection's peer whatever X-Forwarded-For says (a
    client could forge it); 1 takes the address the one trusted proxy appended."""
    from app import create_app
    from config.settings import get_settings

    def client_logged(hops: str) -> str:
        monkeypatch.setenv("FLOPEX_TRUSTED_PROXY_HOPS", hops)
        get_settings.cache_clear()
        app = create_app({"TESTING": True})
        caplog.clear()
        with caplog.at_level("INFO", logger="flopex.access"):
            app.test_client().get(
                "/healthz",
                headers={"X-Forwarded-For": "192.0.2.1, 203.0.113.5"},
                environ_base={"REMOTE_ADDR": "10.0.0.7"},
            )
        (record,) = [r for r in caplog.records if r.name == "flopex.access"]
        return record.client

    try:
        assert client_logged("0") == "10.0.0.7"
        assert client_logged("1") == "203.0.113.5"
        monkeypatch.setenv("FLOPEX_TRUSTED_PROXY_HOPS", "-1")
        get_settings.cache_clear()
        with pytest.raises(ValueError, match="FLOPEX_TRUSTED_PROXY_HOPS"):
            get_settings()
    finally:
        monkeypatch.delenv("FLOPEX_TRUSTED_PROXY_HOPS")
        get_settings.cache_clear()


def test_raw_api_keys_never_reach_the_logs(client, pipeline, make_account, worker, caplog):
    account = make_account()
    caplog.set_level("DEBUG")
    client.post("/v1/inference", json=BODY, headers=account.headers)
    secret = account.api_key.split("_", 2)[2]
    assert secret not in caplog.text
    assert secret not in worker.output()


def test_rate_limit_answers_429_with_retry_after_and_changes_nothing(
    client, pipeline, make_account
):
    account = make_account()
    with session_scope() as session:
        session.execute(
            update(Account)
            .where(Account.id == account.account_id)
            .values(rate_limit_per_min=1, rate_limit_burst=1)
        )
    first = client.get("/v1/wallet", headers=account.headers)
    assert first.status_code == 200
    resp = client.post("/v1/inference", json=BODY, headers=account.headers)
    assert resp.status_code == 429
    assert resp.get_json()["error"]["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    with session_scope() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Job).where(Job.account_id == account.account_id)
            )
            == 0
        )
    # Other accounts are not affected.
    assert client.get("/v1/wallet", headers=make_account().headers).status_code == 200


def test_an_accounts_own_rate_limit_wins_zero_included(client, pipeline, make_account):
    def limited(per_min, burst):  # type: ignore[no-untyped-def]
        account = make_account()
        with session_scope() as session:
            session.execute(
                update(Account)
                .where(Account.id == account.account_id)
                .values(rate_limit_per_min=per_min, rate_limit_burst=burst)
            )
        return [client.get("/v1/wallet", headers=account.headers).status_code for _ in range(4)]

    # Only a rate: the burst is at most a minute of it, not the deployment's 200.
    assert limited(2, None) == [200, 200, 429, 429]
    assert limited(0, None) == [429] * 4  # zero means none, not "the default"
    assert limited(60, 3) == [200, 200, 200, 429]


def test_chunked_body_over_the_limit_is_413(client, pipeline, make_account):
    from config.settings import get_settings

    account = make_account()
    payload = json.dumps({**BODY, "input": "x" * (get_settings().max_body_bytes + 100)}).encode()
    resp = client.post(
        "/v1/inference",
        input_stream=io.BytesIO(payload),
        headers={
            **account.headers,
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "request_too_large"
