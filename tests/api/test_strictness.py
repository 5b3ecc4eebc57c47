"""Strict where the API was loose (issue 19): every answer in the one error shape, an unknown
route pointing at the API's routes, an empty body named as not JSON, a repeated query parameter
refused, a whitespace-only prompt refused, and the OpenAPI document stating what is enforced."""

from __future__ import annotations

from typing import Any

import pytest

BODY = {"model": "llama-3.1-8b", "input": "hello", "max_output_tokens": 8}


def test_an_unknown_route_names_the_apis_routes(client: Any) -> None:
    resp = client.get("/v1/inferences")
    assert resp.status_code == 404
    error = resp.get_json()["error"]
    assert error["code"] == "not_found"
    assert "GET /v1/inferences" in error["message"]
    assert "/v1/inference" in error["message"] and "/docs" in error["message"]
    assert "If you entered the URL manually" not in error["message"]
    # Path parameters as the spec names them, not Werkzeug's converters.
    assert "/v1/models/{model_id}" in error["message"] and "path:" not in error["message"]


def test_a_missing_job_is_still_job_not_found(client: Any, make_account: Any) -> None:
    account = make_account("1.00")
    resp = client.get("/v1/inference/00000000-0000-0000-0000-000000000000", headers=account.headers)
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "job_not_found"


def test_an_empty_body_is_not_valid_json(client: Any, make_account: Any) -> None:
    account = make_account("1.00")
    resp = client.post(
        "/v1/inference", data=b"", headers={**account.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "query", ["limit=1&limit=2", "status=success&status=failed", "limit=5&limit=5"]
)
def test_a_repeated_query_parameter_is_refused(client: Any, make_account: Any, query: str) -> None:
    account = make_account("1.00")
    resp = client.get(f"/v1/inference?{query}", headers=account.headers)
    assert resp.status_code == 400, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == query.split("=")[0]


@pytest.mark.parametrize("field", ["input", "prompt"])
@pytest.mark.parametrize("text", [" ", "\n\t  \r\n"])
def test_a_whitespace_only_prompt_is_refused_and_nothing_is_charged(
    client: Any, make_account: Any, field: str, text: str
) -> None:
    from tests.conftest import ledger_kinds

    account = make_account("1.00")
    body = {"model": "llama-3.1-8b", "max_output_tokens": 8, field: text}
    resp = client.post("/v1/inference", json=body, headers=account.headers)
    assert resp.status_code == 400, resp.text
    error = resp.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", field)
    assert ledger_kinds(account) == ["topup"]


def test_the_spec_states_the_prompt_and_list_rules(client: Any) -> None:
    import re

    spec = client.get("/openapi.json").get_json()
    request = spec["components"]["schemas"]["InferenceRequest"]
    assert {tuple(branch["required"]) for branch in request["anyOf"]} == {
        ("input",),
        ("prompt",),
    }
    assert request["not"]["required"] == ["input", "prompt"]
    for name in ("input", "prompt"):
        pattern = re.compile(request["properties"][name]["pattern"])
        assert pattern.search("") and pattern.search(" a ") and not pattern.search(" \n")
    listing = next(
        p
        for p in spec["paths"]["/v1/inference"]["get"]["parameters"]
        if p["name"] == "customer_ref"
    )
    assert re.fullmatch(listing["schema"]["pattern"], "order-1")
    assert not re.fullmatch(listing["schema"]["pattern"], "a\x00b")
