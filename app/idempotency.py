"""Idempotency-Key, after Stripe: a key is scoped to the account; the first request with it
claims it (in the transaction that creates the job); a retry with the same body gets the first
outcome back byte for byte; a different body is refused; a request rejected before execution
leaves no trace, so a corrected retry runs normally.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any, cast

import simplejson
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from app.models import IdempotencyKey

MAX_KEY_LENGTH = 255


def fingerprint(endpoint: str, body: Any) -> str:
    """Key order, whitespace and a number's spelling (``1.5``, ``1.50``, ``15e-1``) do not
    matter; a number and a string with the same digits do (``1.5`` is not ``"1.5"``). ``body``
    as parsed with Decimal numbers (app.json)."""
    canonical = simplejson.dumps(
        {"endpoint": endpoint, "body": _normalized(body)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        use_decimal=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        number = Decimal(value)
        # Exact whatever its length: the default context would round past 28 digits.
        return number.normalize(Context(prec=max(28, len(number.as_tuple().digits))))
    return value


@dataclass(frozen=True)
class Claim:
    """new: this request owns the key. replay: the outcome is stored. in_progress: another
    request owns it and has not finished. mismatch: the key came with another request."""

    state: str
    record_id: int
    job_id: uuid.UUID | None = None
    status: int | None = None
    body: str | None = None


def _insert(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def claim(
    session: Session,
    account_id: uuid.UUID,
    key: str,
    endpoint: str,
    fp: str,
    ttl_s: int,
) -> Claim:
    now = datetime.now(UTC)
    for _ in range(2):
        # Concurrent claims of one key queue on the unique index; exactly one inserts.
        stmt = (
            _insert(session)(IdempotencyKey)
            .values(
                account_id=account_id,
                key=key,
                endpoint=endpoint,
                fingerprint=fp,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            .on_conflict_do_nothing(index_elements=["account_id", "key"])
            .returning(IdempotencyKey.id)
        )
        inserted = session.execute(stmt).scalar_one_or_none()
        if inserted is not None:
            return Claim("new", inserted)
        row = session.execute(
            select(IdempotencyKey).where(
                IdempotencyKey.account_id == account_id, IdempotencyKey.key == key
            )
        ).scalar_one_or_none()
        if row is None:
            continue  # purged between the two statements
        expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
        if expires <= now:
            session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.id == row.id, IdempotencyKey.expires_at <= now
                )
            )
            continue
        if row.endpoint != endpoint or row.fingerprint != fp:
            return Claim("mismatch", row.id)
        if row.response_body is not None:
            return Claim("replay", row.id, row.job_id, row.response_status, row.response_body)
        return Claim("in_progress", row.id, row.job_id)
    raise RuntimeError("could not claim idempotency key")  # pragma: no cover - needs 2 races


def attach_job(session: Session, record_id: int, job_id: uuid.UUID) -> None:
    session.execute(
        update(IdempotencyKey).where(IdempotencyKey.id == record_id).values(job_id=job_id)
    )


def record_response(
    session: Session, record_id: int, status: int, body: str, *, commit: bool = True
) -> tuple[int, str]:
    """Stores the outcome once; whoever stores first wins and every caller gets the stored one,
    so the first response and all replays are the same bytes."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == record_id, IdempotencyKey.response_body.is_(None))
        .values(response_status=status, response_body=body)
    )
    stored = session.execute(
        select(IdempotencyKey.response_status, IdempotencyKey.response_body).where(
            IdempotencyKey.id == record_id
        )
    ).one()
    if commit:
        session.commit()
    stored_status, stored_body = stored
    # Set by the UPDATE above, or by the caller that stored first.
    assert stored_status is not None and stored_body is not None
    return stored_status, stored_body


def purge_expired(session: Session, now: datetime | None = None) -> int:
    result = cast(
        CursorResult[Any],
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or datetime.now(UTC)))
        ),
    )
    return result.rowcount or 0
