"""Recovery at start: finish or undo the writes a killed run left behind (invariant 1)."""

from __future__ import annotations

import logging

from mailsyncd.domain import MessageState, RecordedMessage
from mailsyncd.sources.base import TwoWaySource
from mailsyncd.state.repo import KnownFolder, PushIntent, StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore
from mailsyncd.sync.twoway_run import IntentKind, find_uploaded

log = logging.getLogger(__name__)


def recover(repo: StateRepo, store: Store, account_id: int) -> tuple[int, int]:
    """Every intent of the account that never became ``stored``, of any protocol, is
    looked up in the store: whole ones are adopted, the rest forgotten (and so fetched
    again). Returns (adopted, forgotten). Must run before anything else touches the account.
    """
    pending = repo.pending(account_id)
    if not pending:
        return 0, 0
    found = store.recover(intent.location for intent in pending)
    adopted = [(intent, found[intent.location]) for intent in pending if intent.location in found]
    forgotten = [intent for intent in pending if intent.location not in found]
    repo.resolve_pending(adopted, forgotten)
    log.info("recovered an interrupted run: %d messages found whole, %d to fetch again",
             len(adopted), len(forgotten))
    return len(adopted), len(forgotten)


def reconcile_pushes(repo: StateRepo, store: MaildirStore, source: TwoWaySource, account_id: int) -> int:
    """Settle the two-way intents a killed run left, by looking at both sides; returns
    how many there were. Must run after ``recover`` and before the pass plans anything.

    An APPEND or MOVE may have reached the server without its UID being recorded: the
    target folder is searched above the UIDNEXT saved with the intent for the same bytes,
    and a hit is paired, so the message is never uploaded twice. Every other kind (flag
    writes, renames, \\Deleted + UID EXPUNGE, removals) is idempotent, and the next
    merge against the unchanged base sees exactly what was done and what was not: its
    intent is simply dropped.
    """
    intents = repo.push_intents(account_id)
    if not intents:
        return 0
    folders = {folder.id: folder for folder in repo.folders(account_id)}
    for intent in intents:
        if intent.kind in (IntentKind.APPEND, IntentKind.MOVE):
            _find_pushed(repo, store, source, intent, folders)
        assert intent.row_id is not None  # read back from the database
        repo.drop_intents([intent.row_id])
    log.info("settled %d two-way changes an interrupted run left unfinished", len(intents))
    return len(intents)


def _find_pushed(repo: StateRepo, store: MaildirStore, source: TwoWaySource, intent: PushIntent,
                 folders: dict[int, KnownFolder]) -> None:
    """Pair an uploaded or moved message found on the server with its file."""
    target_id = intent.target_folder_id if intent.kind == IntentKind.MOVE else intent.folder_id
    target = folders.get(target_id) if target_id is not None else None
    if target is None or target.uidvalidity is None or intent.local_name is None:
        return
    uid = find_uploaded(source, target.name, intent.uidnext or 1, intent.message_id, intent.size or 0,
                        intent.sha256)
    location = store.find(intent.local_name)
    if intent.kind == IntentKind.MOVE and intent.uid is not None and intent.uidvalidity is not None:
        if uid is None:
            return  # not moved: the pair in the source stays, and the next pass moves it
        repo.record_pushes(intent.folder_id, intent.uidvalidity, forget=[intent.uid])
    if uid is None or location is None:
        return  # not uploaded (or the file is gone): the next pass decides again
    repo.record_pushes(target.id, target.uidvalidity, pairs=[RecordedMessage(
        uid, target.uidvalidity, MessageState.STORED, intent.flags, location, intent.size, intent.sha256,
        intent.message_id)], forget=[intent.uid] if intent.kind == IntentKind.APPEND and intent.uid else [])
    log.info("found UID %d of folder %r on the server: an interrupted run had uploaded it", uid, target.name)
