"""The ``flopex`` admin command: accounts, keys, wallets, the catalog and migrations.

Examples::

    flopex db upgrade
    flopex catalog load config/catalog.dev.toml
    flopex account create "Acme" --top-up 25
    flopex account set-limit <account-id> --per-min 600 --burst 50
    flopex key issue <account-id>
    flopex key list <account-id>
    flopex key revoke <key, fpx_<prefix> or prefix>
    flopex wallet top-up <account-id> 10.00 --memo "invoice 42"
    flopex wallet refund <job-id> [--amount 0.0012] --memo "ticket 7: truncated answer"
    flopex wallet adjust <account-id> -5.00 --memo "top-up entered twice"
    flopex job show <job-id>
    flopex job cancel <job-id>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app import accounts, wallet
from app.catalog import load_catalog
from app.db import session_scope
from app.models import Account, ApiKey, Job, LedgerEntry, Wallet
from app.money import JSON_NUMBER, micros_to_usd, usd_to_micros
from config.settings import get_settings


def _wallet_id(session: Session, account_id: str) -> uuid.UUID:
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
    # No silent default: the file is the whole truth, and the development catalog loaded by
    # mistake would disable every real provider. FLOPEX_CATALOG names the deployment's file.
    if not args.path and not os.environ.get("FLOPEX_CATALOG"):
        raise ValueError(
            "name the catalog file (flopex catalog load <path>) or set FLOPEX_CATALOG; "
            "the development catalog is config/catalog.dev.toml"
        )
    path = Path(args.path) if args.path else get_settings().catalog_path
    with session_scope() as session:
        report = load_catalog(session, path, allow_empty=args.allow_empty)
    for warning in report.warnings:
        print(f"flopex: warning: {warning}", file=sys.stderr)
    _print({"catalog": str(path), **report.__dict__})


# A credit above this is a typo (and beyond a billion dollars the ledger's BIGINT of micro-USD
# is not far off).
_MAX_CREDIT_USD = Decimal(1_000_000_000)


# The API's number grammar (JSON's: an exponent is allowed, as in max_price_usd) with an
# optional leading +: the admin CLI and the API read amounts alike.
_AMOUNT = re.compile(rf"\+?{JSON_NUMBER.pattern}")


def _micros(amount: str) -> int:
    if not _AMOUNT.fullmatch(amount.strip()):
        raise ValueError(f"an amount is written in USD like 10, 0.25 or 2.5e-1, not {amount!r}")
    micros = usd_to_micros(amount.strip())
    if abs(micros) > usd_to_micros(_MAX_CREDIT_USD):
        raise ValueError(f"an amount above ${_MAX_CREDIT_USD:,} is refused: {amount}")
    return micros


def _credit_micros(amount: str) -> int:
    """A top-up amount: positive, at most six decimals, at most _MAX_CREDIT_USD."""
    micros = _micros(amount)
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
    _print(
        {
            "account_id": account.id,
            "api_key": raw,
            "key_prefix": accounts.key_prefix(raw),
            "balance_usd": str(micros_to_usd(balance)),
        }
    )


def cmd_key_issue(args: argparse.Namespace) -> None:
    with session_scope() as session:
        row, raw = accounts.issue_key(session, uuid.UUID(args.account_id), name=args.name)
    _print({"api_key": raw, "prefix": row.prefix})


# `fpx_<prefix>` or `fpx_<prefix>_` as copied from a key or a log line.
_PREFIX_FORM = re.compile(r"^fpx_([A-Za-z0-9]{8,24})_?$")


def cmd_key_revoke(args: argparse.Namespace) -> None:
    """Takes the key itself, `fpx_<prefix>` or the bare prefix: whatever the operator has."""
    given = args.key.strip()
    with session_scope() as session:
        # The key itself first (its hash must match: an imported key such as
        # `fpx_demo12345678` has a hash-derived prefix and also looks like `fpx_<prefix>`),
        # then `fpx_<prefix>`, then the bare prefix.
        row = session.scalar(
            select(ApiKey).where(
                ApiKey.prefix == accounts.key_prefix(given),
                ApiKey.key_hash == accounts.hash_key(given),
            )
        )
        if row is None:
            form = _PREFIX_FORM.match(given)
            prefix = form.group(1) if form else given
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is None:
            raise LookupError(f"no key matches {given!r} (give the key, fpx_<prefix> or prefix)")
        already = row.revoked_at is not None
        accounts.revoke_key(session, row.prefix)
        result = {
            "prefix": row.prefix,
            "account_id": row.account_id,
            "name": row.name,
            "revoked_at": row.revoked_at,
            "already_revoked": already,
        }
    _print(result)


def cmd_key_list(args: argparse.Namespace) -> None:
    with session_scope() as session:
        _wallet_id(session, args.account_id)  # the account exists
        rows = session.scalars(
            select(ApiKey)
            .where(ApiKey.account_id == uuid.UUID(args.account_id))
            .order_by(ApiKey.created_at)
        ).all()
        keys = [
            {
                "prefix": r.prefix,
                "name": r.name,
                "created_at": r.created_at,
                "revoked_at": r.revoked_at,
            }
            for r in rows
        ]
    _print({"account_id": args.account_id, "keys": keys})


def cmd_wallet_top_up(args: argparse.Namespace) -> None:
    with session_scope() as session:
        state = wallet.top_up(
            session, _wallet_id(session, args.account_id), _credit_micros(args.amount), args.memo
        )
    _print({"balance_usd": str(micros_to_usd(state.balance_micros))})


def cmd_wallet_refund(args: argparse.Namespace) -> None:
    amount = None if args.amount is None else _micros(args.amount)
    if amount is not None and amount <= 0:
        raise ValueError(f"a refund must be a positive amount, not {args.amount}")
    with session_scope() as session:
        done = wallet.refund(session, uuid.UUID(args.job_id), amount, args.memo)
        account_id = session.scalar(select(Job.account_id).where(Job.id == uuid.UUID(args.job_id)))
    _print(
        {
            "job_id": args.job_id,
            "account_id": account_id,
            "refunded_usd": str(micros_to_usd(done.amount_micros)),
            "job_charged_usd": str(micros_to_usd(done.captured_micros)),
            "job_refunded_total_usd": str(micros_to_usd(done.refunded_micros)),
            "balance_usd": str(micros_to_usd(done.state.balance_micros)),
        }
    )


def cmd_wallet_adjust(args: argparse.Namespace) -> None:
    amount = _micros(args.amount)
    with session_scope() as session:
        state = wallet.adjust(session, _wallet_id(session, args.account_id), amount, args.memo)
    _print(
        {
            "adjusted_usd": str(micros_to_usd(amount)),
            "balance_usd": str(micros_to_usd(state.balance_micros)),
            "available_usd": str(micros_to_usd(state.available_micros)),
        }
    )


def cmd_account_set_limit(args: argparse.Namespace) -> None:
    """The account's own rate limit; --default returns it to the deployment's settings."""
    if args.default == (args.per_min is not None or args.burst is not None):
        raise ValueError("give --per-min (and optionally --burst), or --default")
    for name, value in (("--per-min", args.per_min), ("--burst", args.burst)):
        if value is not None and value < 0:
            raise ValueError(f"{name} cannot be negative")
    with session_scope() as session:
        account = session.get(Account, uuid.UUID(args.account_id))
        if account is None:
            raise LookupError(f"no account {args.account_id}")
        account.rate_limit_per_min = None if args.default else args.per_min
        account.rate_limit_burst = None if args.default else args.burst
    settings = get_settings()
    _print(
        {
            "account_id": args.account_id,
            "rate_limit_per_min": args.per_min if not args.default else None,
            "rate_limit_burst": args.burst if not args.default else None,
            "deployment_default": f"{settings.rate_limit_per_min}/min, burst "
            f"{settings.rate_limit_burst}",
            "takes_effect": f"within FLOPEX_AUTH_CACHE_S ({settings.auth_cache_s:g} s)",
        }
    )


def cmd_job_show(args: argparse.Namespace) -> None:
    """What the customer sees (the job object) and what only we see: its internal status and
    version, its account, hold and webhook state, and its ledger entries."""
    from app.jobs.render import render_job

    with session_scope() as session:
        job = session.get(Job, uuid.UUID(args.job_id))
        if job is None:
            raise LookupError(f"no job {args.job_id}")
        entries = session.execute(
            select(
                LedgerEntry.id,
                LedgerEntry.kind,
                LedgerEntry.amount_micros,
                LedgerEntry.held_delta_micros,
                LedgerEntry.memo,
                LedgerEntry.created_at,
            )
            .where(LedgerEntry.job_id == job.id)
            .order_by(LedgerEntry.id)
        ).all()
        shown = {
            "internal": {
                "status": job.status,
                "version": job.version,
                "account_id": job.account_id,
                "hold_micros": job.hold_micros,
                "charge_micros": job.charge_micros,
                "webhook_status": job.webhook_status,
                "request_id": job.request_id,
                "updated_at": job.updated_at,
            },
            "ledger": [
                {
                    "id": e.id,
                    "kind": e.kind,
                    "amount_micros": e.amount_micros,
                    "held_delta_micros": e.held_delta_micros,
                    "memo": e.memo,
                    "created_at": e.created_at,
                }
                for e in entries
            ],
            "job": render_job(job),
        }
    _print(shown)


def cmd_job_cancel(args: argparse.Namespace) -> None:
    """As the customer's POST /v1/inference/<id>/cancel: only before the job starts executing;
    its hold is released, waiters are woken and its webhook is queued."""
    from app.celery_app import make_celery
    from app.exceptions import FlopexError
    from app.jobs.cancel import announce_cancelled, cancel
    from app.redis_client import get_redis

    with session_scope() as session:
        job = session.get(Job, uuid.UUID(args.job_id))
        if job is None:
            raise LookupError(f"no job {args.job_id}")
        try:
            job = cancel(session, job)
        except FlopexError as exc:
            raise ValueError(f"job {args.job_id}: {exc.message}") from None
    announce_cancelled(job, get_redis(), make_celery())
    _print({"job_id": args.job_id, "status": "cancelled", "hold_released_micros": job.hold_micros})


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
            # None: the deployment's FLOPEX_RATE_LIMIT_PER_MIN / _BURST apply.
            "rate_limit_per_min": account.rate_limit_per_min,
            "rate_limit_burst": account.rate_limit_burst,
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
    limit = account.add_parser("set-limit", help="an account's own rate limit (0 refuses all)")
    limit.add_argument("account_id")
    limit.add_argument("--per-min", type=int, help="requests per minute")
    limit.add_argument("--burst", type=int, help="burst (default: at most a minute of the rate)")
    limit.add_argument("--default", action="store_true", help="use the deployment's limit")
    limit.set_defaults(func=cmd_account_set_limit)
    demo = account.add_parser("demo", help="ensure the demo account exists (idempotent)")
    demo.add_argument("--key", required=True)
    demo.add_argument("--credit", default="10.00")
    demo.set_defaults(func=cmd_demo)

    key = sub.add_parser("key").add_subparsers(dest="cmd", required=True)
    issue = key.add_parser("issue", help="issue a new API key")
    issue.add_argument("account_id")
    issue.add_argument("--name", default="")
    issue.set_defaults(func=cmd_key_issue)
    revoke = key.add_parser("revoke", help="revoke a key (the key, fpx_<prefix> or prefix)")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_key_revoke)
    listing = key.add_parser("list", help="an account's keys (prefixes, never the keys)")
    listing.add_argument("account_id")
    listing.set_defaults(func=cmd_key_list)

    wallet_p = sub.add_parser("wallet").add_subparsers(dest="cmd", required=True)
    top = wallet_p.add_parser("top-up", help="credit a wallet (a ledger entry)")
    top.add_argument("account_id")
    top.add_argument("amount", help="USD, at most six decimals")
    top.add_argument("--memo", default="")
    top.set_defaults(func=cmd_wallet_top_up)
    ref = wallet_p.add_parser("refund", help="credit back part or all of a job's charge")
    ref.add_argument("job_id")
    ref.add_argument("--amount", help="USD (default: all that is left of the charge)")
    ref.add_argument("--memo", required=True, help="why, and who asked")
    ref.set_defaults(func=cmd_wallet_refund)
    adj = wallet_p.add_parser("adjust", help="correct a balance (+ credit, - debit)")
    adj.add_argument("account_id")
    adj.add_argument("amount", help="USD, signed: -5.00 debits, 5.00 credits")
    adj.add_argument("--memo", required=True, help="why, and who asked")
    adj.set_defaults(func=cmd_wallet_adjust)

    job = sub.add_parser("job").add_subparsers(dest="cmd", required=True)
    for name, help_text, func in (
        ("show", "a job as the customer sees it, with its ledger", cmd_job_show),
        ("cancel", "cancel a job that has not started executing", cmd_job_cancel),
    ):
        command = job.add_parser(name, help=help_text)
        command.add_argument("job_id")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Every command needs the settings (the database URL at least): read them first, so a
        # malformed or out-of-range variable stops the command before it does anything, as the
        # one-line ValueError below that names the variable (config/settings.py).
        get_settings()
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
    except OperationalError as exc:  # the database is down, or the URL names none
        print(f"flopex: cannot reach the database: {exc.orig}".rstrip(), file=sys.stderr)
        return 1
    except ArgumentError as exc:  # e.g. DATABASE_URL=mysql://... (no driver installed)
        print(
            f"flopex: DATABASE_URL is not usable ({exc}); PostgreSQL URLs are "
            "postgresql+psycopg2://user@host:5432/name",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
