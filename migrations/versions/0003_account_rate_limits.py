"""account rate limits

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 01:06:20.690193
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("rate_limit_per_min", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("rate_limit_burst", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("accounts", "rate_limit_burst")
    op.drop_column("accounts", "rate_limit_per_min")
