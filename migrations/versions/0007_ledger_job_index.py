"""ledger entries by job: the console's job page lists a job's entries

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 15:00:00
"""

import contextlib
from collections.abc import Sequence
from typing import Any

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_ledger_job_id"


def upgrade() -> None:
    """Without it, a job's entries are found by scanning the wallet's whole ledger
    (ix_ledger_wallet_id_id): a cost that grows with the account's history (docs/console.md).
    CONCURRENTLY on PostgreSQL, as 0004: a plain build would block every settlement."""
    postgres = op.get_bind().dialect.name == "postgresql"
    with _outside_transaction(postgres):
        if postgres:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {_INDEX}")  # a failed build's leftover
        op.create_index(_INDEX, "ledger_entries", ["job_id"], postgresql_concurrently=postgres)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with _outside_transaction(postgres):
        op.drop_index(_INDEX, table_name="ledger_entries", postgresql_concurrently=postgres)


def _outside_transaction(postgres: bool) -> Any:
    return op.get_context().autocommit_block() if postgres else contextlib.nullcontext()
