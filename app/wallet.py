"""The wallet ledger. Every change to a balance or to the amount on hold is one conditional
UPDATE of the wallet row plus an immutable ledger entry, in the caller's transaction.

Invariants (checked by tests and enforced by CHECK constraints):
balance = sum(amount_micros), held = sum(held_delta_micros), 0 <= held <= balance.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, bindparam, func, insert, select, union_all, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.models import Job, LedgerEntry, Wallet, utcnow

_WALLETS = Wallet.__table__
_LEDGER = LedgerEntry.__table__
_JOBS = Job.__table__


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


def _apply(
    wallet_id: uuid.UUID,
    amount: int,
    held_delta: int,
    *,
    require_available: int | None = None,
) -> Update:
    """The wallet row's UPDATE. With ``require_available`` the check and the write are one
    statement: two concurrent holds can never both see the same available amount."""
    w = _WALLETS.c
    stmt = (
        update(_WALLETS)
        .where(w.id == wallet_id)
        .values(
            balance_micros=w.balance_micros + amount,
            held_micros=w.held_micros + held_delta,
            updated_at=utcnow(),
        )
        .returning(w.balance_micros, w.held_micros, w.id)
    )
    if require_available is not None:
        stmt = stmt.where(w.balance_micros - w.held_micros >= require_available)
    return stmt


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
    job: tuple[int, dict[str, Any]] | None = None,
) -> WalletState | None:
    """Change the wallet row, append its ledger entries and, with ``job`` (the version the
    caller read, the column values to write), finish the job row, fenced on that version and
    with the wallet's new balance as ``balance_after_micros``. None when ``require_available``
    is not available (nothing is written).

    On PostgreSQL all of it is one statement (data-modifying CTEs): the wallet row, which every
    request of an account locks, is held for that one statement and the commit instead of a
    round trip per write; that alone more than doubles the captures per second one wallet
    takes (docs/performance.md). Other databases run the same writes one by one.
    """
    if session.get_bind().dialect.name == "postgresql":
        params: dict[str, Any] = {
            "wallet_id": wallet_id,
            "job_id": job_id,
            "amount": amount,
            "held_delta": held_delta,
            "available": require_available,
            "memo": memo,
            "now": utcnow(),
        }
        for i, e in enumerate(entries):
            params.update(
                {f"kind_{i}": e.kind, f"amount_{i}": e.amount, f"held_delta_{i}": e.held_delta}
            )
            params[f"held_offset_{i}"] = e.held_offset
        job_columns = None
        if job is not None:
            params["job_version"] = job[0]
            params.update({f"job_{k}": v for k, v in job[1].items()})
            job_columns = tuple(sorted(job[1]))
        statement = _one_statement(len(entries), require_available is not None, job_columns)
        row = session.execute(statement, {f"p_{k}": v for k, v in params.items()}).first()
        if row is None:
            if job is not None:
                raise StaleDataError(f"job {job_id}: version {job[0]} is no longer current")
            return None
        return WalletState(row[0], row[1])
    wallet_update = _apply(wallet_id, amount, held_delta, require_available=require_available)
    row = session.execute(wallet_update).first()
    if row is None:
        return None
    state = WalletState(row[0], row[1])
    session.execute(
        insert(_LEDGER),
        [
            _entry_values(
                wallet_id,
                job_id,
                e,
                state.balance_micros,
                state.held_micros + e.held_offset,
                memo,
            )
            for e in entries
        ],
    )
    if job is not None:
        version, values = job
        result = session.execute(
            update(_JOBS)
            .where(_JOBS.c.id == job_id, _JOBS.c.version == version)
            .values(
                {**values, "balance_after_micros": state.balance_micros, "version": version + 1}
            )
        )
        if result.rowcount != 1:
            raise StaleDataError(f"job {job_id}: version {version} is no longer current")
    return state


def _entry_values(
    wallet_id: uuid.UUID,
    job_id: uuid.UUID | None,
    entry: _Entry,
    balance_after: Any,
    held_after: Any,
    memo: str,
) -> dict[str, Any]:
    return {
        "wallet_id": wallet_id,
        "job_id": job_id,
        "kind": entry.kind,
        "amount_micros": entry.amount,
        "held_delta_micros": entry.held_delta,
        "balance_after_micros": balance_after,
        "held_after_micros": held_after,
        "memo": memo,
        "created_at": utcnow(),
    }


_ENTRY_COLUMNS = list(_entry_values(uuid.UUID(int=0), None, _Entry("", 0, 0), 0, 0, ""))


@functools.lru_cache(maxsize=64)
def _one_statement(entries: int, checked: bool, job_columns: tuple[str, ...] | None) -> Any:
    """The PostgreSQL form of ``_move`` as one statement, built once per shape (how many ledger
    entries, whether the hold is checked, which job columns are written) with every value a
    named parameter, so that SQLAlchemy compiles it once per process."""

    def param(name: str, column: Any) -> Any:
        # Prefixed: a parameter named after a column is reserved in INSERT and UPDATE.
        return bindparam(f"p_{name}", type_=column.type)

    w = _WALLETS.c
    wallet_update = (
        update(_WALLETS)
        .where(w.id == param("wallet_id", w.id))
        .values(
            balance_micros=w.balance_micros + param("amount", w.balance_micros),
            held_micros=w.held_micros + param("held_delta", w.held_micros),
            updated_at=param("now", w.updated_at),
        )
        .returning(w.balance_micros, w.held_micros, w.id)
    )
    if checked:
        wallet_update = wallet_update.where(
            w.balance_micros - w.held_micros >= param("available", w.balance_micros)
        )
    moved = wallet_update.cte("moved")
    c = _LEDGER.c
    selects = [
        select(
            param("wallet_id", c.wallet_id),
            param("job_id", c.job_id),
            param(f"kind_{i}", c.kind),
            param(f"amount_{i}", c.amount_micros),
            param(f"held_delta_{i}", c.held_delta_micros),
            moved.c.balance_micros,
            moved.c.held_micros + param(f"held_offset_{i}", c.held_after_micros),
            param("memo", c.memo),
            param("now", c.created_at),
        ).select_from(moved)
        for i in range(entries)
    ]
    # UNION ALL keeps the entries in order, so their ids are in order too.
    source = selects[0] if entries == 1 else union_all(*selects)
    recorded = insert(_LEDGER).from_select(_ENTRY_COLUMNS, source).cte("recorded")
    if job_columns is None:
        return select(moved.c.balance_micros, moved.c.held_micros).add_cte(recorded)
    j = _JOBS.c
    return (
        update(_JOBS)
        .where(
            j.id == param("job_id", j.id),
            j.version == param("job_version", j.version),
            j.wallet_id == moved.c.id,
        )
        .values(
            {
                **{k: param(f"job_{k}", j[k]) for k in job_columns},
                "balance_after_micros": moved.c.balance_micros,
                "version": j.version + 1,
            }
        )
        .returning(moved.c.balance_micros, moved.c.held_micros)
        .add_cte(recorded)
    )


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
    session: Session, wallet_id: uuid.UUID, job_id: uuid.UUID, amount_micros: int
) -> WalletState | None:
    """Reserve ``amount_micros`` of the available balance; None when it is not available."""
    if amount_micros < 0:
        raise ValueError("a hold cannot be negative")
    if amount_micros == 0:
        return get_state(session, wallet_id)
    return _move(
        session,
        wallet_id,
        job_id,
        0,
        amount_micros,
        [_Entry("hold", 0, amount_micros)],
        require_available=amount_micros,
    )


def settle(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID,
    held_micros: int,
    charge_micros: int,
    *,
    job: tuple[int, dict[str, Any]] | None = None,
) -> WalletState:
    """Capture ``charge_micros`` of a job's hold and release the rest, in one UPDATE.

    Every settlement writes exactly one ``release`` entry (zero when the charge used the whole
    hold) and at most one ``capture``; the partial unique indexes on ledger_entries then make any
    second settlement of the same job fail, whatever its amounts: no job is charged twice.

    ``job``: the job's version as the caller read it and the columns that finish it; they are
    written with the settlement, fenced on that version, with the wallet's new balance as
    ``balance_after_micros``. If the version moved, ``StaleDataError`` is raised and the caller
    must roll back: the wallet and ledger writes made before the check go with it.
    """
    if not 0 <= charge_micros <= held_micros:
        raise ValueError(f"capture {charge_micros} outside hold {held_micros}")
    released = held_micros - charge_micros
    entries = [_Entry("release", 0, -released)]
    if charge_micros:
        entries.insert(0, _Entry("capture", -charge_micros, -charge_micros, released))
    state = _move(session, wallet_id, job_id, -charge_micros, -held_micros, entries, job=job)
    if state is None:
        raise LookupError(f"wallet {wallet_id} not found")
    return state


def ledger_sums(session: Session, wallet_id: uuid.UUID) -> WalletState:
    balance, held = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.amount_micros), 0),
            func.coalesce(func.sum(LedgerEntry.held_delta_micros), 0),
        ).where(LedgerEntry.wallet_id == wallet_id)
    ).one()
    return WalletState(int(balance), int(held))
