"""Two-way round: mailsyncd (mode = "sync") against mbsync (Sync All) on the same changes.

Each tool gets its own account on one private Dovecot, filled with the same messages,
and a first sync. Then the same local changes are made in both Maildirs (flag changes,
deletions, new messages, moves between folders, chosen by Message-ID), and one pass of
each tool is timed, then a no-op pass (local scan included). The servers must end the
same: per folder, the same Message-IDs with the same flags.

    .venv/bin/python bench/twoway.py --messages 20000 --folders 20
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server_helpers import DevServer

MBSYNC = "/usr/bin/mbsync"
ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE)


def message(number: int, folder: str, rng: random.Random) -> bytes:
    body = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(500, 4000)))
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: {folder} {number}\r\n"
            f"Message-ID: <{number}.{folder}@bench>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n"
            f"{body}\r\n").encode()


def mailsyncd_config(root: Path, server: DevServer, user: str) -> list[str]:
    config = root / "config.toml"
    config.write_text(f'[general]\nstate = "{root / "state.db"}"\n' + server.account_toml(
        user, root / "store", name="bench", extra='mode = "sync"\nexclude = ["Drafts", "Junk", "Sent", "Trash"]\n'
        'max_deletions = "500"', store_extra='layout = "fs"'))
    config.chmod(0o600)
    return [sys.executable, "-m", "mailsyncd", "--config", str(config), "-q", "sync"]


def mbsync_config(root: Path, server: DevServer, user: str) -> list[str]:
    (root / "store").mkdir()
    (root / "state").mkdir()
    config = root / "mbsyncrc"
    config.write_text(f"""IMAPAccount far
Host localhost
Port {server.imaps_port}
User {user}
Pass {user}-pw
SSLType IMAPS
CertificateFile {server.ca_file}
SystemCertificates no

IMAPStore far
Account far

MaildirStore near
Path {root / 'store'}/
Inbox {root / 'store'}/INBOX
SubFolders Verbatim

Channel bench
Far :far:
Near :near:
Patterns * !Drafts !Junk !Sent !Trash
Sync All
Create Both
Expunge Both
SyncState {root / 'state'}/
""")
    config.chmod(0o600)
    return [MBSYNC, "-c", str(config), "-q", "-a"]


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"{argv[0]} failed: {done.stderr[-2000:]}")
    return time.monotonic() - started


def files_by_id(store: Path) -> dict[bytes, Path]:
    found = {}
    for path in store.rglob("*"):
        if path.is_file() and path.parent.name in ("cur", "new"):
            match = ID.search(path.read_bytes()[:400])
            if match:
                found[match.group(1)] = path
    return found


def change(store: Path, folders: list[str], seed: int) -> None:
    """200 flag changes, 50 deletions, 20 new messages and 5 moves, the same for every
    tool: chosen by Message-ID from a seeded random order."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible choice of changes, not a secret
    files = files_by_id(store)
    ids = sorted(files)
    rng.shuffle(ids)
    for message_id in ids[:200]:
        path = files[message_id]
        base, _, letters = path.name.partition(":2,")
        letters = "".join(sorted(set(letters) ^ {"S"}))
        path.rename(path.parent.parent / "cur" / f"{base}:2,{letters}")
    files = files_by_id(store)
    for message_id in ids[200:250]:
        files[message_id].unlink()
    for number in range(20):
        (store / folders[0] / "cur" / f"1700000000.new{number}.bench:2,S").write_bytes(
            message(900000 + number, folders[0], rng).replace(b"\r\n", b"\n"))
    for message_id in [i for i in ids[250:] if files[i].parent.parent.name == folders[1]][:5]:
        path = files[message_id]
        # Without mbsync's ",U=<uid>" (which a moved file must lose, or mbsync stops
        # with "duplicate UID"); mailsyncd's names carry none.
        path.rename(store / folders[2] / path.parent.name / re.sub(r",U=\d+", "", path.name))


def server_state(server: DevServer, user: str, folders: list[str]) -> dict[str, dict[bytes, frozenset[str]]]:
    state = {}
    for folder in folders:
        bodies = server.fetch_all(user, folder)
        flags = server.flags(user, folder)
        state[folder] = {ID.search(body).group(1): frozenset(flags[uid] - {"\\Recent"})  # type: ignore[union-attr]
                         for uid, body in bodies.items() if not {"\\Deleted"} & flags[uid]}
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--folders", type=int, default=5)
    args = parser.parse_args()
    folders = ["INBOX"] + [f"Folder{index:02d}" for index in range(1, args.folders)]
    with tempfile.TemporaryDirectory(prefix="twoway-bench-") as temp, DevServer(Path(temp) / "dovecot",
                                                                                  users=()) as server:
        rng = random.Random(1)  # noqa: S311 - reproducible message bodies
        messages = {folder: [message(n, folder, rng) for n in range(args.messages // args.folders)]
                    for folder in folders}
        tools = {}
        for tool, configure in (("mailsyncd", mailsyncd_config), ("mbsync", mbsync_config)):
            server.add_user(tool, f"{tool}-pw")
            for folder in folders:
                if folder != "INBOX":
                    server.create_folder(tool, folder)
                server.append_many(tool, folder, messages[folder])
            root = Path(temp) / tool
            root.mkdir()
            tools[tool] = (root, configure(root, server, tool))
        results = {}
        for tool, (root, argv) in tools.items():
            first = timed(argv)
            change(root / "store", folders, seed=7)
            push = timed(argv)
            noop = timed(argv)
            results[tool] = (first, push, noop)
            print(f"{tool}: first sync {first:.2f} s, pass with changes {push:.2f} s, no-op pass {noop:.2f} s",
                  flush=True)
        same = server_state(server, "mailsyncd", folders) == server_state(server, "mbsync", folders)
        print(f"{args.messages} messages in {args.folders} folders; same end state on the server: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
