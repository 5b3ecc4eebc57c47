"""Every validation rule of POST /v1/inference: a clear error with a stable code and param, and
nothing changes (no job row, no ledger entry)."""

from __future__ import annotations

from typing import Any

import pytest

from app.db import session_scope
from tests.factories import MINIMAL_REQUEST as VALID
from tests.factories import footprint


@pytest.fixture
def account(catalog, make_account):
    return make_account("10.00")


def reject(
    client: Any, account: Any, body: Any, status: int, code: str, param: str | None, **kw: Any
) -> dict:
    before = footprint(account)
    resp = client.post("/v1/inference", json=body, headers=account.headers, **kw)
    assert resp.status_code == status, resp.text
    err = resp.get_json()["error"]
    assert set(err) >= {"type", "code", "message", "param"}
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]
    assert footprint(account) == before
    return err


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"model": 7}, "model"),
        ({"input": None}, "input"),
        ({"input": ""}, "input"),
        ({"input": 5}, "input"),
        ({"input": "a", "prompt": "b"}, "prompt"),
        ({"max_output_tokens": None}, "max_output_tokens"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": -3}, "max_output_tokens"),
        ({"max_output_tokens": 1.5}, "max_output_tokens"),
        ({"max_output_tokens": 16.0}, "max_output_tokens"),
        ({"max_output_tokens": "16"}, "max_output_tokens"),
        ({"max_output_tokens": True}, "max_output_tokens"),
        ({"max_output_tokens": 128_001}, "max_output_tokens"),
        ({"performance_profile": "turbo"}, "performance_profile"),
        ({"performance_profile": None}, "performance_profile"),
        ({"routing_strategy": "random"}, "routing_strategy"),
        ({"customer_ref": ""}, "customer_ref"),
        ({"customer_ref": "x" * 256}, "customer_ref"),
        ({"customer_ref": 42}, "customer_ref"),
        ({"max_price_usd": -0.01}, "max_price_usd"),
        ({"max_price_usd": "cheap"}, "max_price_usd"),
        ({"max_price_usd": " 0.02"}, "max_price_usd"),
        ({"max_price_usd": "+0.02"}, "max_price_usd"),
        ({"max_price_usd": "NaN"}, "max_price_usd"),
        ({"max_price_usd": True}, "max_price_usd"),
        ({"max_price_usd": 1e13}, "max_price_usd"),
        ({"max_price_usd": 10**400}, "max_price_usd"),
        ({"max_latency_ms": 0}, "max_latency_ms"),
        ({"max_latency_ms": 10.5}, "max_latency_ms"),
        ({"max_latency_ms": 600_001}, "max_latency_ms"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"metadata": "text"}, "metadata"),
        ({"metadata": {"blob": "x" * 20_000}}, "metadata"),
        ({"temperature": 0.2}, "temperature"),
        ({"input": "a\u0000b"}, "input"),
        ({"customer_ref": "ref\u0000"}, "customer_ref"),
        ({"metadata": {"k": "v\u0000"}}, "metadata"),
        ({"model": "\ud800"}, "model"),
        ({"input": "\ud800x"}, "input"),
        ({"customer_ref": "\udfff"}, "customer_ref"),
        ({"metadata": {"k": "\ud800"}}, "metadata"),
        ({"metadata": {"\ud800": 1}}, "metadata"),
        ({"metadata": {"k": [{"k": "\ud800"}]}}, "metadata"),
        ({"callback_url": "https://example.com/\ud800"}, "callback_url"),
    ],
)
def test_invalid_parameters_are_400_invalid_request(client, account, changes, param):
    body = {**VALID, **changes}
    if changes.get("max_output_tokens", 1) is None:
        body.pop("max_output_tokens")
    if "model" in changes and changes["model"] is None:
        body.pop("model")
    reject(client, account, body, 400, "invalid_request", param)


def test_metadata_nested_too_deeply_is_rejected(client, account):
    from app.api.schemas import MAX_METADATA_DEPTH

    nested: Any = "leaf"
    for _ in range(MAX_METADATA_DEPTH + 1):
        nested = {"k": nested}
    reject(client, account, {**VALID, "metadata": nested}, 400, "invalid_request", "metadata")


