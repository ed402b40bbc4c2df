"""widen sync_runs.result so that "interrupted" fits

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 12:30:00.000000

"interrupted" has 11 characters; SQLite ignores a VARCHAR's length, PostgreSQL does not.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sync_runs', schema=None) as batch_op:
        batch_op.alter_column('result', existing_type=sa.String(length=10), type_=sa.String(length=16),
                              existing_nullable=False)


def downgrade() -> None:
    # The old width cannot hold "interrupted"; such a run ended without finishing its work.
    op.execute("UPDATE sync_runs SET result = 'failed' WHERE result = 'interrupted'")
    with op.batch_alter_table('sync_runs', schema=None) as batch_op:
        batch_op.alter_column('result', existing_type=sa.String(length=16), type_=sa.String(length=10),
                              existing_nullable=False)
