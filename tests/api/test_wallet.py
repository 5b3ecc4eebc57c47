"""GET /v1/wallet and GET /v1/wallet/ledger."""

from __future__ import annotations

from decimal import Decimal

from app.billing import wallet
from app.infra.db import session_scope
from tests.conftest import decimal_json


def test_wallet_shows_balance_holds_and_available(client, database, make_account):
    account = make_account("2.50")
    body = decimal_json(client.get("/v1/wallet", headers=account.headers).data)
    assert body == {
        "object": "wallet",
        "currency": "USD",
        "balance_usd": Decimal("2.500000"),
        "held_usd": Decimal("0.000000"),
        "available_usd": Decimal("2.500000"),
    }


def test_wallet_requires_a_key(client, database):
    resp = client.get("/v1/wallet")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_ledger_pages_newest_first_with_a_cursor(client, database, make_account):
    account = make_account("1.00")
    with session_scope() as session:
        for i in range(4):
            wallet.top_up(session, account.wallet_id, 1000 * (i + 1), f"top-up {i}")
    first = client.get("/v1/wallet/ledger?limit=2", headers=account.headers).get_json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [e["memo"] for e in first["data"]] == ["top-up 3", "top-up 2"]
    second = client.get(
        f"/v1/wallet/ledger?limit=2&starting_after={first['next_cursor']}", headers=account.headers
    ).get_json()
    assert [e["memo"] for e in second["data"]] == ["top-up 1", "top-up 0"]
    third = client.get(
        f"/v1/wallet/ledger?limit=2&starting_after={second['next_cursor']}", headers=account.headers
    ).get_json()
    assert [e["memo"] for e in third["data"]] == ["test"] and third["has_more"] is False
    assert third["next_cursor"] is None
    entry = decimal_json(client.get("/v1/wallet/ledger?limit=1", headers=account.headers).data)[
        "data"
    ][0]
    assert entry["kind"] == "topup" and entry["amount_usd"] == Decimal("0.004000")
    assert entry["balance_after_usd"] == Decimal("1.010000")
    assert entry["created_at"].endswith("Z")  # RFC 3339 in UTC, as every timestamp of the API


def test_ledger_entries_of_a_job_are_tied_to_it(client, pipeline, make_account):
    account = make_account()
    job = client.post(
        "/v1/inference",
        json={"model": "qwen-7b", "input": "hi", "max_output_tokens": 8},
        headers=account.headers,
    ).get_json()
    entries = client.get("/v1/wallet/ledger", headers=account.headers).get_json()["data"]
    kinds = {e["kind"] for e in entries if e["job_id"] == job["id"]}
    # A release follows unless the charge used the whole hold.
    assert {"hold", "capture"} <= kinds <= {"hold", "capture", "release"}


def test_ledger_is_only_the_callers(client, database, make_account):
    a, b = make_account("1.00"), make_account("3.00")
    data = client.get("/v1/wallet/ledger", headers=a.headers).get_json()["data"]
    assert [e["balance_after_usd"] for e in data] == [1.0]
    assert client.get("/v1/wallet", headers=b.headers).get_json()["balance_usd"] == 3.0


def test_ledger_query_is_validated(client, database, make_account):
    account = make_account()
    for query in ("limit=0", "limit=101", "limit=x", "starting_after=-1", "bogus=1"):
        resp = client.get(f"/v1/wallet/ledger?{query}", headers=account.headers)
        assert resp.status_code == 400, query
        assert resp.get_json()["error"]["code"] == "invalid_request"
