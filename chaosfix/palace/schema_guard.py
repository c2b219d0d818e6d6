"""The palace's SQL schema compared with what chromadb itself creates.

A palace is untrusted input, and SQLite runs a file's own triggers (and reads its views)
on every connection that writes or reads the tables they sit on. chromadb 0.4 - 1.5
never create a trigger or a view (their migrations make tables, FTS5 shadow tables and
indexes only), so any trigger or view is foreign: someone else put it there. So is an
index not among chromadb's own: SQLite evaluates its functions and collations on every
write of its table. The names
below are chromadb's own objects across its generations (0.4.x ``embedding_fulltext``
and the migrations' transient ``*_tmp`` tables included), so a palace of any supported
version passes and anything else is named.

Two defences use this module: ``inspect`` before any write (reconcile refuses, exit 8,
unless ``--drop-foreign-sql`` drops the objects after saving their SQL in the backup),
and ``writer_authorizer`` + ``RowFingerprint`` around reconcile's write transaction (a
statement that would reach a trigger or view, or write a table reconcile never writes,
is refused by SQLite itself; before COMMIT the rows reconcile never touches must be
exactly as they were).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

# tables chromadb creates (all generations); FTS5 shadow tables follow the *_data/... rule
CHROMA_TABLES = frozenset({
    "collections", "collection_metadata", "segments", "segment_metadata", "embeddings",
    "embedding_metadata", "embeddings_queue", "embeddings_queue_config", "max_seq_id",
    "migrations", "tenants", "databases", "maintenance_log", "acquire_write",
    "embedding_metadata_array", "embedding_fulltext_search", "embedding_fulltext",
    "collections_tmp", "segments_temp",
})
FTS_TABLES = ("embedding_fulltext_search", "embedding_fulltext")
FTS_SHADOW = ("_data", "_idx", "_content", "_docsize", "_config")
CHROMA_INDEXES = frozenset({
    "embedding_metadata_int_value", "embedding_metadata_float_value", "embedding_metadata_string_value",
    "embedding_metadata_array_id_key", "embedding_metadata_array_key_float",
    "embedding_metadata_array_key_int", "embedding_metadata_array_key_string",
})
# what chaosfix reads (and the chromadb post-check replays into): a palace needs these
REQUIRED = {
    "collections": {"id", "name", "dimension"},
    "collection_metadata": {"collection_id", "key", "str_value", "int_value", "float_value"},
    "segments": {"id", "type", "scope", "collection"},
    "embeddings": {"id", "segment_id", "embedding_id", "seq_id"},
    "embedding_metadata": {"id", "key", "string_value"},
    "embeddings_queue": {"seq_id", "operation", "topic", "id", "vector", "metadata"},
    "max_seq_id": {"segment_id", "seq_id"},
}
WRITTEN = frozenset({"max_seq_id", "embeddings_queue"})  # the only tables reconcile writes
# ...and, for STALE_ROWS only, deletes from (a record's leftovers, its embeddings row gone)
STALE_DELETES = frozenset({"embedding_metadata", "embedding_metadata_array", "embedding_fulltext_search"})
STALE_GONE = "typeof(id) = 'integer' AND id NOT IN (SELECT id FROM embeddings)"  # a record's leftover
FTS_WRITES = frozenset(f"embedding_fulltext_search{s}" for s in FTS_SHADOW)  # FTS5's own bookkeeping
GUARDED = ("embeddings", "embedding_metadata", "collections", "segments", "collection_metadata")


def _is_chroma_table(name: str) -> bool:
    low = name.lower()
    if low in CHROMA_TABLES:
        return True
    return any(low == f"{t}{s}" for t in FTS_TABLES for s in FTS_SHADOW)


_WORDS = re.compile("|".join(sorted(CHROMA_TABLES, key=len, reverse=True)), re.IGNORECASE)


@dataclass(frozen=True)
class ForeignObject:
    """A trigger, view or index chromadb never creates, or an object in a chromadb name's place."""

    type: str
    name: str
    table: str
    sql: str
    touches: bool  # it sits on, names or stands in for a table chaosfix or chromadb uses

    def describe(self) -> str:
        on = f" on {self.table}" if self.type in ("trigger", "index") else ""
        return f"{self.type} {self.name!r}{on}"


@dataclass
class SchemaReport:
    foreign: list[ForeignObject] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "table" or "table.column"
    chroma_tables: int = 0  # how many of chromadb's tables exist (0: not a palace)

    @property
    def dangerous(self) -> list[ForeignObject]:
        return [o for o in self.foreign if o.touches]


def inspect(conn: sqlite3.Connection) -> SchemaReport:
    """Compare ``sqlite_master`` with chromadb's objects. Reads only the schema table."""
    rep = SchemaReport()
    tables: dict[str, str] = {}
    for typ, name, tbl, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        name, tbl, sql = str(name), str(tbl or ""), str(sql or "")
        if typ == "table":
            tables[name.lower()] = name
            if _is_chroma_table(name):
                rep.chroma_tables += 1
        elif typ in ("trigger", "view"):
            # chromadb makes neither; one touches us when it sits on, names, or replaces
            # (a view named like a chromadb table) anything chromadb or chaosfix use
            touches = _is_chroma_table(tbl) or _is_chroma_table(name) or bool(_WORDS.search(sql))
            rep.foreign.append(ForeignObject(typ, name, tbl, sql, touches))
        elif typ == "index" and sql and name.lower() not in CHROMA_INDEXES:
            # SQLite evaluates an index's expressions, functions and collations on every
            # write of its table: on a table reconcile writes, a foreign one fails the
            # repair's write ('unknown function', 'no such collation sequence')
            touches = tbl.lower() in WRITTEN | STALE_DELETES
            rep.foreign.append(ForeignObject(typ, name, tbl, sql, touches))
    for table, cols in REQUIRED.items():
        if table not in tables:
            rep.missing.append(table)
            continue
        have = {str(r[1]).lower() for r in conn.execute(f'PRAGMA table_info("{tables[table]}")')}
        rep.missing.extend(f"{table}.{c}" for c in sorted(cols - have))
    return rep


