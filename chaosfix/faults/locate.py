"""Find a palace's segments and files for the fault primitives (read-only, no chromadb)."""

from __future__ import annotations

from pathlib import Path

from chaosfix.drawers import COLLECTION
from chaosfix.errors import OperationalError
from chaosfix.palace import PalaceSql, palace_db
from chaosfix.palace.idmap import FILENAME as PICKLE_NAME


def segment_id(palace: str | Path, scope: str = "vector", collection: str | None = COLLECTION) -> str:
    """The id of ``collection``'s VECTOR (``scope='vector'``) or METADATA segment.

    ``collection=None`` means the palace's only collection. An id that already looks like
    a segment id is not accepted here: pass it straight to the primitive instead.
    """
    scope = scope.lower()
    if scope not in ("vector", "metadata"):
        raise ValueError(f"scope must be 'vector' or 'metadata', not {scope!r}")
    sql = PalaceSql(palace_db(palace))
    try:
        cols = sql.collections()
    finally:
        sql.close()
    if collection is not None:
        cols = [c for c in cols if c.name == collection]
    if len(cols) != 1:
        raise OperationalError(f"{palace}: expected one collection named {collection!r}, found {len(cols)}")
    sid = cols[0].vector_segment if scope == "vector" else cols[0].metadata_segment
    if sid is None:
        raise OperationalError(f"{palace}: collection has no {scope} segment")
    return sid


def segment_dir(palace: str | Path, collection: str | None = COLLECTION) -> Path:
    """The VECTOR segment folder of ``collection`` (it may not exist yet)."""
    return Path(palace) / segment_id(palace, "vector", collection)


def segment_file(palace: str | Path, name: str, collection: str | None = COLLECTION) -> Path:
    """``<palace>/<vector segment>/<name>``, e.g. ``segment_file(p, "data_level0.bin")``."""
    return segment_dir(palace, collection) / name


def pickle_path(path: str | Path) -> Path:
    """Accept a pickle file, a segment folder or a palace folder; return the pickle's path."""
    p = Path(path)
    if p.name == PICKLE_NAME:
        return p
    if (p / "chroma.sqlite3").is_file():
        return segment_dir(p) / PICKLE_NAME
    return p / PICKLE_NAME
