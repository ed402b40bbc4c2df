"""`mailsyncd example-config` and `mailsyncd systemd-units` hand out the files of config/ and systemd/."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsyncd import cli
from tests.helpers import REPO


def test_example_config_prints_the_file_that_load_config_is_tested_on(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["example-config"]) == 0
    assert capsys.readouterr().out == (REPO / "config" / "mailsyncd.example.toml").read_text()


def test_units_install_over_an_older_copy_and_leave_drop_ins_alone(tmp_path: Path) -> None:
    target = tmp_path / "systemd" / "user"
    drop_in = target / "mailsyncd.service.d" / "override.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[Service]\nExecStart=\nExecStart=/opt/mailsyncd run\n")
    (target / "mailsyncd.service").write_text("an older unit\n")
    assert cli.main(["systemd-units", "--user", "--install", str(target)]) == 0
    assert (target / "mailsyncd.service").read_text() == (REPO / "systemd" / "mailsyncd-user.service").read_text()
    assert (target / "mailsyncd.service").stat().st_mode & 0o777 == 0o644
    assert drop_in.read_text().endswith("/opt/mailsyncd run\n")


def test_an_impossible_install_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["systemd-units", "--install", str(blocker / "units")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(f"ERROR cannot install the units into {blocker / 'units'}: Not a directory")
