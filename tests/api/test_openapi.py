"""The OpenAPI spec at /openapi.json keeps the public API document's promises.

The spec is generated from the code (routes, marshmallow schemas, the error table), so comparing
it with that code proves nothing. It is compared instead with a source the code does not
generate: the public API document (tests/data/public_api.txt, a verbatim copy of
shared/seed/000_56dc14daea872abc.txt). Every request parameter it lists must be in the spec with
its type, required-ness, values and default; every response field it lists, and every field of
its example response, must be in the spec's 200 response with the example's JSON type; its
example request must be one the spec accepts; and the error and header it names must be
documented on the operation. A real response of the running app is checked against the same
list (tests/api/test_fuzz.py checks real responses against the whole spec).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.api_document import DOC_REQUEST
from tests.conftest import decimal_json

DOCUMENT = (Path(__file__).parent.parent / "data" / "public_api.txt").read_text()

# The document's words for a type, as OpenAPI types.
_TYPES = {"string": "string", "integer": "integer", "float": "number", "object": "object"}
# Documented as required, accepted without when its documented alternative is sent (the
# document: "Legacy prompt is also accepted when input is empty").
_ALTERNATIVES = {"input": "prompt"}


# -- the document, parsed ----------------------------------------------------------------------


def _section(start: str, end: str) -> str:
    return DOCUMENT.split(start, 1)[1].split(end, 1)[0]


def documented_parameters() -> dict[str, dict[str, Any]]:
    """name -> {type, required, text} from "Request parameters"."""
    lines = [line.strip() for line in _section("Request parameters", "Response fields").split("\n")]
    lines = [line for line in lines if line]
    found: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"([a-z_]+)(string|integer|float|object|boolean)(required|optional)", line)
        if m:
            found[m[1]] = {
                "type": _TYPES[m[2]],
                "required": m[3] == "required",
                "text": lines[i + 1] if i + 1 < len(lines) else "",
            }
    return found


def documented_response_fields() -> list[str]:
    """Dotted paths from the "Response fields" bullets (``usage.input_tokens, ...``)."""
    paths: list[str] = []
    for line in _section("Key fields:", "Full request and response").split("\n"):
        line = line.strip()
        if not line.startswith("•"):
            continue
        names = line.lstrip("• ").split(" — ", 1)[0]
        paths += [n.strip() for n in re.split(r"[,/]", names) if n.strip()]
    return paths


def _example(label: str) -> Any:
    """The example JSON under the heading ``label`` of "Full request and response"."""
    text = DOCUMENT.split("Full request and response", 1)[1]
    text = re.split(rf"^{label}$", text, maxsplit=1, flags=re.MULTILINE)[1]
    start = text.index("{")
    depth = 0
    for i, ch in enumerate(text[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return json.loads(text[start : i + 1], parse_float=Decimal)
    raise AssertionError(f"no JSON object under {label!r}")


def _leaves(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float | Decimal):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(value)]


# -- the spec, walked --------------------------------------------------------------------------


class Spec:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema with $ref followed and a one-element allOf (a described $ref) merged."""
        while True:
            if "$ref" in schema:
                name = schema["$ref"].rsplit("/", 1)[1]
                schema = {**self.doc["components"]["schemas"][name]}
            elif len(schema.get("allOf", [])) == 1:
                inner = schema["allOf"][0]
                schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **inner}
            else:
                return schema

    def field(self, schema: dict[str, Any], dotted: str) -> dict[str, Any]:
        for name in dotted.split("."):
            properties = self.resolve(schema).get("properties", {})
            assert name in properties, f"{dotted}: {name!r} is not in the spec"
            schema = properties[name]
        return self.resolve(schema)

    @staticmethod
    def types(schema: dict[str, Any]) -> set[str]:
        if "type" in schema:
            return {schema["type"]}
        return {t for s in schema.get("anyOf", []) + schema.get("oneOf", []) for t in Spec.types(s)}

    def accepts_type(self, schema: dict[str, Any], json_type: str) -> bool:
        types = self.types(schema)
        return json_type in types or (json_type == "integer" and "number" in types)

    def operation(self, method: str, path: str) -> dict[str, Any]:
        return self.doc["paths"][path][method]

    def request_schema(self) -> dict[str, Any]:
        body = self.operation("post", "/v1/inference")["requestBody"]
        return self.resolve(body["content"]["application/json"]["schema"])

    def response_schema(self, status: str = "200") -> dict[str, Any]:
        answer = self.operation("post", "/v1/inference")["responses"][status]
        return self.resolve(answer["content"]["application/json"]["schema"])


@pytest.fixture
def spec(client: Any, database: str) -> Spec:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    return Spec(doc)


# -- the document's parsing is itself checked: a parser that finds nothing passes nothing -------


def test_the_document_is_parsed_whole():
    assert list(documented_parameters()) == [
        "model",
        "input",
        "max_output_tokens",
        "performance_profile",
        "routing_strategy",
        "customer_ref",
        "max_price_usd",
        "max_latency_ms",
        "metadata",
    ]
    fields = documented_response_fields()
    assert len(fields) == 16 and fields[0] == "id" and "billing.total_tokens" in fields
    assert _example("Request") == json.loads(json.dumps(DOC_REQUEST), parse_float=Decimal)
    assert _example("Response")["billing"]["cost_usd"] == Decimal("0.000041")


# -- request ---------------------------------------------------------------------------------


def test_every_documented_parameter_is_in_the_spec_with_its_type_and_requiredness(spec):
    schema = spec.request_schema()
    required = set(schema.get("required", []))
    for name, doc in documented_parameters().items():
        field = spec.field(schema, name)
        assert spec.accepts_type(field, doc["type"]), (name, doc["type"], field)
        if doc["required"] and name not in required:
            alternative = _ALTERNATIVES.get(name)
            assert alternative in schema["properties"], f"{name} is documented as required"
        if not doc["required"]:
            assert name not in required, f"{name} is documented as optional"


