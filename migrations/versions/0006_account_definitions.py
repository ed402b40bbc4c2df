"""account definitions: accounts kept in the state database, and their change counter

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 22:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('account_definitions',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('definition', sa.Text(), nullable=False),
    sa.Column('base', sa.Text(), nullable=False),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    generation = op.create_table('account_generation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.bulk_insert(generation, [{'id': 1, 'generation': 0}])


def downgrade() -> None:
    # The accounts kept here are lost with the table; their stores and state rows stay.
    op.drop_table('account_generation')
    op.drop_table('account_definitions')
