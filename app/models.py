"""SQLAlchemy 2.0 typed models. Money columns are integer micro-USD (1 USD = 1,000,000).

The schema is owned by Alembic (``migrations/``); these classes describe it for the ORM and tests
check that the two agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY, so BIGINT ids fall back to INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(value: datetime | None) -> str | None:
    """A stored timestamp as the API shows it: RFC 3339 in UTC with a ``Z``. SQLite (the
    embedded default) hands timestamps back without a zone; every one we store is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Base(DeclarativeBase):
    # Every model here is mapped to one Table (never a join or a select): Core statements
    # (wallet, job rows) take it as a table.
    __table__: ClassVar[Table]


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    # Per-account request rate limit (requests per minute, burst); NULL = the deployment default.
    rate_limit_per_min: Mapped[int | None] = mapped_column(Integer)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"), index=True)
    # The public part of the key, used to find the row; the secret is only stored hashed.
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Wallet(Base):
    __tablename__ = "wallets"
    __table_args__ = (
        CheckConstraint("balance_micros >= 0", name="ck_wallet_balance_nonneg"),
        CheckConstraint("held_micros >= 0", name="ck_wallet_held_nonneg"),
        CheckConstraint("held_micros <= balance_micros", name="ck_wallet_held_le_balance"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"), unique=True)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    balance_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    held_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerEntry(Base):
    """An immutable movement. ``amount_micros`` changes the balance, ``held_delta_micros`` the
    amount on hold; a wallet's balance and held amount are the sums of its entries."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # A job is captured at most once and released at most once: a database-level guard
        # against double charging, whatever the application does.
        Index(
            "uq_ledger_capture_per_job",
            "job_id",
            unique=True,
            postgresql_where=text("kind = 'capture'"),
            sqlite_where=text("kind = 'capture'"),
        ),
        Index(
            "uq_ledger_release_per_job",
            "job_id",
            unique=True,
            postgresql_where=text("kind = 'release'"),
            sqlite_where=text("kind = 'release'"),
        ),
        Index("ix_ledger_wallet_id_id", "wallet_id", "id"),
        # A job's entries (the console's job page; migration 0007).
        Index("ix_ledger_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    wallet_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("wallets.id"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    held_delta_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_after_micros: Mapped[int] = mapped_column(BigInteger)
    held_after_micros: Mapped[int] = mapped_column(BigInteger)
    memo: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Provider(Base):
    __tablename__ = "providers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    base_url: Mapped[str] = mapped_column(String(500))
    # Name of the environment variable that holds the provider's API key; never the key itself.
    api_key_env: Mapped[str | None] = mapped_column(String(128))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(String(128), unique=True)
    max_output_tokens: Mapped[int] = mapped_column(Integer)
    context_length: Mapped[int] = mapped_column(Integer)
    # max_tokens of a chat request that sends none; NULL: min(4096, max_output_tokens).
    default_max_tokens: Mapped[int | None] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class Offering(Base):
    __tablename__ = "offerings"
    __table_args__ = (
        UniqueConstraint("alias_id", "provider_id", name="uq_offering_alias_provider"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("model_aliases.id"))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"))
    provider_model_id: Mapped[str] = mapped_column(String(200))
    # USD per million tokens, in micro-USD (0.05 USD/M = 50_000).
    input_price_micros_per_m: Mapped[int] = mapped_column(BigInteger)
    output_price_micros_per_m: Mapped[int] = mapped_column(BigInteger)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Optional speed priors from the catalog: what routing assumes until it has measured the
    # offering (app/providers/speed.py).
    expected_ttft_ms: Mapped[int | None] = mapped_column(Integer)
    expected_tokens_per_s: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
        Index(
            "ix_jobs_webhook_owed",
            "finished_at",
            postgresql_where=text("webhook_status = 'pending'"),
            sqlite_where=text("webhook_status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    wallet_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("wallets.id"))
    # quoting -> routing -> executing -> settling -> success | failed (app/jobs/states.py)
    status: Mapped[str] = mapped_column(String(16))
    # Fencing token: every UPDATE of a job checks and bumps it (SQLAlchemy version_id_col), so a
    # worker that lost its claim (recovered by the sweeper, cancelled) can no longer write.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    model: Mapped[str] = mapped_column(String(128))
    request: Mapped[dict[str, Any]] = mapped_column(Json)
    performance_profile: Mapped[str] = mapped_column(String(16))
    routing_strategy: Mapped[str] = mapped_column(String(16))
    max_output_tokens: Mapped[int] = mapped_column(Integer)
    max_price_micros: Mapped[int | None] = mapped_column(BigInteger)
    max_latency_ms: Mapped[int | None] = mapped_column(Integer)
    customer_ref: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", Json)
    request_id: Mapped[str | None] = mapped_column(String(128))
    # The markup in force when the job was accepted, applied to its estimates and its charge.
    markup: Mapped[str] = mapped_column(String(16))
    estimated_input_tokens: Mapped[int] = mapped_column(Integer)
    expected_quotes: Mapped[int] = mapped_column(Integer)
    # The options asked for a quote at submission, then the quotes the route step considered.
    quotes: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    routing: Mapped[dict[str, Any] | None] = mapped_column(Json)
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    provider_name: Mapped[str | None] = mapped_column(String(64))
    provider_model_id: Mapped[str | None] = mapped_column(String(200))
    output_text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    hold_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    charge_micros: Mapped[int | None] = mapped_column(BigInteger)
    provider_cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    balance_after_micros: Mapped[int | None] = mapped_column(BigInteger)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    error_param: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The webhook outbox (app/jobs/recovery.py): `pending` from submission while the job's
    # callback_url is owed its delivery, then `delivered`, `failed` (gave up) or `refused`
    # (a private address); null without a callback_url.
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_attempted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A chat completion's request as the provider gets it (NULL for a native job: one user
    # message), and the tool calls it answered with.
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    provider_params: Mapped[dict[str, Any] | None] = mapped_column(Json)
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)

    __mapper_args__ = {"version_id_col": version}


class IdempotencyKey(Base):
    """A client's Idempotency-Key, scoped to its account, with the fingerprint of the request it
    first came with and, once the outcome is final, the exact response to replay."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("account_id", "key", name="uq_idempotency_account_key"),
        Index("ix_idempotency_expires_at", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"))
    key: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
