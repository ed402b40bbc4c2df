"""the fleet's rules in the lease row: the account's last node (sticky) and server host (caps)

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-05 22:15:00.000000

``last_owner`` is the node that last finished a run of the account, and ``sticky_until``
the time until which another node leaves a sticky account to it. ``host`` is the
account's server host, recorded at each claim, so that a claim can count the live
leases on that host against ``host_logins``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('account_leases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_owner', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('sticky_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('host', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_account_leases_host', ['host'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('account_leases', schema=None) as batch_op:
        batch_op.drop_index('ix_account_leases_host')
        batch_op.drop_column('host')
        batch_op.drop_column('sticky_until')
        batch_op.drop_column('last_owner')
