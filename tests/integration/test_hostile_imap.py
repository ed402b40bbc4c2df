"""A hostile IMAP server: folder names that are not modified UTF-7, absurd and lying sizes.
Each fault ends in one clear line at most, the rest of the account syncs, and the next
run behaves the same (nothing is stopped for good)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from tests.helpers import run_cli, sync
from tests.hostile_imap import Folder, HostileImap, Message


def message(number: int, size: int = 0) -> Message:
    body = (f"Message-ID: <m{number}@hostile.test>\r\nSubject: number {number}\r\n\r\n".encode()
            + b"x" * size + b"\r\n")
    return Message(body)


def config(directory: Path, port: int, extra: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(f"""
[general]
state = "{directory / 'state.db'}"

[[account]]
name = "hostile"
protocol = "imap"
host = "127.0.0.1"
port = {port}
security = "plain"
allow_plaintext = true
username = "me"
password = "pw"
{extra}

[account.store]
format = "maildir"
path = "{directory / 'store'}"
layout = "fs"
""")
    path.chmod(0o600)
    return path


def stored(directory: Path) -> list[str]:
    """Relative paths of the messages in the store, without their unique names."""
    return sorted(str(path.parent.parent.relative_to(directory / "store"))
                  for path in (directory / "store").rglob("*") if path.parent.name in ("new", "cur")
                  and path.is_file())


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if " ERROR " in line or "error" in line.lower()]


def test_a_folder_name_that_is_not_modified_utf7_is_synced_and_does_not_stop_the_others(tmp_path: Path) -> None:
    folders = {b"INBOX": Folder({1: message(1)}), b"&&&-bad": Folder({1: message(2), 2: message(3)}),
               b"Other": Folder({1: message(4)})}
    with HostileImap(folders) as server:
        path = config(tmp_path, server.port)
        for _ in range(2):
            result = run_cli(path, "sync")
            assert result.returncode == 0, result.stderr
            assert "'&&&-bad'" in result.stderr and "not valid modified UTF-7" in result.stderr
            assert stored(tmp_path) == ["&&&-bad", "&&&-bad", "INBOX", "Other"]


def test_a_bad_folder_name_that_would_take_another_folders_name_is_skipped_with_one_line(tmp_path: Path) -> None:
    # "&-&-&--bad" is the valid spelling of "&&&-bad", the name the bad one would go by.
    folders = {b"&&&-bad": Folder({1: message(1)}), b"&-&-&--bad": Folder({1: message(2)})}
    with HostileImap(folders) as server:
        result = run_cli(config(tmp_path, server.port), "sync")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "not valid modified UTF-7" in line]
    assert len(lines) == 1 and lines[0].endswith("cannot be kept apart from the others; skipped"), result.stderr
    assert stored(tmp_path) == ["&&&-bad"]
    [kept] = [path for path in (tmp_path / "store").rglob("*") if path.parent.name == "new"]
    assert b"<m2@hostile.test>" in kept.read_bytes()


def test_an_absurd_announced_size_is_skipped_and_reported(tmp_path: Path) -> None:
    huge = message(2)
    huge.announced = 2 ** 70
    with HostileImap({b"INBOX": Folder({1: message(1), 2: huge, 3: message(3)})}) as server:
        path = config(tmp_path, server.port, 'max_message_size = "1MB"')
        for _ in range(2):
            result = run_cli(path, "sync")
            assert result.returncode == 0, result.stderr
            assert "OverflowError" not in result.stderr
            assert len(stored(tmp_path)) == 2


def test_a_literal_larger_than_announced_is_refused_on_arrival(tmp_path: Path) -> None:
    liar = message(2, size=3 * 1024 * 1024)
    liar.announced = 100
    with HostileImap({b"INBOX": Folder({1: message(1), 2: liar, 3: message(3)}),
                      b"Other": Folder({1: message(4)})}) as server:
        path = config(tmp_path, server.port, 'max_message_size = "1MB"')
        for _ in range(2):
            result = run_cli(path, "sync")
            assert result.returncode == 1, result.stderr
            lines = error_lines(result)
            assert len(lines) == 1 and "UID 2" in lines[0] and "max_message_size" in lines[0], result.stderr
            assert stored(tmp_path) == ["INBOX", "INBOX", "Other"]


def test_a_literal_announced_as_huge_allocates_nothing_and_ends_in_one_line(tmp_path: Path) -> None:
    liar = message(2)
    liar.literal = b"{99999999999}\r\nFrom: nobody\r\n"
    with HostileImap({b"INBOX": Folder({1: message(1), 2: liar})}) as server:
        path = config(tmp_path, server.port)
        for _ in range(2):
            result = run_cli(path, "sync")
            assert result.returncode == 1, result.stderr
            assert "MemoryError" not in result.stderr
            lines = error_lines(result)
            assert len(lines) == 1 and "announced a message of 99999999999 bytes" in lines[0], result.stderr


def test_a_long_answer_from_the_server_is_cut_in_the_error_line(tmp_path: Path) -> None:
    folders = {b"INBOX": Folder({1: message(1)}), b"Refused": Folder(refusal=b"[SERVERBUG] " + b"blah " * 2000)}
    with HostileImap(folders) as server:
        result = run_cli(config(tmp_path, server.port), "sync")
    assert result.returncode == 1, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and "[SERVERBUG] blah" in lines[0] and len(lines[0]) < 400, result.stderr
    assert stored(tmp_path) == ["INBOX"]


def test_a_server_that_does_not_say_uidnext_keeps_the_folder_incremental(tmp_path: Path) -> None:
    """Without UIDNEXT in EXAMINE's answer, a run that finds nothing new must not record
    a UIDNEXT below the last one: the next run would list the folder from UID 1 again."""
    inbox = Folder({1: message(1), 2: message(2)}, uidnext=False)
    with HostileImap({b"INBOX": inbox}) as server:
        path = config(tmp_path, server.port)
        recorded = []
        for more in (0, 0, 3, 0):
            if more:
                inbox.messages[more] = message(more)
            assert sync(path) == 0
            db = sqlite3.connect(tmp_path / "state.db")
            recorded += [uidnext for (uidnext,) in db.execute("select uidnext from folders where name = 'INBOX'")]
            db.close()
        assert recorded == [3, 3, 4, 4]
        assert stored(tmp_path) == ["INBOX"] * 3
