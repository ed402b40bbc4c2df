"""The schema's history: migrations build what the models declare, walk down and up,
and ship inside the wheel so `mailsyncd db upgrade` works from any install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from mailsyncd.state import db
from mailsyncd.state.models import metadata

REPO = Path(__file__).resolve().parents[2]


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    engine = db.create(str(tmp_path / "state.db"))
    db.upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    engine.dispose()
    assert differences == []


def test_every_revision_walks_down_and_up(tmp_path: Path) -> None:
    engine = db.create(str(tmp_path / "state.db"))
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


def test_fast_path_knows_the_newest_revision(tmp_path: Path) -> None:
    engine = db.create(str(tmp_path / "state.db"))
    head = ScriptDirectory.from_config(db.alembic_config(engine)).get_current_head()
    assert head == db.HEAD_REVISION, "update HEAD_REVISION in mailsyncd/state/db.py with each new revision"
    assert not db.at_head(engine)
    db.upgrade(engine)
    assert db.at_head(engine)
    engine.dispose()


def test_db_upgrade_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it (without the source tree on the path) and migrate."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("mailsyncd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("mailsyncd/_migrations/versions/0001") for name in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    config = tmp_path / "config.toml"
    config.write_text(f'[general]\nstate = "{tmp_path / "state.db"}"\n')
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import mailsyncd, sys; print(mailsyncd.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(target))
    result = subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(config), "db", "upgrade"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    engine = db.create(str(tmp_path / "state.db"))
    assert db.at_head(engine)
    engine.dispose()
