"""The wallet ledger. Every change to a balance or to the amount on hold is one conditional
UPDATE of the wallet row plus an immutable ledger entry, in the caller's transaction.

Invariants (checked by tests and enforced by CHECK constraints):
balance = sum(amount_micros), held = sum(held_delta_micros), 0 <= held <= balance.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.models import LedgerEntry, Wallet, utcnow

_WALLETS = Wallet.__table__


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
    session: Session,
    wallet_id: uuid.UUID,
    amount: int,
    held_delta: int,
    *,
    require_available: int | None = None,
) -> WalletState | None:
    # A Core statement on the table: no ORM bookkeeping while the wallet row is locked.
    w = _WALLETS.c
    stmt = (
        update(_WALLETS)
        .where(w.id == wallet_id)
        .values(
            balance_micros=w.balance_micros + amount,
            held_micros=w.held_micros + held_delta,
            updated_at=utcnow(),
        )
        .returning(w.balance_micros, w.held_micros)
    )
    if require_available is not None:
        # The check and the write are one statement: two concurrent holds can never both see
        # the same available amount.
        stmt = stmt.where(w.balance_micros - w.held_micros >= require_available)
    row = session.execute(stmt).first()
    return None if row is None else WalletState(row[0], row[1])


def _entry(
    session: Session,
    wallet_id: uuid.UUID,
    job_id: uuid.UUID | None,
    kind: str,
    amount: int,
    held_delta: int,
    after: WalletState,
    memo: str = "",
) -> None:
    session.add(
        LedgerEntry(
            wallet_id=wallet_id,
            job_id=job_id,
            kind=kind,
            amount_micros=amount,
            held_delta_micros=held_delta,
            balance_after_micros=after.balance_micros,
            held_after_micros=after.held_micros,
            memo=memo,
        )
    )


def top_up(
    session: Session, wallet_id: uuid.UUID, amount_micros: int, memo: str = ""
) -> WalletState:
    if amount_micros <= 0:
        raise ValueError("a top-up must be positive")
    state = _apply(session, wallet_id, amount_micros, 0)
    if state is None:
        raise LookupError(f"wallet {wallet_id} not found")
    _entry(session, wallet_id, None, "topup", amount_micros, 0, state, memo)
    return state


def hold(
    session: Session, wallet_id: uuid.UUID, job_id: uuid.UUID, amount_micros: int
) -> WalletState | None:
    """Reserve ``amount_micros`` of the available balance; None when it is not available."""
    if amount_micros < 0:
        raise ValueError("a hold cannot be negative")
    if amount_micros == 0:
        return get_state(session, wallet_id)
    state = _apply(session, wallet_id, 0, amount_micros, require_available=amount_micros)
    if state is not None:
        _entry(session, wallet_id, job_id, "hold", 0, amount_micros, state)
    return state


def settle(
    session: Session, wallet_id: uuid.UUID, job_id: uuid.UUID, held_micros: int, charge_micros: int
) -> WalletState:
    """Capture ``charge_micros`` of a job's hold and release the rest, in one UPDATE.

    Every settlement writes exactly one ``release`` entry (zero when the charge used the whole
    hold) and at most one ``capture``; the partial unique indexes on ledger_entries then make any
    second settlement of the same job fail, whatever its amounts: no job is charged twice.
    """
    if not 0 <= charge_micros <= held_micros:
        raise ValueError(f"capture {charge_micros} outside hold {held_micros}")
    released = held_micros - charge_micros
    state = _apply(session, wallet_id, -charge_micros, -held_micros)
    if state is None:
        raise LookupError(f"wallet {wallet_id} not found")
    if charge_micros:
        after_capture = WalletState(state.balance_micros, state.held_micros + released)
        _entry(session, wallet_id, job_id, "capture", -charge_micros, -charge_micros, after_capture)
    _entry(session, wallet_id, job_id, "release", 0, -released, state)
    return state


def ledger_sums(session: Session, wallet_id: uuid.UUID) -> WalletState:
    balance, held = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.amount_micros), 0),
            func.coalesce(func.sum(LedgerEntry.held_delta_micros), 0),
        ).where(LedgerEntry.wallet_id == wallet_id)
    ).one()
    return WalletState(int(balance), int(held))
