"""The schema's history: migrations build what the models declare, walk down and up,
and ship inside the wheel so `mailsyncd db upgrade` works from any install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from mailsyncd.state import db
from mailsyncd.state.models import metadata

REPO = Path(__file__).resolve().parents[2]


def test_models_and_migrations_agree(state_url: str) -> None:
    engine = db.create(state_url)
    db.upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    engine.dispose()
    assert differences == []


def test_every_revision_walks_down_and_up(state_url: str) -> None:
    engine = db.create(state_url)
    config = db.alembic_config(engine)
    revisions = list(ScriptDirectory.from_config(config).walk_revisions())
    assert revisions, "no migrations found"
    for revision in revisions:
        assert revision.doc, f"revision {revision.revision} has no title line"
    db.upgrade(engine)
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.upgrade(engine)
    assert {"accounts", "folders", "messages", "pop_messages", "sync_runs"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_fast_path_knows_the_newest_revision(state_url: str) -> None:
    engine = db.create(state_url)
    head = ScriptDirectory.from_config(db.alembic_config(engine)).get_current_head()
    assert head == db.HEAD_REVISION, "update HEAD_REVISION in mailsyncd/state/db.py with each new revision"
    assert not db.at_head(engine)
    db.upgrade(engine)
    assert db.at_head(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    """Build the wheel and install it into a directory of its own: its file names, and an
    environment whose ``python -m mailsyncd`` runs that install, without the source tree."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, text=True)
    assert "deprecat" not in (built.stdout + built.stderr).lower(), built.stderr
    wheel = next((tmp_path / "dist").glob("mailsyncd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import mailsyncd, sys; print(mailsyncd.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(target))
    return names, env


def test_db_upgrade_from_an_installed_wheel(
    tmp_path: Path, installed_wheel: tuple[list[str], dict[str, str]]
) -> None:
    """Build the wheel, install it (without the source tree on the path) and migrate."""
    names, env = installed_wheel
    assert any(name.startswith("mailsyncd/_migrations/versions/0001") for name in names)
    config = tmp_path / "config.toml"
    config.write_text(f'[general]\nstate = "{tmp_path / "state.db"}"\n')
    result = subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(config), "db", "upgrade"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    engine = db.create(str(tmp_path / "state.db"))
    assert db.at_head(engine)
    engine.dispose()


def test_the_wheel_ships_its_licence_example_config_and_units(
    tmp_path: Path, installed_wheel: tuple[list[str], dict[str, str]]
) -> None:
    """What the docs and error messages point to comes with every install, byte for byte."""
    names, env = installed_wheel
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)

    def mailsyncd(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "mailsyncd", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert mailsyncd("example-config") == (REPO / "config" / "mailsyncd.example.toml").read_text()
    user_unit = (REPO / "systemd" / "mailsyncd-user.service").read_text()
    assert mailsyncd("systemd-units", "--user") == user_unit
    assert "ExecStart=%h/.local/bin/mailsyncd run" in user_unit
    printed = mailsyncd("systemd-units")
    installed = mailsyncd("systemd-units", "--install", str(tmp_path / "units")).splitlines()
    for unit in ("mailsyncd.service", "mailsyncd-sync.service", "mailsyncd-sync.timer"):
        text = (REPO / "systemd" / unit).read_text()
        assert f"# --- {unit} ---\n{text}" in printed
        assert (tmp_path / "units" / unit).read_text() == text
        assert f"installed {tmp_path / 'units' / unit}" in installed
    mailsyncd("systemd-units", "--user", "--install", str(tmp_path / "user"))
    assert [path.name for path in (tmp_path / "user").iterdir()] == ["mailsyncd.service"]
    assert (tmp_path / "user" / "mailsyncd.service").read_text() == user_unit
