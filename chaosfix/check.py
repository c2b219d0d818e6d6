"""palace -> findings. Read-only: never opens chromadb, never writes, never unpickles
outside the allow-list (see ``chaosfix.palace.idmap``)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chaosfix.errors import OperationalError, UsageProblem
from chaosfix.palace import SQLITE_NAME, PalaceSql, SqlReadError, palace_db, schema_guard
from chaosfix.palace.generation import Generation
from chaosfix.palace.leftovers import human, orphan_dirs, quarantined
from chaosfix.palace.sql import SidecarError, StaleRows, journal_synced
from chaosfix.palace.state import (
    PICKLE_MISSING,
    PICKLE_UNREADABLE,
    PICKLE_UNSAFE,
    CollectionState,
    load_state,
)
from chaosfix.safe_fs import is_link

SCHEMA = "chaosfix.check/1"
ERROR, WARNING, INFO = "error", "warning", "info"
SAMPLE = 5
BLOAT_FLOOR = 64 << 10  # a healthy link_lists.bin has no tail at all

# code -> what it means, for `--help`-style listings and the README
CODES = {
    "SQL_ONLY": "rows with no vector in the index (orphans search never finds)",
    "HNSW_ONLY": "id map entries with no SQL row (phantoms)",
    "GHOST_LABEL": "live index labels the id map does not know",
    "DUPLICATE_LABEL": "one label held by several slots or ids",
    "REPLAY_CONFLICT": "pending deletes already applied to the index: chromadb 1.x fails to apply logs",
    "REPLAY_QUIRK": "pending WAL rows chromadb 0.x's replay applies otherwise than SQL (phantoms, wrong vectors)",
    "INDEX_AHEAD": "index holds writes SQL rolled back (0.6 persist before commit): wrong vectors",
    "OFF_BY_ONE": "total_elements_added below the max label, or maps not inverse",
    "DIMENSION_LOST": "id map without dimensionality (0.6 raises TypeError on every read), or not the index's",
    "TORN": "index files inconsistent with their header (torn or damaged write)",
    "PICKLE_MISSING": "index_metadata.pickle missing for a persisted segment",
    "PICKLE_UNREADABLE": "index_metadata.pickle truncated, zeroed or malformed",
    "PICKLE_UNSAFE": "index_metadata.pickle references code outside the allow-list",
    "POISONED_SEQ": "max_seq_id above 2**53: new writes never appear",
    "SEQ_MISSING": "persisted vector segment without a max_seq_id row",
    "QUEUE_RESET": "WAL seq_ids restarted below consumed max_seq_id: writes vanish",
    "STALE_ROWS": "metadata or full-text rows whose record row is gone: the next add fails (1.x) or inherits them (0.6)",
    "LINK_BLOAT": "link_lists.bin far larger than its elements use",
    "SEGMENT_DIR_MISSING": "vector segment folder missing for persisted rows",
    "SEGMENT_DIR_ORPHAN": "segment folder no segment owns (chromadb never reads it): info, with its size",
    "QUARANTINED": "quarantined copy of a segment (repair tools' .corrupt/.drift/.hnsw-backup, chaosfix backups)",
    "HOT_JOURNAL": "leftover chroma.sqlite3-journal: interrupted transaction",
    "SQLITE_CORRUPT": "chroma.sqlite3 fails to open or PRAGMA quick_check",
    "SIDECAR": "chroma.sqlite3-journal, -wal or -shm is not a regular file (FIFO, symlink, folder): not opened",
    "PENDING": "WAL rows chromadb will replay on open (healthy)",
    "WAL_UNREADABLE": "pending WAL rows chromadb 1.x cannot read (0.x wrote a null document): every read fails",
    "FOREIGN_SQL": "a trigger, view or index chromadb never creates (error when it touches what chaosfix writes)",
    "UNSAFE_ID": "a collection or segment id that is not a UUID (never used as a path)",
    "SYMLINK": "a symlinked segment folder or file (never followed; info for chroma.sqlite3 itself)",
    "WAL_MODE": "chroma.sqlite3 is in SQLite WAL mode (chromadb uses a rollback journal; read without writing)",
    "BAD_VECTOR": "live index slots whose stored vector is not finite (cosine: not the unit length hnswlib stores)",
    "STALE_VECTOR": "check --deep: the index holds another vector than the row's document embeds to",
}
# findings about the whole palace, never a collection's own repair work
PALACE_CODES = {"HOT_JOURNAL", "SQLITE_CORRUPT", "SIDECAR", "QUEUE_RESET", "STALE_ROWS", "SEGMENT_DIR_ORPHAN", "FOREIGN_SQL",
                "WAL_MODE", "SYMLINK"}


@dataclass
class Finding:
    code: str
    severity: str
    collection: str | None
    segment: str | None
    count: int
    sample: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class CheckReport:
    palace: str
    findings: list[Finding] = field(default_factory=list)
    collections: list[dict] = field(default_factory=list)
    states: list[CollectionState] = field(default_factory=list, repr=False)
    generation: Generation | None = None  # the chromadb generation that wrote the palace

    @property
    def consistent(self) -> bool:
        return all(f.severity == INFO for f in self.findings)

    def codes(self, collection: str | None = None) -> dict[str, int]:
        """code -> count, for tests and scenario expectations."""
        out: dict[str, int] = {}
        for f in self.findings:
            if collection is None or f.collection in (collection, None):
                out[f.code] = out.get(f.code, 0) + f.count
        return out

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "palace": self.palace,
            "consistent": self.consistent,
            "findings": [asdict(f) for f in self.findings],
            "collections": self.collections,
            "generation": self.generation.to_json() if self.generation else None,
        }


def check_palace(path: str | Path, collection: str | None = None, conn: sqlite3.Connection | None = None,
                 for_repair: bool = False) -> CheckReport:
    """Inspect a palace and return its findings. Raises OperationalError (exit 8) only
    when the path is not a palace or is locked; UsageProblem (exit 2) when the named
    collection does not exist.
    ``conn`` lets the reconciler check through its own exclusive connection;
    ``for_repair``: the reconciler's read (each id map unpickled in this process; the
    slot pass judges every stored vector for check and the plan alike)."""
    db = palace_db(path)
    root = db.parent
    report = CheckReport(palace=os.path.abspath(root))  # (as reconcile reports it: absolute, lexically)
    try:
        sql = PalaceSql(db, conn)
    except SidecarError as exc:
        report.findings.append(Finding("SIDECAR", ERROR, None, None, 1, [],
                                       f"{exc}: SQLite opens it beside chroma.sqlite3 (a FIFO blocks every open, "
                                       "a symlink is read for the palace); not opened. Move it out of the palace"))
        return report
    except SqlReadError as exc:
        _refuse_locked(root, exc)
        report.findings.append(Finding("SQLITE_CORRUPT", ERROR, None, None, 1, [], f"cannot open: {exc}"))
        return report
    try:
        if _schema(sql, root, report):
            _check(sql, root, collection, report, for_repair)
    except SqlReadError as exc:
        _refuse_locked(root, exc)
        report.findings.append(Finding("SQLITE_CORRUPT", ERROR, None, None, 1, [], str(exc)))
    except Exception as exc:  # sqlite3.DatabaseError and friends from a damaged file
        if isinstance(exc, sqlite3.OperationalError):
            _refuse_locked(root, exc)
        if isinstance(exc, (ValueError, TypeError)) or (
                isinstance(exc, sqlite3.Error) and not isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError))):
            report.findings.append(Finding("SQLITE_CORRUPT", ERROR, None, None, 1, [],
                                           f"{type(exc).__name__}: {exc}"))
        else:
            raise
    finally:
        sql.close()
    return report


def _schema(sql: PalaceSql, root: Path, report: CheckReport) -> bool:
    """Schema findings; False when the tables chaosfix reads are not all there. A file
    with none of chromadb's tables is not a palace (exit 8)."""
    add = report.findings.append
    schema = schema_guard.inspect(sql.conn)
    if schema.chroma_tables == 0:
        raise OperationalError(f"{root}: not a palace (chroma.sqlite3 has none of chromadb's tables)")
    if is_link(sql.path):
        add(Finding("SYMLINK", INFO, None, None, 1, [SQLITE_NAME],
                    f"chroma.sqlite3 is a symlink to {os.path.realpath(sql.path)}: read; reconcile refuses it"))
    if sql.wal_mode:
        add(Finding("WAL_MODE", INFO, None, None, 1, [], "chroma.sqlite3 is in WAL journal mode; chromadb "
                    "never sets it (read without creating -wal/-shm)"))
    for sev, objs in ((ERROR, schema.dangerous), (INFO, [o for o in schema.foreign if not o.touches])):
        if objs:
            add(Finding("FOREIGN_SQL", sev, None, None, len(objs), [o.describe() for o in objs[:SAMPLE]],
                        "chromadb creates no trigger or view, nor this index; SQLite would run it on writes"
                        if sev == ERROR else "a trigger, view or index chromadb never creates, on what "
                        "reconcile never writes"))
    if schema.missing:
        add(Finding("SQLITE_CORRUPT", ERROR, None, None, len(schema.missing), schema.missing[:SAMPLE],
                    "chromadb's schema is incomplete: missing " + ", ".join(schema.missing[:SAMPLE])))
        return False
    return True


