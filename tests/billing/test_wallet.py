"""app/billing/wallet.py: the ledger, its invariants and the database guards behind them.

Most tests run in a rolled-back transaction (``db_session``). The concurrency tests use real,
separate connections and transactions, committed to the test database.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.billing import wallet
from app.billing.wallet import WalletState
from app.infra.db import Commit, session_factory, session_scope
from app.models import Job, LedgerEntry
from tests.conftest import run_together
from tests.factories import Owner, make_held_job, make_job, make_wallet
from tests.factories import ledger_entries as entries

USD = 1_000_000


def assert_invariants(session: Session, wallet_id: uuid.UUID) -> WalletState:
    session.flush()
    state = wallet.get_state(session, wallet_id)
    assert wallet.ledger_sums(session, wallet_id) == state
    assert 0 <= state.held_micros <= state.balance_micros
    return state


def test_top_up_hold_settle_ledger_and_after_balances(db_session):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)

    assert wallet.top_up(db_session, wid, 1 * USD, "invoice 1") == WalletState(1_000_000, 0)
    assert wallet.hold(db_session, wid, job, 300_000) == WalletState(1_000_000, 300_000)
    assert assert_invariants(db_session, wid).available_micros == 700_000
    assert wallet.settle_hold(db_session, wid, job, 300_000, 120_000) == WalletState(880_000, 0)

    assert entries(db_session, wid) == [
        ("topup", None, 1_000_000, 0, 1_000_000, 0),
        ("hold", job, 0, 300_000, 1_000_000, 300_000),
        ("capture", job, -120_000, -120_000, 880_000, 180_000),
        ("release", job, 0, -180_000, 880_000, 0),
    ]
    assert assert_invariants(db_session, wid) == WalletState(880_000, 0)
    memo = db_session.scalar(
        select(LedgerEntry.memo).where(LedgerEntry.kind == "topup", LedgerEntry.wallet_id == wid)
    )
    assert memo == "invoice 1"


def test_settle_for_the_full_hold_writes_a_zero_release_marker(db_session):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 500)
    wallet.hold(db_session, wid, job, 200)
    assert wallet.settle_hold(db_session, wid, job, 200, 200) == WalletState(300, 0)
    assert [e[0] for e in entries(db_session, wid)] == ["topup", "hold", "capture", "release"]
    assert entries(db_session, wid)[-1] == ("release", job, 0, 0, 300, 0)
    assert_invariants(db_session, wid)


def test_a_settled_job_cannot_be_settled_again_with_other_amounts(db_session):
    from sqlalchemy.exc import IntegrityError

    account_id, wid = make_wallet(db_session)
    job, other = make_job(db_session, account_id, wid), make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 500)
    wallet.hold(db_session, wid, job, 100)
    wallet.hold(db_session, wid, other, 100)
    wallet.settle_hold(db_session, wid, job, 100, 0)  # cancelled: all released
    before = entries(db_session, wid)
    with pytest.raises(IntegrityError), db_session.begin_nested():
        wallet.settle_hold(db_session, wid, job, 100, 100)  # a capture after the release
        db_session.flush()
    assert entries(db_session, wid) == before


def test_settle_for_nothing_releases_the_whole_hold(db_session):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 500)
    wallet.hold(db_session, wid, job, 200)
    assert wallet.settle_hold(db_session, wid, job, 200, 0) == WalletState(500, 0)
    assert entries(db_session, wid)[-1] == ("release", job, 0, -200, 500, 0)
    assert [e[0] for e in entries(db_session, wid)] == ["topup", "hold", "release"]
    assert_invariants(db_session, wid)


def test_hold_of_exactly_the_available_amount_succeeds(db_session):
    account_id, wid = make_wallet(db_session)
    jobs = [make_job(db_session, account_id, wid) for _ in range(2)]
    wallet.top_up(db_session, wid, 1000)
    assert wallet.hold(db_session, wid, jobs[0], 400) == WalletState(1000, 400)
    assert wallet.hold(db_session, wid, jobs[1], 600) == WalletState(1000, 1000)
    assert assert_invariants(db_session, wid).available_micros == 0


def test_hold_refused_when_unavailable_writes_nothing(db_session):
    account_id, wid = make_wallet(db_session)
    jobs = [make_job(db_session, account_id, wid) for _ in range(2)]
    wallet.top_up(db_session, wid, 1000)
    wallet.hold(db_session, wid, jobs[0], 700)
    before = entries(db_session, wid)

    assert wallet.hold(db_session, wid, jobs[1], 301) is None

    assert entries(db_session, wid) == before
    assert assert_invariants(db_session, wid) == WalletState(1000, 700)


def test_zero_hold_writes_nothing_and_negative_hold_is_refused(db_session):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 10)
    assert wallet.hold(db_session, wid, job, 0) == WalletState(10, 0)
    with pytest.raises(ValueError, match="cannot be negative"):
        wallet.hold(db_session, wid, job, -1)
    assert [e[0] for e in entries(db_session, wid)] == ["topup"]


@pytest.mark.parametrize("amount", [0, -5])
def test_top_up_must_be_positive(db_session, amount):
    _, wid = make_wallet(db_session)
    with pytest.raises(ValueError, match="must be positive"):
        wallet.top_up(db_session, wid, amount)
    assert entries(db_session, wid) == []


def test_top_up_of_an_unknown_wallet_is_a_lookup_error(db_session):
    with pytest.raises(LookupError):
        wallet.top_up(db_session, uuid.uuid4(), 100)


@pytest.mark.parametrize(("held", "charge"), [(100, 101), (100, -1)])
def test_settle_outside_the_hold_raises_and_writes_nothing(db_session, held, charge):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 1000)
    wallet.hold(db_session, wid, job, held)
    before = entries(db_session, wid)

    with pytest.raises(ValueError, match="outside hold"):
        wallet.settle_hold(db_session, wid, job, held, charge)

    assert entries(db_session, wid) == before
    assert assert_invariants(db_session, wid) == WalletState(1000, held)


@pytest.mark.parametrize(
    ("first_charge", "index"),
    [(40, "uq_ledger_capture_per_job"), (0, "uq_ledger_release_per_job")],
)
def test_a_second_settlement_of_the_same_job_violates_the_unique_index(
    db_session, first_charge, index
):
    account_id, wid = make_wallet(db_session)
    job, other_job = make_job(db_session, account_id, wid), make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 1000)
    wallet.hold(db_session, wid, job, 100)
    # A second hold keeps enough on hold for the repeated settle's UPDATE to pass its CHECKs,
    # so the only guard left is the partial unique index.
    wallet.hold(db_session, wid, other_job, 100)
    wallet.settle_hold(db_session, wid, job, 100, first_charge)
    before = assert_invariants(db_session, wid)
    ledger_before = entries(db_session, wid)

    with pytest.raises(IntegrityError, match=index), db_session.begin_nested():
        wallet.settle_hold(db_session, wid, job, 100, first_charge)
        db_session.flush()

    assert entries(db_session, wid) == ledger_before
    assert assert_invariants(db_session, wid) == before


def test_the_unique_index_allows_one_capture_per_job_but_many_jobs(db_session):
    account_id, wid = make_wallet(db_session)
    jobs = [make_job(db_session, account_id, wid) for _ in range(3)]
    wallet.top_up(db_session, wid, 1000)
    for job in jobs:
        wallet.hold(db_session, wid, job, 100)
    for job in jobs:
        wallet.settle_hold(db_session, wid, job, 100, 30)
    assert assert_invariants(db_session, wid) == WalletState(910, 0)
    assert [e[0] for e in entries(db_session, wid)].count("capture") == 3


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("UPDATE wallets SET balance_micros = -1 WHERE id = :w", "ck_wallet_balance_nonneg"),
        ("UPDATE wallets SET held_micros = -1 WHERE id = :w", "ck_wallet_held_nonneg"),
        (
            "UPDATE wallets SET held_micros = balance_micros + 1 WHERE id = :w",
            "ck_wallet_held_le_balance",
        ),
    ],
)
def test_check_constraints_guard_the_wallet_row(db_session, statement, constraint):
    _, wid = make_wallet(db_session)
    wallet.top_up(db_session, wid, 100)
    db_session.flush()
    with pytest.raises(IntegrityError, match=constraint), db_session.begin_nested():
        db_session.execute(text(statement), {"w": wid})
    assert wallet.get_state(db_session, wid) == WalletState(100, 0)


def test_a_capture_above_the_balance_is_refused_by_the_database(db_session):
    account_id, wid = make_wallet(db_session)
    job = make_job(db_session, account_id, wid)
    wallet.top_up(db_session, wid, 100)
    wallet.hold(db_session, wid, job, 100)
    db_session.flush()
    # Claiming a larger hold than was taken would drive held and balance negative.
    with pytest.raises(IntegrityError, match="ck_wallet"), db_session.begin_nested():
        wallet.settle_hold(db_session, wid, job, 150, 150)
    assert assert_invariants(db_session, wid) == WalletState(100, 100)


# -- concurrency on real connections -----------------------------------------------


@pytest.mark.parametrize("solo", [False, True], ids=["in-transaction", "solo"])
def test_concurrent_holds_never_over_commit_and_concurrent_settles_stay_exact(make_account, solo):
    account = make_account("1.00")
    wid = account.wallet_id
    with session_scope() as session:
        job_ids = [make_job(session, account.account_id, wid) for _ in range(40)]

    def try_hold(job_id: uuid.UUID) -> Callable[[], WalletState | None]:
        def task() -> WalletState | None:
            with session_scope() as session:
                return wallet.hold(session, wid, job_id, 100_000)

        return task

    results = run_together([try_hold(j) for j in job_ids])

    held_jobs = [j for j, r in zip(job_ids, results, strict=True) if r is not None]
    assert len(held_jobs) == 10
    # Every successful hold saw a distinct amount on hold: they were serialised, not lost.
    assert sorted(r.held_micros for r in results if r is not None) == [
        100_000 * k for k in range(1, 11)
    ]
    with session_scope() as session:
        state = wallet.get_state(session, wid)
        assert state == WalletState(1_000_000, 1_000_000)
        assert wallet.ledger_sums(session, wid) == state
        hold_jobs = session.scalars(
            select(LedgerEntry.job_id).where(
                LedgerEntry.wallet_id == wid, LedgerEntry.kind == "hold"
            )
        ).all()
        assert sorted(hold_jobs) == sorted(held_jobs)

    rng = random.Random(1234)
    charges = {j: rng.randint(0, 100_000) for j in held_jobs}

    def settle(job_id: uuid.UUID) -> Callable[[], WalletState]:
        def task() -> WalletState:
            with session_scope() as session:
                return wallet.settle_hold(
                    session,
                    wid,
                    job_id,
                    100_000,
                    charges[job_id],
                    commit=Commit.ALONE_DEFERRED if solo else Commit.JOINED,
                )

        return task

    run_together([settle(j) for j in held_jobs])

    with session_scope() as session:
        state = wallet.get_state(session, wid)
        assert state == WalletState(1_000_000 - sum(charges.values()), 0)
        assert state.balance_micros >= 0
        assert wallet.ledger_sums(session, wid) == state
        captured = session.scalars(
            select(LedgerEntry.amount_micros).where(
                LedgerEntry.wallet_id == wid, LedgerEntry.kind == "capture"
            )
        ).all()
        assert sorted(-c for c in captured) == sorted(c for c in charges.values() if c)


def test_settle_finishes_the_job_in_the_same_statement(db_session):
    account_id, wallet_id = make_wallet(db_session)
    wallet.top_up(db_session, wallet_id, 10 * USD)
    job_id = make_job(db_session, account_id, wallet_id)
    wallet.hold(db_session, wallet_id, job_id, 3 * USD)
    version = db_session.scalar(select(Job.version).where(Job.id == job_id))
    state = wallet.settle_hold(
        db_session,
        wallet_id,
        job_id,
        3 * USD,
        USD,
        finish=wallet.FinalJobWrite(version, {"status": "success"}),
    )
    assert state == WalletState(9 * USD, 0)
    row = db_session.execute(
        select(
            Job.__table__.c.status, Job.__table__.c.version, Job.__table__.c.balance_after_micros
        ).where(Job.__table__.c.id == job_id)
    ).one()
    assert tuple(row) == ("success", version + 1, 9 * USD)
    assert [e[0] for e in entries(db_session, wallet_id)] == ["topup", "hold", "capture", "release"]


def test_settle_of_a_job_whose_version_moved_raises_and_rolls_back(db_session):
    account_id, wallet_id = make_wallet(db_session)
    wallet.top_up(db_session, wallet_id, 10 * USD)
    job_id = make_job(db_session, account_id, wallet_id)
    wallet.hold(db_session, wallet_id, job_id, 3 * USD)
    before = entries(db_session, wallet_id)
    stale = db_session.scalar(select(Job.version).where(Job.id == job_id)) - 1
    savepoint = db_session.begin_nested()
    with pytest.raises(StaleDataError):
        wallet.settle_hold(
            db_session,
            wallet_id,
            job_id,
            3 * USD,
            USD,
            finish=wallet.FinalJobWrite(stale, {"status": "x"}),
        )
    savepoint.rollback()
    assert entries(db_session, wallet_id) == before
    assert wallet.get_state(db_session, wallet_id) == WalletState(10 * USD, 3 * USD)


# -- solo settlements: the statement is its own transaction -------------------------


def _held_job(make_account: Any) -> tuple[Any, uuid.UUID, int]:
    """A committed job with a $3 hold on a $10 wallet; returns (account, job id, version)."""
    account = make_account("10.00")
    with session_scope() as session:
        job_id, version = make_held_job(
            session, Owner(account.account_id, account.wallet_id), 3 * USD
        )
    return account, job_id, version


def _solo_settle(session: Session, wallet_id: uuid.UUID, job_id: uuid.UUID, version: int) -> Any:
    """Capture $1 of the job's $3 hold as one statement that is its own transaction."""
    return wallet.settle_hold(
        session,
        wallet_id,
        job_id,
        3 * USD,
        USD,
        finish=wallet.FinalJobWrite(version, {"status": "success"}),
        commit=Commit.ALONE_DEFERRED,
    )


