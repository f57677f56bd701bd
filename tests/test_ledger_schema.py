"""The coordinator's ledger records its schema version and refuses one written by a newer version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coordinator.ledger import SCHEMA_VERSION, Ledger
from privdistill.errors import ConfigError


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_new_ledger_records_its_schema_version(tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.sqlite")
    assert _user_version(tmp_path / "ledger.sqlite") == SCHEMA_VERSION


def test_a_ledger_from_a_newer_version_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # Prepare: a ledger a future version wrote
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}"):
        Ledger(path)
    assert _user_version(path) == SCHEMA_VERSION + 1
