"""Read-only access to a palace's ``chroma.sqlite3``; no chromadb import.

The connection is opened with ``mode=ro``, so nothing here can change a byte or an
mtime. When a hot journal sits beside the file (an interrupted transaction), the file
and its journal are copied to a private scratch folder and rolled back there, so the
model shows the committed state chromadb will see, not uncommitted spilled pages.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from chaosfix.filecopy import sparse_copy
from chaosfix.palace.generation import Generation, hnsw_config
from chaosfix.palace.generation import detect as detect_generation
from chaosfix.palace.schema_guard import STALE_GONE
from chaosfix.safe_fs import is_regular, open_regular
from chaosfix.scratch import JOURNAL_SCRATCH, WAL_SCRATCH, Scratch

POISON_LIMIT = 2**53
OP_NAMES = {0: "add", 1: "update", 2: "upsert", 3: "delete", 4: "backfill"}
VECTOR_TYPE = "urn:chroma:segment/vector/hnsw-local-persisted"
METADATA_TYPE = "urn:chroma:segment/metadata/sqlite"
DOCUMENT_KEY = "chroma:document"
DEFAULT_TENANT, DEFAULT_DATABASE = "default_tenant", "default_database"  # chromadb's, where a client opens
DOCUMENTS_BY_ID = 20000  # up to this many ids, documents() looks them up by id
CONFIG_MAX = 1 << 20  # a collection's config_json_str is a few hundred bytes
SCHEMA_MAX = 1 << 28  # its schema_str grows with its metadata keys (1.4 MB at 12,000): parsed by SQLite


def _blob_seqs(rows: dict[str, object]) -> dict[str, int] | None:
    """0.6's seq_ids, every one an 8-byte big-endian blob, decoded at once by numpy (0.3 s
    per 100k rows one by one); None for anything else (``decode_seq`` judges each)."""
    seqs = rows.values()
    if set(map(type, seqs)) != {bytes} or set(map(len, seqs)) != {8}:
        return None
    return dict(zip(rows, np.frombuffer(b"".join(seqs), dtype=">u8").tolist()))


def decode_seq(value: object) -> int | None:
    """Decode a seq_id in either encoding: 0.6's 8-byte big-endian blob or 1.x's integer."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return int.from_bytes(bytes(value), "big")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"unreadable seq_id {value!r}")


@dataclass(frozen=True)
class SeqValue:
    """One ``max_seq_id`` row: the decoded value and how it was stored."""

    value: int
    stored_as: str  # "blob" (0.4-0.6), "int" (1.x) or "pickle" (0.4 vector segment)

    @property
    def poisoned(self) -> bool:
        return self.value > POISON_LIMIT


@dataclass
class WalRow:
    seq_id: int
    op: int
    id: str
    vector: np.ndarray | None
    document: str | None
    metadata: dict | None
    has_vector: bool = False  # the row carries an embedding (read even when ``vector`` is not)

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op, str(self.op))


TIMESTAMP_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")  # SQLite's CURRENT_TIMESTAMP


def _is_timestamp(t: object) -> bool:
    return isinstance(t, str) and TIMESTAMP_RE.fullmatch(t) is not None


@dataclass
class StaleRows:
    """Rows keyed by a record's ``embeddings.id`` that outlived the record (its embeddings
    row deleted behind chromadb's back): metadata rows and full-text index documents."""

    metadata: list[int] = field(default_factory=list)  # distinct integer ids in ``tables``
    fulltext: list[int] = field(default_factory=list)  # rowids in embedding_fulltext_search
    tables: tuple[str, ...] = ()  # the metadata tables of this palace (STALE_TABLES it has)

    @property
    def ids(self) -> list[int]:
        return sorted(set(self.metadata) | set(self.fulltext))

    def __bool__(self) -> bool:
        return bool(self.metadata or self.fulltext)


