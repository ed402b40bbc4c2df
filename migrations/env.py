"""Alembic environment: the engine is handed over by mailsyncd.state.db, never read from
an ini file, so the same code path serves `mailsyncd db upgrade`, start-up and tests."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from mailsyncd.state.models import metadata

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url") or "")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
