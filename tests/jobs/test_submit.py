"""app/jobs/submit.py: the job row and its hold are written together or not at all; without a
transaction open (a submission without an Idempotency-Key), as one statement that is its own
transaction."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, text

from app import accounts
from app.catalog import ModelCache
from app.db import session_factory, session_scope
from app.exceptions import FlopexError
from app.jobs.submit import SubmitInference
from app.models import Job
from config.settings import get_settings
from tests.factories import SUBMISSION as REQUEST
from tests.factories import books, make_submitted_job


def _principal(account: Any) -> Any:
    with session_scope() as session:
        return accounts.authenticate(session, account.api_key)


def _estimates(account: Any, models: ModelCache) -> list[int]:
    """The hold choices a submission makes for REQUEST (largest first)."""
    with session_scope() as session:
        submit = SubmitInference(
            session, _principal(account), REQUEST, get_settings(), models=models
        )
        submit.validate()
        return list(submit._hold_choices)


@pytest.mark.parametrize("defer", [False, True], ids=["durable", "deferred"])
def test_a_submission_without_a_transaction_open_commits_job_and_hold_by_itself(
    models, make_account, defer
):
    account = make_account("10.00")
    session = session_factory()()
    try:
        accepted = make_submitted_job(session, account, models, defer=defer)
        # Committed by the server as the statement ended: nothing for the session to roll back.
        session.rollback()
    finally:
        session.close()
    jobs, ledger, state = books(account)
    assert jobs == [accepted.job.id]
    assert ledger == [("topup", 0), ("hold", accepted.job.hold_micros)]
    assert state.held_micros == accepted.job.hold_micros > 0


def _submit_with(available: int, models: ModelCache, make_account: Any) -> tuple[Any, Any]:
    account = make_account(f"{available / 1_000_000:.6f}")
    session = session_factory()()
    try:
        return account, make_submitted_job(session, account, models)
    finally:
        session.close()


@pytest.mark.parametrize(
    ("available", "held"),
    [
        # Short of the largest worst case by a micro: the middle one, not the cheapest.
        (lambda c: c[0] - 1, lambda c: c[1]),
        # Between the middle and the largest: still the middle.
        (lambda c: (c[0] + c[1]) // 2, lambda c: c[1]),
        # Short of the middle by a micro: the cheapest.
        (lambda c: c[1] - 1, lambda c: c[2]),
        # Exactly the middle, exactly the largest.
        (lambda c: c[1], lambda c: c[1]),
        (lambda c: c[0], lambda c: c[0]),
    ],
    ids=["largest-1", "between", "middle-1", "middle", "largest"],
)
def test_the_hold_is_the_largest_worst_case_the_wallet_covers(
    models, make_account, available, held
):
    choices = _estimates(make_account("10.00"), models)
    # The test catalog's three providers serve REQUEST's model at three different prices.
    assert len(choices) == 3 and choices == sorted(set(choices), reverse=True)
    account, accepted = _submit_with(available(choices), models, make_account)
    jobs, ledger, state = books(account)
    # One hold, of the chosen amount, with its job; nothing else was written.
    assert jobs == [accepted.job.id] and accepted.job.hold_micros == held(choices)
    assert ledger == [("topup", 0), ("hold", held(choices))]
    assert state.held_micros == held(choices)
    with session_scope() as check:
        stored = check.scalar(select(Job.hold_micros).where(Job.id == accepted.job.id))
    assert stored == held(choices)


def test_the_price_limit_bounds_the_hold_choices(models, make_account):
    choices = _estimates(make_account("10.00"), models)
    limited = dataclasses.replace(REQUEST, max_price_usd=Decimal(choices[1] + 1).scaleb(-6))
    with session_scope() as session:
        submit = SubmitInference(
            session, _principal(make_account("10.00")), limited, get_settings(), models=models
        )
        submit.validate()
    # The largest worst case is above max_price_usd: it can be neither held nor routed to.
    assert submit._hold_choices == choices[1:]


def test_a_refused_submission_writes_no_job_and_no_hold(models, make_account):
    cheapest = _estimates(make_account("10.00"), models)[-1]
    account = make_account(f"{(cheapest - 1) / 1_000_000:.6f}")
    before = books(account)
    session = session_factory()()
    try:
        with pytest.raises(FlopexError) as refused:
            make_submitted_job(session, account, models)
        session.rollback()
    finally:
        session.close()
    assert refused.value.code == "insufficient_balance"
    assert books(account) == before
    assert before[0] == []


def test_with_a_transaction_open_the_job_and_hold_join_it(models, make_account):
    account = make_account("10.00")
    before = books(account)
    session = session_factory()()
    try:
        session.execute(text("SELECT 1"))  # as an Idempotency-Key's claim does
        make_submitted_job(session, account, models)
        assert books(account) == before  # not committed yet
        session.rollback()
    finally:
        session.close()
    assert books(account) == before
