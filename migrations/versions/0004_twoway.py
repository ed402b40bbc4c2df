"""two-way sync: push intents, and per folder the listed directories' mtimes and last counts

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-05 17:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('push_intents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('folder_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=True),
    sa.Column('uid', sa.BigInteger(), nullable=True),
    sa.Column('local_name', sa.Text(), nullable=True),
    sa.Column('target_folder_id', sa.Integer(), nullable=True),
    sa.Column('uidnext', sa.BigInteger(), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('message_id', sa.Text(), nullable=True),
    sa.Column('flags', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['folder_id'], ['folders.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['target_folder_id'], ['folders.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('push_intents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_push_intents_folder_id'), ['folder_id'], unique=False)
    with op.batch_alter_table('folders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cur_mtime_ns', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('new_mtime_ns', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('pushed', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('pulled', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('folders', schema=None) as batch_op:
        batch_op.drop_column('pulled')
        batch_op.drop_column('pushed')
        batch_op.drop_column('new_mtime_ns')
        batch_op.drop_column('cur_mtime_ns')
    with op.batch_alter_table('push_intents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_push_intents_folder_id'))
    op.drop_table('push_intents')