def _refuse_locked(root: Path, exc: Exception) -> None:
    """Another process holds a write lock longer than the read waits: an operational error
    (exit 8), never SQLITE_CORRUPT, whose advice (restore the file) would lose rows."""
    if "database is locked" in str(exc) or "database table is locked" in str(exc):
        raise OperationalError(f"{root}: chroma.sqlite3 is locked by another process (a write in progress?); "
                               "try again once it is done") from None


def _check(sql: PalaceSql, root: Path, collection: str | None, report: CheckReport,
           for_repair: bool = False) -> None:
    add = report.findings.append
    if sql.hot_journal:
        # A synced header means SQLite must roll back before anyone may write (error);
        # a zeroed header never reached the db file and SQLite ignores it
        hot = journal_synced(sql.path)
        state = ("rollback pending: synced header, the db file may hold uncommitted pages (read rolled back); "
                 "SQLite rolls it back at the next read-write open (chromadb's start, or reconcile); "
                 "never copy chroma.sqlite3 without it"
                 if hot else "header never synced: nothing reached chroma.sqlite3")
        # (info, not a warning: a journal SQLite ignores is no work for anyone, and check's
        # exit code must agree with reconcile's "nothing to do")
        # A synced one is a warning, not an error: SQLite's rollback is safe and automatic.
        add(Finding("HOT_JOURNAL", WARNING if hot else INFO, None, None, 1, [],
                    f"chroma.sqlite3-journal present; {state}"))
    report.generation = sql.generation
    at = len(report.findings)
    # the STALE_ROWS scans read the whole metadata b-tree: the quick_check helper runs them
    _, stale_queries = sql.stale_queries()
    quick_check = sql.quick_check_started(stale_queries)
    try:
        _collections(sql, root, collection, report, for_repair)
    finally:
        problems, answers = quick_check()  # joined even when the rest failed: it reads the same file
        if problems:
            report.findings.insert(at, Finding("SQLITE_CORRUPT", ERROR, None, None, len(problems),
                                               problems[:SAMPLE], "PRAGMA quick_check"))
    _stale_findings(sql.stale_rows(answers), report, sql.generation)