def _committed(account: Any, job_id: uuid.UUID) -> tuple[WalletState, list[str], Any]:
    """What another connection sees: the wallet, its ledger kinds, the job's status/version."""
    with session_scope() as other:
        state = wallet.get_state(other, account.wallet_id)
        assert wallet.ledger_sums(other, account.wallet_id) == state
        kinds = [e[0] for e in entries(other, account.wallet_id)]
        job = other.execute(select(Job.status, Job.version).where(Job.id == job_id)).one()
    return state, kinds, tuple(job)


def test_a_solo_settlement_commits_by_itself(make_account):
    from app.infra.db import make_durable, session_factory

    account, job_id, version = _held_job(make_account)
    session = session_factory()()
    try:
        state = _solo_settle(session, account.wallet_id, job_id, version)
        assert state == WalletState(9 * USD, 0)
        # Committed by the server as the statement ended: visible elsewhere at once, and a
        # rollback of the session has nothing to undo.
        session.rollback()
        assert _committed(account, job_id) == (
            WalletState(9 * USD, 0),
            ["topup", "hold", "capture", "release"],
            ("success", version + 1),
        )
        make_durable(session)  # the session goes on as usual, in a normal transaction
        assert session.scalar(text("SHOW transaction_isolation")) == "read committed"
    finally:
        session.close()


