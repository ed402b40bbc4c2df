"""What every executor writes through and reports to, and the crash tests' hook.

A ``Checkpoint`` is called after every effect step; it does nothing in production and
lets the crash tests stop the process at each step in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mailsyncd.progress import Progress
from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import Store

Checkpoint = Callable[[str], None]


def no_checkpoint(_step: str) -> None:
    """Production checkpoint: nothing to do."""


@dataclass
class Counts:
    fetched: int = 0
    fetched_bytes: int = 0
    skipped: int = 0
    placeholders: int = 0
    flags: int = 0
    gone: int = 0
    removed: int = 0
    adopted: int = 0
    folders: int = 0
    pushed: int = 0  # two-way: changes written to the server
    pulled: int = 0  # two-way: changes made here
    report: list[str] = field(default_factory=list)  # a dry run's lines
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        both_ways = f"{self.pushed} changes to the server, {self.pulled} here; " if self.pushed or self.pulled else ""
        return both_ways + (
                f"{self.folders} folders, {self.fetched} new ({self.fetched_bytes} bytes), {self.flags} flag changes"
                f", {self.gone} gone, {self.removed} removed, {self.adopted} re-adopted, "
                f"{self.skipped} skipped, {self.placeholders} kept as placeholders")


@dataclass
class Effects:
    """What every executor writes through and reports to."""

    account: str
    repo: StateRepo
    store: Store
    progress: Progress
    checkpoint: Checkpoint
    counts: Counts
