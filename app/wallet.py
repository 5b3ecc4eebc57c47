"""The wallet ledger. Every change to a balance or to the amount on hold is one conditional
UPDATE of the wallet row plus an immutable ledger entry, in the caller's transaction.

Invariants (checked by tests and enforced by CHECK constraints):
balance = sum(amount_micros), held = sum(held_delta_micros), 0 <= held <= balance.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Select,
    Update,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app import fencing
from app.db import Commit, begin, without_flush_wait
from app.models import Job, LedgerEntry, Wallet, utcnow

_WALLETS = Wallet.__table__
_LEDGER = LedgerEntry.__table__
_JOBS = Job.__table__


@dataclass(frozen=True)
class FinalJobWrite:
    """The job's final write, made in the statement that settles its hold: fenced on the
    ``version`` the caller read (a job taken over meanwhile writes nothing at all), with
    ``columns`` (column keys -> values) and the wallet's new balance as
    ``balance_after_micros``."""

    version: int
    columns: Mapping[str, Any]


@dataclass(frozen=True)
class WalletState:
    balance_micros: int
    held_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros


def get_state(session: Session, wallet_id: uuid.UUID) -> WalletState:
    balance, held = session.execute(
        select(Wallet.balance_micros, Wallet.held_micros).where(Wallet.id == wallet_id)
    ).one()
    return WalletState(balance, held)


def _param(name: str, column: Any) -> Any:
    # Prefixed: a parameter named after a column is reserved in INSERT and UPDATE.
    return bindparam(f"p_{name}", type_=column.type)


# The statements below are built once per shape, every value a named parameter, so that
# SQLAlchemy compiles each once per process (building them per call costs CPU that a saturated
# machine pays in throughput: docs/performance.md).


@functools.lru_cache(maxsize=2)
def _wallet_update(checked: bool) -> Update:
    """The wallet row's UPDATE. When ``checked`` the check and the write are one statement:
    two concurrent holds can never both see the same available amount."""
    w = _WALLETS.c
    stmt = (
        update(_WALLETS)
        .where(w.id == _param("wallet_id", w.id))
        .values(
            balance_micros=w.balance_micros + _param("amount", w.balance_micros),
            held_micros=w.held_micros + _param("held_delta", w.held_micros),
            updated_at=_param("now", w.updated_at),
        )
        .returning(w.balance_micros, w.held_micros, w.id)
    )
    if checked:
        stmt = stmt.where(w.balance_micros - w.held_micros >= _param("available", w.balance_micros))
    return stmt


@functools.lru_cache(maxsize=16)
def _finish_job_alone(job_columns: tuple[str, ...]) -> Update:
    """The job's final write (app/fencing.py: fenced on its version), for the databases that
    run a movement's statements one by one."""
    return fencing.fenced_update(
        job_columns, balance_after_micros=_param("balance_after", _JOBS.c.balance_after_micros)
    )


_ENTRY_COLUMNS = (
    "wallet_id",
    "job_id",
    "kind",
    "amount_micros",
    "held_delta_micros",
    "balance_after_micros",
    "held_after_micros",
    "memo",
    "created_at",
)