def test_a_stale_solo_settlement_writes_nothing(make_account):
    from app.infra.db import session_factory

    account, job_id, version = _held_job(make_account)
    before = _committed(account, job_id)
    session = session_factory()()
    try:
        with pytest.raises(StaleDataError):
            _solo_settle(session, account.wallet_id, job_id, version - 1)
    finally:
        session.close()
    # Nothing to roll back, and nothing written: the job's version is checked before the wallet.
    assert _committed(account, job_id) == before
    assert before[0] == WalletState(10 * USD, 3 * USD)


def test_solo_joins_a_transaction_already_open(make_account):
    from app.infra.db import session_factory

    account, job_id, version = _held_job(make_account)
    before = _committed(account, job_id)
    session = session_factory()()
    try:
        session.execute(text("SELECT 1"))  # a transaction is open
        _solo_settle(session, account.wallet_id, job_id, version)
        assert _committed(account, job_id) == before  # not committed yet
        session.rollback()
    finally:
        session.close()
    assert _committed(account, job_id) == before


def test_a_solo_settlement_against_another_wallet_writes_nothing(make_account):
    from app.infra.db import session_factory

    account, job_id, version = _held_job(make_account)
    other = make_account("10.00")
    before, other_before = _committed(account, job_id), wallet_state(other)
    session = session_factory()()
    try:
        with pytest.raises(StaleDataError):
            _solo_settle(session, other.wallet_id, job_id, version)
    finally:
        session.close()
    assert _committed(account, job_id) == before
    assert wallet_state(other) == other_before


