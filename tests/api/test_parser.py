"""app/api/parser.py and the request schema's text and number rules: a body that is not strict
JSON, or holds what cannot be stored, is a 400 invalid_request, never a 500, and changes nothing;
a money field reads the client's exact decimal."""

from __future__ import annotations

from decimal import Decimal

import pytest
from werkzeug.datastructures import Headers

from app.api.parser import JsonNumber, load_json
from app.api.prefer import parse_prefer
from app.api.schemas import InferenceRequestSchema
from app.exceptions import InvalidRequest
from tests.factories import MINIMAL_REQUEST as VALID
from tests.factories import footprint


@pytest.fixture
def account(catalog, make_account):
    return make_account("10.00")


PREFIX = b'{"model": "llama-3.1-8b", "input": "Hi.", "max_output_tokens": 16, '


@pytest.mark.parametrize(
    "tail",
    [
        b'"metadata": {"k": NaN}}',
        b'"metadata": {"k": Infinity}}',
        b'"metadata": {"k": -Infinity}}',
        b'"metadata": {"k": 1e400}}',
        b'"max_price_usd": 1e400}',
        b'"metadata": ' + b'{"k": ' * 5000 + b"1" + b"}" * 5001,
        b'"input": "\xff"}',
    ],
    ids=["nan", "infinity", "-infinity", "float-overflow", "price-overflow", "deep", "not-utf8"],
)
def test_bodies_that_are_not_strict_json_are_400(client, account, tail):
    before = footprint(account)
    resp = client.post(
        "/v1/inference",
        data=PREFIX + tail,
        headers={**account.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 400, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("The request body")
    assert footprint(account) == before


def test_a_fractional_number_keeps_the_clients_digits():
    body = load_json(b'{"a": 0.0000249999999999999999, "b": 2, "c": [1.5]}')
    assert isinstance(body["a"], JsonNumber) and body["a"].text == "0.0000249999999999999999"
    assert body["a"] == 2.5e-05 and body["b"] == 2 and body["c"] == [1.5]
    with pytest.raises(InvalidRequest):
        load_json(b"\xef\xbb\xbf{}")  # a byte order mark is not JSON


def test_max_price_usd_is_the_exact_decimal_sent():
    raw = PREFIX + b'"max_price_usd": 0.0000249999999999999999}'
    args = InferenceRequestSchema().load(load_json(raw))
    assert args["max_price_usd"] == Decimal("0.0000249999999999999999")
    for sent in (3, "3", "0.0000249999999999999999", "2.5E-5"):
        loaded = InferenceRequestSchema().load({**VALID, "max_price_usd": sent})
        assert loaded["max_price_usd"] == Decimal(str(sent))


def test_metadata_size_is_its_compact_utf8_size():
    from config.settings import get_settings

    limit = get_settings().max_metadata_bytes
    fits = {"k": "é" * ((limit - 16) // 2)}  # ~limit bytes of UTF-8, ~3x that \u-escaped
    assert InferenceRequestSchema().load({**VALID, "metadata": fits})["metadata"] == fits
    with pytest.raises(Exception, match="exceeds"):
        InferenceRequestSchema().load({**VALID, "metadata": {"k": "é" * (limit // 2 + 1)}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("wait=5", 5.0), ("wait=" + "9" * 300, 60.0), ("respond-async, wait=0", 0.0)],
)
def test_prefer_wait_is_capped_however_large(value, expected):
    assert parse_prefer(Headers({"Prefer": value}), max_wait_s=60.0).wait_s == expected
