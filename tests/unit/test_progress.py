"""The terminal bars: one overall bar with messages, bytes, rate and time left, the
current folder's bar under it, and no line wider than the terminal (a wrapped line is
what left half-lines behind at every redraw)."""

from __future__ import annotations

import io
import re

from mailsyncd.progress import TerminalProgress

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_bars_fit_an_80_column_terminal_with_an_overall_total() -> None:
    out = io.StringIO()
    bars = TerminalProgress(out, width=80)
    bars.start_folder("personal", "Archive/2024/a-folder-with-a-rather-long-name", 1200, 80_000_000)
    for _ in range(10):
        bars.advance(50, 3_000_000)
    screen = [line for line in re.split(r"[\r\n]", _CONTROL.sub("", out.getvalue())) if line.strip()]
    bars.end_folder()
    bars.start_folder("personal", "INBOX", 30, 1_000_000)
    bars.advance(30, 1_000_000)
    bars.end_folder()
    bars.close()
    screen += [line for line in re.split(r"[\r\n]", _CONTROL.sub("", out.getvalue())) if line.strip()]
    assert max(len(line) for line in screen) <= 80
    overall = [line for line in screen if line.startswith("all ")]
    assert overall and "/1230 msg" in overall[-1] and "MiB" in overall[-1]
    assert re.search(r"\d+:\d\d:\d\d|-:--:--", overall[-1])  # time left
    assert any(line.startswith("personal/Archive/2024/") for line in screen)  # the folder, under it