def wallet_state(account: Any) -> WalletState:
    with session_scope() as session:
        return wallet.get_state(session, account.wallet_id)


def _charged_job(session: Session, charge: int) -> tuple[uuid.UUID, uuid.UUID]:
    """A wallet with $1 and one job charged ``charge`` (of a 100,000 hold)."""
    account_id, wid = make_wallet(session)
    wallet.top_up(session, wid, USD)
    job_id = make_job(session, account_id, wid)
    wallet.hold(session, wid, job_id, 100_000)
    wallet.settle_hold(session, wid, job_id, 100_000, charge)
    return wid, job_id


def test_refunds_credit_the_wallet_and_never_exceed_the_charge(db_session):
    wid, job_id = _charged_job(db_session, 30_000)
    first = wallet.refund(db_session, job_id, 10_000, "ticket 1")
    assert (first.amount_micros, first.refunded_micros, first.captured_micros) == (
        10_000,
        10_000,
        30_000,
    )
    with pytest.raises(ValueError, match="between 1 and 20000"):
        wallet.refund(db_session, job_id, 20_001, "too much")
    rest = wallet.refund(db_session, job_id, None, "the rest")  # None: whatever is left
    assert rest.amount_micros == 20_000 and rest.refunded_micros == 30_000
    with pytest.raises(ValueError, match="nothing left to refund"):
        wallet.refund(db_session, job_id, None, "again")
    state = assert_invariants(db_session, wid)
    assert state == WalletState(USD, 0)  # the whole charge came back
    assert entries(db_session, wid)[-2:] == [
        ("refund", job_id, 10_000, 0, USD - 20_000, 0),
        ("refund", job_id, 20_000, 0, USD, 0),
    ]


