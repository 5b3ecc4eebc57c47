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
from tests.factories import make_job


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

    assert set(out) == {"account_id", "api_key", "key_prefix", "balance_usd"}
    assert out["key_prefix"] == accounts.key_prefix(out["api_key"])
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
    assert capsys.readouterr().err.startswith("flopex: ")
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

    revoked = run(capsys, "key", "revoke", issued["prefix"])
    assert revoked["prefix"] == issued["prefix"] and revoked["already_revoked"] is False
    assert revoked["account_id"] == account_id and revoked["revoked_at"]
    assert authenticate(issued["api_key"]) is None
    assert run(capsys, "key", "revoke", issued["prefix"])["already_revoked"] is True

    assert main(["key", "revoke", f"missing{uuid.uuid4().hex[:8]}"]) == 2
    assert "no key matches" in capsys.readouterr().err


def test_key_revoke_takes_the_key_or_either_form_of_its_prefix(database, capsys):
    """An operator has whatever the customer pasted: the whole key, `fpx_<prefix>` from a log,
    the bare prefix; an imported key (no visible prefix) is found by the key itself."""
    account_id = run(capsys, "account", "create", unique("Forms"))["account_id"]
    keys = [run(capsys, "key", "issue", account_id)["api_key"] for _ in range(3)]
    prefixes = [accounts.key_prefix(k) for k in keys]
    for given in (keys[0], f"fpx_{prefixes[1]}", f"fpx_{prefixes[2]}_"):
        run(capsys, "key", "revoke", given)
    # An imported key that looks like `fpx_<prefix>` is found by its hash, not mistaken for one.
    imported = f"fpx_imp{uuid.uuid4().hex[:13]}"
    run(capsys, "key", "issue", account_id)  # a fourth, left alone
    with session_scope() as session:
        accounts.issue_key(session, uuid.UUID(account_id), name="import", raw_key=imported)
    assert run(capsys, "key", "revoke", imported)["prefix"] == accounts.key_prefix(imported)
    assert [authenticate(k) for k in (*keys, imported)] == [None] * 4

    listed = run(capsys, "key", "list", account_id)["keys"]
    # The account's default key first, then in the order issued.
    assert [k["prefix"] for k in listed][1:4] == prefixes
    assert [k["revoked_at"] is not None for k in listed] == [False, True, True, True, False, True]
    assert not any(k in json.dumps(listed) for k in keys)  # prefixes, never keys


def _charged_job(account_id: str, charge: int) -> str:
    """A job of the account with a hold of 100,000 micro-USD settled for ``charge``."""
    wid = wallet_of(account_id)
    with session_scope() as session:
        job_id = make_job(session, uuid.UUID(account_id), wid)
        wallet.hold(session, wid, job_id, 100_000)
        wallet.settle_hold(session, wid, job_id, 100_000, charge)
    return str(job_id)


def test_wallet_refund_pays_back_part_then_the_rest_and_no_more(database, capsys):
    account_id = run(capsys, "account", "create", unique("Refund"), "--top-up", "1")["account_id"]
    job_id = _charged_job(account_id, 30_000)

    part = run(capsys, "wallet", "refund", job_id, "--amount", "0.01", "--memo", "ticket 7")
    assert part["refunded_usd"] == "0.010000" and part["job_charged_usd"] == "0.030000"
    assert part["account_id"] == account_id
    rest = run(capsys, "wallet", "refund", job_id, "--memo", "ticket 7, the rest")
    assert rest["refunded_usd"] == "0.020000" and rest["job_refunded_total_usd"] == "0.030000"
    assert rest["balance_usd"] == "1.000000"
    assert main(["wallet", "refund", job_id, "--memo", "once more"]) == 2
    assert "nothing left to refund" in capsys.readouterr().err
    refunds = [e for e in ledger(account_id) if e[0] == "refund"]
    assert refunds == [("refund", 10_000, "ticket 7"), ("refund", 20_000, "ticket 7, the rest")]


