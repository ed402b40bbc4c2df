"""TLS and connection failures against the real server, each in one line that names the
cause and what to change, for IMAP and POP3 alike."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import DovecotUser
from tests.helpers import run_cli, write_config
from tests.integration.test_cli import one_error_line
from tests.proxy import CutProxy


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_certificate_for_other_names_says_so_and_which_names_it_holds(
        tmp_path: Path, dovecot: DovecotUser, protocol: str) -> None:
    server = dovecot.server
    port = server.imaps_port if protocol == "imap" else server.pop3s_port
    with CutProxy(server.host, port, listen_host="127.0.0.2") as proxy:
        config = write_config(tmp_path, server, dovecot.user, dovecot.password, protocol=protocol)
        config.write_text(config.read_text().replace(f'host = "{server.host}"', 'host = "127.0.0.2"')
                          .replace(f"port = {port}", f"port = {proxy.port}"))
        result = run_cli(config, "sync")
    line = one_error_line(result)
    assert result.returncode == 1
    assert "not valid for the name '127.0.0.2'" in line and "127.0.0.1" in line, line
    assert "tls_ca_file" not in line


@pytest.mark.parametrize(("protocol", "tls_port"), [("imap", 993), ("pop3", 995)])
def test_tls_spoken_to_a_plain_port_says_the_port_does_not_speak_tls(
        tmp_path: Path, dovecot: DovecotUser, protocol: str, tls_port: int) -> None:
    server = dovecot.server
    port, plain = ((server.imaps_port, server.imap_port) if protocol == "imap"
                   else (server.pop3s_port, server.pop3_port))
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, protocol=protocol)
    config.write_text(config.read_text().replace(f"port = {port}", f"port = {plain}"))
    result = run_cli(config, "sync")
    line = one_error_line(result)
    assert result.returncode == 1
    assert f"port {plain} does not speak TLS; use security = starttls or port {tls_port}" in line, line


def test_a_missing_tls_ca_file_is_a_config_error_naming_the_key(tmp_path: Path, dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    config.write_text(config.read_text().replace(str(dovecot.server.ca_file), str(tmp_path / "no-ca.pem")))
    result = run_cli(config, "check")
    line = one_error_line(result)
    assert result.returncode == 2
    assert 'account "acct".tls_ca_file' in line and "no-ca.pem" in line, line


def test_a_refused_connection_names_host_and_port(tmp_path: Path, dovecot: DovecotUser) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    config.write_text(config.read_text().replace(f"port = {dovecot.server.imaps_port}", f"port = {port}"))
    result = run_cli(config, "sync")
    line = one_error_line(result)
    assert result.returncode == 1
    assert f"127.0.0.1 port {port} refused the connection" in line, line