def test_a_refund_needs_a_memo_and_a_charged_job(db_session):
    wid, job_id = _charged_job(db_session, 0)  # failed job: nothing captured
    with pytest.raises(ValueError, match="memo"):
        wallet.refund(db_session, job_id, 1, " ")
    with pytest.raises(ValueError, match="nothing left"):
        wallet.refund(db_session, job_id, None, "nothing was charged")
    with pytest.raises(LookupError):
        wallet.refund(db_session, uuid.uuid4(), None, "no such job")
    assert [e[0] for e in entries(db_session, wid)] == ["topup", "hold", "release"]


def test_concurrent_refunds_of_one_job_pay_back_the_charge_once(make_account):
    account = make_account("1.00")
    with session_scope() as session:
        job_id = make_job(session, account.account_id, account.wallet_id)
        wallet.hold(session, account.wallet_id, job_id, 100_000)
        wallet.settle_hold(session, account.wallet_id, job_id, 100_000, 40_000)

    def refund_all() -> str:
        try:
            with session_scope() as session:
                wallet.refund(session, job_id, None, "duplicate support tickets")
            return "refunded"
        except ValueError:
            return "refused"

    assert sorted(run_together([refund_all] * 6)) == ["refunded"] + ["refused"] * 5
    with session_scope() as session:
        assert assert_invariants(session, account.wallet_id) == WalletState(USD, 0)


def test_adjustments_credit_or_debit_only_what_is_available(db_session):
    account_id, wid = make_wallet(db_session)
    wallet.top_up(db_session, wid, 50_000)
    assert wallet.adjust(db_session, wid, 7_000, "goodwill") == WalletState(57_000, 0)
    wallet.hold(db_session, wid, make_job(db_session, account_id, wid), 40_000)
    with pytest.raises(ValueError, match="exceeds the 17000 available"):
        wallet.adjust(db_session, wid, -17_001, "would take money on hold")
    assert wallet.adjust(db_session, wid, -17_000, "top-up entered twice") == WalletState(
        40_000, 40_000
    )
    for amount, memo in ((0, "nothing"), (5, "")):
        with pytest.raises(ValueError):
            wallet.adjust(db_session, wid, amount, memo)
    assert assert_invariants(db_session, wid) == WalletState(40_000, 40_000)
    assert [e[0] for e in entries(db_session, wid)] == [
        "topup",
        "adjustment",
        "hold",
        "adjustment",
    ]


