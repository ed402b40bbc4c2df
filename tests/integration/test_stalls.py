"""A server that trickles bytes must not hold a sync forever: no progress for
progress_timeout, or a run longer than timeout, ends the account's run in one line,
and the next run carries on from where it stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import DovecotUser
from tests.helpers import run_cli, write_config
from tests.integration.test_cli import one_error_line
from tests.proxy import CutProxy

BODY = b"".join(b"line %06d of a message large enough to need many packets\r\n" % n for n in range(4000))


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize(("keys", "said"), [
    ('progress_timeout = "2s"', "made no progress for 2 s (progress_timeout)"),
    ('progress_timeout = "1h"\ntimeout = "4s"', "the run took longer than its timeout"),
])
def test_a_trickling_server_ends_the_run_in_one_line_and_the_next_run_goes_on(
        tmp_path: Path, dovecot: DovecotUser, keys: str, said: str, protocol: str) -> None:
    server = dovecot.server
    server.append_many(dovecot.user, "INBOX", [b"Subject: big %d\r\n\r\n" % n + BODY for n in range(3)])
    tls_port, plain_port = ((server.imaps_port, server.imap_port) if protocol == "imap"
                            else (server.pop3s_port, server.pop3_port))
    with CutProxy(server.host, plain_port) as proxy:
        config = write_config(tmp_path, server, dovecot.user, dovecot.password, protocol=protocol, extra=keys)
        config.write_text(config.read_text().replace(
            f"port = {tls_port}", f'port = {proxy.port}\nsecurity = "plain"\nallow_plaintext = true'))
        # Login, listing and metadata pass at full speed; the bodies come at 64 bytes/s.
        proxy.trickle_after_bytes(30_000, 64)
        started = time.monotonic()
        result = run_cli(config, "-q", "sync", timeout=60)
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - started < 30
        assert said in one_error_line(result)
        proxy.reset()
        result = run_cli(config, "sync", timeout=60)
        assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "store-acct" / "new").iterdir())) == 3
