"""Accounts per hour with N mailsyncd daemons sharing one PostgreSQL state.

Starts a private Dovecot and a private PostgreSQL 15 cluster (as the tests do), makes
ACCOUNTS users with MESSAGES messages each, then for each N starts N mailsyncd
daemons (`mailsyncd run`, interval 1 h, so each account runs once at start) and times
how long until every account is synced: first on empty stores (first sync), then,
with every account due again, a no-op round. The time includes the daemons' start (about
a second of Python imports) and the first runs' spread over 2 s.

    .venv/bin/python bench/shared_state.py --accounts 40 --messages 200 --daemons 1,2,4
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, text  # noqa: E402

from mailsyncd.state import db  # noqa: E402
from mailsyncd.testing import DovecotServer  # noqa: E402
from tests.postgres import private_cluster  # noqa: E402


def config(directory: Path, url: str, server: DovecotServer, users: list[str], password: str, node: str) -> Path:
    accounts = "".join(server.account_toml(user, directory / "stores" / "{account}", password=password,
                                           extra='interval = "1h"') for user in users)
    path = directory / f"config-{node}.toml"
    path.write_text(f'[general]\nstate = "{url}"\nnode = "{node}"\n' + accounts)
    path.chmod(0o600)
    return path


def timed_round(configs: list[Path], done: Callable[[], bool]) -> float:
    """Start one `mailsyncd run` per config, wait until ``done``, stop them: the seconds taken."""
    started = time.monotonic()
    daemons = [subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(path), "-q", "run"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for path in configs]
    try:
        while not done():
            time.sleep(0.2)
        return time.monotonic() - started
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(30) for daemon in daemons]
        assert codes == [0] * len(codes), codes


def counter(engine: Engine, sql: str) -> Callable[[], int]:
    def count() -> int:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar_one())
    return count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--daemons", default="1,2,4")
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
        print("| daemons | first sync (s) | accounts/h | no-op (s) | accounts/h | commits per no-op account |")
        print("|---|---|---|---|---|---|")
        for count in (int(part) for part in args.daemons.split(",")):
            directory = Path(work) / f"n{count}"
            directory.mkdir()
            url = cluster.new_database()
            configs = []
            for node in range(count):
                offset = node * len(users) // count
                configs.append(config(directory, url, server, users[offset:] + users[:offset], password, f"n{node}"))
            subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(configs[0]), "db", "upgrade"],
                           cwd=REPO, check=True, capture_output=True)
            engine = db.create(url)
            stored = counter(engine, "SELECT count(*) FROM messages WHERE state = 'stored'")
            runs = counter(engine, "SELECT count(*) FROM sync_runs WHERE finished IS NOT NULL")
            first = timed_round(configs, lambda stored=stored: stored() == args.accounts * args.messages)
            with engine.begin() as connection:  # due again at once: the next start is a no-op round
                connection.execute(text("UPDATE account_leases SET due = NULL"))
            commits = counter(engine, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            before = commits()
            noop = timed_round(configs, lambda runs=runs: runs() >= 2 * args.accounts)
            time.sleep(1)  # the statistics collector reports with a short delay
            per_account = (commits() - before) / args.accounts
            engine.dispose()
            print(f"| {count} | {first:.1f} | {args.accounts * 3600 / first:.0f} | {noop:.1f} | "
                  f"{args.accounts * 3600 / noop:.0f} | {per_account:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
