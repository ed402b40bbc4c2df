"""The error tree.

Errors are typed by the scope they spoil, and each scope's owner catches its own:
a MessageError skips one message, a FolderError one folder, an AccountError one
account, and a FatalError (config, state database, a second instance) stops the run.
Only ``cli.py`` turns them into exit codes. Every message is one line a user can act
on; it never carries a password.

Each class also says, in ``retry``, how soon trying again is worth it, as isync grades its
failures; the daemon reads that rather than knowing the classes.
"""

from __future__ import annotations

import re
from enum import Enum


class Retry(Enum):
    TEMPORARY = "temporary"  # the network, a busy server: again soon, backing off step by step
    WAIT = "wait"  # the server refused us (a login): soon would be refused again
    FINAL = "final"  # only the user can mend it (the config, the state database)


class MailsyncError(Exception):
    """Base of every error mailsyncd raises on purpose."""

    exit_code = 1
    retry = Retry.TEMPORARY


class MessageError(MailsyncError):
    """One message could not be handled; the rest of the folder goes on."""


class FolderError(MailsyncError):
    """One folder could not be synced; the other folders go on."""


class AccountError(MailsyncError):
    """One account could not be synced (connection, login, TLS); other accounts go on."""


class AuthError(AccountError):
    """The server refused the credentials; retrying soon will not help."""

    retry = Retry.WAIT


class Interrupted(MailsyncError):
    """The run was asked to stop (the daemon got SIGTERM); what was written is recorded."""


class FatalError(MailsyncError):
    """Nothing can go on: the whole run stops."""

    exit_code = 2
    retry = Retry.FINAL


class ConfigError(FatalError):
    """The config is wrong. The message names the file, the key and what is allowed."""

    def __init__(self, path: object, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}")


class SecretError(AccountError):
    """A password source failed (command exit status, missing variable, unreadable file)."""


class StateError(FatalError):
    """The state database cannot be opened, migrated or written."""


class AlreadyRunning(FatalError):
    """Another mailsyncd holds the state database (design invariant 7).

    ``holder`` is what the lock file says ("pid 123", or "pid 123 daemon" for ``mailsyncd
    run``); ``daemon_pid`` is that pid when the holder is the daemon, else None.
    """

    def __init__(self, path: object, holder: str) -> None:
        match = re.fullmatch(r"pid (\d+) daemon", holder)
        self.daemon_pid = int(match.group(1)) if match else None
        shown = holder.removesuffix(" daemon") or "another process"
        super().__init__(f"another mailsyncd ({shown}) is using the state database "
                         f"{path}; stop it first or point --config at another state")


class StateDamaged(StateError):
    """The state database is not a database any more (overwritten, truncated). Nothing can
    go on with it, yet it is a fault of this machine, not of the config: exit 1."""

    exit_code = 1


class StateLocked(StateError):
    """Another program holds the state database's write lock (an sqlite3 shell, a backup)."""

    exit_code = 1
    retry = Retry.TEMPORARY


class StateFull(AccountError):
    """The state database cannot grow: its disk is full. The account's run stops; what
    is stored and recorded stays consistent, and the next run goes on from there."""


class StoreUnavailable(AccountError):
    """The account's store cannot be written at all: a full or read-only disk, a path that
    is a file or cannot be made. The other accounts go on."""


class StoreError(FolderError):
    """The local store refused a write (disk full, permissions, a path outside the root)."""


class UnsafePath(StoreError):
    """A computed path would leave the store root; refused before anything is created."""


class AccountBusy(AccountError):
    """Another daemon holds the account's lease and is syncing it; not a failure, the
    account is simply that daemon's for now."""


class LeaseLost(AccountError):
    """This daemon's lease on the account ran out and another took it over (a stall, a
    lost network): the state transaction was refused, and this run ends without writing."""


class AccountNotDue(AccountBusy):
    """Another daemon (or this one) synced the account recently; a scheduled run skips it,
    so N daemons do not sync every account N times per interval."""


class AccountReserved(AccountBusy):
    """A sticky account is left to the node that synced it last (its store is on that
    node's disk) while that node keeps syncing it; taken over only once it is overdue."""


class HostCapped(AccountBusy):
    """The account's server host already has ``host_logins`` syncs running among the
    daemons sharing the state; skipped like a busy account, tried again at its next run."""
