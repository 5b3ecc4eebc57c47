"""offering speed priors: what the catalog expects of an offering before we have measured it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # Nullable columns without a default: a catalog-only change, no table rewrite. Fail the
        # release rather than queue every request behind a long transaction's lock.
        op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column(
        "offerings",
        sa.Column("expected_ttft_ms", sa.Integer(), nullable=True),
        if_not_exists=postgres,
    )
    op.add_column(
        "offerings",
        sa.Column("expected_tokens_per_s", sa.Numeric(10, 2), nullable=True),
        if_not_exists=postgres,
    )


def downgrade() -> None:
    op.drop_column("offerings", "expected_tokens_per_s")
    op.drop_column("offerings", "expected_ttft_ms")