@functools.lru_cache(maxsize=64)
def _one_statement(
    entries: int,
    checked: bool,
    job_columns: tuple[str, ...] | None,
    no_flush: bool = False,
    new_job_columns: tuple[str, ...] | None = None,
) -> Any:
    """The PostgreSQL form of ``_move``: the wallet UPDATE, its ledger entries (the columns of
    ``_ENTRY_COLUMNS``, in order) and the job's final write, or the new job's INSERT, as one
    statement.

    With a job to finish, the job's row is locked first and only if it still has the version
    the caller read (``fence``); the wallet is touched only then, so a stale settlement writes
    nothing at all, even when the statement is its own transaction. A new job (``p_new_<column
    key>``) is inserted only if the wallet UPDATE matched: a refused hold writes no job either.
    ``no_flush``: the statement is its own transaction (autocommit), whose commit does not wait
    for its WAL flush (``app.db.without_flush_wait``; see ``settle``)."""
    wallet_update = _wallet_update(checked)
    if job_columns is not None:
        j = _JOBS.c
        fence = (
            select(j.id)
            .where(
                j.id == fencing.param("id"),
                j.version == fencing.param("version"),
                # The job's own wallet: the final job UPDATE requires it too, and must never
                # be the only check to fail once the wallet has moved.
                j.wallet_id == _param("wallet_id", j.wallet_id),
            )
            .with_for_update()
            .cte("fence")
        )
        wallet_update = wallet_update.where(exists(select(fence.c.id)))
    if no_flush:
        wallet_update = without_flush_wait(wallet_update)
    moved = wallet_update.cte("moved")
    ctes = []
    if new_job_columns is not None:
        values = [bindparam(f"p_new_{k}", type_=_JOBS.c[k].type) for k in new_job_columns]
        # Before the ledger entries that refer to it (their foreign key is checked at the end of
        # the statement, when the row exists).
        ctes.append(
            insert(_JOBS)
            .from_select(new_job_columns, select(*values).select_from(moved))
            .cte("created")
        )
    c = _LEDGER.c
    selects = [
        select(
            _param("wallet_id", c.wallet_id),
            _param("job_id", c.job_id),
            _param(f"kind_{i}", c.kind),
            _param(f"amount_{i}", c.amount_micros),
            _param(f"held_delta_{i}", c.held_delta_micros),
            moved.c.balance_micros,
            moved.c.held_micros + _param(f"held_offset_{i}", c.held_after_micros),
            _param("memo", c.memo),
            _param("now", c.created_at),
        ).select_from(moved)
        for i in range(entries)
    ]
    # UNION ALL keeps the entries in order, so their ids are in order too.
    source = selects[0] if entries == 1 else union_all(*selects)
    ctes.append(insert(_LEDGER).from_select(_ENTRY_COLUMNS, source).cte("recorded"))
    if job_columns is None:
        return select(moved.c.balance_micros, moved.c.held_micros).add_cte(*ctes)
    return (
        fencing.fenced_update(job_columns, balance_after_micros=moved.c.balance_micros)
        .where(_JOBS.c.wallet_id == moved.c.id)
        .returning(moved.c.balance_micros, moved.c.held_micros)
        .add_cte(*ctes)
    )


@dataclass(frozen=True)
class _Entry:
    """One ledger entry of a movement; its ``held_after`` is the wallet's held amount after the
    whole movement plus ``held_offset`` (a capture is recorded before the release that follows
    it in the same UPDATE)."""

    kind: str
    amount: int
    held_delta: int
    held_offset: int = 0


def _move(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID | None,
    amount: int,
    held_delta: int,
    entries: list[_Entry],
    *,
    require_available: int | None = None,
    memo: str = "",
    job: FinalJobWrite | None = None,
    new_job: dict[str, Any] | None = None,
    commit: Commit = Commit.JOINED,
) -> WalletState | None:
    """Change the wallet row, append its ledger entries and, with ``job``, finish the job row,
    fenced on its version and with the wallet's new balance as ``balance_after_micros``; or,
    with ``new_job`` (column keys -> values), insert that job row. None when
    ``require_available`` is not available (nothing is written, not even the new job).
    ``commit``: how the movement commits (app/db.py); a deferred one owes a ``make_durable``
    before anyone outside the database hears of it.

    On PostgreSQL all of it is one statement (data-modifying CTEs): the wallet row, which every
    request of an account locks, is held for that one statement and the commit instead of a
    round trip per write; that alone more than doubles the captures per second one wallet
    takes (docs/performance.md). Other databases run the same statements one by one.
    """
    now = utcnow()
    params: dict[str, Any] = {
        "p_wallet_id": wallet_id,
        "p_job_id": job_id,
        "p_amount": amount,
        "p_held_delta": held_delta,
        "p_available": require_available,
        "p_memo": memo,
        "p_now": now,
    }
    for i, e in enumerate(entries):
        params.update(
            {
                f"p_kind_{i}": e.kind,
                f"p_amount_{i}": e.amount,
                f"p_held_delta_{i}": e.held_delta,
                f"p_held_offset_{i}": e.held_offset,
            }
        )
    checked = require_available is not None
    job_columns = None
    if job is not None:
        assert job_id is not None
        params.update(fencing.params(job_id, job.version, job.columns))
        job_columns = tuple(sorted(job.columns))
    new_job_columns = None
    if new_job is not None:
        new_job_columns = tuple(sorted(new_job))
        params.update({f"p_new_{k}": v for k, v in new_job.items()})

    if session.get_bind().dialect.name == "postgresql":
        no_flush = begin(session, commit)
        statement = _one_statement(len(entries), checked, job_columns, no_flush, new_job_columns)
        row = session.execute(statement, params).first()
        if row is None:
            if job is not None:
                raise StaleDataError(f"job {job_id}: version {job.version} is no longer current")
            return None
        return WalletState(row[0], row[1])

    row = session.execute(_wallet_update(checked), params).first()
    if row is None:
        return None
    state = WalletState(row[0], row[1])
    if new_job is not None:
        session.execute(insert(_JOBS), new_job)
    session.execute(
        insert(_LEDGER),
        [
            dict(
                zip(
                    _ENTRY_COLUMNS,
                    (
                        wallet_id,
                        job_id,
                        e.kind,
                        e.amount,
                        e.held_delta,
                        state.balance_micros,
                        state.held_micros + e.held_offset,
                        memo,
                        now,
                    ),
                    strict=True,
                )
            )
            for e in entries
        ],
    )
    if job is not None and job_columns is not None:
        result = cast(
            CursorResult[Any],
            session.execute(
                _finish_job_alone(job_columns), {**params, "p_balance_after": state.balance_micros}
            ),
        )
        if result.rowcount != 1:
            raise StaleDataError(f"job {job_id}: version {job.version} is no longer current")
    return state


