"""An index to find old progress events, which the worker now deletes every half minute

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_job_events_kind_created", "job_events", ["kind", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_job_events_kind_created", table_name="job_events")
