"""Folder names -> relative store paths that cannot escape the store root.

Server folder names are untrusted: they may hold ``..``, ``/``, control characters,
NUL-like code points or be hundreds of bytes long. Each hierarchy component is
percent-escaped so that the mapping is injective (two folders never share a path) and,
but for over-long names, reversible. Over-long components keep a readable prefix and
gain a digest of the whole name after a ``%~`` marker, which no escaped name contains.
The state database records every folder's path, so the digest form needs no reversal.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Literal

Layout = Literal["maildir++", "fs", "mbox"]

# A path component longer than this is shortened; 255 is the usual NAME_MAX, and the
# Maildir++ dot prefix, mbox ".sbd" suffix and a little slack must fit under it.
MAX_COMPONENT_BYTES = 200
MBOX_CHILDREN_SUFFIX = ".sbd"  # Thunderbird's convention for an mbox folder's children


def _must_escape(char: str, layout: Layout, first: bool) -> bool:
    if char in "%/\\":
        return True
    if char == "." and (layout != "fs" or first):
        # Maildir++ and our mbox layout use "." themselves; in "fs" only a leading dot
        # (hidden files, "." and "..") needs it.
        return True
    if char == ":" and layout != "mbox":
        return True  # the Maildir info separator
    return unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def escape_component(component: str, layout: Layout) -> str:
    """Escape one hierarchy level; the empty name becomes a lone ``%``."""
    if not component:
        return "%"
    out = []
    for index, char in enumerate(component):
        if _must_escape(char, layout, index == 0):
            out.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
        else:
            out.append(char)
    return _shorten("".join(out))


def _shorten(component: str) -> str:
    raw = component.encode("utf-8")
    if len(raw) <= MAX_COMPONENT_BYTES:
        return component
    digest = hashlib.sha256(raw).hexdigest()[:16]
    prefix = raw[: MAX_COMPONENT_BYTES - 20].decode("utf-8", "ignore")
    # Cutting inside an escape would leave a dangling "%4"; drop it.
    cut = prefix.rfind("%")
    if cut >= len(prefix) - 2:
        prefix = prefix[:cut]
    return f"{prefix}%~{digest}"


def unescape_component(component: str) -> str:
    """Inverse of escape_component for names that were not shortened."""
    if component == "%":
        return ""
    if "%~" in component:
        raise ValueError(f"shortened folder name cannot be reversed: {component!r}")
    return bytes(_unescape_bytes(component)).decode("utf-8", "surrogatepass")


def _unescape_bytes(component: str) -> bytearray:
    out = bytearray()
    index = 0
    while index < len(component):
        char = component[index]
        if char == "%":
            out.append(int(component[index + 1 : index + 3], 16))
            index += 3
        else:
            out += char.encode("utf-8")
            index += 1
    return out


def split_name(name: str, delimiter: str | None) -> list[str]:
    return name.split(delimiter) if delimiter else [name]


def is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def folder_path(name: str, delimiter: str | None, layout: Layout) -> str:
    """The relative path of a folder in a store of the given layout.

    Maildir++: INBOX is the root (``""``), other folders are ``.A.B`` directories.
    fs: nested directories, INBOX is ``INBOX``. mbox: a file per folder, a folder's
    children in the directory ``<name>.sbd``. The result never starts with ``/`` and
    never contains a ``.`` or ``..`` component.
    """
    parts = ["INBOX"] if is_inbox(name) else split_name(name, delimiter)
    if layout == "maildir++":
        if is_inbox(name):
            return ""
        return _shorten("." + ".".join(escape_component(part, layout) for part in parts))
    escaped = [escape_component(part, layout) for part in parts]
    if layout == "mbox":
        escaped = [part + MBOX_CHILDREN_SUFFIX for part in escaped[:-1]] + escaped[-1:]
    return "/".join(escaped)



def folder_name(path: str, delimiter: str | None, layout: Layout) -> str | None:
    """The folder name a Maildir path stands for (the inverse of ``folder_path``), or None
    when the path is not one ``folder_path`` makes (a shortened name, a stray directory)."""
    if layout == "maildir++":
        if not path.startswith(".") or "/" in path:
            return None
        parts = path[1:].split(".")
    elif layout == "fs":
        parts = path.split("/")
    else:
        return None
    try:
        components = [unescape_component(part) for part in parts]
    except (ValueError, UnicodeDecodeError):
        return None
    if len(components) > 1 and not delimiter:
        return None
    name = (delimiter or "").join(components)
    return name if folder_path(name, delimiter, layout) == path else None
