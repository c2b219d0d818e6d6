"""The palace's on-disk format, read-only, with no chromadb import."""

from __future__ import annotations

from pathlib import Path

from chaosfix.errors import OperationalError
from chaosfix.palace.sql import PalaceSql, SqlReadError
from chaosfix.safe_fs import UUID_RE

SQLITE_NAME = "chroma.sqlite3"


def palace_db(path: str | Path) -> Path:
    """Validate that ``path`` is a palace and return its SQLite path (else exit-8 error)."""
    p = Path(path)
    if not p.exists():
        raise OperationalError(f"{p}: no such directory")
    if not p.is_dir():
        raise OperationalError(f"{p}: not a directory")
    db = p / SQLITE_NAME
    if not db.is_file():
        raise OperationalError(f"{p}: not a palace (no {SQLITE_NAME})")
    return db


__all__ = ["PalaceSql", "SqlReadError", "palace_db", "UUID_RE", "SQLITE_NAME"]
