"""app/wallet.py on SQLite (the embedded default of `make run`): the same movements as on
PostgreSQL, written statement by statement instead of as one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app import wallet
from app.db import build_engine
from app.models import Base, Job, LedgerEntry, utcnow
from tests.factories import make_job, make_wallet


@pytest.fixture
def sqlite_session(tmp_path) -> Iterator[Session]:  # type: ignore[no-untyped-def]
    engine = build_engine(f"sqlite:///{tmp_path / 'wallet.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_hold_settle_and_finish_the_job_in_order(sqlite_session):
    s = sqlite_session
    account_id, wallet_id = make_wallet(s)
    wallet.top_up(s, wallet_id, 1_000)
    job_id = make_job(s, account_id, wallet_id)
    assert wallet.hold(s, wallet_id, job_id, 5_000) is None  # more than is available
    assert wallet.hold(s, wallet_id, job_id, 400) == wallet.WalletState(1_000, 400)
    state = wallet.settle_hold(
        s, wallet_id, job_id, 400, 150, finish=wallet.FinalJobWrite(1, {"status": "success"})
    )
    assert state == wallet.WalletState(850, 0)
    entries = s.execute(
        select(
            LedgerEntry.kind,
            LedgerEntry.amount_micros,
            LedgerEntry.held_delta_micros,
            LedgerEntry.balance_after_micros,
            LedgerEntry.held_after_micros,
        )
        .where(LedgerEntry.wallet_id == wallet_id)
        .order_by(LedgerEntry.id)
    ).all()
    assert [tuple(e) for e in entries] == [
        ("topup", 1_000, 0, 1_000, 0),
        ("hold", 0, 400, 1_000, 400),
        ("capture", -150, -150, 850, 250),
        ("release", 0, -250, 850, 0),
    ]
    job = s.execute(
        select(
            Job.__table__.c.status, Job.__table__.c.version, Job.__table__.c.balance_after_micros
        ).where(Job.__table__.c.id == job_id)
    ).one()
    assert tuple(job) == ("success", 2, 850)
    assert wallet.ledger_sums(s, wallet_id) == wallet.get_state(s, wallet_id)


def test_a_stale_job_version_refuses_the_settlement(sqlite_session):
    s = sqlite_session
    account_id, wallet_id = make_wallet(s)
    wallet.top_up(s, wallet_id, 1_000)
    job_id = make_job(s, account_id, wallet_id)
    wallet.hold(s, wallet_id, job_id, 400)
    with pytest.raises(StaleDataError):
        wallet.settle_hold(
            s, wallet_id, job_id, 400, 150, finish=wallet.FinalJobWrite(7, {"status": "success"})
        )


def new_job_row(
    job_id: uuid.UUID, account_id: uuid.UUID, wallet_id: uuid.UUID, **values: object
) -> dict[str, object]:
    """A job row as app/jobs/submit.py hands it to a hold: every column with a Python-side
    default is given (PostgreSQL's INSERT ... SELECT does not run them)."""
    return {
        "id": job_id,
        "account_id": account_id,
        "wallet_id": wallet_id,
        "status": "quoting",
        "version": 1,
        "model": "llama-3.1-8b",
        "request": {"input": "hi"},
        "performance_profile": "economy",
        "routing_strategy": "lowest_cost",
        "max_output_tokens": 16,
        "markup": "0.15",
        "estimated_input_tokens": 9,
        "expected_quotes": 1,
        "created_at": utcnow(),
        "updated_at": utcnow(),
        **values,
    }


@pytest.mark.parametrize("dialect_session", ["sqlite_session", "db_session"])
def test_a_hold_writes_its_new_job_only_when_it_is_placed(dialect_session, request):
    s = request.getfixturevalue(dialect_session)
    account_id, wallet_id = make_wallet(s)
    wallet.top_up(s, wallet_id, 1_000)
    job_id = uuid.uuid4()
    row = new_job_row(job_id, account_id, wallet_id)
    refused = wallet.hold(s, wallet_id, job_id, 5_000, new_job={**row, "hold_micros": 5_000})
    assert refused is None
    assert s.scalar(select(Job.id).where(Job.id == job_id)) is None
    placed = wallet.hold(s, wallet_id, job_id, 400, new_job={**row, "hold_micros": 400})
    assert placed == wallet.WalletState(1_000, 400)
    assert s.scalar(select(Job.hold_micros).where(Job.id == job_id)) == 400
    kinds = s.scalars(
        select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
    ).all()
    assert kinds == ["hold"]

    # A free job (nothing to hold) still gets its row, and no ledger entry.
    free_id = uuid.uuid4()
    state = wallet.hold(s, wallet_id, free_id, 0, new_job={**row, "id": free_id, "hold_micros": 0})
    assert state == wallet.WalletState(1_000, 400)
    assert s.scalar(select(Job.hold_micros).where(Job.id == free_id)) == 0
    assert s.scalar(select(LedgerEntry.id).where(LedgerEntry.job_id == free_id)) is None


@pytest.mark.parametrize("dialect_session", ["sqlite_session", "db_session"])
def test_hold_largest_holds_the_largest_choice_the_wallet_covers(dialect_session, request):
    s = request.getfixturevalue(dialect_session)
    account_id, wallet_id = make_wallet(s)
    wallet.top_up(s, wallet_id, 1_000)

    def row(job_id: uuid.UUID) -> dict[str, object]:
        # The largest choice, as app/jobs/submit.py passes it: replaced by the amount held.
        return new_job_row(job_id, account_id, wallet_id, expected_quotes=3, hold_micros=1_500)

    def hold(choices: list[int]) -> tuple[uuid.UUID, tuple[int, wallet.WalletState] | None]:
        job_id = uuid.uuid4()
        return job_id, wallet.hold_largest(s, wallet_id, job_id, choices, new_job=row(job_id))

    def job_hold(job_id: uuid.UUID) -> int | None:
        return s.scalar(select(Job.hold_micros).where(Job.id == job_id))

    # 1,000 available: the middle choice is the largest it covers (not the largest, not the
    # smallest).
    middle, placed = hold([1_500, 710, 470])
    assert placed == (710, wallet.WalletState(1_000, 710))
    assert job_hold(middle) == 710
    entry = s.execute(
        select(
            LedgerEntry.kind,
            LedgerEntry.amount_micros,
            LedgerEntry.held_delta_micros,
            LedgerEntry.balance_after_micros,
            LedgerEntry.held_after_micros,
        ).where(LedgerEntry.job_id == middle)
    ).all()
    assert [tuple(e) for e in entry] == [("hold", 0, 710, 1_000, 710)]

    # 290 left: not even the smallest fits; nothing is written, not even the job.
    refused, placed = hold([1_500, 710, 470])
    assert placed is None and job_hold(refused) is None

    # Choices in any order, duplicates allowed.
    smallest, placed = hold([200, 290, 200])
    assert placed == (290, wallet.WalletState(1_000, 1_000))
    assert job_hold(smallest) == 290

    # Nothing left, but a free offering needs no money: its job gets no ledger entry.
    free, placed = hold([300, 0])
    assert placed == (0, wallet.WalletState(1_000, 1_000))
    assert job_hold(free) == 0
    assert s.scalar(select(LedgerEntry.id).where(LedgerEntry.job_id == free)) is None

    assert wallet.ledger_sums(s, wallet_id) == wallet.get_state(s, wallet_id)
    with pytest.raises(ValueError):
        wallet.hold_largest(s, wallet_id, uuid.uuid4(), [])
    with pytest.raises(ValueError):
        wallet.hold_largest(s, wallet_id, uuid.uuid4(), [10, -1])
