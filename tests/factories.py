"""Test data: accounts, API keys, jobs and ledger entries, built through the domain's own
functions so that every row obeys the same invariants as production data (a wallet's ledger
sums to its balance, a hold has its ledger entry).

Plain typed functions that take a session and flush, never commit: the caller's transaction
decides (``db_session`` rolls back, ``session_scope()`` commits). Shared by test modules instead
of helpers imported from one test module into another.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import accounts, wallet
from app.catalog import ModelCache
from app.db import session_scope
from app.jobs.submit import Accepted, InferenceRequest, SubmitInference
from app.models import Job, LedgerEntry, Wallet
from app.money import usd_to_micros
from app.providers.breaker import Breaker
from app.providers.probe import probe_all
from app.wallet import WalletState
from config.settings import get_settings

USD = 1_000_000


class Owner(NamedTuple):
    """An account and its wallet (every account has exactly one)."""

    account_id: uuid.UUID
    wallet_id: uuid.UUID


@dataclass
class TestAccount:
    """An account that can call the API: its ids and a raw API key."""

    __test__ = False  # not a pytest test class

    account_id: uuid.UUID
    wallet_id: uuid.UUID
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


# -- accounts and keys -------------------------------------------------------------------------


def make_wallet(session: Session, name: str | None = None) -> Owner:
    """A new account with its empty wallet."""
    account = accounts.create_account(session, name or f"wallet-test-{uuid.uuid4().hex[:6]}")
    wallet_id = session.scalar(select(Wallet.id).where(Wallet.account_id == account.id))
    assert wallet_id is not None
    return Owner(account.id, wallet_id)


def make_key(session: Session, account_id: uuid.UUID) -> str:
    """A new API key for the account; returns the raw key (shown once, stored hashed)."""
    _, raw = accounts.issue_key(session, account_id)
    return raw


def make_customer(session: Session, balance_usd: str = "10.00", name: str = "test") -> TestAccount:
    """An account with an API key and a wallet topped up with ``balance_usd`` (a top-up entry)."""
    owner = make_wallet(session, name)
    raw = make_key(session, owner.account_id)
    principal = accounts.authenticate(session, raw)
    assert principal is not None and principal.wallet_id == owner.wallet_id
    if Decimal(balance_usd) > 0:
        make_top_up(session, owner.wallet_id, usd_to_micros(balance_usd), "test")
    return TestAccount(owner.account_id, owner.wallet_id, raw)


# -- jobs --------------------------------------------------------------------------------------


def make_job(
    session: Session, account_id: uuid.UUID, wallet_id: uuid.UUID, **columns: Any
) -> uuid.UUID:
    """A job row (by default executing, no hold); ``columns`` override any column."""
    values: dict[str, Any] = {
        "account_id": account_id,
        "wallet_id": wallet_id,
        "status": "executing",
        "model": "llama-3.1-8b",
        "request": {"input": "hi"},
        "performance_profile": "economy",
        "routing_strategy": "lowest_cost",
        "max_output_tokens": 16,
        "markup": "0.15",
        "estimated_input_tokens": 9,
        "expected_quotes": 1,
        **columns,
    }
    job = Job(**values)
    session.add(job)
    session.flush()
    return job.id


MINIMAL_REQUEST = {"model": "llama-3.1-8b", "input": "Hello there.", "max_output_tokens": 16}
"""The smallest valid POST /v1/inference body."""

SUBMISSION = InferenceRequest(
    model="llama-3.1-8b",
    prompt="Hold me.",
    max_output_tokens=64,
    performance_profile="economy",
)


def make_submitted_job(
    session: Session,
    account: TestAccount,
    models: ModelCache,
    *,
    request: InferenceRequest = SUBMISSION,
    defer: bool = True,
) -> Accepted:
    """A job admitted as the API admits one (the job row and its ``hold`` entry, one statement);
    ``models`` is a warm catalog cache (tests/jobs/conftest.py)."""
    with session_scope() as auth:
        principal = accounts.authenticate(auth, account.api_key)
    assert principal is not None
    return SubmitInference(
        session, principal, request, get_settings(), models=models, defer=defer
    ).run()


def route_option(provider: str, base_url: str = "", offering_id: int = 1) -> dict[str, Any]:
    """One offering as a job stores it for the route step (a catalog option, speed priors
    included)."""
    return {
        "offering_id": offering_id,
        "provider": provider,
        "base_url": base_url or f"http://{provider}.invalid/v1",
        "api_key_env": None,
        "provider_model_id": "m",
        "input_price_micros_per_m": 50_000,
        "output_price_micros_per_m": 80_000,
        "estimated_charge_micros": 12,
        "expected_ttft_ms": 30,
        "expected_tokens_per_s": 100.0,
    }


# -- ledger entries ----------------------------------------------------------------------------


def make_top_up(session: Session, wallet_id: uuid.UUID, micros: int, memo: str = "test") -> None:
    """A ``topup`` entry."""
    wallet.top_up(session, wallet_id, micros, memo)


def make_held_job(session: Session, owner: Owner, hold_micros: int) -> tuple[uuid.UUID, int]:
    """A job with a ``hold`` entry of ``hold_micros`` on the owner's wallet (which must cover
    it); returns the job's id and version."""
    job_id = make_job(session, owner.account_id, owner.wallet_id)
    wallet.hold(session, owner.wallet_id, job_id, hold_micros)
    version = session.scalar(select(Job.version).where(Job.id == job_id))
    assert version is not None
    return job_id, version


# -- reading them back -------------------------------------------------------------------------


def ledger_entries(session: Session, wallet_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """The wallet's entries in order: (kind, job, amount, held delta, balance after, held after)."""
    session.flush()
    rows = session.scalars(
        select(LedgerEntry).where(LedgerEntry.wallet_id == wallet_id).order_by(LedgerEntry.id)
    )
    return [
        (
            e.kind,
            e.job_id,
            e.amount_micros,
            e.held_delta_micros,
            e.balance_after_micros,
            e.held_after_micros,
        )
        for e in rows
    ]


def books(owner: Owner | TestAccount) -> tuple[list[uuid.UUID], list[tuple[str, int]], WalletState]:
    """What is committed for the account: its jobs, its ledger as (kind, held delta), and its
    wallet, checked against the ledger's sums."""
    with session_scope() as session:
        jobs = list(session.scalars(select(Job.id).where(Job.account_id == owner.account_id)))
        ledger = [(e[0], e[3]) for e in ledger_entries(session, owner.wallet_id)]
        state = wallet.get_state(session, owner.wallet_id)
        assert wallet.ledger_sums(session, owner.wallet_id) == state
    return jobs, ledger, state


def footprint(owner: Owner | TestAccount) -> tuple[int, int]:
    """How many jobs and ledger entries the account has committed: what a refused request must
    not change."""
    with session_scope() as session:
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.account_id == owner.account_id)
        )
        entries = session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.wallet_id == owner.wallet_id)
        )
    return jobs or 0, entries or 0


# -- provider health ---------------------------------------------------------------------------


def make_probe_results(redis_client: Any, now: float | None = None) -> Any:
    """Every catalog provider probed once (the beat's health probe): each gets a probe result,
    and so a success rate."""
    settings = get_settings()
    with session_scope() as session:
        return probe_all(
            session,
            redis_client,
            Breaker.from_settings(redis_client, settings),
            timeout_s=0.5,
            now=now,
        )