def top_up(
    session: Session, wallet_id: uuid.UUID, amount_micros: int, memo: str = ""
) -> WalletState:
    if amount_micros <= 0:
        raise ValueError("a top-up must be positive")
    state = _move(
        session, wallet_id, None, amount_micros, 0, [_Entry("topup", amount_micros, 0)], memo=memo
    )
    if state is None:
        raise LookupError(f"wallet {wallet_id} not found")
    return state


def hold(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID,
    amount_micros: int,
    *,
    new_job: dict[str, Any] | None = None,
    commit: Commit = Commit.JOINED,
) -> WalletState | None:
    """Reserve ``amount_micros`` of the available balance; None when it is not available.

    ``new_job`` (column keys -> values): the job row the hold is for, inserted with it, one
    statement on PostgreSQL, and only if the hold is placed. It must give every column that has
    a Python-side default (``id``, ``version``, ``created_at``...): PostgreSQL's INSERT ...
    SELECT does not run them. ``commit``: see ``_move``; a hold ALONE is committed when this
    returns, so the wallet row is locked only while the server runs the statement (the web's
    submission without an Idempotency-Key, docs/billing.md)."""
    if amount_micros < 0:
        raise ValueError("a hold cannot be negative")
    if amount_micros == 0:
        if new_job is not None:
            session.execute(insert(_JOBS), new_job)
        return get_state(session, wallet_id)
    return _move(
        session,
        wallet_id,
        job_id,
        0,
        amount_micros,
        [_Entry("hold", 0, amount_micros)],
        require_available=amount_micros,
        new_job=new_job,
        commit=commit,
    )


@functools.lru_cache(maxsize=8)
def _hold_largest_statement(no_flush: bool, new_job_columns: tuple[str, ...] | None) -> Select[Any]:
    """The PostgreSQL form of ``hold_largest``: one statement that picks the amount, places the
    hold, records it and inserts the new job (``p_new_<column key>``, its ``hold_micros`` the
    amount picked).

    ``pick`` locks the wallet row and computes, from that row, the largest of ``p_choices``
    not above its available balance (NULL when none is). Under READ COMMITTED a row that
    another transaction changed while this statement waited for its lock is re-read at its
    newest version and the expressions evaluated again (EvalPlanQual), so the amount is chosen
    from the balance as it is when the lock is granted, not as the statement's snapshot had
    it: exact under concurrency, with no second attempt.

    The UPDATE then writes the row ``pick`` holds locked: its newest version, the one the
    amount was computed from, so ``held + amount <= balance`` holds for it. But PostgreSQL
    first evaluates the UPDATE on the version the statement's snapshot sees, and only then
    notices that the row has moved on and evaluates it again on the newest one. That first,
    discarded evaluation must neither filter the row out nor fail the CHECK constraint
    ``held_micros <= balance_micros`` (which is tested before the row's version is): after a
    top-up committed while we waited, the snapshot's balance may be below the amount. Hence no
    condition on the wallet's columns, and ``LEAST(held + amount, balance)``, which is exactly
    ``held + amount`` on the version that is written. ``no_flush``: see ``_one_statement``."""
    w = _WALLETS.c
    choice = func.unnest(bindparam("p_choices", type_=ARRAY(BigInteger))).column_valued("c")
    largest = (
        select(func.max(choice)).where(choice <= w.balance_micros - w.held_micros).scalar_subquery()
    )
    # No condition on the balance here either: a SELECT ... FOR UPDATE also tests its WHERE on
    # the snapshot's version first, and would skip the row without waiting for the lock. So the
    # row is always locked (for this statement only, when it is its own transaction) and a
    # refusal is a NULL amount, which the UPDATE filters out (nothing is written).
    pick = (
        select(w.id, largest.label("amount"))
        .where(w.id == _param("wallet_id", w.id))
        .with_for_update()
        .cte("pick")
    )
    wallet_update = (
        update(_WALLETS)
        .where(w.id == pick.c.id, pick.c.amount.is_not(None))
        .values(
            held_micros=func.least(w.held_micros + pick.c.amount, w.balance_micros),
            updated_at=_param("now", w.updated_at),
        )
        .returning(w.balance_micros, w.held_micros, w.id, pick.c.amount)
    )
    if no_flush:
        wallet_update = without_flush_wait(wallet_update)
    moved = wallet_update.cte("moved")
    ctes = []
    if new_job_columns is not None:
        values = [
            moved.c.amount if k == "hold_micros" else bindparam(f"p_new_{k}", type_=_JOBS.c[k].type)
            for k in new_job_columns
        ]
        ctes.append(
            insert(_JOBS)
            .from_select(new_job_columns, select(*values).select_from(moved))
            .cte("created")
        )
    c = _LEDGER.c
    entry = select(
        _param("wallet_id", c.wallet_id),
        _param("job_id", c.job_id),
        literal("hold", c.kind.type),
        literal(0, c.amount_micros.type),
        moved.c.amount,
        moved.c.balance_micros,
        moved.c.held_micros,
        _param("memo", c.memo),
        _param("now", c.created_at),
    ).select_from(moved)
    ctes.append(insert(_LEDGER).from_select(_ENTRY_COLUMNS, entry).cte("recorded"))
    return select(moved.c.balance_micros, moved.c.held_micros, moved.c.amount).add_cte(*ctes)


