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
    adopted = [(intent, found[intent.location]) for intent in pending if intent.location in found]
    forgotten = [intent for intent in pending if intent.location not in found]
    repo.resolve_pending(adopted, forgotten)
    log.info("recovered an interrupted run: %d messages found whole, %d to fetch again",
             len(adopted), len(forgotten))
    return len(adopted), len(forgotten)
