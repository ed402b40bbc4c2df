"""What a long run reports as it goes: the executors call it, the CLI draws a bar from it.

It sits on the ground floor so that the terminal bar can implement it without importing
the sync engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress as RichBars

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

    def close(self) -> None:
        """Called once, when the run is over."""


class TerminalProgress(Progress):
    """On a terminal: one overall bar (messages, bytes, rate, time left) and the current
    folder's bar under it.

    Drawn with rich, which measures the terminal, never lets a line wrap (a wrapped line
    is what leaves half-lines behind at every redraw) and redraws in place; it is kept up
    and typed. rich is imported only here, when a terminal shows the bars. The overall
    total grows as each folder's work becomes known: folders are listed one at a time.
    """

    def __init__(self, stream: TextIO, width: int | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        console = Console(file=stream, width=width, force_terminal=True if width else None)
        self._bars: RichBars = RichProgress(
            TextColumn("{task.description}", table_column=None), BarColumn(bar_width=None),
            TextColumn("{task.fields[done]}/{task.fields[messages]} msg"),
            DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console, expand=False)
        self._overall = self._bars.add_task("all", total=0, done=0, messages=0)
        self._folder = self._bars.add_task("", total=0, visible=False, done=0, messages=0)

    def start_folder(self, account: str, folder: str, messages: int, size: int) -> None:
        self._bars.start()
        overall = self._bars.tasks[self._overall]
        self._bars.update(self._overall, total=(overall.total or 0) + size,
                          messages=overall.fields["messages"] + messages)
        label = f"{account}/{folder}"
        self._bars.reset(self._folder, total=size, visible=True, done=0, messages=messages,
                         description=label if len(label) <= 24 else label[:23] + "…")

    def advance(self, messages: int, size: int) -> None:
        for task in (self._overall, self._folder):
            self._bars.update(task, advance=size, done=self._bars.tasks[task].fields["done"] + messages)

    def end_folder(self) -> None:
        self._bars.update(self._folder, visible=False)

    def close(self) -> None:
        """Leave the last picture on the screen and give the line back to the shell."""
        self._bars.stop()
