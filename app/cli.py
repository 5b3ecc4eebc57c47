"""The ``flopex`` admin command: accounts, keys, wallets, the catalog and migrations.

Examples::

    flopex db upgrade
    flopex catalog load config/catalog.dev.toml
    flopex account create "Acme" --top-up 25
    flopex key issue <account-id>
    flopex key revoke <prefix>
    flopex wallet top-up <account-id> 10.00 --memo "invoice 42"
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import accounts, wallet
from app.catalog import load_catalog
from app.db import session_scope
from app.models import Account, ApiKey, Wallet
from app.money import micros_to_usd, usd_to_micros
from config.settings import get_settings


def _wallet_id(session, account_id: str) -> uuid.UUID:  # type: ignore[no-untyped-def]
    wid = session.scalar(select(Wallet.id).where(Wallet.account_id == uuid.UUID(account_id)))
    if wid is None:
        raise SystemExit(f"no account {account_id}")
    return wid


def _print(data: dict) -> None:  # type: ignore[type-arg]
    print(json.dumps(data, default=str, indent=2))


def cmd_db_upgrade(_: argparse.Namespace) -> None:
    from app.migrate import upgrade

    upgrade()
    print("database at head")


def cmd_catalog_load(args: argparse.Namespace) -> None:
    path = Path(args.path) if args.path else get_settings().catalog_path
    with session_scope() as session:
        report = load_catalog(session, path, allow_empty=args.allow_empty)
    _print({"catalog": str(path), **report.__dict__})


# A credit above this is a typo (and beyond a billion dollars the ledger's BIGINT of micro-USD
# is not far off).
_MAX_CREDIT_USD = Decimal(1_000_000_000)


def _credit_micros(amount: str) -> int:
    """A top-up amount: positive, at most six decimals, at most _MAX_CREDIT_USD."""
    micros = usd_to_micros(amount)
    if micros <= 0:
        raise ValueError(f"a top-up must be a positive amount, not {amount}")
    if micros > usd_to_micros(_MAX_CREDIT_USD):
        raise ValueError(f"a top-up above ${_MAX_CREDIT_USD:,} is refused: {amount}")
    return micros


def cmd_account_create(args: argparse.Namespace) -> None:
    # --top-up 0 means no initial credit; a negative one is a mistake, not a no-op.
    credit = None if args.top_up in (None, "0") else _credit_micros(args.top_up)
    with session_scope() as session:
        account = accounts.create_account(session, args.name)
        _, raw = accounts.issue_key(session, account.id, name="default", raw_key=args.key)
        balance = 0
        if credit is not None:
            wid = _wallet_id(session, str(account.id))
            balance = wallet.top_up(session, wid, credit, "initial credit").balance_micros
    _print({"account_id": account.id, "api_key": raw, "balance_usd": str(micros_to_usd(balance))})


def cmd_key_issue(args: argparse.Namespace) -> None:
    with session_scope() as session:
        row, raw = accounts.issue_key(session, uuid.UUID(args.account_id), name=args.name)
    _print({"api_key": raw, "prefix": row.prefix})


def cmd_key_revoke(args: argparse.Namespace) -> None:
    with session_scope() as session:
        if not accounts.revoke_key(session, args.prefix):
            raise SystemExit(f"no key with prefix {args.prefix}")
    _print({"revoked": args.prefix})


def cmd_wallet_top_up(args: argparse.Namespace) -> None:
    with session_scope() as session:
        state = wallet.top_up(
            session, _wallet_id(session, args.account_id), _credit_micros(args.amount), args.memo
        )
    _print({"balance_usd": str(micros_to_usd(state.balance_micros))})


def ensure_demo_account(raw_key: str, credit_usd: Decimal) -> str:
    """Idempotent: the demo account with this key, credited once."""
    with session_scope() as session:
        existing = session.scalar(
            select(ApiKey).where(ApiKey.prefix == accounts.key_prefix(raw_key))
        )
        if existing is not None:
            return str(existing.account_id)
        account = accounts.create_account(session, "Demo")
        accounts.issue_key(session, account.id, name="demo", raw_key=raw_key)
        wid = _wallet_id(session, str(account.id))
        wallet.top_up(session, wid, usd_to_micros(credit_usd), "demo credit")
        return str(account.id)


def cmd_demo(args: argparse.Namespace) -> None:
    account_id = ensure_demo_account(args.key, Decimal(args.credit))
    _print({"account_id": account_id})


def cmd_account_show(args: argparse.Namespace) -> None:
    with session_scope() as session:
        account = session.get(Account, uuid.UUID(args.account_id))
        if account is None:
            raise SystemExit(f"no account {args.account_id}")
        state = wallet.get_state(session, _wallet_id(session, args.account_id))
    _print(
        {
            "account_id": account.id,
            "name": account.name,
            "balance_usd": str(micros_to_usd(state.balance_micros)),
            "held_usd": str(micros_to_usd(state.held_micros)),
            "available_usd": str(micros_to_usd(state.available_micros)),
        }
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flopex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="group", required=True)

    db = sub.add_parser("db").add_subparsers(dest="cmd", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    catalog = sub.add_parser("catalog").add_subparsers(dest="cmd", required=True)
    load = catalog.add_parser("load", help="load providers, models and offerings from TOML")
    load.add_argument("path", nargs="?")
    load.add_argument(
        "--allow-empty",
        action="store_true",
        help="load a catalog that serves nothing (disables every provider and model)",
    )
    load.set_defaults(func=cmd_catalog_load)

    account = sub.add_parser("account").add_subparsers(dest="cmd", required=True)
    create = account.add_parser("create", help="create an account with a wallet and a key")
    create.add_argument("name")
    create.add_argument("--top-up", help="initial credit in USD, e.g. 10.00")
    create.add_argument("--key", help="use this API key instead of generating one")
    create.set_defaults(func=cmd_account_create)
    show = account.add_parser("show", help="an account's wallet")
    show.add_argument("account_id")
    show.set_defaults(func=cmd_account_show)
    demo = account.add_parser("demo", help="ensure the demo account exists (idempotent)")
    demo.add_argument("--key", required=True)
    demo.add_argument("--credit", default="10.00")
    demo.set_defaults(func=cmd_demo)

    key = sub.add_parser("key").add_subparsers(dest="cmd", required=True)
    issue = key.add_parser("issue", help="issue a new API key")
    issue.add_argument("account_id")
    issue.add_argument("--name", default="")
    issue.set_defaults(func=cmd_key_issue)
    revoke = key.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=cmd_key_revoke)

    wallet_p = sub.add_parser("wallet").add_subparsers(dest="cmd", required=True)
    top = wallet_p.add_parser("top-up", help="credit a wallet (a ledger entry)")
    top.add_argument("account_id")
    top.add_argument("amount", help="USD, at most six decimals")
    top.add_argument("--memo", default="")
    top.set_defaults(func=cmd_wallet_top_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, LookupError, ArithmeticError) as exc:
        print(f"flopex: {exc}", file=sys.stderr)
        return 2
    except IntegrityError as exc:  # e.g. an unknown account id, a --key already issued
        print(f"flopex: refused by the database: {exc.orig}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a catalog file that does not exist
        print(f"flopex: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
