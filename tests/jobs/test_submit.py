"""app/jobs/submit.py: the job row and its hold are written together or not at all; without a
transaction open (a submission without an Idempotency-Key), as one statement that is its own
transaction."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select, text

from app import accounts, wallet
from app.catalog import ModelCache
from app.db import session_factory, session_scope
from app.exceptions import FlopexError
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, LedgerEntry
from config.settings import get_settings

REQUEST = InferenceRequest(
    model="llama-3.1-8b",
    prompt="Hold me.",
    max_output_tokens=64,
    performance_profile="economy",
)


def _principal(account: Any) -> Any:
    with session_scope() as session:
        return accounts.authenticate(session, account.api_key)


@pytest.fixture
def models(pipeline: Any) -> ModelCache:
    """A warm model cache, as the web's: the submission then reads nothing before its hold."""
    cache = ModelCache(ttl_s=60)
    with session_scope() as session:
        assert cache.get(session, REQUEST.model) is not None
    return cache


def _submit(session: Any, account: Any, models: ModelCache, defer: bool = True) -> Any:
    return SubmitInference(
        session, _principal(account), REQUEST, get_settings(), models=models, defer=defer
    ).run()


def _estimates(account: Any, models: ModelCache) -> list[int]:
    """The hold choices a submission makes for REQUEST (largest first)."""
    with session_scope() as session:
        submit = SubmitInference(
            session, _principal(account), REQUEST, get_settings(), models=models
        )
        submit.validate()
        return list(submit._hold_choices)


def _books(account: Any) -> tuple[list[uuid.UUID], list[tuple[str, int]], wallet.WalletState]:
    with session_scope() as session:
        jobs = list(session.scalars(select(Job.id).where(Job.account_id == account.account_id)))
        ledger = [
            (e.kind, e.held_delta_micros)
            for e in session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.wallet_id == account.wallet_id)
                .order_by(LedgerEntry.id)
            )
        ]
        state = wallet.get_state(session, account.wallet_id)
        assert wallet.ledger_sums(session, account.wallet_id) == state
    return jobs, ledger, state


@pytest.mark.parametrize("defer", [False, True], ids=["durable", "deferred"])
def test_a_submission_without_a_transaction_open_commits_job_and_hold_by_itself(
    models, make_account, defer
):
    account = make_account("10.00")
    session = session_factory()()
    try:
        accepted = _submit(session, account, models, defer)
        # Committed by the server as the statement ended: nothing for the session to roll back.
        session.rollback()
    finally:
        session.close()
    jobs, ledger, state = _books(account)
    assert jobs == [accepted.job.id]
    assert ledger == [("topup", 0), ("hold", accepted.job.hold_micros)]
    assert state.held_micros == accepted.job.hold_micros > 0


def test_a_wallet_that_covers_only_the_cheapest_provider_gets_the_cheapest_hold(
    models, make_account
):
    largest, cheapest = _estimates(make_account("10.00"), models)
    assert largest > cheapest
    account = make_account(f"{(largest - 1) / 1_000_000:.6f}")
    session = session_factory()()
    try:
        accepted = _submit(session, account, models)
    finally:
        session.close()
    jobs, ledger, _ = _books(account)
    # The refused first choice wrote nothing, not even the job; the second wrote both.
    assert jobs == [accepted.job.id] and accepted.job.hold_micros == cheapest
    assert ledger == [("topup", 0), ("hold", cheapest)]
    with session_scope() as check:
        assert check.scalar(select(Job.hold_micros).where(Job.id == accepted.job.id)) == cheapest


def test_a_refused_submission_writes_no_job_and_no_hold(models, make_account):
    cheapest = _estimates(make_account("10.00"), models)[-1]
    account = make_account(f"{(cheapest - 1) / 1_000_000:.6f}")
    before = _books(account)
    session = session_factory()()
    try:
        with pytest.raises(FlopexError) as refused:
            _submit(session, account, models)
        session.rollback()
    finally:
        session.close()
    assert refused.value.code == "insufficient_balance"
    assert _books(account) == before
    assert before[0] == []


def test_with_a_transaction_open_the_job_and_hold_join_it(models, make_account):
    account = make_account("10.00")
    before = _books(account)
    session = session_factory()()
    try:
        session.execute(text("SELECT 1"))  # as an Idempotency-Key's claim does
        _submit(session, account, models)
        assert _books(account) == before  # not committed yet
        session.rollback()
    finally:
        session.close()
    assert _books(account) == before
