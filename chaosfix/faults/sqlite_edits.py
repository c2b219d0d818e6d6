"""Edits of ``chroma.sqlite3`` with plain sqlite3, read-write. Only for throwaway palaces.

Each function makes one change the way it happens in the field: an emptied WAL (a
proposed ``--purge-queue`` "repair"), a poisoned or deleted ``max_seq_id``, an
interrupted transaction's leftover journal, an older backup restored beside newer index
files.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from chaosfix.faults.locate import segment_id
from chaosfix.palace import SQLITE_NAME, palace_db

POISON_PREFIX = b"\x11\x11"


def _connect(palace: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(palace_db(palace), isolation_level=None, timeout=5.0)


def _segment(palace: str | Path, segment: str) -> str:
    """'vector' / 'metadata' name the only collection's segments; anything else is an id."""
    return segment_id(palace, segment, None) if segment.lower() in ("vector", "metadata") else segment


def empty_queue(palace: str | Path) -> int:
    """``DELETE FROM embeddings_queue``: the WAL restarts at seq_id 1. Returns rows deleted."""
    con = _connect(palace)
    try:
        return con.execute("DELETE FROM embeddings_queue").rowcount
    finally:
        con.close()


def poisoned_value(seq: int) -> int:
    """The poisoned reading of ``seq``: 1.x's ``b'\\x11\\x11' + digits`` read as a big-endian u64."""
    return int.from_bytes(POISON_PREFIX + seq.to_bytes(6, "big"), "big")


def poison_seq(palace: str | Path, segment: str = "vector", value: int | None = None) -> int:
    """Set ``segment``'s ``max_seq_id`` above 2**53, in the palace's own encoding.

    A blob row (0.6) gets an 8-byte big-endian blob, an integer row (1.x) an integer.
    ``value`` defaults to :func:`poisoned_value` of the current value. Returns the value.
    """
    sid = _segment(palace, segment)
    con = _connect(palace)
    try:
        row = con.execute("SELECT seq_id FROM max_seq_id WHERE segment_id=?", (sid,)).fetchone()
        if row is None:
            raise ValueError(f"segment {sid} has no max_seq_id row")
        raw = row[0]
        cur = int.from_bytes(raw, "big") if isinstance(raw, bytes) else int(raw)
        value = poisoned_value(cur) if value is None else value
        if value <= 2**53 or value >= 2**63:
            raise ValueError(f"poisoned value must be in (2**53, 2**63), got {value}")
        stored: bytes | int = value.to_bytes(8, "big") if isinstance(raw, bytes) else value
        con.execute("UPDATE max_seq_id SET seq_id=? WHERE segment_id=?", (stored, sid))
        return value
    finally:
        con.close()


def delete_seq(palace: str | Path, segment: str = "vector") -> int:
    """Delete ``segment``'s ``max_seq_id`` row. Returns rows deleted (0 or 1)."""
    sid = _segment(palace, segment)
    con = _connect(palace)
    try:
        return con.execute("DELETE FROM max_seq_id WHERE segment_id=?", (sid,)).rowcount
    finally:
        con.close()


_JOURNAL_CHILD = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "spill":
        con.execute("PRAGMA cache_size=1")  # force dirty pages into the db file mid-transaction
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM embedding_metadata")
    con.execute("DELETE FROM embeddings")
    con.execute("DELETE FROM embeddings_queue")
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    time.sleep(600)
    """
)


def leave_hot_journal(palace: str | Path, spill: bool = False, timeout: float = 60) -> Path:
    """Leave a real hot ``chroma.sqlite3-journal``: a writer SIGKILLed mid-transaction.

    A child process opens the palace with plain sqlite3, begins a write transaction that
    deletes every record row and WAL row, and is SIGKILLed before it commits. The journal
    holds the original pages. With ``spill=True`` the child's page cache is tiny, so the
    uncommitted deletions are already in ``chroma.sqlite3`` itself (as in a large add):
    only rolling the journal back gives the committed state. Returns the journal's path.
    """
    db = palace_db(palace)
    proc = subprocess.Popen([sys.executable, "-c", _JOURNAL_CHILD, str(db), "spill" if spill else "cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"journal child failed: {err.strip().splitlines()[-1:]}")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=timeout)
    journal = Path(str(db) + "-journal")
    if not journal.is_file() or journal.stat().st_size == 0:
        raise RuntimeError("journal child left no journal")
    return journal


def copy_sqlite(palace: str | Path, dst: str | Path) -> Path:
    """Save ``chroma.sqlite3`` (content and mtime) to ``dst``, e.g. a backup taken now."""
    return Path(shutil.copy2(palace_db(palace), dst))


def restore_older_sqlite(palace: str | Path, older_copy: str | Path) -> Path:
    """Put an older ``chroma.sqlite3`` back beside the (newer) index files.

    Any journal of the current file is removed with it (it belongs to the replaced file).
    Returns the database path.
    """
    db = Path(palace) / SQLITE_NAME
    for side in ("-journal", "-wal", "-shm"):
        Path(str(db) + side).unlink(missing_ok=True)
    shutil.copy2(older_copy, db)
    return db