def hold_largest(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID,
    choices: Sequence[int],
    *,
    new_job: dict[str, Any] | None = None,
    commit: Commit = Commit.JOINED,
) -> tuple[int, WalletState] | None:
    """Reserve the largest of ``choices`` that the available balance covers, and return it
    with the wallet's new state; None when not even the smallest is available (nothing is
    written, not even the new job).

    On PostgreSQL the choice is made by the database from the wallet row it has locked, in the
    same single statement as the hold, its ledger entry and ``new_job`` (whose
    ``hold_micros`` becomes the amount held): a concurrent hold can never make it over-commit,
    nor make it refuse or settle for less while a larger choice fits. ``new_job`` and
    ``commit``: see ``hold``."""
    if not choices or min(choices) < 0:
        raise ValueError("a hold needs choices and none can be negative")
    positive = sorted({c for c in choices if c > 0}, reverse=True)
    if positive and session.get_bind().dialect.name == "postgresql":
        no_flush = begin(session, commit)
        new_job_columns = None
        params: dict[str, Any] = {
            "p_wallet_id": wallet_id,
            "p_job_id": job_id,
            "p_choices": positive,
            "p_memo": "",
            "p_now": utcnow(),
        }
        if new_job is not None:
            new_job_columns = tuple(sorted({*new_job, "hold_micros"}))
            params.update({f"p_new_{k}": v for k, v in new_job.items() if k != "hold_micros"})
        statement = _hold_largest_statement(no_flush, new_job_columns)
        row = session.execute(statement, params).first()
        if row is not None:
            return row[2], WalletState(row[0], row[1])
        if 0 not in choices:
            return None
        positive = []  # only a zero hold is left, which needs no money (see ``hold``)
    else:
        # Other databases (SQLite, one writer at a time): the amount is read first, then placed
        # with the usual conditional UPDATE; a smaller choice is tried only if a concurrent
        # writer took the money in between.
        available = get_state(session, wallet_id).available_micros
        positive = [c for c in positive if c <= available]
    for amount in [*positive, *([0] if 0 in choices else [])]:
        job_row = None if new_job is None else {**new_job, "hold_micros": amount}
        state = hold(session, wallet_id, job_id, amount, new_job=job_row, commit=commit)
        if state is not None:
            return amount, state
    return None


