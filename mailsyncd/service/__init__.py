"""The daemon, ``mailsyncd run``: scheduled and push (IDLE) syncs, in the foreground.

Shape: one APScheduler job per account (its ``interval`` or ``cron``, a first run at start,
jitter so that accounts do not hit their servers together, ``max_instances=1``,
``coalesce=True``), one thread per folder in ``idle`` holding its own IMAP connection, and
the main thread handling signals, sd_notify and the watchdog. Every sync goes through
``App.sync_account``, as ``mailsyncd sync`` does, on one shared App: one engine, whose
SQLite WAL and BEGIN IMMEDIATE let accounts sync in parallel threads.

Runs of one account never overlap: ``AccountJob`` merges what is asked meanwhile (a
scheduled run, IDLE pushes for some folders) into the next run, so nothing is lost and
nothing runs twice at once. A failing account backs off exponentially without touching the
others; an error whose class says retrying soon will not help (``MailsyncError.retry``,
e.g. a refused login) backs off to the cap at once.

Stopping (SIGTERM, SIGINT) must not cut a write in half: the running sync is stopped by
its Checkpoint, which raises Interrupted at a "write" step only. That step lies inside the
executor's try block, whose ``finally`` makes durable and records every message written so
far and forgets the rest of the batch (fetched again next run). Nothing is ever raised
asynchronously into a worker thread.

The rooms: ``daemon`` (life cycle, reload, run bookkeeping), ``jobs`` (one account's
runs), ``watch`` (IDLE threads), ``schedule`` (triggers, jitter, backoff), ``signals``
(the signal inbox), ``systemd`` (sd_notify, watchdog), ``metrics``, and ``control``,
with which ``mailsyncd sync`` asks a running daemon to sync now. Only ``daemon`` imports
APScheduler, so ``control`` stays cheap to import.
"""
