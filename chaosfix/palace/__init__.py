"""The palace's on-disk format, read-only, with no chromadb import."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from chaosfix.errors import OperationalError
from chaosfix.safe_fs import UUID_RE

if TYPE_CHECKING:
    from chaosfix.palace.sql import PalaceSql, SqlReadError

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


def __getattr__(name: str) -> object:
    # the SQL reader (and numpy, which it imports) only when asked for: the map helper
    # imports ``chaosfix.palace.idmap`` and needs none of it (35 ms of its start)
    if name in ("PalaceSql", "SqlReadError"):
        from chaosfix.palace import sql

        return getattr(sql, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PalaceSql", "SqlReadError", "palace_db", "UUID_RE", "SQLITE_NAME"]