def settle_hold(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID,
    held_micros: int,
    charge_micros: int,
    *,
    finish: FinalJobWrite | None = None,
    commit: Commit = Commit.JOINED,
) -> WalletState:
    """Capture ``charge_micros`` of a job's hold and release the rest, in one UPDATE.

    Every settlement writes exactly one ``release`` entry (zero when the charge used the whole
    hold) and at most one ``capture``; the partial unique indexes on ledger_entries then make any
    second settlement of the same job fail, whatever its amounts: no job is charged twice.

    ``finish``: the job's final write, made with the settlement and fenced on the version the
    caller read. If the version moved, ``StaleDataError`` is raised and the caller must roll
    back (on PostgreSQL nothing was written: the job's row is checked before the wallet's).

    ``commit=Commit.ALONE_DEFERRED`` (what the worker uses): the statement is its own
    transaction, committed as it ends without waiting for the WAL flush, so the wallet row,
    which every settlement of the account waits for, is locked only while the server runs the
    statement, never across a round trip to this process, which may be waiting for its GIL
    (docs/performance.md has the captures per second it buys). The caller must call
    ``app.db.make_durable`` before it tells anyone the outcome, and has nothing to roll back:
    on an error nothing was written.
    """
    if not 0 <= charge_micros <= held_micros:
        raise ValueError(f"capture {charge_micros} outside hold {held_micros}")
    released = held_micros - charge_micros
    entries = [_Entry("release", 0, -released)]
    if charge_micros:
        entries.insert(0, _Entry("capture", -charge_micros, -charge_micros, released))
    state = _move(
        session,
        wallet_id,
        job_id,
        -charge_micros,
        -held_micros,
        entries,
        job=finish,
        commit=commit,
    )
    if state is None:
        raise LookupError(f"wallet {wallet_id} not found")
    return state


@dataclass(frozen=True)
class Refund:
    wallet_id: uuid.UUID
    amount_micros: int
    refunded_micros: int  # for this job so far, this refund included
    captured_micros: int
    state: WalletState


def refund(session: Session, job_id: uuid.UUID, amount_micros: int | None, memo: str) -> Refund:
    """Credit back part or all of what a job was charged: a ``refund`` entry naming the job.

    A job's refunds never add up to more than its capture: the job's row is locked while its
    entries are summed, so two refunds of one job cannot both pass the check. ``None`` refunds
    whatever is left. The job itself keeps the charge it was billed (its ``billing`` is what
    the provider's usage cost); the refund is a movement of its own, in the ledger."""
    if not memo.strip():
        raise ValueError("a refund needs a memo (why, and who asked)")
    wallet_id = session.scalar(select(Job.wallet_id).where(Job.id == job_id).with_for_update())
    if wallet_id is None:
        raise LookupError(f"no job {job_id}")
    c = LedgerEntry
    captured, refunded = session.execute(
        select(
            -func.coalesce(func.sum(c.amount_micros).filter(c.kind == "capture"), 0),
            func.coalesce(func.sum(c.amount_micros).filter(c.kind == "refund"), 0),
        ).where(c.job_id == job_id)
    ).one()
    captured, refunded = int(captured), int(refunded)
    left = captured - refunded
    if amount_micros is None:
        amount_micros = left
    if left <= 0:
        raise ValueError(
            f"job {job_id} has nothing left to refund (charged {captured}, refunded {refunded} "
            "micro-USD)"
        )
    if not 0 < amount_micros <= left:
        raise ValueError(
            f"a refund of job {job_id} must be between 1 and {left} micro-USD "
            f"(charged {captured}, refunded {refunded}), not {amount_micros}"
        )
    state = _move(
        session,
        wallet_id,
        job_id,
        amount_micros,
        0,
        [_Entry("refund", amount_micros, 0)],
        memo=memo,
    )
    assert state is not None  # the job's wallet exists (foreign key)
    return Refund(wallet_id, amount_micros, refunded + amount_micros, captured, state)


def adjust(session: Session, wallet_id: uuid.UUID, amount_micros: int, memo: str) -> WalletState:
    """A correction of the balance by an operator (a mistaken top-up, a goodwill credit): an
    ``adjustment`` entry, positive or negative. A debit never takes money that is on hold or
    not there: it needs that much available, checked in the same UPDATE."""
    if not memo.strip():
        raise ValueError("an adjustment needs a memo (why, and who asked)")
    if amount_micros == 0:
        raise ValueError("an adjustment of zero changes nothing")
    state = _move(
        session,
        wallet_id,
        None,
        amount_micros,
        0,
        [_Entry("adjustment", amount_micros, 0)],
        require_available=-amount_micros if amount_micros < 0 else None,
        memo=memo,
    )
    if state is None:
        if amount_micros > 0:
            raise LookupError(f"wallet {wallet_id} not found")
        available = get_state(session, wallet_id).available_micros
        raise ValueError(
            f"a debit of {-amount_micros} micro-USD exceeds the {available} available "
            "(balance less holds)"
        )
    return state


def ledger_sums(session: Session, wallet_id: uuid.UUID) -> WalletState:
    balance, held = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.amount_micros), 0),
            func.coalesce(func.sum(LedgerEntry.held_delta_micros), 0),
        ).where(LedgerEntry.wallet_id == wallet_id)
    ).one()
    return WalletState(int(balance), int(held))