def _collections(sql: PalaceSql, root: Path, collection: str | None, report: CheckReport,
                 for_repair: bool) -> None:
    add = report.findings.append
    cols = sql.collections()
    if collection is not None:
        named = [c.label for c in cols if c.name == collection and c.label != collection]
        cols = [c for c in cols if c.label == collection]  # (a bare name: the default database's)
        if not cols:
            elsewhere = f"; in other databases: {', '.join(named[:5])}" if named else ""
            raise UsageProblem(f"{root}: no collection named {collection!r}{elsewhere}")
    seqs = sql.max_seq_ids()
    vector_ids = set()
    for info in cols:
        st = load_state(sql, root, info, seqs, for_repair)
        report.states.append(st)
        if info.vector_segment:
            vector_ids.add(info.vector_segment)
        _collection_findings(st, report, sql.generation.family, sql.generation.name)
        if st.pending and sql.generation.family == "1.x":
            _unreadable_findings(sql, st, report)
    if collection is None:
        known = sql.all_segment_ids()
        orphans = orphan_dirs(root, known)
        if orphans:
            size = sum(o.allocated for o in orphans)
            add(Finding("SEGMENT_DIR_ORPHAN", INFO, None, None, len(orphans), [o.segment for o in orphans[:SAMPLE]],
                        f"{human(size)} on disk in folders no segment owns (left by chromadb after replacing a "
                        "segment or deleting a collection; never read); --prune-orphan-dirs moves them to the backup"))
        quar = quarantined(root, backups=False)
        if quar:
            size = sum(q.allocated for q in quar)
            kinds = sorted({q.kind for q in quar})
            add(Finding("QUARANTINED", INFO, None, None, len(quar), [q.path.name for q in quar[:SAMPLE]],
                        f"{human(size)} in quarantined segment copies ({', '.join(kinds)}); chromadb never reads them"))
    _queue_findings(sql, seqs, report)
    fmts = sorted({st.idmap.fmt for st in report.states if st.idmap is not None})
    if fmts:
        report.generation.evidence.append("index_metadata.pickle: " + ", ".join(fmts))


