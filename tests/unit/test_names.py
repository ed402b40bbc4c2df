"""Folder name -> path: injective, reversible, and unable to leave the store root."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsyncd.errors import UnsafePath
from mailsyncd.fsio import safe_join
from mailsyncd.names import (
    MAX_COMPONENT_BYTES,
    Layout,
    escape_component,
    folder_name,
    folder_path,
    unescape_component,
)

LAYOUTS: list[Layout] = ["maildir++", "fs", "mbox"]
NAMES = st.text(st.characters(codec="utf-8"), max_size=40)
HOSTILE = ["..", ".", "../x", "a/../../b", "/etc/passwd", "a\x00b", "tab\there", "new\nline", "\x7f", "\u202e",
           "x" * 300, "é" * 200, ".hidden", "a:b", "%2E%2E", "INBOX/..", "-", "a\\b", "\ud800".encode(
               "utf-8", "surrogatepass").decode("utf-8", "surrogatepass")]


@given(component=NAMES, layout=st.sampled_from(LAYOUTS))
def test_escape_is_reversible_for_names_that_fit(component: str, layout: Layout) -> None:
    escaped = escape_component(component, layout)
    if "%~" not in escaped:
        assert unescape_component(escaped) == component


@given(a=NAMES, b=NAMES, layout=st.sampled_from(LAYOUTS))
def test_distinct_folders_never_share_a_path(a: str, b: str, layout: Layout) -> None:
    if a != b and not (a.upper() == "INBOX" and b.upper() == "INBOX"):
        assert folder_path(a, "/", layout) != folder_path(b, "/", layout)


@given(name=NAMES, layout=st.sampled_from(LAYOUTS), delimiter=st.sampled_from(["/", ".", None]))
def test_paths_have_no_traversal_and_fit_name_max(name: str, layout: Layout, delimiter: str | None) -> None:
    path = folder_path(name, delimiter, layout)
    parts = path.split("/") if path else []
    assert not path.startswith("/")
    assert all(part not in ("", ".", "..") for part in parts)
    assert all(len(part.encode()) <= MAX_COMPONENT_BYTES + 10 for part in parts)
    assert all(ord(char) >= 0x20 and char != "\x7f" for char in path)


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hostile_names_stay_under_the_root(tmp_path: Path, name: str, layout: Layout) -> None:
    root = tmp_path / "store"
    root.mkdir()
    target = safe_join(root, folder_path(name, "/", layout))
    target.mkdir(parents=True, exist_ok=True)
    assert target.resolve().is_relative_to(root.resolve())
    assert {p.name for p in tmp_path.iterdir()} == {"store"}


def test_layouts_look_like_what_mail_readers_expect() -> None:
    assert folder_path("INBOX", "/", "maildir++") == ""
    assert folder_path("Archive/2024", "/", "maildir++") == ".Archive.2024"
    assert folder_path("Archive/2024", "/", "fs") == "Archive/2024"
    assert folder_path("Archive/2024", "/", "mbox") == "Archive.sbd/2024"
    assert folder_path("Entwürfe", "/", "maildir++") == ".Entwürfe"
    assert folder_path("lists.debian", "/", "maildir++") == ".lists%2Edebian"


@pytest.mark.parametrize("relative", ["../x", "/abs", "a/../../b", "a\x00b", "."])
def test_safe_join_refuses_escapes(tmp_path: Path, relative: str) -> None:
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, relative)


def test_safe_join_refuses_a_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        safe_join(tmp_path / "root", "link/x")


@pytest.mark.parametrize(("name", "delimiter", "layout", "path"), [
    ("a/b", ".", "maildir++", ".a%2Fb"),
    ("a/b", ".", "fs", "a%2Fb"),
    ("a/b", ".", "mbox", "a%2Fb"),
    ("x/y/z", None, "fs", "x%2Fy%2Fz"),
    ("x/y/z", None, "mbox", "x%2Fy%2Fz"),
    ("../etc", None, "fs", "%2E.%2Fetc"),
    ("Work.a/b", ".", "fs", "Work/a%2Fb"),
])
def test_a_slash_inside_one_level_never_makes_a_directory(name: str, delimiter: str | None, layout: Layout,
                                                           path: str) -> None:
    """A server whose delimiter is not "/" may put "/" inside a name: it is one level,
    so it must not turn into a nested directory (or a way out of the folder)."""
    assert folder_path(name, delimiter, layout) == path


@pytest.mark.parametrize("layout", ["maildir++", "fs"])
@pytest.mark.parametrize("name", ["Archive", "Lists/Python", "a.b/c:d", "Entwürfe/ü", "%/x"])
def test_a_local_folder_path_names_its_folder_again(name: str, layout: Layout) -> None:
    path = folder_path(name, "/", layout)
    assert folder_name(path, "/", layout) == name


def test_paths_no_folder_makes_have_no_name() -> None:
    assert folder_name(".notmuch/x", "/", "maildir++") is None
    assert folder_name("plain", "/", "maildir++") is None
    assert folder_name("." + "x" * 190 + "%~0123456789abcdef", "/", "maildir++") is None
