"""The ``flopex`` admin command, run in-process against the test database.

These commands commit, so every name and key is unique to its test, and the catalog test loads
the very file the session catalog came from so that nothing other tests rely on changes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from app import accounts, wallet
from app.cli import main
from app.db import session_scope
from app.models import Account, LedgerEntry, ModelAlias, Offering, Provider, Wallet
from tests.conftest import CATALOG_PATH


def run(capsys: Any, *argv: str) -> dict[str, Any]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wallet_of(account_id: str) -> uuid.UUID:
    with session_scope() as session:
        return session.scalar(select(Wallet.id).where(Wallet.account_id == uuid.UUID(account_id)))


def ledger(account_id: str) -> list[tuple[str, int, str]]:
    wid = wallet_of(account_id)
    with session_scope() as session:
        rows = session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount_micros, LedgerEntry.memo)
            .where(LedgerEntry.wallet_id == wid)
            .order_by(LedgerEntry.id)
        ).all()
    return [tuple(r) for r in rows]


def authenticate(raw_key: str) -> accounts.Principal | None:
    with session_scope() as session:
        return accounts.authenticate(session, raw_key)


def test_account_create_with_top_up_prints_a_working_key_and_the_balance(database, capsys):
    name = unique("Acme")
    out = run(capsys, "account", "create", name, "--top-up", "2.50")

    assert set(out) == {"account_id", "api_key", "balance_usd"}
    assert out["balance_usd"] == "2.500000"
    principal = authenticate(out["api_key"])
    assert principal is not None
    assert str(principal.account_id) == out["account_id"]
    with session_scope() as session:
        assert session.get(Account, principal.account_id).name == name
        assert wallet.get_state(session, principal.wallet_id).balance_micros == 2_500_000
    assert ledger(out["account_id"]) == [("topup", 2_500_000, "initial credit")]


def test_account_create_without_top_up_has_a_zero_wallet(database, capsys):
    out = run(capsys, "account", "create", unique("Zero"))
    assert out["balance_usd"] == "0.000000"
    assert authenticate(out["api_key"]) is not None
    assert ledger(out["account_id"]) == []


def test_account_create_with_a_given_key(database, capsys):
    raw = f"imported-{uuid.uuid4().hex}"
    out = run(capsys, "account", "create", unique("Imported"), "--key", raw)
    assert out["api_key"] == raw
    principal = authenticate(raw)
    assert principal is not None and str(principal.account_id) == out["account_id"]


def test_wallet_top_up_adds_a_ledger_entry(database, capsys):
    account_id = run(capsys, "account", "create", unique("TopUp"), "--top-up", "1")["account_id"]

    out = run(capsys, "wallet", "top-up", account_id, "0.000041", "--memo", "invoice 42")

    assert out == {"balance_usd": "1.000041"}
    assert ledger(account_id) == [
        ("topup", 1_000_000, "initial credit"),
        ("topup", 41, "invoice 42"),
    ]
    shown = run(capsys, "account", "show", account_id)
    assert shown["balance_usd"] == "1.000041"
    assert shown["held_usd"] == "0.000000"
    assert shown["available_usd"] == "1.000041"


def test_wallet_top_up_of_an_unknown_account_exits(database, capsys):
    missing = str(uuid.uuid4())
    with pytest.raises(SystemExit, match=f"no account {missing}"):
        main(["wallet", "top-up", missing, "1.00"])


def test_wallet_top_up_with_more_than_six_decimals_writes_nothing(database, capsys):
    account_id = run(capsys, "account", "create", unique("Precise"))["account_id"]
    assert main(["wallet", "top-up", account_id, "0.0000001"]) == 2
    assert "more than six decimal places" in capsys.readouterr().err
    assert ledger(account_id) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["account", "create", "Negative", "--top-up", "-5"],
        ["wallet", "top-up", "ACCOUNT", "-1.00"],
        ["wallet", "top-up", "ACCOUNT", "0"],
        ["wallet", "top-up", "ACCOUNT", "1e20"],
    ],
    ids=["negative-initial", "negative", "zero", "absurd"],
)
def test_bad_credit_amounts_exit_2_and_write_nothing(database, capsys, argv):
    account_id = run(capsys, "account", "create", unique("Credit"))["account_id"]
    argv = [account_id if a == "ACCOUNT" else a for a in argv]
    assert main(argv) == 2
    assert "top-up" in capsys.readouterr().err
    assert ledger(account_id) == []


def test_database_and_file_errors_exit_2_with_a_message(database, capsys, tmp_path):
    assert main(["key", "issue", str(uuid.uuid4())]) == 2  # no such account
    assert "refused by the database" in capsys.readouterr().err
    assert main(["catalog", "load", "/nonexistent/catalog.toml"]) == 2
    assert "catalog.toml" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["catalog", "load", str(empty)]) == 2  # would switch every provider off
    assert "--allow-empty" in capsys.readouterr().err


def test_zero_initial_credit_creates_an_empty_account(database, capsys):
    created = run(capsys, "account", "create", unique("Zero"), "--top-up", "0")
    assert created["balance_usd"] == "0.000000"


def test_key_issue_and_revoke(database, capsys):
    account_id = run(capsys, "account", "create", unique("Keys"))["account_id"]

    issued = run(capsys, "key", "issue", account_id, "--name", "ci")
    assert issued["prefix"] == accounts.key_prefix(issued["api_key"])
    principal = authenticate(issued["api_key"])
    assert principal is not None and str(principal.account_id) == account_id

    assert run(capsys, "key", "revoke", issued["prefix"]) == {"revoked": issued["prefix"]}
    assert authenticate(issued["api_key"]) is None

    with pytest.raises(SystemExit, match="no key with prefix"):
        main(["key", "revoke", f"missing{uuid.uuid4().hex[:8]}"])


def test_account_demo_is_idempotent(database, capsys):
    raw = f"demo-{uuid.uuid4().hex}"

    first = run(capsys, "account", "demo", "--key", raw, "--credit", "3.00")
    second = run(capsys, "account", "demo", "--key", raw, "--credit", "3.00")

    assert first == second
    principal = authenticate(raw)
    assert principal is not None and str(principal.account_id) == first["account_id"]
    with session_scope() as session:
        assert wallet.get_state(session, principal.wallet_id).balance_micros == 3_000_000
        assert session.get(Account, principal.account_id).name == "Demo"
    assert ledger(first["account_id"]) == [("topup", 3_000_000, "demo credit")]


def catalog_snapshot() -> dict[str, list[tuple[Any, ...]]]:
    with session_scope() as session:
        return {
            "providers": sorted(
                tuple(r)
                for r in session.execute(
                    select(Provider.id, Provider.name, Provider.base_url, Provider.enabled)
                )
            ),
            "models": sorted(
                tuple(r)
                for r in session.execute(
                    select(ModelAlias.id, ModelAlias.alias, ModelAlias.enabled)
                )
            ),
            "offerings": sorted(
                tuple(r)
                for r in session.execute(
                    select(
                        Offering.id,
                        Offering.provider_model_id,
                        Offering.input_price_micros_per_m,
                        Offering.output_price_micros_per_m,
                        Offering.enabled,
                    )
                )
            ),
        }


def test_catalog_load_of_the_session_catalog_changes_nothing(catalog, capsys):
    before = catalog_snapshot()
    enabled_before = [p for p in before["providers"] if p[3]]
    assert {p[1] for p in enabled_before} >= {"alpha", "bravo", "charlie"}

    out = run(capsys, "catalog", "load", str(CATALOG_PATH))
    assert out == {"catalog": str(CATALOG_PATH), "providers": 3, "models": 3, "offerings": 5}
    assert catalog_snapshot() == before

    # Without a path the command loads FLOPEX_CATALOG, which the tests point at the same file.
    assert run(capsys, "catalog", "load")["catalog"] == str(CATALOG_PATH)
    assert catalog_snapshot() == before