def _unreadable_findings(sql: PalaceSql, st: CollectionState, report: CheckReport) -> None:
    """A 0.x palace that chromadb 1.x opened (and migrated) with rows still pending: 1.x
    replays them on its first read, and one whose document 0.x wrote as null makes every
    read of the collection panic. reconcile folds them into the index, past which 1.x
    never reads them."""
    bad = sql.documents_not_text(st.info.id)
    rows = [w.id for w in st.pending if w.seq_id in bad]
    if rows:
        report.findings.append(Finding(
            "WAL_UNREADABLE", ERROR, st.info.label, st.info.vector_segment, len(rows), sorted(rows)[:SAMPLE],
            "pending WAL rows whose document 0.x wrote as null: chromadb 1.x panics replaying them "
            "(\"Document not found in metadata\"), and every count, get and query of the collection fails"))


def _queue_findings(sql: PalaceSql, seqs: dict, report: CheckReport) -> None:
    consumed = [s.value for s in seqs.values() if not s.poisoned]
    top = max(consumed, default=0)
    wal_max = sql.wal_max_seq() or 0
    if top > wal_max:
        ahead = sum(1 for v in consumed if v > wal_max)
        report.findings.append(Finding(
            "QUEUE_RESET", ERROR, None, None, ahead, [],
            f"next WAL seq_id {wal_max + 1} <= consumed max_seq_id {top}: new writes would be skipped",
        ))


def _stale_findings(stale: StaleRows, report: CheckReport, gen: Generation) -> None:
    if not stale:
        return
    if gen.name == "0.4" and not stale.metadata:
        # chromadb 0.4 leaves a deleted record's full-text document on every delete, and
        # its own adds replace such a row: a 0.4 palace's normal state. Once a 1.x opens
        # the palace (its migrations make it a 1.x palace), they are reported.
        return
    ids = stale.ids
    report.findings.append(Finding(
        "STALE_ROWS", ERROR, None, None, len(ids), [str(i) for i in ids[:SAMPLE]],
        f"{len(stale.metadata)} record(s)' metadata rows and {len(stale.fulltext)} full-text document(s) outlive "
        "their embeddings row (deleted behind chromadb's back): a new record that gets the id fails to apply "
        "(1.x: the collection's writes and count() then fail) or inherits the metadata (0.6)",
    ))


