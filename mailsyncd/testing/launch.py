"""Start a Dovecot master in its own process group, know when it is ready, and stop it for good."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

START_TIMEOUT = 15.0
HOST = "127.0.0.1"
_EXITED = "dovecot exited during startup"


class DovecotError(RuntimeError):
    """The test server could not be started, or a helper command failed."""


def find_dovecot() -> str | None:
    """The dovecot binary, also when /usr/sbin is missing from a normal user's PATH."""
    return shutil.which("dovecot", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out, held open together so that they are distinct."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def _live_members(pgid: int) -> bool:
    """Whether a process group still has a running (not zombie) member, read from Linux /proc.

    Orphaned zombies stay in the group wherever PID 1 does not reap them (containers, CI), so
    ``killpg(pgid, 0)`` alone would report them alive forever.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def log_tail(workdir: Path, log_file: Path, lines: int = 30) -> str:
    """The last lines of this launch's stderr and of the Dovecot log, for error messages."""
    text = ""
    for path in (workdir / "dovecot.stderr", log_file):
        if path.exists():
            text += "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    return text


def launch(
    dovecot: str,
    workdir: Path,
    config_file: Path,
    log_file: Path,
    greeters: Sequence[tuple[int, bool]],
    client_context: Callable[[], ssl.SSLContext],
) -> subprocess.Popen[bytes] | None:
    """Start ``dovecot -F``; the master once every ``(port, tls)`` greets, None on a port clash."""
    run_dir = workdir / "run"
    # Dovecot's anvil delays every login from an IP for up to 15 s after a failed one from it:
    # one wrong-password test would slow all later tests on 127.0.0.1. The auth process
    # quietly does without this penalty if its anvil socket is missing when it starts, and
    # it starts only at the first login, so the socket is unlinked as soon as it appears.
    penalty_socket = run_dir / "anvil-auth-penalty"
    for stale in (run_dir / "master.pid", penalty_socket):
        stale.unlink(missing_ok=True)  # of a SIGKILLed master
    stderr_file = workdir / "dovecot.stderr"  # this launch only; log_path keeps history
    with open(stderr_file, "wb") as stderr:
        # A new session makes the master a group leader: stop() reaches every child by killpg.
        process = subprocess.Popen(
            [dovecot, "-F", "-c", str(config_file)],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
        )
    try:
        failure = _await_greetings(process, penalty_socket, greeters, client_context)
    except BaseException:
        stop(process, run_dir)
        raise
    if failure is None:
        return process
    stop(process, run_dir)
    if failure == _EXITED and "Address already in use" in stderr_file.read_text(errors="replace"):
        return None
    raise DovecotError(f"{failure}:\n{log_tail(workdir, log_file)}")


def _await_greetings(
    process: subprocess.Popen[bytes],
    penalty_socket: Path,
    greeters: Sequence[tuple[int, bool]],
    client_context: Callable[[], ssl.SSLContext],
) -> str | None:
    """None once every port greets, else why not (the master exited, or the time ran out)."""
    deadline = time.monotonic() + START_TIMEOUT
    # A listening port only proves the master bound it. Reading the greeting (through TLS on
    # the TLS ports) proves login processes, auth config and certificate all work.
    waiting = list(greeters)
    penalty: Path | None = penalty_socket
    error: Exception | None = None
    while waiting:
        if process.poll() is not None:
            return _EXITED
        if time.monotonic() > deadline:
            return f"dovecot not ready in {START_TIMEOUT}s ({error})"
        if penalty is not None:
            if penalty.exists():
                penalty.unlink()
                penalty = None
            time.sleep(0.002)
            continue
        try:
            port, tls = waiting[0]
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((HOST, port), timeout=2))
                if tls:
                    sock = stack.enter_context(client_context().wrap_socket(sock, server_hostname=HOST))
                if sock.recv(64).startswith((b"* OK", b"+OK")):
                    waiting.pop(0)
        except OSError as exc:
            error = exc
            time.sleep(0.02)
    return None


def stop(process: subprocess.Popen[bytes], run_dir: Path) -> None:
    """Terminate the master and all its children.

    SIGTERM first, so connected clients get a BYE as from a real server restart. The master
    then sleeps a fixed second for its log process before exiting; once the mail and login
    processes had their moment, the group is SIGKILLed instead of waiting that out.
    """
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=0.3)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is not None and not _live_members(process.pid):
            break  # nothing holds the listening sockets any more; a restart can rebind
        if time.monotonic() > deadline:
            raise DovecotError(f"dovecot process group {process.pid} does not die")
        time.sleep(0.01)
    (run_dir / "master.pid").unlink(missing_ok=True)