def test_input_longer_than_the_limit_is_rejected(client, account, monkeypatch):
    from config.settings import get_settings

    limit = get_settings().max_input_chars
    reject(client, account, {**VALID, "input": "a" * (limit + 1)}, 400, "invalid_request", "input")


def test_missing_required_fields_name_the_param(client, account):
    reject(
        client, account, {"input": "hi", "max_output_tokens": 4}, 400, "invalid_request", "model"
    )
    reject(
        client,
        account,
        {"model": "llama-3.1-8b", "input": "hi"},
        400,
        "invalid_request",
        "max_output_tokens",
    )


def test_body_must_be_a_json_object(client, account):
    before = footprint(account)
    for data in (b"not json", b"[1, 2]", b'"text"', b""):
        resp = client.post(
            "/v1/inference",
            data=data,
            headers={**account.headers, "Content-Type": "application/json"},
        )
        assert resp.status_code == 400, (data, resp.text)
        assert resp.get_json()["error"]["code"] == "invalid_request"
    assert footprint(account) == before


def test_unknown_model_is_404(client, account):
    reject(client, account, {**VALID, "model": "gpt-9"}, 404, "model_not_found", "model")


def test_max_output_tokens_above_the_model_cap(client, account):
    err = reject(
        client,
        account,
        {**VALID, "model": "qwen-7b", "max_output_tokens": 2049},
        400,
        "max_output_tokens_exceeds_model_cap",
        "max_output_tokens",
    )
    assert "2048" in err["message"]


def test_context_length_exceeded(client, account):
    reject(
        client,
        account,
        {**VALID, "model": "qwen-7b", "input": "word " * 8000, "max_output_tokens": 2048},
        400,
        "context_length_exceeded",
        "input",
    )


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic abc",
        "Bearer fpx_nothere00_aaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer short",
    ],
)
def test_bad_api_keys_are_401(client, catalog, header):
    headers = {"Authorization": header} if header is not None else {}
    resp = client.post("/v1/inference", json=VALID, headers=headers)
    assert resp.status_code == 401
    err = resp.get_json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"


def test_auth_is_checked_before_validation(client, catalog):
    resp = client.post("/v1/inference", data=b"garbage", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401


def test_revoked_key_is_401(client, account):
    from app.accounts import key_prefix, revoke_key

    with session_scope() as session:
        assert revoke_key(session, key_prefix(account.api_key))
    resp = client.post("/v1/inference", json=VALID, headers=account.headers)
    assert resp.status_code == 401


def test_body_over_the_size_limit_is_413(client, account):
    from config.settings import get_settings

    big = {**VALID, "input": "a" * (get_settings().max_body_bytes + 10)}
    reject(client, account, big, 413, "request_too_large", None)


def test_unknown_route_and_method_use_the_error_shape(client, account):
    resp = client.get("/v1/nothing", headers=account.headers)
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    resp = client.delete("/v1/inference", headers=account.headers)
    assert resp.status_code == 405 and resp.get_json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/inference"),
        ("GET", "/v1/inference"),
        ("GET", "/v1/inference/JOB"),
        ("POST", "/v1/inference/JOB/cancel"),
        ("GET", "/v1/wallet"),
        ("GET", "/v1/wallet/ledger"),
        ("GET", "/v1/webhook_secret"),
        ("GET", "/v1/models"),
        ("GET", "/v1/providers"),
    ],
)
def test_every_endpoint_refuses_a_query_parameter_it_does_not_know(client, account, method, path):
    """The same answer everywhere (Stripe's convention): 400 naming the parameter, nothing
    done. A misspelt `?limt=5` ignored would look like a bug of ours."""
    job_id = "00000000-0000-0000-0000-000000000000"
    before = footprint(account)
    resp = client.open(
        path.replace("JOB", job_id) + "?limt=5",
        method=method,
        json=VALID if method == "POST" else None,
        headers=account.headers,
    )
    assert resp.status_code == 400, resp.text
    error = resp.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "limt")
    assert footprint(account) == before
