"""Accounts and API keys. Only a SHA-256 of a key is stored; the row is found by its public prefix."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Account, ApiKey, Wallet

_KEY_FORMAT = re.compile(r"^fpx_([A-Za-z0-9]{8,24})_[A-Za-z0-9_-]{16,}$")


def key_prefix(raw_key: str) -> str:
    """The public, indexed part of a key. Keys minted here carry it visibly (``fpx_<prefix>_…``);
    a key imported from elsewhere (FLOPEX_DEMO_API_KEY) gets one derived from its hash."""
    match = _KEY_FORMAT.match(raw_key)
    if match:
        return match.group(1)
    return "h" + hashlib.sha256(raw_key.encode()).hexdigest()[:23]


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> str:
    return f"fpx_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved once per request from the Authorization header."""

    account_id: uuid.UUID
    api_key_id: uuid.UUID
    wallet_id: uuid.UUID
    rate_limit_per_min: int | None = None
    rate_limit_burst: int | None = None


def create_account(session: Session, name: str) -> Account:
    account = Account(name=name)
    session.add(account)
    session.flush()
    session.add(Wallet(account_id=account.id, balance_micros=0, held_micros=0))
    session.flush()
    return account


def issue_key(
    session: Session, account_id: uuid.UUID, name: str = "", raw_key: str | None = None
) -> tuple[ApiKey, str]:
    """Returns the row and the raw key; the raw key is shown once and never stored."""
    raw = raw_key or generate_key()
    if len(raw) < 16:
        raise ValueError("an API key needs at least 16 characters")
    row = ApiKey(account_id=account_id, prefix=key_prefix(raw), key_hash=hash_key(raw), name=name)
    session.add(row)
    session.flush()
    return row, raw


def revoke_key(session: Session, prefix: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return True


def authenticate(session: Session, raw_key: str) -> Principal | None:
    """One indexed query; constant-time comparison of the hash."""
    return authenticate_digest(session, key_prefix(raw_key), hash_key(raw_key))


def authenticate_digest(session: Session, prefix: str, digest: str) -> Principal | None:
    """``authenticate`` from the key's prefix and hash: what a console session keeps instead
    of the key itself (app/console/auth.py)."""
    row = session.execute(
        select(
            ApiKey.id,
            ApiKey.account_id,
            ApiKey.key_hash,
            ApiKey.revoked_at,
            Wallet.id,
            Account.rate_limit_per_min,
            Account.rate_limit_burst,
        )
        .join(Wallet, Wallet.account_id == ApiKey.account_id)
        .join(Account, Account.id == ApiKey.account_id)
        .where(ApiKey.prefix == prefix)
    ).first()
    if row is None:
        return None
    key_id, account_id, key_hash, revoked_at, wallet_id, per_s, burst = row
    if revoked_at is not None or not hmac.compare_digest(key_hash, digest):
        return None
    return Principal(account_id, key_id, wallet_id, per_s, burst)
