"""schemathesis hooks for tests/api/test_schemathesis_all.py (loaded through SCHEMATHESIS_HOOKS).

A model's own output cap is catalog data, not something the OpenAPI document can state (it
states the API-wide limit): a schema-valid max_output_tokens above the model's cap is refused
400 max_output_tokens_exceeds_model_cap, as the API document says. Generated bodies keep it
within the smallest cap of the test catalog (orphan-1b's 512), so "schema-valid request
rejected" means what it says. Schema-invalid values (0, above the API-wide limit, a string) are
left as generated.

Likewise `metadata`: any JSON object, but PostgreSQL text cannot hold a NUL, in its keys or its
values at any depth, and OpenAPI 3.0 has no way to say so of an object's keys (no
propertyNames) nor of nested values; NULs are dropped from generated metadata."""

from __future__ import annotations

from typing import Any

import schemathesis

SMALLEST_MODEL_CAP = 512


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    # map_case, not map_body: it is applied in every phase (coverage included).
    body = case.body
    tokens = body.get("max_output_tokens") if isinstance(body, dict) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        from app.api.schemas import MAX_OUTPUT_TOKENS_LIMIT

        if SMALLEST_MODEL_CAP < tokens <= MAX_OUTPUT_TOKENS_LIMIT:
            case.body = body = {**body, "max_output_tokens": SMALLEST_MODEL_CAP}
    if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
        case.body = {**body, "metadata": _without_nul(body["metadata"])}
    return case
