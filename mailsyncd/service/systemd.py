"""Talking to systemd: sd_notify status lines and the watchdog's heartbeat period."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(*fields: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send sd_notify fields ("READY=1", "STATUS=...") to $NOTIFY_SOCKET.

    A path or an abstract socket ("@name"). Does nothing without $NOTIFY_SOCKET and never
    raises: a lost status line must not stop mail. True when the datagram was sent.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a kind we do not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as error:
        log.debug("sd_notify to %s failed: %s", environ["NOTIFY_SOCKET"], error)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 heartbeats (half of $WATCHDOG_USEC, as sd_watchdog_enabled
    advises), or None when systemd asked this process for none."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
