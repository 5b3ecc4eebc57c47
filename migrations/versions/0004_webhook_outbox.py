"""webhook outbox: what each finished job's webhook still owes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 10:00:00
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_INDEX = "ix_jobs_webhook_owed"


def upgrade() -> None:
    """Re-runnable on PostgreSQL after a failure half-way: the columns commit before the index
    is built (CONCURRENTLY cannot run in a transaction), so a release that failed while building
    it leaves the columns, and perhaps an INVALID index, behind at revision 0003."""
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # ADD COLUMN needs an exclusive lock for an instant; waiting for it behind a long
        # transaction would queue every request behind the migration. Fail the release instead.
        op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column(
        "jobs", sa.Column("webhook_status", sa.String(16), nullable=True), if_not_exists=postgres
    )
    op.add_column(
        "jobs",
        sa.Column("webhook_attempted_at", sa.DateTime(timezone=True), nullable=True),
        if_not_exists=postgres,
    )
    # Only the owed ones are indexed: the sweeper's query, never more rows than webhooks in flight.
    # CONCURRENTLY on PostgreSQL: a plain CREATE INDEX would block every write to `jobs` (every
    # request) while it scans the table during the release.
    with _outside_transaction(postgres):
        if postgres:
            valid = op.get_bind().scalar(
                # to_regclass: the index of this name in the migration's own schema (search
                # path), not one another schema happens to have.
                sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
                {"name": _INDEX},
            )
            if valid:
                return
            if valid is not None:  # a failed build's leftover: it is maintained but never used
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {_INDEX}")
        op.create_index(
            _INDEX,
            "jobs",
            ["finished_at"],
            postgresql_where=sa.text("webhook_status = 'pending'"),
            sqlite_where=sa.text("webhook_status = 'pending'"),
            postgresql_concurrently=postgres,
        )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with _outside_transaction(postgres):
        op.drop_index(_INDEX, table_name="jobs", postgresql_concurrently=postgres)
    op.drop_column("jobs", "webhook_attempted_at")
    op.drop_column("jobs", "webhook_status")


def _outside_transaction(postgres: bool) -> Any:
    return op.get_context().autocommit_block() if postgres else contextlib.nullcontext()
