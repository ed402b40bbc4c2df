"""PURE: the SASL messages that carry an OAuth2 bearer token, for IMAP and POP3 alike.

XOAUTH2 is Google's mechanism (also Microsoft's): ``user=U^Aauth=Bearer T^A^A``.
OAUTHBEARER is RFC 7628's: a GS2 header naming the user, then host, port and the same
``auth=`` field. When the server refuses the token, both send one more challenge, a
base64 JSON error, and wait for the client's answer before their final NO or -ERR: an
empty response for XOAUTH2, a single ^A for OAUTHBEARER (RFC 7628 section 3.2.3). A
client that sends the token again there, as imaplib would by calling its callback
twice, gets a protocol error instead of the server's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]
MECHANISMS: tuple[Mechanism, ...] = ("XOAUTH2", "OAUTHBEARER")

_SEPARATOR = "\x01"
AFTER_ERROR: dict[Mechanism, bytes] = {"XOAUTH2": b"", "OAUTHBEARER": _SEPARATOR.encode()}


def initial_response(mechanism: Mechanism, user: str, token: str, host: str, port: int) -> bytes:
    """The client's first message, not yet base64-encoded."""
    if mechanism == "XOAUTH2":
        return f"user={user}{_SEPARATOR}auth=Bearer {token}{_SEPARATOR}{_SEPARATOR}".encode()
    # RFC 5801: "=" and "," in the authorization identity are escaped as =3D and =2C.
    identity = user.replace("=", "=3D").replace(",", "=2C")
    return (f"n,a={identity},{_SEPARATOR}host={host}{_SEPARATOR}port={port}{_SEPARATOR}"
            f"auth=Bearer {token}{_SEPARATOR}{_SEPARATOR}").encode()


def choose(offered: Callable[[Mechanism], bool], wanted: str) -> Mechanism:
    """The mechanism to use: the configured one, or with "auto" XOAUTH2 where offered (the
    one Google and Microsoft both speak), else OAUTHBEARER where offered, else XOAUTH2."""
    if wanted != "auto":
        return "OAUTHBEARER" if wanted == "oauthbearer" else "XOAUTH2"
    return next((mechanism for mechanism in MECHANISMS if offered(mechanism)), "XOAUTH2")


def responder(first: bytes, mechanism: Mechanism) -> Callable[[bytes], bytes]:
    """A SASL callback: ``first`` to the server's first (empty) challenge, and to any
    later one, which can only be the error challenge, the answer that ends the exchange."""
    sent = False

    def respond(_challenge: bytes) -> bytes:
        nonlocal sent
        if sent:
            return AFTER_ERROR[mechanism]
        sent = True
        return first

    return respond
