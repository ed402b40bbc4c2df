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
from sqlalchemy import Engine, inspect, text

from mailsyncd.state import db
from mailsyncd.state.models import metadata

REPO = Path(__file__).resolve().parents[2]


def test_models_and_migrations_agree(state_url: str) -> None:
    engine = db.create(state_url)
    command.upgrade(db.alembic_config(engine), "head")  # not db.upgrade: it makes a new database from the models
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


def _schema_and_rows(engine: Engine) -> dict[str, object]:
    """Everything a database holds, as comparable data: each table's columns (in any
    order), keys, indexes and constraints, and its rows."""
    found: dict[str, object] = {}
    with engine.connect() as connection:
        inspector = inspect(connection)
        for table in sorted(inspector.get_table_names()):
            columns = sorted((column["name"], str(column["type"]), column["nullable"], column["default"])
                             for column in inspector.get_columns(table))
            found[table] = (
                columns, inspector.get_pk_constraint(table)["constrained_columns"],
                sorted((tuple(key["constrained_columns"]), key["referred_table"], tuple(key["referred_columns"]),
                        key["options"].get("ondelete")) for key in inspector.get_foreign_keys(table)),
                sorted((index["name"], tuple(index["column_names"]), bool(index["unique"]))
                       for index in inspector.get_indexes(table)),
                sorted(tuple(unique["column_names"]) for unique in inspector.get_unique_constraints(table)),
                sorted(check["sqltext"] for check in inspector.get_check_constraints(table)),
                sorted(map(tuple, connection.execute(text(f"SELECT * FROM {table}")))),  # noqa: S608 - names
            )
    return found


def test_a_new_database_is_made_as_the_migrations_make_it(
        state_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A first run makes its database from the models without Alembic (db._create_at_head):
    it must hold what running every migration holds, rows included."""
    fresh = db.create(state_url)
    db.upgrade(fresh)
    other_url = (str(tmp_path / "migrated.db") if state_url.endswith(".db")
                 else request.getfixturevalue("postgres_cluster").new_database())
    migrated = db.create(other_url)
    command.upgrade(db.alembic_config(migrated), "head")
    assert _schema_and_rows(fresh) == _schema_and_rows(migrated)
    fresh.dispose()
    migrated.dispose()


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
