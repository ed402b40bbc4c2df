"""A timer runs ``mailsyncd sync`` as a whole process, so what it imports is part of every
run's cost: the POP3, mbox and two-way code is imported only by the runs that use it."""

from __future__ import annotations

import subprocess
import sys

LAZY = ("mailsyncd.sources.pop3", "poplib", "mailsyncd.sync.pop", "mailsyncd.stores.mbox",
        "mailsyncd.sync.twoway_run", "mailsyncd.sync.twoway")


def test_the_command_line_does_not_import_what_only_some_runs_use() -> None:
    probe = f"import sys, mailsyncd.cli; print([name for name in {LAZY!r} if name in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