@pytest.mark.parametrize(
    "argv",
    [
        ["wallet", "refund", "JOB", "--amount", "0.05", "--memo", "more than charged"],
        ["wallet", "refund", "JOB", "--amount", "-0.01", "--memo", "negative"],
        ["wallet", "refund", "JOB", "--memo", " "],
        ["wallet", "refund", str(uuid.uuid4()), "--memo", "no such job"],
        ["wallet", "adjust", "ACCOUNT", "-1.01", "--memo", "more than available"],
        ["wallet", "adjust", "ACCOUNT", "0", "--memo", "zero"],
        ["wallet", "adjust", "ACCOUNT", "5", "--memo", ""],
        ["wallet", "top-up", "ACCOUNT", "010"],
    ],
    ids=["over", "negative", "no-memo", "no-job", "overdraw", "zero", "memo", "leading-zero"],
)
def test_bad_refunds_and_adjustments_exit_2_and_write_nothing(database, capsys, argv):
    account_id = run(capsys, "account", "create", unique("Bad"), "--top-up", "1")["account_id"]
    job_id = _charged_job(account_id, 30_000)
    before = ledger(account_id)
    argv = [{"ACCOUNT": account_id, "JOB": job_id}.get(a, a) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("flopex: ")
    assert ledger(account_id) == before


def test_amounts_with_an_exponent_read_as_the_api_reads_them(database, capsys):
    """The API takes max_price_usd as any JSON number (1e-2 included): so does the CLI."""
    account_id = run(capsys, "account", "create", unique("Exponent"))["account_id"]
    run(capsys, "wallet", "top-up", account_id, "1e1")
    job_id = _charged_job(account_id, 30_000)
    refund = run(capsys, "wallet", "refund", job_id, "--amount", "1e-2", "--memo", "exponent")
    assert refund["refunded_usd"] == "0.010000"
    run(capsys, "wallet", "adjust", account_id, "2.5E-1", "--memo", "exponent")
    kinds = [(kind, amount) for kind, amount, _ in ledger(account_id)]
    assert ("topup", 10_000_000) in kinds
    assert ("refund", 10_000) in kinds and ("adjustment", 250_000) in kinds


def test_wallet_adjust_corrects_the_balance_both_ways(database, capsys):
    account_id = run(capsys, "account", "create", unique("Adjust"), "--top-up", "2")["account_id"]
    debit = run(capsys, "wallet", "adjust", account_id, "-1.5", "--memo", "entered twice")
    assert debit == {
        "adjusted_usd": "-1.500000",
        "balance_usd": "0.500000",
        "available_usd": "0.500000",
    }
    run(capsys, "wallet", "adjust", account_id, "0.25", "--memo", "goodwill")
    assert ledger(account_id)[1:] == [
        ("adjustment", -1_500_000, "entered twice"),
        ("adjustment", 250_000, "goodwill"),
    ]


def test_account_set_limit_and_back_to_the_default(database, capsys):
    account_id = run(capsys, "account", "create", unique("Limits"))["account_id"]
    out = run(capsys, "account", "set-limit", account_id, "--per-min", "600", "--burst", "50")
    assert (out["rate_limit_per_min"], out["rate_limit_burst"]) == (600, 50)
    shown = run(capsys, "account", "show", account_id)
    assert (shown["rate_limit_per_min"], shown["rate_limit_burst"]) == (600, 50)
    run(capsys, "account", "set-limit", account_id, "--default")
    shown = run(capsys, "account", "show", account_id)
    assert (shown["rate_limit_per_min"], shown["rate_limit_burst"]) == (None, None)
    for bad in (["--per-min", "-1"], [], ["--default", "--per-min", "5"]):
        assert main(["account", "set-limit", account_id, *bad]) == 2
        capsys.readouterr()
    assert main(["account", "set-limit", str(uuid.uuid4()), "--per-min", "5"]) == 2


def test_an_unreachable_database_is_one_line_not_a_traceback(database, capsys, monkeypatch):
    from sqlalchemy.orm import sessionmaker

    from app import db

    engine = db.build_engine("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    monkeypatch.setattr(db, "_engine", engine)
    monkeypatch.setattr(db, "_factory", sessionmaker(engine))
    assert main(["account", "show", str(uuid.uuid4())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flopex: cannot reach the database") and "Traceback" not in err
    engine.dispose()


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
    assert out == {
        "catalog": str(CATALOG_PATH),
        "providers": 3,
        "models": 3,
        "offerings": 5,
        "warnings": [],
    }
    assert catalog_snapshot() == before

    # Without a path the command loads FLOPEX_CATALOG, which the tests point at the same file.
    assert run(capsys, "catalog", "load")["catalog"] == str(CATALOG_PATH)
    assert catalog_snapshot() == before


def test_catalog_load_without_a_file_or_flopex_catalog_loads_nothing(catalog, capsys, monkeypatch):
    """No silent default: the development catalog loaded by mistake would disable every real
    provider of a deployment."""
    before = catalog_snapshot()
    monkeypatch.delenv("FLOPEX_CATALOG")
    assert main(["catalog", "load"]) == 2
    assert "set FLOPEX_CATALOG" in capsys.readouterr().err
    assert catalog_snapshot() == before


def test_a_quoted_enabled_flag_fails_the_load(catalog, capsys, tmp_path):
    before = catalog_snapshot()
    quoted = tmp_path / "quoted.toml"
    quoted.write_text(
        CATALOG_PATH.read_text().replace('name = "alpha"', 'name = "alpha"\nenabled = "false"')
    )
    assert main(["catalog", "load", str(quoted)]) == 2
    assert "enabled must be true or false" in capsys.readouterr().err
    assert catalog_snapshot() == before


def test_a_provider_key_missing_from_the_environment_is_a_warning(catalog, tmp_path, monkeypatch):
    from app.catalog import load_catalog
    from app.db import session_factory

    monkeypatch.delenv("FLOPEX_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("FLOPEX_TEST_SET_KEY", "sk-test")
    keyed = tmp_path / "keyed.toml"
    keyed.write_text(
        CATALOG_PATH.read_text()
        .replace('name = "alpha"', 'name = "alpha"\napi_key_env = "FLOPEX_TEST_UNSET_KEY"')
        .replace('name = "bravo"', 'name = "bravo"\napi_key_env = "FLOPEX_TEST_SET_KEY"')
    )
    session = session_factory()()
    try:
        report = load_catalog(session, keyed)
    finally:
        session.rollback()
        session.close()
    (warning,) = report.warnings
    assert warning.startswith("provider alpha: api_key_env FLOPEX_TEST_UNSET_KEY is not set")


def test_job_show_and_cancel_for_operators(database, capsys, redis_client):
    from sqlalchemy import update as sql_update

    from app.models import Job

    account_id = run(capsys, "account", "create", unique("Ops"), "--top-up", "1")["account_id"]
    wid = wallet_of(account_id)
    with session_scope() as session:
        job_id = make_job(session, uuid.UUID(account_id), wid)
        session.execute(
            sql_update(Job).where(Job.id == job_id).values(status="quoting", hold_micros=70_000)
        )
        wallet.hold(session, wid, job_id, 70_000)
    shown = run(capsys, "job", "show", str(job_id))
    assert shown["internal"]["status"] == "quoting" and shown["internal"]["hold_micros"] == 70_000
    assert [e["kind"] for e in shown["ledger"]] == ["hold"]
    assert shown["job"]["id"] == str(job_id) and shown["job"]["status"] == "queued"

    out = run(capsys, "job", "cancel", str(job_id))
    assert out == {"job_id": str(job_id), "status": "cancelled", "hold_released_micros": 70_000}
    with session_scope() as session:
        assert wallet.get_state(session, wid) == wallet.WalletState(1_000_000, 0)
    # Anyone waiting on the job (a synchronous request, a long poll) has been woken.
    assert redis_client.exists(f"flopex:done:{job_id}")
    assert main(["job", "cancel", str(job_id)]) == 2
    assert "already finished (cancelled)" in capsys.readouterr().err
    shown = run(capsys, "job", "show", str(job_id))
    assert [e["kind"] for e in shown["ledger"]] == ["hold", "release"]
    assert main(["job", "show", str(uuid.uuid4())]) == 2
