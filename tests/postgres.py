"""A private PostgreSQL 15 cluster for the test session, as the suite runs its own Dovecot.

``initdb`` into a temporary directory owned by the ``postgres`` system user (PostgreSQL
refuses to run as root), ``pg_ctl start`` on a free loopback port with the Unix socket in
that directory, trust authentication on loopback only. Each test gets a database of its
own, so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path("/usr/lib/postgresql/15/bin")
_numbers = itertools.count(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresCluster:
    directory: Path
    port: int
    user: str = "mailsyncd"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check, timeout=60)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run([str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database,
                               "-c", sql], capture_output=True, text=True, check=True, timeout=60)
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        name = f"test{os.getpid()}_{next(_numbers)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def start(self) -> None:
        self._as_owner(str(BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                       str(self.directory / "log"), "-w", "-t", "60", "-o",
                       f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
                       "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_owner(str(BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-m", mode, "-w", "stop",
                       check=False)


@contextlib.contextmanager
def private_cluster() -> Iterator[PostgresCluster]:
    if not (BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed; run scripts/test, which installs it", pytrace=False)
    directory = Path(tempfile.mkdtemp(prefix="mailsyncd-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    cluster = PostgresCluster(directory, _free_port())
    try:
        cluster._as_owner(str(BIN / "initdb"), "-D", str(directory / "data"), "-U", cluster.user,
                          "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