def _collection_findings(st: CollectionState, report: CheckReport, schema: str = "1.x", release: str = "") -> None:
    info = st.info
    seg = info.vector_segment

    def add(code: str, count: int, sample: list, detail: str, severity: str = ERROR) -> None:
        if count:
            report.findings.append(
                Finding(code, severity, info.label, seg, count, [str(s) for s in sample[:SAMPLE]], detail)
            )

    if st.unsafe_id is not None:
        add("UNSAFE_ID", 1, [st.info.id], st.unsafe_id + "; not read")
        report.collections.append(summary(st))
        return
    if st.symlinks:
        add("SYMLINK", len(st.symlinks), st.symlinks, "symlink in the vector segment; not followed, not read")
        report.collections.append(summary(st))
        return
    for s in (st.vector_seq, st.metadata_seq):
        if s is not None and s.poisoned:
            add("POISONED_SEQ", 1, [str(s.value)], f"max_seq_id {s.value} > 2**53")
    dir_ok = st.seg_dir is not None and st.seg_dir.is_dir()
    unpending = st.rows_not_pending()
    if not dir_ok:
        add("SEGMENT_DIR_MISSING", unpending, [], "vector segment folder missing; rows not in the WAL")
    elif st.pickle_status == PICKLE_MISSING:
        add("PICKLE_MISSING", unpending, [], "index_metadata.pickle missing; rows not in the WAL")
    elif st.pickle_status == PICKLE_UNREADABLE:
        add("PICKLE_UNREADABLE", max(unpending, 1), [], st.pickle_error or "")
    elif st.pickle_status == PICKLE_UNSAFE:
        add("PICKLE_UNSAFE", max(unpending, 1), [], st.pickle_error or "")
    if st.idmap is not None and st.vector_seq is None:
        add("SEQ_MISSING", 1, [], "index persisted but max_seq_id row missing", WARNING)
    if st.torn:
        add("TORN", 1, [], "; ".join(st.torn) + ". Do not open this palace with chromadb before repair: "
            "chromadb 1.x sizes the index from the torn header, can grow link_lists.bin to hundreds of GB "
            "(sparse) and crash on the next open; 0.6 reads the torn slots' garbage: it fails reads, or serves "
            "the palace once and segfaults on a later open")
    _bad_vectors(st, add)
    if st.files is not None and st.files.header is not None and not st.torn:
        size = st.files.present.get("link_lists.bin", 0)
        extra = size - st.link_bytes_used
        if extra > max(BLOAT_FLOOR, st.link_bytes_used):
            add("LINK_BLOAT", 1, [], f"link_lists.bin is {size} bytes, elements use {st.link_bytes_used}", WARNING)
    # (also a segment never persisted: 0.x replays its whole WAL from an empty map)
    quirks = st.replay_quirks(release) if schema == "0.6" else []
    add("REPLAY_QUIRK", len(quirks), quirks,
        "pending WAL rows chromadb 0.x's replay applies otherwise than SQL did (a write after a delete of "
        "the same id in one batch): phantoms or vectors the rows never had once replayed; reconcile applies "
        "them itself")
    m = st.idmap
    if m is not None:
        orphans = st.sql_only()
        add("SQL_ONLY", len(orphans), orphans, "rows with no live vector in the index")
        phantoms = st.hnsw_only()
        add("HNSW_ONLY", len(phantoms), phantoms, "id map entries with no SQL row")
        ghosts = st.ghost_labels()
        add("GHOST_LABEL", len(ghosts), ghosts, "index labels unknown to the id map")
        conflicts = st.replay_conflicts()
        # chromadb 0.6 replays such a delete without complaint (measured): on a 0.6 palace
        # it only fails once chromadb 1.x opens it, which is a warning, not an error
        add("REPLAY_CONFLICT", len(conflicts), conflicts,
            "pending deletes of labels the index already marked deleted: chromadb 1.x's replay fails"
            + (" (0.6 palace: 0.6 replays them; 1.x would not)" if schema == "0.6" else ""),
            WARNING if schema == "0.6" else ERROR)
        ahead = st.index_ahead()
        add("INDEX_AHEAD", len(ahead), ahead,
            "index entries newer than their SQL rows (a persisted batch whose commit rolled back): "
            "search and get return vectors SQL never kept")
        dups = st.duplicate_labels()
        add("DUPLICATE_LABEL", len(dups), dups, "labels held twice")
        # the map's own labels only: index labels the map lacks are GHOST_LABEL, and the
        # next add reusing a ghost's label overwrites no drawer's vector
        top_label = m.max_label
        inv = m.inverse_problems()
        if m.total_elements_added != m.sane_total():
            add("OFF_BY_ONE", 1, [], f"total_elements_added={m.total_elements_added} is beyond any label chromadb "
                "could issue: every later add fails inside chromadb")
        elif m.total_elements_added < top_label or inv:
            add("OFF_BY_ONE", max(inv, 1), [], f"total_elements_added={m.total_elements_added}, "
                f"max label={top_label}, {inv} non-inverse map entries")
        if m.fmt == "object" and m.dimensionality is None and m.count:
            add("DIMENSION_LOST", 1, [], "0.6 id map has dimensionality None: chromadb 0.6 fails every read")
        elif (m.dimensionality is not None and m.count and st.files is not None and st.files.header is not None
              and not st.torn and m.dimensionality != st.files.header.dim):
            add("DIMENSION_LOST", 1, [], f"id map says dimensionality {m.dimensionality}, the index holds "
                f"{st.files.header.dim}-d vectors: chromadb 0.6 refuses every query (1.x ignores it)")
    if m is not None and st.written_in_rollback and not any(
            f.severity == ERROR and f.collection == info.label for f in report.findings):
        # said only when nothing else flags the index: any repair proves every slot anyway.
        # A warning: the persist may have been killed before any changed vector reached the
        # file (explore found such states chromadb serves correctly); only the slot-by-slot
        # proof reconcile makes can tell
        add("INDEX_AHEAD", 1, [], "data_level0.bin written after the leftover journal (0.6 persists before "
            "commit): it may hold vectors of the rolled-back batch, which chromadb would serve; reconcile "
            "compares every slot with the WAL or, with --embedder, the re-embedded document", WARNING)
    pend = len(st.pending)
    add("PENDING", pend, sorted(st.pending_ids)[:SAMPLE], "WAL rows chromadb replays on open", INFO)
    report.collections.append(summary(st))


