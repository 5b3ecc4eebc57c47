"""app/billing/accounts.py: accounts, API keys (hashed at rest) and authentication."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.billing import accounts, wallet
from app.models import Account, ApiKey, Wallet


def new_account(session: Session, name: str = "acme") -> Account:
    return accounts.create_account(session, f"{name}-{uuid.uuid4().hex[:6]}")


def test_create_account_creates_a_zero_wallet(db_session):
    account = new_account(db_session)
    rows = db_session.scalars(select(Wallet).where(Wallet.account_id == account.id)).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.balance_micros, row.held_micros, row.currency) == (0, 0, "USD")
    state = wallet.get_state(db_session, row.id)
    assert (state.balance_micros, state.held_micros, state.available_micros) == (0, 0, 0)


def test_issued_key_authenticates_to_its_account_and_wallet(db_session):
    account = new_account(db_session)
    row, raw = accounts.issue_key(db_session, account.id, name="ci")

    principal = accounts.authenticate(db_session, raw)

    assert principal is not None
    wallet_id = db_session.scalar(select(Wallet.id).where(Wallet.account_id == account.id))
    assert principal == accounts.Principal(
        account_id=account.id, api_key_id=row.id, wallet_id=wallet_id
    )
    assert re.fullmatch(r"fpx_[0-9a-f]{12}_[A-Za-z0-9_-]{32}", raw)


def test_only_the_hash_of_a_key_is_stored(db_session):
    account = new_account(db_session)
    row, raw = accounts.issue_key(db_session, account.id, name="ci")
    secret = raw.split("_", 2)[2]
    db_session.expire_all()

    stored = db_session.execute(select(ApiKey.__table__).where(ApiKey.id == row.id)).one()
    values = [str(v) for v in stored._mapping.values()]
    assert not any(raw in v or secret in v for v in values)
    assert stored.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert stored.prefix == raw.split("_")[1]


def _other_char(c: str) -> str:
    return "A" if c != "A" else "B"


def test_wrong_secret_with_the_right_prefix_fails(db_session):
    account = new_account(db_session)
    _, raw = accounts.issue_key(db_session, account.id)
    tampered = raw[:-1] + _other_char(raw[-1])
    assert accounts.key_prefix(tampered) == accounts.key_prefix(raw)

    assert accounts.authenticate(db_session, tampered) is None
    assert accounts.authenticate(db_session, raw + "x") is None
    assert accounts.authenticate(db_session, raw) is not None


@pytest.mark.parametrize(
    "raw", ["", "Bearer", "fpx_", "not-a-key-at-all-but-long", "fpx_abcdefgh_"]
)
def test_unknown_or_malformed_keys_fail(db_session, raw):
    assert accounts.authenticate(db_session, raw) is None


def test_revoked_key_fails_and_revocation_is_idempotent(db_session):
    account = new_account(db_session)
    row, raw = accounts.issue_key(db_session, account.id)
    _, other_raw = accounts.issue_key(db_session, account.id)

    assert accounts.revoke_key(db_session, row.prefix) is True
    db_session.flush()
    first_revoked_at = row.revoked_at
    assert first_revoked_at is not None
    assert accounts.authenticate(db_session, raw) is None
    # Other keys of the same account are unaffected.
    assert accounts.authenticate(db_session, other_raw) is not None

    assert accounts.revoke_key(db_session, row.prefix) is True
    assert row.revoked_at == first_revoked_at
    assert accounts.revoke_key(db_session, "nosuchprefix") is False


def test_key_prefix_of_minted_keys_is_their_visible_part():
    raw = accounts.generate_key()
    visible = raw.split("_")[1]
    assert accounts.key_prefix(raw) == visible
    assert accounts.key_prefix("fpx_ABCdef12_0123456789abcdefXYZ") == "ABCdef12"


@pytest.mark.parametrize(
    "raw",
    [
        "demo-key-0123456789abcdef",
        "sk-live-0123456789abcdef",
        # Looks minted but the visible part is too short or the secret too short.
        "fpx_abc_0123456789abcdefXYZ",
        "fpx_abcdefgh_short",
    ],
)
def test_key_prefix_of_foreign_keys_is_derived_from_the_hash(raw):
    prefix = accounts.key_prefix(raw)
    assert prefix == "h" + hashlib.sha256(raw.encode()).hexdigest()[:23]
    assert len(prefix) == 24  # fits api_keys.prefix (String(32))


def test_foreign_key_can_be_imported_and_authenticates(db_session):
    account = new_account(db_session, "demo")
    raw = f"demo-{uuid.uuid4().hex}"
    row, returned = accounts.issue_key(db_session, account.id, name="demo", raw_key=raw)
    assert returned == raw
    assert row.prefix == accounts.key_prefix(raw)
    principal = accounts.authenticate(db_session, raw)
    assert principal is not None and principal.account_id == account.id


def test_keys_shorter_than_sixteen_characters_are_refused(db_session):
    account = new_account(db_session)
    with pytest.raises(ValueError, match="at least 16 characters"):
        accounts.issue_key(db_session, account.id, raw_key="short-key-15chr")
    assert db_session.scalars(select(ApiKey).where(ApiKey.account_id == account.id)).all() == []


def test_generated_keys_are_unique():
    keys = {accounts.generate_key() for _ in range(200)}
    assert len(keys) == 200
    assert len({accounts.key_prefix(k) for k in keys}) == 200
