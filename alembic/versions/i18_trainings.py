"""/teach: trained LoRAs, each with its job (kind "teach") as its queue entry

Revision ID: i18_trainings
Revises: i17_workers
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "i18_trainings"
down_revision: str | None = "i17_workers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trainings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("pictures", sa.JSON(), nullable=False),
        sa.Column("losses", sa.JSON(), nullable=False),
        sa.Column("shared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_trainings_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_trainings_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trainings")),
        sa.UniqueConstraint("job_id", name=op.f("uq_trainings_job_id")),
    )
    op.create_index("ix_trainings_user_name", "trainings", ["user_id", "name"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_trainings_user_name", table_name="trainings")
    op.drop_table("trainings")
