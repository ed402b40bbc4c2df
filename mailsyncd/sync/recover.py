"""Recovery at start: finish or undo the writes a killed run left behind (invariant 1)."""

from __future__ import annotations

import logging

from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import Store

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