# -- hold_largest: the amount is chosen from the row the lock was granted on --------------

CHOICES = [150, 71, 47]


def _blocked_by(observer: Session, pid: int) -> bool:
    return bool(
        observer.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
            {"pid": pid},
        )
    )


@pytest.mark.parametrize(
    ("start", "change", "expected"),
    [
        # Another hold of 40 commits while this one waits: 60 are left, so 47, not 71 (which
        # the statement's snapshot, 100 available, would have picked and found no longer fits).
        ("0.000100", "hold", (47, WalletState(100, 87))),
        # A top-up of 60 commits while it waits: 160 are available, so 150, not 71.
        ("0.000100", "topup", (150, WalletState(160, 150))),
        # From 30, where the snapshot covers no choice at all: the top-up makes 90, so 71.
        ("0.000030", "topup", (71, WalletState(90, 71))),
    ],
    ids=["hold-shrinks", "topup-grows", "topup-from-too-little"],
)
def test_hold_largest_picks_from_the_balance_as_it_is_when_its_lock_is_granted(
    make_account, start, change, expected
):
    account = make_account(start)
    wid = account.wallet_id
    with session_scope() as session:
        first, waiting = (make_job(session, account.account_id, wid) for _ in range(2))
    blocker = session_factory()()
    observer = session_factory()()
    try:
        # An uncommitted change of the wallet row: the hold below must wait for its lock.
        if change == "hold":
            assert wallet.hold(blocker, wid, first, 40) is not None
        else:
            wallet.top_up(blocker, wid, 60)
        blocker_pid = blocker.scalar(text("SELECT pg_backend_pid()"))
        results: list[Any] = []

        def hold() -> None:
            with session_scope() as session:
                results.append(
                    wallet.hold_largest(session, wid, waiting, CHOICES, commit=Commit.ALONE)
                )

        thread = threading.Thread(target=hold)
        thread.start()
        # Wait (on the database's word, not a timer) until the hold is queued behind the lock.
        deadline = time.monotonic() + 30
        while not _blocked_by(observer, blocker_pid):
            assert thread.is_alive() and time.monotonic() < deadline, results
            observer.rollback()
        blocker.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        blocker.rollback()
        blocker.close()
        observer.close()
    assert results == [expected]
    with session_scope() as session:
        assert assert_invariants(session, wid) == expected[1]


def test_concurrent_largest_holds_each_take_the_largest_choice_still_covered(make_account):
    # 530 available: serialised, each hold takes the largest choice that still fits, whatever
    # the order: 150, 150, 150 (80 left), then 71 (9 left), then nothing. Trying only the
    # largest and the smallest would have held 47 where 71 fits.
    account = make_account("0.000530")
    wid = account.wallet_id
    with session_scope() as session:
        job_ids = [make_job(session, account.account_id, wid) for _ in range(12)]

    def try_hold(job_id: uuid.UUID) -> Callable[[], tuple[int, WalletState] | None]:
        def task() -> tuple[int, WalletState] | None:
            session = session_factory()()
            try:
                return wallet.hold_largest(session, wid, job_id, CHOICES, commit=Commit.ALONE)
            finally:
                session.close()

        return task

    results = run_together([try_hold(j) for j in job_ids])

    placed = [r for r in results if r is not None]
    assert sorted(amount for amount, _ in placed) == [71, 150, 150, 150]
    # Serialised, never lost: each hold saw the one before it.
    assert sorted(state.held_micros for _, state in placed) == [150, 300, 450, 521]
    with session_scope() as session:
        assert assert_invariants(session, wid) == WalletState(530, 521)
        holds = session.execute(
            select(LedgerEntry.job_id, LedgerEntry.held_delta_micros).where(
                LedgerEntry.wallet_id == wid, LedgerEntry.kind == "hold"
            )
        ).all()
    assert sorted(h for _, h in holds) == [71, 150, 150, 150]
    assert {j for j, _ in holds} == {
        j for j, r in zip(job_ids, results, strict=True) if r is not None
    }
