"""Logging set-up and secret redaction.

Under systemd (JOURNAL_STREAM is set) the journal adds timestamps itself, so lines carry
a syslog priority prefix, the level and the message; elsewhere they get a local timestamp
with its UTC offset. Every password that
``secrets.password_for`` resolved is scrubbed from every record, as a last line of defence
behind the rule that no code logs one (invariant 8).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from mailsyncd.secrets import redact


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JournalFormatter(logging.Formatter):
    """A syslog priority prefix (``<3>`` for errors) that journald reads from a service's
    stderr, so that ``journalctl -p err`` finds the errors; the journal adds the time."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((code for level, code in self.PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{super().format(record)}"


def setup(level: str = "info", verbose: bool = False, quiet: bool = False, stream: TextIO | None = None,
          trace: bool = False) -> None:
    """``trace`` adds the protocol trace (``-vv``) to the debug lines of ``verbose``."""
    name = "DEBUG" if verbose else "WARNING" if quiet else level.upper()
    logging.getLogger("mailsyncd.trace").setLevel(logging.DEBUG if trace else logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:  # local time with its UTC offset, as `status` shows times
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S%z"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mailsyncd").setLevel(name)