def _bad_vectors(st: CollectionState, add: Callable[..., None]) -> None:
    """BAD_VECTOR: live, well-formed slots whose stored vector is NaN or infinite, or, in a
    cosine index (hnswlib stores unit vectors there), not of unit length: a torn page
    zeroed part of it. chromadb serves them as they are: the row ranks wrong or never.
    Judged in the slot pass from the blocks it reads anyway (under a torn header, the
    repair's rebuild judges them)."""
    sl = st.slots
    if sl is None or sl.vector_ok is None or st.torn:
        return
    bad = np.flatnonzero(sl.live & ~sl.vector_ok & ~sl.bad)
    if not len(bad):
        return
    labels = sl.labels[bad[:SAMPLE]].tolist()
    names = [st.idmap.label_to_id.get(lab, f"label {lab}") for lab in labels] if st.idmap is not None else \
        [f"label {lab}" for lab in labels]
    what = "not finite" + (" or not unit length" if st.info.space == "cosine" else "")
    add("BAD_VECTOR", len(bad), names, f"live slots whose stored vector is {what}: chromadb serves them as "
        "stored (the rows rank wrong or are never found); reconcile takes each row's vector from the WAL or its "
        "document again")


def summary(st: CollectionState) -> dict:
    return {
        "name": st.info.label,
        "id": st.info.id,
        "database": st.info.database,
        "tenant": st.info.tenant,
        "vector_segment": st.info.vector_segment,
        "space": st.info.space,
        "dimension": st.info.dimension,
        "rows": len(st.sql_rows),
        "mapped": st.idmap.count if st.idmap else None,
        "live_labels": len(st.live_labels) if st.slots is not None else None,
        "pending": len(st.pending),
        "pickle": st.idmap.fmt if st.idmap else st.pickle_status,
        "max_seq_id": st.vector_seq.value if st.vector_seq else None,
    }


def deep_findings(sql: PalaceSql, report: CheckReport, embedders) -> dict[str, dict]:  # noqa: ANN001
    """``check --deep``: re-embed every mapped row and add STALE_VECTOR findings to
    ``report``. ``embedders`` is a ``chaosfix.embedders.select.EmbedderSelector``.
    Returns collection id -> {row id: its document's vector} for the reconciler. Raises
    OperationalError when a collection has no usable embedder (one line, what helps)."""
    from chaosfix.deep import stale_vectors

    out: dict[str, dict] = {}
    for st in report.states:
        if st.idmap is None or not st.sql_rows:
            continue
        choice = embedders.for_collection(sql, st)
        if choice.embedder is None:
            raise OperationalError(f"check --deep of {st.info.label}: {choice.refused}")
        res = stale_vectors(sql, st, getattr(choice.embedder, "__wrapped__", choice.embedder))
        out[st.info.id] = res.stale
        if res.stale:
            report.findings.append(Finding(
                "STALE_VECTOR", ERROR, st.info.label, st.info.vector_segment, len(res.stale),
                sorted(res.stale)[:SAMPLE], f"{len(res.stale)} of {res.compared} rows hold another vector than "
                f"their document embeds to (lowest cosine {res.worst}; {choice.line()}): e.g. an upsert whose "
                "index flush was lost"))
    return out