def drop_statements(objs: list[ForeignObject]) -> list[str]:
    """DROP statements for foreign triggers, views and indexes (run inside the write transaction)."""
    out = []
    for o in objs:
        quoted = '"' + o.name.replace('"', '""') + '"'
        out.append(f"DROP {o.type.upper()} IF EXISTS {quoted}")
    return out


# ---- the write transaction's own guards ----------------------------------------------

_WRITES = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}
_DROPS = {sqlite3.SQLITE_DROP_TRIGGER, sqlite3.SQLITE_DROP_VIEW, sqlite3.SQLITE_DROP_TEMP_TRIGGER,
          sqlite3.SQLITE_DROP_TEMP_VIEW, sqlite3.SQLITE_DROP_INDEX}


def writer_authorizer(drops: frozenset[str] = frozenset(), stale: bool = False):  # noqa: ANN201 - sqlite3 callback
    """An authorizer for reconcile's connection: anything a trigger or view would do is
    denied (SQLite compiles trigger programs into the statement, so the statement fails
    before it runs), and rows may be written only in ``max_seq_id`` and
    ``embeddings_queue``. DROP TRIGGER/VIEW only of ``drops`` (asked for by the user).
    ``stale``: rows may also be deleted from the metadata tables and chromadb's full-text
    table (``STALE_DELETES``), whose FTS5 module then writes its own shadow tables
    (STALE_ROWS)."""
    low_drops = {d.lower() for d in drops}
    deletable = STALE_DELETES if stale else frozenset()
    shadows = FTS_WRITES if stale else frozenset()

    def auth(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        name = (arg1 or "").lower()
        if source is not None:
            return sqlite3.SQLITE_DENY
        if action in _WRITES:
            ok = (name in WRITTEN or name.startswith("sqlite_") or name in shadows
                  or (action == sqlite3.SQLITE_DELETE and (name in low_drops or name in deletable)))
            return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY
        if action in _DROPS:
            return sqlite3.SQLITE_OK if name in low_drops else sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    return auth


@dataclass(frozen=True)
class RowFingerprint:
    """Counts and id sums of the tables reconcile never writes, plus the exact content of
    ``max_seq_id`` and the WAL's count: compared before COMMIT with what the plan allows.
    Of the metadata tables it deletes leftovers from (STALE_ROWS: ``stale_tables``), the
    rows of live records (and any id that is not an integer) are fingerprinted, taken
    the same way before and after: those must not change either."""

    guarded: tuple
    seqs: dict
    queue: tuple

    @classmethod
    def take(cls, conn: sqlite3.Connection, stale_tables: tuple[str, ...] = ()) -> RowFingerprint:
        def rows(t: str) -> str:  # (every row, or every row but a record's leftovers)
            return f"{t} WHERE NOT ({STALE_GONE})" if t in stale_tables else t

        g = [(t, conn.execute(f"SELECT count(*) FROM {rows(t)}").fetchone()[0]) for t in GUARDED]
        g.append(("embeddings ids", *conn.execute(
            "SELECT total(id), max(id), total(length(embedding_id)), total(unicode(embedding_id)) FROM embeddings"
        ).fetchone()))
        g.append(("embedding_metadata ids",
                  *conn.execute(f"SELECT total(id), max(id) FROM {rows('embedding_metadata')}").fetchone()))
        g += [(t, *conn.execute(f"SELECT count(*), total(id), max(id) FROM {rows(t)}").fetchone())
              for t in stale_tables if t not in GUARDED]
        seqs = {r[0]: r[1] for r in conn.execute("SELECT segment_id, seq_id FROM max_seq_id")}
        queue = tuple(conn.execute("SELECT count(*), min(seq_id), max(seq_id) FROM embeddings_queue").fetchone())
        return cls(tuple(g), seqs, queue)

    def problems(self, after: RowFingerprint, seq_writes: dict, floor: int | None) -> list[str]:
        """What differs from the plan: no row of a guarded table may change, max_seq_id
        may only take the planned values, the WAL may only gain the planned floor row."""
        out = [f"{a[0]}: {a[1:]} -> {b[1:]}" for a, b in zip(self.guarded, after.guarded) if a != b]
        want = {**self.seqs, **seq_writes}
        if after.seqs != want:
            out.append(f"max_seq_id rows {len(after.seqs)} differ from the {len(want)} planned")
        n0, n1 = self.queue[0], after.queue[0]
        if not (n1 == n0 or (floor is not None and n1 == n0 + 1)) or (n0 and after.queue[1] != self.queue[1]
                                                                       and floor is None):
            out.append(f"embeddings_queue rows {n0} -> {n1}")
        return out