# metadata tables keyed by embeddings.id (1.x adds the array one); read and written only
# when the palace's own declaration is a plain table with an ``id`` column
STALE_TABLES = ("embedding_metadata", "embedding_metadata_array")
# the full-text table chromadb (0.5 - 1.5) creates; only this exact declaration is read
# (through its docsize shadow table, also exactly chromadb's: no module code or
# palace expression runs) and written (through FTS5, which keeps its index right)
FTS_TABLE = "embedding_fulltext_search"
FTS_SQL = "CREATE VIRTUAL TABLE embedding_fulltext_search USING fts5(string_value, tokenize='trigram')"
DOCSIZE_SQL = "CREATE TABLE 'embedding_fulltext_search_docsize'(id INTEGER PRIMARY KEY, sz BLOB)"


@dataclass
class CollectionInfo:
    id: str
    name: str
    dimension: int | None
    metadata: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    vector_segment: str | None = None
    metadata_segment: str | None = None
    index_config: dict = field(default_factory=dict)  # 1.3+: schema_str's vector index config
    has_schema: bool = False  # 1.3+: a schema_str (then it alone holds the index's settings)
    segment_metadata: dict = field(default_factory=dict)  # the vector segment's (0.x reads its settings there)
    database: str | None = None  # its database's name and tenant (None before chromadb 0.4.16)
    tenant: str | None = None

    @property
    def resize_factor(self) -> float:
        """chromadb 0.x's capacity growth (``hnsw:resize_factor``, 1.2 by default): 0.6
        sizes max_elements with it, so a large one is no damage."""
        val = self.metadata.get("hnsw:resize_factor", self.segment_metadata.get("hnsw:resize_factor"))
        try:
            return max(1.2, float(val)) if val is not None else 1.2
        except (TypeError, ValueError):
            return 1.2

    @property
    def label(self) -> str:
        """The name, qualified as ``tenant/database/name`` outside chromadb's default
        database: names are unique per database only, and two applications sharing a
        palace may each have a ``docs``."""
        if self.database in (None, DEFAULT_DATABASE) and self.tenant in (None, DEFAULT_TENANT):
            return self.name
        return f"{self.tenant}/{self.database}/{self.name}"

    @property
    def space(self) -> str:
        """Distance space: a 1.3+ schema's alone (chromadb 1.5.9 builds and searches in it
        even where the collection's metadata names another space, and in l2 where the
        schema names none; its config_json_str is then ``{}``), else the metadata (0.x
        honours it), then 1.0-1.2's config."""
        if self.has_schema:
            space = self.index_config.get("space")
            return space if isinstance(space, str) else "l2"
        if "hnsw:space" in self.metadata:
            return str(self.metadata["hnsw:space"])
        return str(hnsw_config(self.config).get("space", "l2"))

    def param(self, key: str, default: int) -> int:
        """An HNSW parameter in 0.6's metadata name (M, construction_ef, search_ef...),
        from the same sources as ``space``: a schema's (or chromadb's default), else the
        metadata's, then the config's."""
        if self.has_schema:
            val = hnsw_config(self.index_config).get(key, default)
        else:
            val = self.metadata.get(f"hnsw:{key}", hnsw_config(self.config).get(key, default))
        try:
            return int(val) if val is not None else default
        except (TypeError, ValueError):  # a damaged or hostile value
            return default


# a 1.3+ schema_str's vector index configs, cut out by SQLite: chromadb records every
# metadata key a collection ever saw there (1.4 MB at 12,000 keys), and only these count
_INDEX_CONFIGS = ('$.keys."#embedding".float_list.vector_index.config', "$.defaults.float_list.vector_index.config")


def vector_index_config(*configs: object) -> dict:
    """The vector index config of a 1.3+ schema: the ``#embedding`` key's (what chromadb
    builds the index with), else the defaults' (JSON texts, as SQLite cut them out); {}
    when there is none."""
    for text in configs:
        cfg = _json_or_none(text)
        if isinstance(cfg, dict):
            return cfg
    return {}


