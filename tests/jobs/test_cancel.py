"""app/jobs/cancel.py: a cancellation that races another writer of the job judges the job on
its new state, never a 500, and moves money only when it wins."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from app import wallet
from app.db import session_factory, session_scope
from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.cancel import cancel
from app.jobs.settlement import close_failed
from app.models import Job
from tests.factories import books, make_submitted_job


def _cancel_after_a_move(account: Any, cache: Any, moved_to: str) -> str:
    """Submits a job, reads it, lets another writer (the router's claim, the sweeper) move it
    and its version, then cancels from the stale read: the job's status, or the error code."""
    with session_scope() as session:
        job_id = make_submitted_job(session, account, cache).job.id
    session = session_factory()()
    try:
        job = session.get(Job, job_id)
        assert job.status == states.QUOTING
        with session_scope() as other:
            other.execute(
                update(Job).where(Job.id == job_id).values(version=Job.version + 1, status=moved_to)
            )
        try:
            status = cancel(session, job).status
        except FlopexError as exc:
            session.rollback()
            return exc.code
        session.commit()
        return status
    finally:
        session.close()


def test_a_job_that_started_executing_between_read_and_cancel_is_not_cancellable(
    models,
    make_account,
):
    account = make_account(balance_usd="1")
    assert _cancel_after_a_move(account, models, states.EXECUTING) == "job_not_cancellable"
    jobs, ledger, state = books(account)
    assert [kind for kind, _ in ledger] == ["topup", "hold"]  # the running job keeps its hold
    assert state.held_micros > 0
    with session_scope() as session:  # end it, so that no later sweep finds it executing
        close_failed(session, session.get(Job, jobs[0]), "provider_error", "test over")


@pytest.mark.parametrize("moved_to", [states.QUOTING, states.ROUTING], ids=["requoted", "claimed"])
def test_a_job_moved_but_not_yet_executing_is_cancelled(
    models,
    make_account,
    moved_to,
):
    """The sweeper re-quoted it, or a router claimed it: the router's next write is fenced off by
    the cancellation's version bump, before any provider call."""
    account = make_account(balance_usd="1")
    assert _cancel_after_a_move(account, models, moved_to) == states.CANCELLED
    _, ledger, state = books(account)
    assert [kind for kind, _ in ledger] == ["topup", "hold", "release"]
    assert state == wallet.WalletState(state.balance_micros, 0)


def _cancelled_count() -> float:
    """flopex_jobs_finished_total{status="cancelled"} as /metrics aggregates it."""
    from prometheus_client import generate_latest

    from app.metrics import host_registry
    from tests.conftest import metric_samples

    text = generate_latest(host_registry()).decode()
    return metric_samples(text, "flopex_jobs_finished_total").get(
        (("code", ""), ("status", "cancelled")), 0.0
    )


def test_a_cancellation_is_counted_once_when_committed_never_when_rolled_back(
    models,
    make_account,
):
    account = make_account(balance_usd="1")
    with session_scope() as session:
        rolled_back, committed = (
            make_submitted_job(session, account, models).job.id for _ in range(2)
        )
    start = _cancelled_count()
    session = session_factory()()
    try:
        cancel(session, session.get(Job, rolled_back))
        session.rollback()
        assert _cancelled_count() == start  # not cancelled after all
        cancel(session, session.get(Job, committed))
        assert _cancelled_count() == start  # not committed yet
        session.commit()
        assert _cancelled_count() == start + 1
        session.commit()  # a later commit of the same session counts nothing again
        with pytest.raises(FlopexError, match="already finished"):
            cancel(session, session.get(Job, committed))
        session.rollback()
        session.commit()
        assert _cancelled_count() == start + 1
    finally:
        session.close()
    with session_scope() as session:
        assert session.get(Job, rolled_back).status == states.QUOTING
        # End it, so that no later sweep finds it (cancelled: counted once more).
        cancel(session, session.get(Job, rolled_back))
    assert _cancelled_count() == start + 2
