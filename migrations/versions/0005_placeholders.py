"""widen the message states so that "placeholder" fits

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-05 17:40:00.000000

A message over max_message_size may be stored as a placeholder ("placeholder", 11
characters) and replaced later by the whole message ("replacing" while that is under
way). SQLite ignores a VARCHAR's length, PostgreSQL does not.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_TABLES = ('messages', 'pop_messages')


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('state', existing_type=sa.String(length=10), type_=sa.String(length=16),
                                  existing_nullable=False)


def downgrade() -> None:
    # The old width cannot hold the new states. A placeholder becomes a skipped message
    # (what the older schema had for "over the limit"), so no whole copy is fetched beside
    # its file; a replacement cut short has left its placeholder, or recovery settles it
    # before a downgrade can run, so it is the same.
    for table in _TABLES:
        op.execute(f"UPDATE {table} SET state = 'skipped' WHERE state IN ('placeholder', 'replacing')")  # noqa: S608 - constants
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('state', existing_type=sa.String(length=16), type_=sa.String(length=10),
                                  existing_nullable=False)
