"""Accounts per hour with N mailsyncd processes sharing one PostgreSQL state.

Starts a private Dovecot and a private PostgreSQL 15 cluster (as the tests do), makes
ACCOUNTS users with MESSAGES messages each, then for each N runs N `mailsyncd sync`
processes at once over every account (each starting at a different account, so they
meet only at the end), first on empty stores (first sync), then again (no-op). Accounts
held by another process are skipped by the leases, so the wall time until the last
process exits is what N processes need for every account once.

    .venv/bin/python bench/shared_state.py --accounts 40 --messages 200 --processes 1,2,4
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mailsyncd.testing import DovecotServer  # noqa: E402
from tests.postgres import private_cluster  # noqa: E402


def config(directory: Path, url: str, server: DovecotServer, users: list[str], password: str, node: str) -> Path:
    accounts = "".join(f"""
[[account]]
name = "{user}"
protocol = "imap"
host = "{server.host}"
port = {server.imaps_port}
tls_ca_file = "{server.ca_file}"
username = "{user}"
password = "{password}"

[account.store]
format = "maildir"
path = "{directory / 'stores' / '{account}'}"
""" for user in users)
    path = directory / f"config-{node}.toml"
    path.write_text(f'[general]\nstate = "{url}"\nnode = "{node}"\n' + accounts)
    path.chmod(0o600)
    return path


def timed_round(configs: list[Path]) -> float:
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(path), "-q", "sync"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for path in configs]
    codes = [process.wait() for process in processes]
    elapsed = time.monotonic() - started
    assert codes == [0] * len(codes), codes
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--processes", default="1,2,4")
    args = parser.parse_args()
    corpus = sorted(path for path in (REPO / "tests" / "corpus" / "messages").rglob("*") if path.is_file())
    password = secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory(prefix="mailsyncd-scale-", dir="/var/tmp") as work, \
            DovecotServer(Path(work) / "dovecot", users=()) as server, private_cluster() as cluster:
        users = [f"scale{index:03d}" for index in range(args.accounts)]
        for index, user in enumerate(users):
            server.add_user(user, password)
            bodies = [corpus[(index * 7 + number) % len(corpus)].read_bytes() for number in range(args.messages)]
            server.append_many(user, "INBOX", bodies)
        print(f"{args.accounts} accounts x {args.messages} messages; cores: {os.cpu_count()}")
        print("| processes | first sync (s) | accounts/h | no-op (s) | accounts/h |")
        print("|---|---|---|---|---|")
        for count in (int(part) for part in args.processes.split(",")):
            directory = Path(work) / f"n{count}"
            directory.mkdir()
            url = cluster.new_database()
            configs = []
            for node in range(count):
                offset = node * len(users) // count
                configs.append(config(directory, url, server, users[offset:] + users[:offset], password, f"n{node}"))
            subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(configs[0]), "db", "upgrade"],
                           cwd=REPO, check=True, capture_output=True)
            first = timed_round(configs)
            noop = timed_round(configs)
            print(f"| {count} | {first:.1f} | {args.accounts * 3600 / first:.0f} | {noop:.1f} | "
                  f"{args.accounts * 3600 / noop:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
