"""The OpenAPI spec at /openapi.json is generated from the same schemas that validate requests,
and covers every route, error code and header."""

from __future__ import annotations

import re

from app.exceptions import ERROR_CODES

_UNDOCUMENTED = {"/static/<path:filename>", "/openapi.json", "/docs"}


def test_every_route_is_in_the_spec(client, flask_app, database):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for rule in flask_app.url_map.iter_rules():
        # The console's HTML pages (docs/console.md) are not part of the API.
        if rule.rule in _UNDOCUMENTED or rule.rule.startswith("/console/"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        assert path in spec["paths"], f"{rule.rule} is missing from the spec"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in spec["paths"][path], f"{method} {rule.rule} is missing"


def test_every_error_code_and_header_is_described(client, database):
    text = client.get("/openapi.json").get_data(as_text=True)
    for code in ERROR_CODES:
        assert f"`{code}`" in text, code
    for header in ("Idempotency-Key", "Prefer", "X-Request-ID", "Retry-After"):
        assert header in text, header


def test_the_request_schema_is_the_validator(client, database):
    spec = client.get("/openapi.json").get_json()
    body = spec["paths"]["/v1/inference"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    name = body["$ref"].rsplit("/", 1)[1]
    schema = spec["components"]["schemas"][name]
    assert set(schema["required"]) == {"model", "max_output_tokens"}
    assert schema["properties"]["performance_profile"]["enum"] == ["economy", "balanced", "fast"]
    assert schema["properties"]["max_output_tokens"]["maximum"] == 128_000
    assert schema["additionalProperties"] is False


def test_docs_page_is_served(client, database):
    resp = client.get("/docs")
    assert resp.status_code == 200 and b"redoc" in resp.data.lower()


def test_invalid_parameters_are_documented_as_the_400_they_are(client, database):
    spec = client.get("/openapi.json").get_json()
    for path in ("/v1/wallet/ledger", "/v1/inference", "/v1/inference/{job_id}"):
        responses = spec["paths"][path]["get"]["responses"]
        assert "400" in responses and "422" not in responses, path
