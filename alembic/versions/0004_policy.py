"""Policy: cost-unit quota charges on jobs, moderator grants, appeals, richer safety flags

The daily image counter (quota_usage) gives way to the jobs' own charges (jobs.cost_milli): a job's
charge counts while it is queued, running or succeeded, and stops counting when it fails or is
cancelled, so reserve, refund and commit are one column and the job's status.

Revision ID: 0004
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quota_grants",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("extra_milli", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_quota_grants_user_id_users")),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_quota_grants")),
    )
    op.create_table(
        "appeals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=16), nullable=True),
        sa.Column("flag_id", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=160), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["flag_id"], ["safety_flags.id"], name=op.f("fk_appeals_flag_id_safety_flags"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_appeals_job_id_jobs"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_appeals_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_appeals")),
    )
    with op.batch_alter_table("appeals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_appeals_user_id"), ["user_id"], unique=False)

    op.drop_table("quota_usage")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cost_milli", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("nsfw_allowed", sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table("safety_flags", schema=None) as batch_op:
        batch_op.add_column(sa.Column("detail", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("actor", sa.String(length=160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("safety_flags", schema=None) as batch_op:
        batch_op.drop_column("actor")
        batch_op.drop_column("detail")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("nsfw_allowed")
        batch_op.drop_column("cost_milli")

    op.create_table(
        "quota_usage",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_quota_usage_user_id_users")),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_quota_usage")),
    )
    with op.batch_alter_table("appeals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_appeals_user_id"))

    op.drop_table("appeals")
    op.drop_table("quota_grants")