def test_documented_values_and_defaults_are_the_specs(spec):
    schema = spec.request_schema()
    for name, doc in documented_parameters().items():
        field = spec.field(schema, name)
        values = re.search(r"One of ([a-z_, ]+)\.|^([a-z_]+ or [a-z_]+)\.", doc["text"])
        if values:
            listed = re.split(r", | or ", values[1] or values[2])
            assert field.get("enum") == listed, (name, field.get("enum"), listed)
        default = re.search(r"Default: ([a-z_]+)\.", doc["text"])
        if default:
            assert field.get("default") == default[1], (name, field.get("default"))
    assert spec.field(schema, "max_output_tokens")["maximum"] == 128_000  # "up to 128,000"


def test_the_documented_example_request_is_one_the_spec_accepts(spec):
    schema = spec.request_schema()
    assert schema.get("additionalProperties") is False  # so an unknown field would be refused
    example = _example("Request")
    assert set(schema.get("required", [])) <= set(example)
    for name, value in _leaves(example).items():
        top = name.split(".", 1)[0]
        field = spec.field(schema, top)
        if top == name:
            assert spec.accepts_type(field, _json_type(value)), (name, value, field)
            if "enum" in field:
                assert value in field["enum"], (name, value)


# -- response --------------------------------------------------------------------------------


def test_every_documented_response_field_is_in_the_spec(spec):
    schema = spec.response_schema()
    example = _leaves(_example("Response"))
    for dotted in documented_response_fields():
        field = spec.field(schema, dotted)
        if dotted in example:
            assert spec.accepts_type(field, _json_type(example[dotted])), (dotted, field)


def test_every_field_of_the_documented_example_response_is_in_the_spec(spec):
    schema = spec.response_schema()
    for dotted, value in _leaves(_example("Response")).items():
        field = spec.field(schema, dotted)
        assert spec.accepts_type(field, _json_type(value)), (dotted, value, field)
        if dotted == "object":
            assert field.get("enum", [value]) == [value] or value in field.get("enum", [])


def test_a_real_answer_has_every_documented_field_with_the_documented_type(
    client, pipeline, make_account, spec
):
    account = make_account("10.00")
    resp = client.post("/v1/inference", json=DOC_REQUEST, headers=account.headers)
    assert resp.status_code == 200, resp.text
    real = _leaves(decimal_json(resp.data))
    documented = _leaves(_example("Response"))
    for dotted in documented_response_fields():
        assert dotted in real, f"{dotted} is documented but not answered"
        assert _json_type(real[dotted]) in {
            _json_type(documented[dotted]),
            *(["number"] if _json_type(documented[dotted]) == "integer" else []),
            *(["integer"] if _json_type(documented[dotted]) == "number" else []),
        }, (dotted, real[dotted], documented[dotted])
        assert spec.accepts_type(
            spec.field(spec.response_schema(), dotted), _json_type(real[dotted])
        )


# -- idempotency -----------------------------------------------------------------------------


def test_the_documented_idempotency_header_and_error_are_in_the_operation(spec):
    operation = spec.operation("post", "/v1/inference")
    headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
    assert "Idempotency-Key" in headers
    code = re.search(r"Conflicting reuse returns ([a-z_]+)", DOCUMENT)
    assert code and code[1] == "idempotency_key_reused_with_different_request"
    described = json.dumps(operation["responses"])
    assert code[1] in described, "the document's idempotency error is not on the operation"


# -- routes, headers, errors -------------------------------------------------------------------

_UNDOCUMENTED = {"/static/<path:filename>", "/openapi.json", "/docs"}


def test_every_route_is_in_the_spec(client, flask_app, spec):
    # A route added with a plain Flask decorator (not a flask-smorest Blueprint) is missing.
    for rule in flask_app.url_map.iter_rules():
        # The console's HTML pages (docs/console.md) are not part of the API.
        if rule.rule in _UNDOCUMENTED or rule.rule.startswith("/console/"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        assert path in spec.doc["paths"], f"{rule.rule} is missing from the spec"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in spec.doc["paths"][path], f"{method} {rule.rule} is missing"


def test_the_headers_we_answer_with_or_read_are_described(client, spec):
    text = json.dumps(spec.doc)
    for header in ("Idempotency-Key", "Prefer", "X-Request-ID", "Retry-After"):
        assert header in text, header


def test_every_error_code_is_in_the_hand_written_api_guide():
    # The spec's error descriptions are generated from ERROR_CODES; docs/api.md is written by
    # hand, so a new code without its documentation fails here.
    from app.exceptions import ERROR_CODES

    guide = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    assert [code for code in ERROR_CODES if f"`{code}`" not in guide] == []


def test_the_request_schema_is_the_validator(spec):
    schema = spec.request_schema()
    assert set(schema["required"]) == {"model", "max_output_tokens"}
    assert schema["properties"]["performance_profile"]["enum"] == ["economy", "balanced", "fast"]
    assert schema["properties"]["max_output_tokens"]["maximum"] == 128_000
    assert schema["additionalProperties"] is False


def test_docs_page_is_served(client, database):
    resp = client.get("/docs")
    assert resp.status_code == 200 and b"redoc" in resp.data.lower()


def test_invalid_parameters_are_documented_as_the_400_they_are(spec):
    for path in ("/v1/wallet/ledger", "/v1/inference", "/v1/inference/{job_id}"):
        responses = spec.doc["paths"][path]["get"]["responses"]
        assert "400" in responses and "422" not in responses, path