def _json_or_none(text: object) -> object:
    """``text`` parsed as JSON; None for no text or text that is not JSON (damage)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class SqlReadError(Exception):
    """The SQLite file cannot be read at all."""


class SidecarError(SqlReadError):
    """A file SQLite opens beside the db (``-journal``, ``-wal``, ``-shm``) is not a
    regular file: a FIFO blocks every open (Ctrl-C too), a symlink would be read for the
    palace, a folder or socket fails the open. The palace is not opened."""


SIDECARS = ("-journal", "-wal", "-shm")


def odd_sidecars(db_path: Path) -> list[str]:
    """What SQLite's files beside the db (and beside its target, when the db is a
    symlink) are when they are not regular files (lstat only: nothing is opened)."""
    out = []
    real = os.path.realpath(db_path)  # (SQLite opens them beside a symlinked db's target)
    for suffix, base in itertools.product(SIDECARS, dict.fromkeys([str(db_path), real])):
        p = Path(base + suffix)
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            out.append(f"{p.name}: {exc.strerror}")
            continue
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"),
                                           (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
                         if test(mode)), "a device")
            out.append(f"{p.name} is {kind}")
    return out


class PalaceSql:
    """Read-only view of chroma.sqlite3."""

    def __init__(self, db_path: Path, conn: sqlite3.Connection | None = None) -> None:
        """Open read-only, or wrap ``conn`` (the reconciler's own locked connection)."""
        self.path = db_path
        self.uri: str | None = None  # set when this object opened its own read-only connection
        self._scratch: Scratch | None = None
        odd = odd_sidecars(db_path) if conn is None else []
        if odd:
            raise SidecarError("; ".join(odd))
        self.hot_journal = _hot_journal(db_path)
        # through the caller's connection when there is one: an open and close of the db
        # here would drop every POSIX lock this process holds on it (the repair's EXCLUSIVE)
        self.wal_mode = (wal_mode(db_path) if conn is None
                         else str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal")
        self.owned = conn is None
        try:
            if conn is None:
                conn = self._open_readonly(db_path)
            self.conn = conn
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            self.columns = {
                t: {r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")}
                for t in ("collections", "collection_metadata", "embeddings_queue", "segments", "segment_metadata",
                          "databases")
            }
        except (sqlite3.Error, UnicodeDecodeError) as exc:  # a flipped bit in the schema's text decodes badly
            self._drop_scratch()
            raise SqlReadError(f"{type(exc).__name__}: {exc}" if isinstance(exc, UnicodeDecodeError) else str(exc)) from exc

    def _open_readonly(self, db_path: Path) -> sqlite3.Connection:
        """``mode=ro``; with a hot journal, the committed state: a private copy of the file
        and its journal, rolled back there (chromadb's next open rolls it back the same
        way). Reading the file as it is would show a large transaction's uncommitted,
        spilled pages. Falls back to ``immutable=1`` when the copy cannot be made."""
        if self.wal_mode:
            return self._open_wal(db_path)
        if self.hot_journal:
            scratch = Scratch(JOURNAL_SCRATCH)
            try:
                copy = scratch.path / db_path.name
                sparse_copy(db_path, copy)  # (holes kept: the cost is the files' data, not their length)
                sparse_copy(Path(str(db_path) + "-journal"), Path(str(copy) + "-journal"))
                roll = sqlite3.connect(copy, timeout=2.0)
                try:
                    roll.execute("SELECT count(*) FROM sqlite_master").fetchone()
                finally:
                    roll.close()
                self._scratch = scratch
                self.uri = f"file:{copy.as_posix()}?mode=ro"
                return sqlite3.connect(self.uri, uri=True, timeout=2.0)
            except (OSError, sqlite3.Error):
                scratch.remove()
        mode = "immutable=1" if self.hot_journal else "mode=ro"
        self.uri = f"file:{db_path.as_posix()}?{mode}"
        return sqlite3.connect(self.uri, uri=True, timeout=2.0)

    def _open_wal(self, db_path: Path) -> sqlite3.Connection:
        """A WAL-mode file (chromadb never makes one; another tool did): ``mode=ro`` would
        create ``-wal``/``-shm`` beside it, so read it ``immutable=1`` when no ``-wal``
        holds frames, else read a private copy of the file and its ``-wal``."""
        wal = Path(str(db_path) + "-wal")
        try:
            frames = is_regular(wal) and wal.stat().st_size > 0
        except OSError:
            frames = False
        if not frames:
            return sqlite3.connect(f"file:{db_path.as_posix()}?immutable=1", uri=True, timeout=2.0)
        scratch = Scratch(WAL_SCRATCH)
        self._scratch = scratch
        copy = scratch.path / db_path.name
        try:
            sparse_copy(db_path, copy)
            sparse_copy(wal, Path(str(copy) + "-wal"))
        except OSError:  # cannot copy: the file alone, still without writing a byte
            return sqlite3.connect(f"file:{db_path.as_posix()}?immutable=1", uri=True, timeout=2.0)
        return sqlite3.connect(str(copy), timeout=2.0)

    def _drop_scratch(self) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            scratch.remove()
            self._scratch = None

    def close(self) -> None:
        if self.owned:
            self.conn.close()
        self._drop_scratch()

    def quick_check(self) -> list[str]:
        rows = [r[0] for r in self.conn.execute("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    @cached_property
    def generation(self) -> Generation:
        """The chromadb generation that wrote the palace (its migrations table decides)."""
        return detect_generation(self.conn)

    def quick_check_started(self, also: Sequence[str] = ()) -> Callable[[], QuickCheck]:
        """Start ``quick_check`` and return the call that waits for its result.
        ``also``: read-only queries run after it on the same connection, in the same
        process (their first columns come back as lists; None for one that failed, which
        the caller then asks itself): check's STALE_ROWS scans, 0.3 s at 500k drawers.

        It reads every page of the file, the longest single step of a check. On our own
        read-only connection it runs in a child process (``_QUICK_CHECK``, standard
        library only; a thread below ``QUICK_CHECK_CHILD_BYTES``) so the rest of the
        check proceeds on the other core: a thread would share SQLite's global allocator
        mutex with this one's row reads, which then run 50% slower (measured at 500k
        rows). If the child cannot run, a thread does it.
        On a borrowed connection (the reconciler's exclusive transaction locks out any
        other reader) it runs inline. The returned call re-raises what quick_check raised."""
        if self.uri is None:
            done = QuickCheck(self.quick_check(), [None] * len(also))
            return lambda: done
        uri = self.uri
        try:
            small = os.path.getsize(self.path) < QUICK_CHECK_CHILD_BYTES
        except OSError:
            small = True
        if small:  # a process start (~30 ms) costs more than the contention it avoids
            return _quick_check_thread(uri, also)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _QUICK_CHECK, uri, str(self.path), json.dumps(also)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            return _quick_check_thread(uri, also)

        def result() -> QuickCheck:
            out, _ = proc.communicate()
            try:
                got = json.loads(out)
            except ValueError:
                got = None
            if not isinstance(got, dict):
                if proc.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: stop
                    raise KeyboardInterrupt
                return _quick_check_thread(uri, also)()  # the child died for its own reasons: ask here
            if "error" in got:
                name, msg = got["error"]
                cls = getattr(sqlite3, str(name), None)
                if not (isinstance(cls, type) and issubclass(cls, sqlite3.Error)):
                    cls = sqlite3.DatabaseError
                raise cls(str(msg))
            rows = [str(r) for r in got.get("rows", [])]
            answers = got.get("also")
            if not (isinstance(answers, list) and len(answers) == len(also)):
                answers = [None] * len(also)
            return QuickCheck([] if rows == ["ok"] else rows,
                              [a if isinstance(a, list) and all(type(x) is int for x in a) else None for a in answers])

        return result

    def collections(self) -> list[CollectionInfo]:
        cols = []
        have = self.columns["collections"]
        cfg_col = f"CASE WHEN length(config_json_str) < {CONFIG_MAX} THEN config_json_str END" \
            if "config_json_str" in have else "NULL"
        if "schema_str" in have:  # (valid JSON of a size SQLite parses in bounded time)
            ok = f"schema_str IS NOT NULL AND length(schema_str) < {SCHEMA_MAX} AND json_valid(schema_str)"
            schema_cols = f"{ok}, " + ", ".join(f"CASE WHEN {ok} THEN json_extract(schema_str, '{path}') END"
                                                for path in _INDEX_CONFIGS)
        else:
            schema_cols = "0, NULL, NULL"
        # chromadb 0.4.16+: a name is unique per database, and a client opens one database
        where = ("(SELECT name FROM databases WHERE id=collections.database_id), "
                 "(SELECT tenant_id FROM databases WHERE id=collections.database_id)"
                 if "database_id" in have and {"name", "tenant_id"} <= self.columns["databases"] else "NULL, NULL")
        for cid, name, dim, cfg_text, database, tenant, has_schema, *configs in self.conn.execute(
                f"SELECT id, name, dimension, {cfg_col}, {where}, {schema_cols} FROM collections"):
            cfg = _json_or_none(cfg_text)
            cols.append(CollectionInfo(id=cid, name=name, dimension=dim, config=cfg if isinstance(cfg, dict) else {},
                                       index_config=vector_index_config(*configs), has_schema=bool(has_schema),
                                       database=database if isinstance(database, str) else None,
                                       tenant=tenant if isinstance(tenant, str) else None))
        # 0.4 has no bool_value column
        values = [c for c in ("str_value", "int_value", "float_value", "bool_value")
                  if c in self.columns["collection_metadata"]]
        for c in cols:
            for key, *vals in self.conn.execute(
                f"SELECT key, {', '.join(values)} FROM collection_metadata WHERE collection_id=?", (c.id,),
            ):
                c.metadata[key] = next((v for v in vals if v is not None), None)
            for sid, _stype, scope in self.conn.execute(
                "SELECT id, type, scope FROM segments WHERE collection=?", (c.id,)
            ):
                if scope == "VECTOR":
                    c.vector_segment = sid
                elif scope == "METADATA":
                    c.metadata_segment = sid
        seg_values = [c for c in ("str_value", "int_value", "float_value") if c in self.columns["segment_metadata"]]
        for c in cols:  # (the vector segment's own settings: what 0.x's segment reads)
            if c.vector_segment is not None and seg_values:
                for key, *vals in self.conn.execute(
                        f"SELECT key, {', '.join(seg_values)} FROM segment_metadata WHERE segment_id=?",
                        (c.vector_segment,)):
                    c.segment_metadata[key] = next((v for v in vals if v is not None), None)
        return cols

    def all_segment_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT id FROM segments")}

    def max_seq_ids(self) -> dict[str, SeqValue]:
        out = {}
        for sid, raw in self.conn.execute("SELECT segment_id, seq_id FROM max_seq_id"):
            kind = "blob" if isinstance(raw, bytes) else "int"
            out[sid] = SeqValue(decode_seq(raw) or 0, kind)
        return out

    def rows(self, metadata_segment: str) -> dict[str, int]:
        """user id -> seq_id of every record row of a METADATA segment."""
        # "+segment_id": a table scan beats the index lookup plus a table hop per row (3x)
        q = "SELECT embedding_id, seq_id FROM embeddings WHERE +segment_id=?"
        rows = dict(self.conn.execute(q, (metadata_segment,)))  # built in C: 1.x stores plain ints
        if not set(map(type, rows.values())) <= {int}:  # 0.6's blobs, or damage
            rows = _blob_seqs(rows) or {eid: decode_seq(seq) or 0 for eid, seq in rows.items()}
        return rows

    def id_blob(self, metadata_segment: str) -> str | None:
        """Every record id of a METADATA segment joined by NUL, in one string built by
        SQLite from a scan of the table (``NOT INDEXED``: a covering index would serve
        these columns, and a damaged file may hold it stale): 0.25 s at 500k rows against 0.5 s for the rows as
        Python tuples. None when that string would not split back into the ids (a NULL,
        non-text or NUL-holding id) or there are none: ``rows`` then reads them one by one."""
        q = ("SELECT group_concat(embedding_id, char(0)), count(*), sum(typeof(embedding_id) <> 'text') "
             "FROM embeddings NOT INDEXED WHERE segment_id=?")
        try:
            blob, n, odd = self.conn.execute(q, (metadata_segment,)).fetchone()
        except sqlite3.DataError:  # the string outgrew SQLite's limit
            return None
        # an id holding a NUL adds one beyond the n - 1 separators (counted here in C: an
        # instr() per row in the query was 0.04 s at 500k rows)
        if not n or odd or not isinstance(blob, str) or blob.count("\0") != n - 1:
            return None
        return blob

    def _by_ids(self, q: str, params: tuple, ids: Iterable[object], column: str) -> Iterator[tuple]:
        """``q`` (ending in a WHERE clause) for these ids, 500 at a time through the
        (segment_id, embedding_id) index. (Not sorted: a damaged table mixes text and
        blob ids.)"""
        todo = list(dict.fromkeys(ids))
        for s in range(0, len(todo), 500):
            chunk = todo[s : s + 500]
            yield from self.conn.execute(f"{q} AND {column} IN ({','.join('?' * len(chunk))})", (*params, *chunk))

    def row_seqs(self, metadata_segment: str, ids: list[str]) -> dict[str, int]:
        """user id -> seq_id of these rows."""
        out: dict[str, int] = {}
        q = "SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ?"
        for eid, seq in self._by_ids(q, (metadata_segment,), ids, "embedding_id"):
            try:
                out[eid] = decode_seq(seq) or 0
            except ValueError:
                continue
        return out

    def created(self, metadata_segment: str, ids: list[str]) -> dict[str, str]:
        """user id -> the row's created_at (SQLite's CURRENT_TIMESTAMP when the row was
        inserted; an update leaves it); none where the column is missing or is not such a
        timestamp (compared as text, which orders only that one format)."""
        q = "SELECT embedding_id, created_at FROM embeddings WHERE segment_id = ?"
        try:
            return {eid: t for eid, t in self._by_ids(q, (metadata_segment,), ids, "embedding_id")
                    if _is_timestamp(t)}
        except sqlite3.DatabaseError:
            return {}

    def wal_created(self, collection_id: str, seqs: Collection[int]) -> dict[int, str]:
        """seq_id -> created_at of these WAL rows (when chromadb logged the write)."""
        out: dict[int, str] = {}
        try:
            for seq, t in self.conn.execute("SELECT seq_id, created_at FROM embeddings_queue WHERE topic LIKE ?",
                                            (f"%/{collection_id}",)):
                try:
                    seq = decode_seq(seq) or 0
                except ValueError:
                    continue
                if seq in seqs and _is_timestamp(t):
                    out[seq] = t
        except sqlite3.DatabaseError:
            return {}
        return out

    def documents(self, metadata_segment: str, ids: list[str] | None = None) -> dict[str, str | None]:
        """user id -> document text (None when the row has no document)."""
        q = (
            "SELECT e.embedding_id, m.string_value FROM embeddings e LEFT JOIN embedding_metadata m "
            "ON m.id = e.id AND m.key = ? WHERE e.segment_id = ?"
        )
        want = set(ids) if ids is not None else None
        out = {}
        if want is not None and len(want) <= DOCUMENTS_BY_ID:
            # a few ids (e.g. 5k orphans of 500k rows): look them up through the
            # (segment_id, embedding_id) unique index instead of scanning every document
            out.update(self._by_ids(q, (DOCUMENT_KEY, metadata_segment), want, "e.embedding_id"))
            return out
        for eid, doc in self.conn.execute(q, (DOCUMENT_KEY, metadata_segment)):
            if want is None or eid in want:
                out[eid] = doc
        return out

    def wal(self, collection_id: str, above: int = 0, with_vectors: bool = True) -> list[WalRow]:
        """The collection's WAL rows with seq_id > ``above``, in seq order."""
        cols = "seq_id, operation, id, " + ("vector, encoding, metadata" if with_vectors
                                            else "vector IS NOT NULL, NULL, NULL")
        out = []
        for seq, op, rid, vec, enc, meta in self.conn.execute(
            f"SELECT {cols} FROM embeddings_queue WHERE topic LIKE ? ORDER BY seq_id",
            (f"%/{collection_id}",),
        ):
            seq = decode_seq(seq) or 0
            if seq <= above:
                continue
            vector, has = None, bool(vec) if not with_vectors else vec is not None
            if with_vectors and vec is not None and (enc or "FLOAT32").upper() == "FLOAT32" and len(vec) % 4 == 0:
                vector = np.frombuffer(vec, dtype="<f4").copy()
            md = None
            if meta:
                try:
                    md = json.loads(meta)
                except ValueError:
                    md = None
            doc = md.get(DOCUMENT_KEY) if isinstance(md, dict) else None
            out.append(WalRow(seq, int(op), rid, vector, doc, md, has))
        return out

    def documents_not_text(self, collection_id: str) -> set[int]:
        """seq_ids of the collection's WAL rows whose metadata holds a ``chroma:document``
        that is not text (0.x writes null for a row added without a document). chromadb
        1.x panics reading such a row ("Document not found in metadata", its sqlite_log),
        so once it must replay one, every read of the collection fails. Judged by SQLite's
        own JSON functions: no row's metadata is parsed in Python."""
        q = ("SELECT seq_id FROM embeddings_queue WHERE topic LIKE ? AND json_valid(metadata) "
             f"AND json_type(metadata, '$.\"{DOCUMENT_KEY}\"') != 'text'")
        return {decode_seq(s) or 0 for (s,) in self.conn.execute(q, (f"%/{collection_id}",))}

    def stale_rows(self, answers: Sequence[list | None] = ()) -> StaleRows:
        """Metadata rows and full-text documents whose ``embeddings`` row is gone. chromadb
        gives a new record the next ``embeddings.id``, so such a row above the last record
        (a tool that deleted the newest rows in SQL; 1.5.9's own delete_collection leaves
        its array metadata) meets the next add: 1.x then fails to apply its log, and every
        later write and even count() of the collection fails (or, for array metadata, the
        new record inherits it); 0.6 gives the new record the deleted one's metadata.
        Scans of covering b-trees with a rowid probe each (0.3 s at 500k drawers), so
        check has them run by its quick_check helper (``stale_queries``, ``answers``)."""
        tables, queries = self.stale_queries()
        got = [answers[i] if i < len(answers) and answers[i] is not None else [r[0] for r in self.conn.execute(q)]
               for i, q in enumerate(queries)]
        meta = sorted({i for rows in got[: len(tables)] for i in rows})
        return StaleRows(meta, got[len(tables)] if len(got) > len(tables) else [], tables)

    def stale_queries(self) -> tuple[tuple[str, ...], list[str]]:
        """The metadata tables to read and the queries ``stale_rows`` runs: one per table,
        then the full-text one where chromadb's own declarations are found."""
        if not self._plain_table("embeddings"):
            return (), []
        tables = tuple(t for t in STALE_TABLES if self._plain_table(t))
        # each id looked up once, not once per key (0.26 -> 0.20 s at 2M rows of 500k ids);
        # the type filtered before DISTINCT, as the single query before did
        queries = [f"SELECT id FROM (SELECT DISTINCT id FROM {t} WHERE typeof(id) = 'integer') WHERE {STALE_GONE}"
                   for t in tables]
        if self.fulltext_known():
            queries.append(f"SELECT id FROM {FTS_TABLE}_docsize WHERE {STALE_GONE}")
        return tables, queries

    def _plain_table(self, name: str) -> bool:
        """``name`` is a table (not a view or virtual table) with a stored ``id`` column
        (not a generated one: a palace's expression would run for every row read)."""
        row = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        if row is None or not str(row[0] or "").upper().lstrip().startswith("CREATE TABLE"):
            return False
        cols = {str(r[1]).lower(): r[6] for r in self.conn.execute(f'PRAGMA table_xinfo("{name}")')}
        return cols.get("id") == 0  # (hidden: 0 stored, 2/3 generated)

    def fulltext_known(self) -> bool:
        """The full-text table and its docsize shadow table are declared exactly as chromadb does."""
        found = {name: " ".join(str(sql or "").split()) for name, sql in self.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
            (FTS_TABLE, f"{FTS_TABLE}_docsize"))}
        return found.get(FTS_TABLE) == FTS_SQL and found.get(f"{FTS_TABLE}_docsize") == DOCSIZE_SQL

    def wal_max_seq(self) -> int | None:
        row = self.conn.execute("SELECT max(seq_id) FROM embeddings_queue").fetchone()
        return decode_seq(row[0]) if row else None



QUICK_CHECK_CHILD_BYTES = 32 << 20  # chroma.sqlite3 of about 30k drawers and up
_QUICK_CHECK = """
import json, os, sqlite3, sys
try:  # Linux: die with the parent (a killed check leaves nobody reading the palace)
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)
except (OSError, AttributeError):
    pass
try:  # read the file once in order first: quick_check reads it page by page in b-tree
    # order, from a cold cache random I/O (3.6 s at 500k rows, against 0.3 s + 1.0 s;
    # fadvise(WILLNEED) measured no help). Not when it is cached already (RWF_NOWAIT
    # reads of 64 spread pages all succeed): the copy would be CPU for nothing. Only as
    # far as the pages the header counts and the first hole: bytes SQLite never reads
    # (a sparse or padded file) are not read here either
    with open(os.open(sys.argv[2], os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0) as f:
        fd, buf = f.fileno(), bytearray(1 << 20)
        head = os.pread(fd, 100, 0)
        end = os.fstat(fd).st_size
        if len(head) == 100 and head[92:96] == head[24:28]:  # the header's page count is valid
            size = int.from_bytes(head[16:18], "big")
            end = min(end, (65536 if size == 1 else size) * int.from_bytes(head[28:32], "big"))
        try:
            end = min(end, os.lseek(fd, 0, os.SEEK_HOLE))
        except (OSError, AttributeError):
            pass
        page = memoryview(buf)[:4096]
        try:
            cached = all(os.preadv(fd, [page], end * k // 64, os.RWF_NOWAIT) > 0 for k in range(64)) if end else True
        except (OSError, AttributeError):  # not in the cache, or no RWF_NOWAIT here
            cached = False
        done = 0
        while not cached and done < end:
            got = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - done)]], done)
            if not got:
                break
            done += got
except OSError:
    pass
try:
    conn = sqlite3.connect(sys.argv[1], uri=True, timeout=2.0)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
        also = []
        for q in json.loads(sys.argv[3]) if len(sys.argv) > 3 else []:
            try:
                also.append([r[0] for r in conn.execute(q)])
            except sqlite3.Error:
                also.append(None)
        print(json.dumps({"rows": rows, "also": also}))
    finally:
        conn.close()
except sqlite3.Error as exc:
    print(json.dumps({"error": [type(exc).__name__, str(exc)]}))
"""


def _quick_check_thread(uri: str, also: Sequence[str] = ()) -> Callable[[], QuickCheck]:
    """``PRAGMA quick_check`` (and ``also``) on a second connection in a thread (SQLite
    drops the GIL)."""
    out: dict = {}

    def work() -> None:
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=2.0)
            try:
                rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
                answers = [_column(conn, q) for q in also]
            finally:
                conn.close()
            out["done"] = QuickCheck([] if rows == ["ok"] else rows, answers)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=work, name="chaosfix-quick-check", daemon=True)
    t.start()

    def result() -> QuickCheck:
        t.join()
        if "error" in out:
            raise out["error"]
        return out["done"]

    return result


def _column(conn: sqlite3.Connection, q: str) -> list | None:
    try:
        return [r[0] for r in conn.execute(q)]
    except sqlite3.Error:
        return None


class QuickCheck(NamedTuple):
    problems: list[str]  # quick_check's rows; none when it said "ok"
    also: list[list | None]  # the ``also`` queries' first columns (None: ask again)


JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def journal_synced(db_path: Path) -> bool:
    """True when the leftover journal carries its magic header: SQLite wrote it before
    touching the db file, so the file may hold uncommitted pages (a rollback is pending).
    A zeroed header means the transaction never reached the file; SQLite ignores it."""
    try:  # (never through a symlink, never blocking on a FIFO put there since)
        with open_regular(Path(str(db_path) + "-journal")) as f:
            return f.read(8) == JOURNAL_MAGIC
    except OSError:
        return False


def wal_mode(db_path: Path) -> bool:
    """True when the file header says WAL journal mode (read/write versions 2)."""
    try:
        with open(db_path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[:16] == b"SQLite format 3\x00" and head[18:20] == b"\x02\x02"


def _hot_journal(db_path: Path) -> bool:
    try:
        st = os.lstat(str(db_path) + "-journal")
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0
