"""What a long run reports as it goes: the executors call it, the CLI draws a bar from it.

It sits on the ground floor so that the log module's terminal bar can implement it
without importing the sync engine.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Progress:
    """Receives progress of long runs; the CLI draws a bar from it on a terminal."""

    def start_folder(self, account: str, folder: str, messages: int, size: int) -> None:
        if messages:
            log.info("%s/%s: fetching %d messages (%d bytes)", account, folder, messages, size)

    def advance(self, messages: int, size: int) -> None:
        """Called after each durable batch."""

    def end_folder(self) -> None:
        """Called when a folder is finished or failed."""
