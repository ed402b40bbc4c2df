"""Recovery at start: finish or undo the writes a killed run left behind (invariant 1)."""

from __future__ import annotations

import logging
from collections import defaultdict

from mailsyncd.domain import MessageState, RecordedMessage
from mailsyncd.sources.base import TwoWaySource
from mailsyncd.state.repo import KnownFolder, PushIntent, StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore, flags_from_name

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
    new = [intent for intent in pending if intent.placeholder is None]
    adopted = [(intent, found[intent.location]) for intent in new if intent.location in found]
    forgotten = [intent for intent in new if intent.location not in found]
    # A replacement is written over its placeholder in one rename: the location holds
    # the placeholder (its SHA-256 unchanged: the rename never happened, so it stays a
    # placeholder) or the whole message (stored). Never neither, never both.
    replaced, kept = [], []
    for intent in pending:
        if intent.placeholder is not None:
            there = found.get(intent.location)
            if there is not None and there.sha256 != intent.placeholder:
                replaced.append((intent, there))
            else:
                kept.append((intent, there))
    repo.resolve_pending([*adopted, *replaced], forgotten, kept)
    log.info("recovered an interrupted run: %d messages found whole, %d to fetch again, %d placeholders "
             "replaced, %d placeholders kept", len(adopted), len(forgotten), len(replaced), len(kept))
    return len(adopted) + len(replaced), len(forgotten)


def reconcile_pushes(repo: StateRepo, store: MaildirStore, source: TwoWaySource, account_id: int) -> int:
    """Settle the two-way intents a killed run left, by looking at both sides; returns
    how many there were. Must run after ``recover`` and before the pass plans anything.

    An APPEND or MOVE may have reached the server without its UID being recorded: the
    target folder is searched above the UIDNEXT saved with the intent for the same bytes,
    and a hit is paired, so the message is never uploaded twice. Flag writes may have
    happened without the base following: each one the server or the file shows is counted
    into the base, or a change the user makes next would be read as the other side's.
    The other kinds (moves of files, \\Deleted + UID EXPUNGE, removals) leave both sides
    where the next merge against the unchanged base sees what was done and what was not.
    """
    # Imported here: a pull (every timer run) never loads the two-way code.
    from mailsyncd.sync.twoway_run import IntentKind
    intents = repo.push_intents(account_id)
    if not intents:
        return 0
    folders = {folder.id: folder for folder in repo.folders(account_id)}
    flag_writes: dict[int, list[PushIntent]] = defaultdict(list)
    for intent in intents:
        if intent.kind in (IntentKind.APPEND, IntentKind.MOVE):
            _find_pushed(repo, store, source, intent, folders)
        elif intent.kind == IntentKind.FLAGS:
            flag_writes[intent.folder_id].append(intent)
    for folder_id, writes in flag_writes.items():
        _settle_flags(repo, store, source, folders[folder_id], writes)
    repo.drop_intents([intent.row_id for intent in intents if intent.row_id is not None])
    log.info("settled %d two-way changes an interrupted run left unfinished", len(intents))
    return len(intents)


def _settle_flags(repo: StateRepo, store: MaildirStore, source: TwoWaySource, folder: KnownFolder,
                  writes: list[PushIntent]) -> None:
    """Count the flag writes that happened into their messages' bases."""
    from mailsyncd.sync.twoway_run import FlagChange
    uidvalidity = writes[0].uidvalidity
    if uidvalidity is None or uidvalidity != folder.uidvalidity:
        return  # the pairs they were about are over
    uids = [intent.uid for intent in writes if intent.uid is not None]
    remote = source.flags(folder.name, uids)
    recorded = repo.recorded_folder(folder, uids).messages
    rebases = []
    for intent in writes:
        row = recorded.get(intent.uid or 0)
        if row is None or row.state != MessageState.STORED:
            continue
        local = None
        if intent.local_name is not None and (found := store.find(intent.local_name)) is not None:
            local = flags_from_name(found)
        base = FlagChange.decode(intent.flags).settled(row.flags, remote.get(row.uid), local)
        if base != row.flags:
            rebases.append((row.uid, base, found if local is not None else None))
    repo.record_pushes(folder.id, uidvalidity, rebases=rebases)


def _find_pushed(repo: StateRepo, store: MaildirStore, source: TwoWaySource, intent: PushIntent,
                 folders: dict[int, KnownFolder]) -> None:
    """Pair an uploaded or moved message found on the server with its file."""
    from mailsyncd.sync.twoway_run import IntentKind, find_uploaded
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
    if uid is None:
        return  # not uploaded: the next pass decides again
    # Paired even when the file is gone meanwhile: the next pass then deletes it on the
    # server, as the user asked, instead of downloading it as a stranger.
    repo.record_pushes(target.id, target.uidvalidity, pairs=[RecordedMessage(
        uid, target.uidvalidity, MessageState.STORED, intent.flags, location or intent.local_name, intent.size,
        intent.sha256,
        intent.message_id)], forget=[intent.uid] if intent.kind == IntentKind.APPEND and intent.uid else [])
    log.info("found UID %d of folder %r on the server: an interrupted run had uploaded it", uid, target.name)
