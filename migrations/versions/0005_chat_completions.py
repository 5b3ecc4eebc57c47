"""chat completions: a job's messages, pass-through parameters and tool calls; model defaults

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    """Nullable columns without a default: adding them rewrites nothing (PostgreSQL keeps the
    table as it is), so the exclusive lock lasts an instant; re-runnable after a failure."""
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("SET LOCAL lock_timeout = '5s'")
    # What a /v1/chat/completions job sends to the provider, kept with the job so that a resumed
    # or retried execution sends the same request; NULL for a native job (one user message).
    op.add_column("jobs", sa.Column("messages", _JSON, nullable=True), if_not_exists=postgres)
    op.add_column(
        "jobs", sa.Column("provider_params", _JSON, nullable=True), if_not_exists=postgres
    )
    # The provider's tool calls, when it answered with them.
    op.add_column("jobs", sa.Column("tool_calls", _JSON, nullable=True), if_not_exists=postgres)
    # max_tokens of a chat request that sends none (NULL: min(4096, max_output_tokens)).
    op.add_column(
        "model_aliases",
        sa.Column("default_max_tokens", sa.Integer(), nullable=True),
        if_not_exists=postgres,
    )


def downgrade() -> None:
    op.drop_column("model_aliases", "default_max_tokens")
    op.drop_column("jobs", "tool_calls")
    op.drop_column("jobs", "provider_params")
    op.drop_column("jobs", "messages")
