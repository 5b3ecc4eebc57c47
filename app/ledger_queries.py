"""Reads of a wallet's ledger, for the API's views (the wallet's writes are app/wallet.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.exceptions import FlopexError
from app.models import LedgerEntry


@dataclass(frozen=True)
class LedgerPage:
    entries: list[LedgerEntry]
    has_more: bool

    @property
    def next_cursor(self) -> str | None:
        return str(self.entries[-1].id) if self.has_more and self.entries else None


def ledger_page(
    session: Session, wallet_id: uuid.UUID, limit: int, starting_after: int | None = None
) -> LedgerPage:
    """Entries newest first; ``starting_after`` (an entry id) gives the page after it."""
    stmt = select(LedgerEntry).where(LedgerEntry.wallet_id == wallet_id)
    if starting_after is not None:
        # The cursor must be one of the caller's own entries, as the job list requires of its
        # cursor: an unknown id silently gave the first page, another account's an empty one.
        # Both are the same 404, so nothing is learnt about other wallets.
        own = session.scalar(
            select(LedgerEntry.id).where(
                LedgerEntry.id == starting_after, LedgerEntry.wallet_id == wallet_id
            )
        )
        if own is None:
            raise FlopexError("not_found", f"No ledger entry {starting_after}.", "starting_after")
        stmt = stmt.where(LedgerEntry.id < starting_after)
    rows = list(session.scalars(stmt.order_by(LedgerEntry.id.desc()).limit(limit + 1)))
    return LedgerPage(rows[:limit], len(rows) > limit)
