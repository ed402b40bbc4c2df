"""The state database's tables, as SQLAlchemy 2 Core ``Table`` objects.

Core rather than ORM classes: StateRepo speaks SQL statements, never mapped objects, and
importing the ORM costs about a fifth of a no-op sync's start-up. Alembic revisions under
migrations/ build these tables; a test runs autogenerate and expects no difference.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

ACCOUNTS = Table(
    "accounts", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("protocol", String(10), nullable=False),
)

FOLDERS = Table(
    "folders", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),  # decoded server name
    Column("delimiter", String(4)),
    Column("path", Text, nullable=False),  # relative path in the store
    Column("uidvalidity", BigInteger),
    Column("uidnext", BigInteger),  # NULL until the first sync of this UIDVALIDITY finished
    Column("highestmodseq", BigInteger),
    Column("last_sync", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("on_server", Boolean, nullable=False, default=True),
    # Two-way: st_mtime_ns of the folder's cur/ and new/ when their listing last matched
    # the recorded pairs exactly (unchanged -> no listing), and what the last pass did each way.
    Column("cur_mtime_ns", BigInteger),
    Column("new_mtime_ns", BigInteger),
    Column("pushed", Integer),
    Column("pulled", Integer),
    UniqueConstraint("account_id", "name"),
)

MESSAGES = Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # domain.MessageState
    Column("location", Text),
    Column("size", BigInteger),  # the server's RFC822.SIZE
    Column("sha256", String(64)),  # of the stored bytes
    Column("message_id", Text),
    Column("internaldate", DateTime(timezone=True)),
    Column("flags", Text, nullable=False, default=""),  # space-separated, as last synced: the merge base
    UniqueConstraint("folder_id", "uidvalidity", "uid"),
    Index("ix_messages_folder_state", "folder_id", "state"),
    Index("ix_messages_folder_message_id", "folder_id", "message_id"),
)

POP_MESSAGES = Table(
    "pop_messages", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("uidl", Text, nullable=False),
    Column("state", String(16), nullable=False),  # domain.MessageState
    Column("location", Text),
    Column("size", BigInteger),
    Column("sha256", String(64)),
    Column("message_id", Text),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True)),
    UniqueConstraint("account_id", "uidl"),
)

PUSH_INTENTS = Table(
    # Two-way: one row per effect on either side, committed before the effect, deleted
    # once its outcome is recorded. What is left at start is settled by looking at both
    # sides (sync/recover.py): an APPEND is searched for before it is ever sent again.
    "push_intents", metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # sync.twoway_run.IntentKind
    Column("uidvalidity", BigInteger),
    Column("uid", BigInteger),
    Column("local_name", Text),  # the file's unique name (its location for an append)
    Column("target_folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE")),
    Column("uidnext", BigInteger),  # the target folder's UIDNEXT before an APPEND or MOVE
    Column("size", BigInteger),  # the server's size of the bytes
    Column("sha256", String(64)),
    Column("message_id", Text),
    Column("flags", Text, nullable=False, default=""),
    Column("created", DateTime(timezone=True), nullable=False),
)

SYNC_RUNS = Table(
    "sync_runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("started", DateTime(timezone=True), nullable=False),
    Column("finished", DateTime(timezone=True)),
    Column("result", String(16), nullable=False),  # domain.RunResult
    Column("fetched", Integer, nullable=False, default=0),
    Column("fetched_bytes", BigInteger, nullable=False, default=0),
    Column("error", Text),
)

# One row per account that a daemon ever claimed. ``epoch`` counts the claims: every state
# transaction of a sync checks that it still holds the epoch it claimed (the fence), so a
# daemon that stalled past ``until`` and lost the account can no longer write its rows.
LEASES = Table(
    "account_leases", metadata,
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("owner", String(255)),  # host:node of the holder; NULL when released
    Column("epoch", BigInteger, nullable=False, default=0),
    Column("since", DateTime(timezone=True)),
    Column("until", DateTime(timezone=True)),
    Column("due", DateTime(timezone=True)),  # a scheduled run before this is skipped: synced recently
)

# Accounts kept in the database (``mailsyncd accounts import``) beside the config file's.
# ``definition`` is the account's TOML table as JSON, checked by the config file's own
# validator at import and again at every load; ``base`` is the directory its relative
# paths are anchored at (the imported file's). Never a secret: import refuses inline ones.
ACCOUNT_DEFINITIONS = Table(
    "account_definitions", metadata,
    Column("name", String(200), primary_key=True),
    Column("definition", Text, nullable=False),
    Column("base", Text, nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

# One row (id 1): a counter every import and removal increments in its transaction, so a
# daemon notices a change with one cheap read, whatever the clocks of the nodes say.
ACCOUNT_GENERATION = Table(
    "account_generation", metadata,
    Column("id", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),
)
