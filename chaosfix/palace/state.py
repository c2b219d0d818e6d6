"""One collection's on-disk state, read from SQLite, the HNSW files and the id map.

``check`` reports from it and ``reconcile`` plans from it, so both see exactly the same
facts. Nothing here raises for damaged data: every problem is recorded as a fact.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Container, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from chaosfix.palace import idmap as idmap_mod
from chaosfix.palace import map_child, pickle_reader, replay0x
from chaosfix.palace.hnsw import DEFAULT_EFC, DEFAULT_M, HnswFiles, SlotTable, derive_header
from chaosfix.palace.idmap import in_sorted
from chaosfix.palace.sql import CollectionInfo, PalaceSql, SeqValue, WalRow
from chaosfix.safe_fs import is_link, is_uuid, links_in, shown

# a layout derived for a lost header.bin is taken only when at most this share of its
# slots has garbage links or flags (a wrong layout makes nearly all of them garbage)
DERIVED_MAX_BAD = 0.1

PICKLE_OK, PICKLE_NONE, PICKLE_MISSING, PICKLE_UNREADABLE, PICKLE_UNSAFE = (
    "ok", "none", "missing", "unreadable", "unsafe"
)


@dataclass
class CollectionState:
    info: CollectionInfo
    seg_dir: Path | None
    # user id -> seq_id; the seq_ids are None where nothing reads them (a 1.x dict map
    # and a sound max_seq_id: ``load_state`` then reads the ids alone; a healthy large
    # one's stay one string until asked, ``SqlIds``)
    sql_rows: Mapping[str, int | None]
    vector_seq: SeqValue | None
    metadata_seq: SeqValue | None
    pending: list[WalRow]
    files: HnswFiles | None = None
    idmap: idmap_mod.IdMap | None = None
    pickle_status: str = PICKLE_NONE
    pickle_error: str | None = None
    slots: SlotTable | None = None
    torn: list[str] = field(default_factory=list)
    link_bytes_used: int = 0
    unsafe_id: str | None = None  # why the collection or segment id is not used as a path
    symlinks: list[str] = field(default_factory=list)  # symlinked segment folder/files: never read
    # WAL rows past the metadata segment's max_seq_id, which chromadb's replay still
    # applies to SQL's rows (None: the pending rows above the vector segment's say it)
    unapplied: list[WalRow] | None = None
    written_in_rollback: bool = False  # 0.6: index files written by a transaction that rolled back
    # the map helper's exact answer (a deferred map): SQL's ids the map lacks, the map's
    # ids SQL lacks; both empty: same_ids (None: not asked, or too many to name)
    map_diff: MapDiff | None = None

    def drop_index_facts(self) -> None:
        """Forget the old index's id map and slot table (the largest objects a plan holds)
        once the new segment is built: verification then reuses their memory instead of
        adding its own on top (peak RSS)."""
        self.idmap = None
        self.slots = None
        self.map_diff = None
        for cached in ("live_label_slots", "live_sorted", "live_labels", "same_ids"):
            self.__dict__.pop(cached, None)

    # ---- derived facts -------------------------------------------------------------
    @property
    def pending_ids(self) -> set[str]:
        return {w.id for w in self.pending}

    @cached_property
    def pending_vector_ids(self) -> set[str]:
        """Ids chromadb's replay of the pending WAL leaves with a vector in the index. A
        metadata-only update brings none, nor does an update of an id the id map lacks
        (both 0.6 and 1.x skip it), so a row whose only pending write is one of those
        stays a row search never finds."""
        if not self.pending:
            return set()
        return set(replayed(self.pending, self.map_ids(), lambda w: w.has_vector)[0])

    def map_ids(self) -> Container[str]:
        """The id map's ids, to ask whether it holds a few (pending) ids: a deferred map
        whose ids the helper compared with SQL's answers from SQL's ids and the few on
        either side alone, unpickled never (1 s at 500k ids, which a check of a palace
        between two flushes paid)."""
        m, d = self.idmap, self.map_diff
        if m is None:
            return {}
        if not m.is_deferred or d is None:
            return m.id_to_label
        return self.sql_rows if d.empty else _MapIds(self.sql_rows, d)

    @cached_property
    def live_label_slots(self) -> dict[int, int]:
        """live label -> its first slot (computed once: slots never change after load)."""
        if self.slots is None:
            return {}
        idx = np.flatnonzero(self.slots.live)
        labels = self.slots.labels[idx]
        order = np.argsort(labels, kind="stable")  # equal labels keep slot order: first wins
        first = firsts(labels[order])
        return dict(zip(labels[order][first].tolist(), idx[order][first].tolist()))

    @cached_property
    def live_sorted(self) -> np.ndarray:
        """Every live slot's label, sorted (uint64; nearly sorted already: slot order)."""
        if self.slots is None:
            return np.zeros(0, dtype=np.uint64)
        return idmap_mod.sort_labels(self.slots.labels[self.slots.live])

    @cached_property
    def live_labels(self) -> np.ndarray:
        """The distinct live labels, sorted: the set operations below run on it in numpy
        instead of a 10^5..10^6-entry Python dict."""
        return self.live_sorted[firsts(self.live_sorted)]

    @cached_property
    def same_ids(self) -> bool:
        """SQL's ids are exactly the map's (the healthy case), compared once in C."""
        if self.idmap is None:
            return False
        if self.map_diff is not None:
            return self.map_diff.empty
        rows, m = self.sql_rows, self.idmap.id_to_label
        # (equal sizes and rows within the map; a set difference is 2x faster than keys ==)
        return len(rows) == len(m) and not rows.keys() - m.keys()

    def duplicate_labels(self) -> list[int]:
        dups: set[int] = set()
        s = self.live_sorted
        dups |= set(s[1:][s[1:] == s[:-1]].tolist())
        if self.idmap is not None and not self.idmap.labels_unique():
            dups |= {lab for lab, n in Counter(self.idmap.id_to_label.values()).items() if n > 1}
        return sorted(dups)

    def sql_only(self) -> list[str]:
        """Rows that search can never find: no live vector, nothing pending to bring one."""
        if self.idmap is None:
            return []
        d = self.map_diff
        if (self.same_ids or d is not None) and in_sorted(self.idmap.sorted_labels(), self.live_labels).all():
            alone = d.sql_alone if d is not None else frozenset()
            if not alone:
                return []  # (the healthy case, answered without the map's dicts)
            # every mapped id is found: only the rows the map lacks can be unfindable
            return sorted(alone - self.pending_vector_ids - self.replay_removes)
        m, rows = self.idmap.id_to_label, self.sql_rows
        unmapped = set() if self.same_ids else rows.keys() - m.keys()
        # mapped ids whose label has no live slot, in numpy (labels were range-checked: u64)
        labels = np.fromiter(m.values(), dtype=np.uint64, count=len(m))
        dead = ~in_sorted(labels, self.live_labels)
        unfound = set(itertools.compress(m, dead.tolist())) if dead.any() else set()
        if unfound and not self.same_ids:
            unfound &= rows.keys()
        return sorted((unmapped | unfound) - self.pending_vector_ids - self.replay_removes)

    @cached_property
    def replay_removes(self) -> set[str]:
        """SQL rows a WAL delete the metadata segment has not applied yet removes when
        chromadb replays it (1.x commits its WAL, then the metadata segment applies it in
        a transaction of its own: a kill between leaves the row and its delete): rows no
        search need find."""
        tail = self.unapplied
        if tail is None:
            top = self.reflected_seq if self.pending else 0
            tail = [w for w in self.pending if w.seq_id > top]
        gone: set[str] = set()
        for w in tail:
            if w.op == 3:
                gone.add(w.id)
            elif w.op in (0, 2):
                gone.discard(w.id)
        return {i for i in gone if i in self.sql_rows}

    def hnsw_only(self) -> list[str]:
        """Mapped ids with no row (phantoms)."""
        if self.idmap is None or self.same_ids:
            return []
        if self.map_diff is not None:
            return sorted(self.map_diff.map_alone - self.pending_ids)
        return sorted(self.idmap.id_to_label.keys() - self.sql_rows.keys() - self.pending_ids)

    def ghost_labels(self) -> list[int]:
        """Live index labels the map does not know (KeyError on query), except the ones
        chromadb's replay of the pending WAL re-issues (``replay_labels``)."""
        if self.idmap is None:
            return []
        claimed = self.replay_labels() if not self.torn else range(0)  # a torn index is never replayed
        live = self.live_labels
        if self.idmap.inverse_problems():
            known = self.idmap.label_to_id
            mapped = np.sort(np.fromiter(known, dtype=np.uint64, count=len(known)))
        else:  # inverse maps: label_to_id's keys are id_to_label's labels
            mapped = self.idmap.sorted_labels()
        unknown = live[~in_sorted(live, mapped)]
        return sorted(lab for lab in unknown.tolist() if lab not in claimed)

    def replay_labels(self) -> range:
        """The labels chromadb's replay of the pending WAL will issue: one per pending
        add/upsert of an id the map does not hold, counted up from total_elements_added.
        A kill after a persist wrote the HNSW files but before the pickle leaves exactly
        these labels in the index (1.x commits its WAL first): the replay re-adds the same
        rows under the same labels, overwriting those slots, and chromadb serves the palace
        correctly, so they are no finding (measured by ``chaosfix explore``)."""
        m = self.idmap
        if m is None or not self.pending:
            return range(0)
        held, seen = self.map_ids(), set()
        for w in self.pending:
            if w.op in (0, 2) and w.id not in held:
                seen.add(w.id)
        new = len(seen)
        return range(m.total_elements_added + 1, m.total_elements_added + 1 + new)

    @property
    def reflected_seq(self) -> int:
        """How far the SQL rows reflect the WAL: the metadata segment's max_seq_id, or the
        rows' own highest seq_id when that is poisoned or missing."""
        m = self.metadata_seq
        return m.value if m is not None and not m.poisoned else max(self.sql_rows.values(), default=0)

    def replay_quirks(self, release: str) -> list[str]:
        """Ids chromadb 0.x's replay of the pending WAL leaves otherwise than SQL's rows
        say (``replay0x``: a write after a delete of the same id in one batch). None on
        1.x, whose replay is the model itself. Only rows SQL's rows already reflect are
        judged (reconcile folds in only those; a later one is judged once SQL has it).
        A segment without an id map (never persisted: fewer rows than its sync
        threshold) is replayed by 0.x from an empty map with no index loaded, on every
        open. Call it for 0.x palaces only (a map's format cannot say so without a map)."""
        m = self.idmap
        if not self.pending or self.pickle_status not in (PICKLE_OK, PICKLE_NONE, PICKLE_MISSING):
            return []
        if m is not None and (m.fmt != "object" or self.torn):
            return []
        top = self.reflected_seq
        rows = list(itertools.takewhile(lambda w: w.seq_id <= top, self.pending))
        # 0.x sizes its batch from the vector segment's metadata (a collection's modify()
        # drops the collection's copy), chromadb's default 100 when it has none
        size = self.info.segment_metadata.get("hnsw:batch_size")
        size = size if type(size) is int and size > 0 else 100
        return replay0x.divergent(rows, self.map_ids(), size, release, lambda w: w.has_vector,
                                  m is not None and bool(m.count))

    def replay_conflicts(self) -> list[str]:
        """Ids with a pending delete whose mapped label the index already marked deleted:
        the persist reached data_level0.bin but not the pickle or max_seq_id, and chromadb
        1.x's replay of the delete then fails ('Failed to apply logs')."""
        if self.idmap is None or self.slots is None or not any(w.op == 3 for w in self.pending):
            return []
        gone = set(self.slots.labels[self.slots.deleted].tolist())
        if not gone:
            return []
        return sorted({w.id for w in self.pending if w.op == 3 and self.idmap.id_to_label.get(w.id) in gone})

    def label_bound(self) -> int:
        """The highest label this palace could have issued. Labels are issued one by one
        and never reused, and each new one takes a new slot, so none exceeds the id map's
        own count plus the slots in data_level0.bin plus the rows still pending. A slot
        label above it is bytes of a torn write (about 9.4e13 seen in 0.6): adopting it
        as total_elements_added makes every later chromadb add fail (std::bad_alloc)."""
        m = self.idmap
        base = max(m.sane_total(), m.max_label) if m is not None else 0
        slots = self.files.slots_in_file if self.files is not None and self.files.header is not None else 0
        return base + slots + len(self.pending)

    def index_ahead(self) -> list[str]:
        """Ids whose index entry records a later write than their SQL row (0.6's
        ``id_to_seq_id`` above the row's seq_id): 0.6 persists a batch's index inside the
        add's transaction, so a kill before the commit rolls SQL back and leaves the index
        holding the batch's new vectors for existing ids (wrong vectors, silently)."""
        m = self.idmap
        if m is None or not m.has_seq_map:
            return []
        rows = self.sql_rows  # (with their seq_ids: load_state reads them for a map that has some)
        seqs = m.id_to_seq_id
        # compared at C speed where every seq_id fits an int64 (0.17 s a call at 100k ids
        # one by one); the loop below is the definition
        if set(map(type, seqs.values())) <= {int}:
            # (no shortcut by the metadata segment's max_seq_id: after a rollback SQLite
            # issues the rolled-back seq_ids again, so later writes carry it past the
            # map's while the index still holds the rolled-back vectors)
            n = len(seqs)
            try:
                mine = np.fromiter(seqs.values(), dtype=np.int64, count=n)
                theirs = np.fromiter(map(rows.get, seqs, itertools.repeat(0)), dtype=np.int64, count=n)
            except (OverflowError, TypeError, ValueError):
                pass
            else:
                there = np.fromiter(map(rows.__contains__, seqs), dtype=bool, count=n)
                keys = list(seqs)
                later = np.flatnonzero(there & (mine > theirs)).tolist()
                return sorted(rid for rid in map(keys.__getitem__, later) if rid in m.id_to_label)
        return sorted(rid for rid, seq in seqs.items()
                      if rid in rows and rid in m.id_to_label and isinstance(seq, int) and seq > rows[rid])

    def rows_not_pending(self) -> int:
        """Rows no pending WAL row brings a vector for (none pending: SQL's ids need not
        be made a dict, ``SqlIds``)."""
        pend = self.pending_vector_ids
        return len(self.sql_rows) - (len(pend & self.sql_rows.keys()) if pend else 0)


def replayed(pending: list[WalRow], existing: Container[str],
             carries: Callable[[WalRow], bool]) -> tuple[dict[str, WalRow], set[str]]:
    """Replay pending WAL rows the way chromadb's vector segment does (0.6's
    ``_write_records``, 1.x's local HNSW writer): an add of an id the index already holds
    and an update of one it does not hold are skipped; upsert adds or replaces.

    Returns (id -> the row whose vector the index ends up holding, ids whose current
    index vector a pending delete voids). ``carries`` says whether a row brings a vector
    (check reads only whether it has one; reconcile needs it decoded). ``existing`` is
    only asked about (never copied: 500k ids, usually no pending row).
    """
    added: set[str] = set()
    gone: set[str] = set()

    def present(i: str) -> bool:
        return i in added or (i not in gone and i in existing)

    out: dict[str, WalRow] = {}
    reset: set[str] = set()
    for w in pending:
        if w.op == 3:
            out.pop(w.id, None)
            if present(w.id):
                reset.add(w.id)
            added.discard(w.id)
            gone.add(w.id)
        elif not carries(w):
            continue
        elif w.op == 0 and present(w.id):
            continue
        elif w.op == 1 and not present(w.id):
            continue
        else:
            out[w.id] = w
            added.add(w.id)
            gone.discard(w.id)
    return out, reset


def firsts(s: np.ndarray) -> np.ndarray:
    """Mask of the first of each run of equal values in sorted ``s`` (``np.unique`` without
    its cost: numpy 2's unique hashes, 40x slower here than a sort of nearly sorted labels)."""
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    return first


def id_problem(info: CollectionInfo) -> str | None:
    """Why this collection's ids cannot be trusted as names (None when they are UUIDs):
    the vector segment id is a folder name and the collection id a WAL topic suffix."""
    for what, val in (("collection", info.id), ("vector segment", info.vector_segment),
                      ("metadata segment", info.metadata_segment)):
        if val is not None and not is_uuid(val):
            return f"{what} id {shown(val)} is not a UUID"
    return None


def written_in_rollback(seg_dir: Path, db_path: Path) -> bool:
    """chromadb 0.6 persists the index inside the add's transaction, before its commit.
    A leftover journal means that transaction never committed (SQLite rolls it back);
    an index file written after the journal's last write was written by it, after every
    SQL change it made, i.e. by its persist: it may hold the batch's vectors for
    existing ids, which SQL no longer has (nor, once purged, any WAL row). When the
    persist got as far as the pickle, its ``id_to_seq_id`` names every id the batch
    wrote, so ``index_ahead`` finds them exactly and no slot needs proving."""
    journal = Path(str(db_path) + "-journal")
    try:
        since = journal.stat().st_mtime_ns
    except OSError:
        return False
    try:
        if (seg_dir / idmap_mod.FILENAME).stat().st_mtime_ns >= since:
            return False
    except OSError:
        pass
    # only data_level0.bin holds vectors: a persist killed after rewriting header.bin (the
    # same bytes, measured on 0.6.3) but before any vector left chromadb serving SQL's view
    try:
        return (seg_dir / "data_level0.bin").stat().st_mtime_ns >= since
    except OSError:
        return False


def load_state(sql: PalaceSql, palace: Path, info: CollectionInfo, seqs: dict[str, SeqValue],
               for_repair: bool = False) -> CollectionState:
    """Read one collection (``for_repair``: the reconciler's read, its id map always
    unpickled here, never deferred to check's helper). An id that is not a UUID is
    recorded and nothing is read by it; a symlinked segment folder or file is recorded
    and the segment is not read."""
    bad_id = id_problem(info)
    if bad_id is not None:
        return CollectionState(info=info, seg_dir=None, sql_rows={}, vector_seq=None, metadata_seq=None,
                               pending=[], unsafe_id=bad_id)
    vseq = seqs.get(info.vector_segment) if info.vector_segment else None
    mseq = seqs.get(info.metadata_segment) if info.metadata_segment else None
    st = CollectionState(
        info=info,
        seg_dir=palace / info.vector_segment if info.vector_segment else None,
        sql_rows={},
        vector_seq=vseq,
        metadata_seq=mseq,
        pending=[],
    )
    linked = st.seg_dir is not None and is_link(st.seg_dir)
    if linked:
        st.symlinks.append(st.seg_dir.name)
    seg_ok = st.seg_dir is not None and not linked and st.seg_dir.is_dir()
    if seg_ok:
        st.symlinks.extend(f"{st.seg_dir.name}/{n}" for n in links_in(st.seg_dir))
        seg_ok = not st.symlinks
    raw = _pickle_bytes(st) if seg_ok else None
    # deferred for check of a 1.x palace; a 0.6 map's seq_ids are compared with SQL's by
    # every check (``index_ahead``), so it would be unpickled here anyway
    if (raw is not None and len(raw) >= map_child.MIN_BYTES and not for_repair
            and sql.generation.pickle_format == "dict"):
        _load_deferred(sql, st, raw)
    else:
        # the pickle's opcode scan (pure Python, ~1 s per 500k ids) runs in a child on the
        # other core while this one reads SQL's rows and the HNSW files
        with pickle_reader.Scan(raw or b"") as scan:
            # a 1.x map keeps no seq_ids: SQL's ids alone (as one string: 0.2 s at 500k
            # rows against 0.5-1 s for the (id, seq_id) rows), re-read with seq_ids below
            # for an odd map that keeps some
            blob = sql.id_blob(info.metadata_segment) if (_seqs_unused(st)
                                                          and sql.generation.pickle_format == "dict") else None
            from_blob = blob is not None
            st.sql_rows = (dict.fromkeys(blob.split("\0")) if blob is not None
                           else sql.rows(info.metadata_segment) if info.metadata_segment else {})
            del blob
            if seg_ok:
                _read_files(st)
            if raw is not None:
                _parse_pickle(st, raw, scan)
        if from_blob and st.idmap is not None and (st.idmap.fmt == "object" or st.idmap.has_seq_map):
            st.sql_rows = sql.rows(info.metadata_segment)
    if vseq is None and st.idmap is not None and st.idmap.max_seq_id is not None and sql.generation.vector_seq_in_pickle:
        st.vector_seq = SeqValue(st.idmap.max_seq_id, "pickle")  # 0.4: the pickle holds it
    above = st.vector_seq.value if st.vector_seq is not None else 0
    st.pending = sql.wal(info.id, above=above, with_vectors=False)
    if st.info.metadata_segment is not None and st.sql_rows and st.reflected_seq < above:
        st.unapplied = sql.wal(info.id, above=st.reflected_seq, with_vectors=False)  # (the metadata segment lags)
    if seg_ok and sql.hot_journal and sql.generation.pickle_format == "object":
        st.written_in_rollback = written_in_rollback(st.seg_dir, sql.path)
    return st


def _load_deferred(sql: PalaceSql, st: CollectionState, raw: bytes) -> None:
    """check's read of a large 1.x map: a helper process unpickles it and compares its ids
    with SQL's on the other core, while this one reads SQL's ids (as one string) and the
    HNSW files; the map stays deferred (``idmap.deferred``) until a finding needs its
    dicts, and so do SQL's ids when the helper found them the map's (``SqlIds``). The
    seq_ids are read only where something uses them. Any answer but "sound" is judged
    again here, by the in-process read (scan, then unpickle), so the verdict on a hostile
    or broken map is always that read's, as in reconcile."""
    seg = st.info.metadata_segment
    with map_child.MapFacts(raw) as helper:
        blob = sql.id_blob(seg) if _seqs_unused(st) and seg is not None else None
        helper.send_ids(blob)
        if blob is None:
            st.sql_rows = sql.rows(seg) if seg else {}
        _read_files(st)
        got = helper.result()
    ok = got is not None and got[0] == "ok"
    diff, from_blob = None, blob is not None
    if blob is not None:
        if ok and got[1]["same_ids"]:
            # the list of ids is a permutation of the map's: as many ids as it has, each once
            diff, st.sql_rows = MapDiff(), SqlIds(blob, got[1]["facts"]["count"])
        else:
            ids = blob.split("\0")
            st.sql_rows = dict.fromkeys(ids)
            # an id twice (a table without its UNIQUE index): the helper's answer was
            # about the list, the findings are about the set
            if ok and len(ids) == len(st.sql_rows) and got[1].get("diff") is not None:
                diff = MapDiff.of(got[1], got[2], ids)
            del ids
    del blob
    if ok:
        _, answer, rest = got
        labels = np.frombuffer(rest, dtype="<u8", count=answer["facts"]["count"]).astype(np.uint64)
        st.idmap = idmap_mod.deferred(raw, answer["facts"], labels)
        st.pickle_status = PICKLE_OK
        st.map_diff = diff
    else:
        _parse_pickle(st, raw)
    if from_blob and st.idmap is not None and (st.idmap.fmt == "object" or st.idmap.has_seq_map):
        st.sql_rows = sql.rows(seg)  # an odd palace: a map that keeps seq_ids, which are compared
        st.map_diff = None


@dataclass(frozen=True)
class MapDiff:
    """The ids a deferred map and SQL do not share (the map helper's ``idmap.id_diff``)."""

    sql_alone: frozenset[str] = frozenset()
    map_alone: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.sql_alone and not self.map_alone

    @classmethod
    def of(cls, answer: dict, rest: bytes, ids: list[str]) -> MapDiff | None:
        """From the helper's answer: positions in ``ids`` (SQL's, as sent), then the map's
        own ids in the bytes after the labels (None: malformed)."""
        at = answer["diff"].get("sql_at") if isinstance(answer["diff"], dict) else None
        if not isinstance(at, list) or not all(type(i) is int and 0 <= i < len(ids) for i in at):
            return None
        alone = map_child.map_alone(answer, rest)
        return None if alone is None else cls(frozenset(map(ids.__getitem__, at)), frozenset(alone))


class _MapIds(Container[str]):
    """A deferred map's ids, asked one at a time: SQL's, but for the few either side alone."""

    def __init__(self, sql_rows: Mapping[str, object], diff: MapDiff) -> None:
        self._rows, self._diff = sql_rows, diff

    def __contains__(self, key: object) -> bool:
        d = self._diff
        return key in d.map_alone or (key not in d.sql_alone and key in self._rows)


class SqlIds(Mapping):
    """SQL's ids of a healthy palace (each the map's, each once), kept as the one string
    SQLite built (``PalaceSql.id_blob``) and made a dict only when something asks more
    than how many there are: a healthy check of 500k rows never does (0.25 s saved)."""

    def __init__(self, blob: str, count: int) -> None:
        self._blob: str | None = blob
        self._count = count
        self._rows: dict[str, None] | None = None

    def _dict(self) -> dict[str, None]:
        if self._rows is None:
            assert self._blob is not None
            self._rows, self._blob = dict.fromkeys(self._blob.split("\0")), None
        return self._rows

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, key: str) -> None:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __contains__(self, key: object) -> bool:
        return key in self._dict()

    # the dict's own views, so set operations on them run in C
    def keys(self) -> KeysView[str]:
        return self._dict().keys()

    def values(self) -> ValuesView[None]:
        return self._dict().values()

    def items(self) -> ItemsView[str, None]:
        return self._dict().items()


def _seqs_unused(st: CollectionState) -> bool:
    """SQL rows' seq_ids are read only for what uses them: ``reflected_seq`` when the
    metadata segment's max_seq_id is poisoned or missing, a map that keeps seq_ids."""
    m_seq = st.metadata_seq
    return st.info.metadata_segment is not None and m_seq is not None and not m_seq.poisoned


def _pickle_bytes(st: CollectionState) -> bytes | None:
    """The pickle's bytes, or None with ``pickle_status`` saying why there are none."""
    assert st.seg_dir is not None
    p = st.seg_dir / idmap_mod.FILENAME
    if not p.is_file():
        st.pickle_status = PICKLE_MISSING
        return None
    try:
        return pickle_reader.read_bounded(p)
    except (OSError, pickle_reader.PickleBoundsError) as exc:
        st.pickle_status, st.pickle_error = PICKLE_UNREADABLE, str(exc)
        return None


def _read_pickle(st: CollectionState) -> None:
    """Read and parse the pickle now (its scan inline): for callers with nothing to overlap."""
    raw = _pickle_bytes(st)
    if raw is not None:
        _parse_pickle(st, raw)


def _parse_pickle(st: CollectionState, raw: bytes, scan: pickle_reader.Scan | None = None) -> None:
    try:
        st.idmap = idmap_mod.loads(raw, scanned=scan)
        st.pickle_status = PICKLE_OK
    except idmap_mod.UnsafePickle as exc:
        st.pickle_status, st.pickle_error = PICKLE_UNSAFE, str(exc)
    except idmap_mod.UnreadablePickle as exc:
        st.pickle_status, st.pickle_error = PICKLE_UNREADABLE, str(exc)


def _read_files(st: CollectionState) -> None:
    assert st.seg_dir is not None
    files = HnswFiles.open(st.seg_dir)
    st.files = files
    if not files.present:
        return
    broken = [files.header_error or "header.bin missing"] if files.header is None else files.header.problems()
    derived = None
    if broken:
        st.torn.extend(broken)
        # the slots are still readable with the layout the collection implies (their
        # vectors then need no embedder); garbage under a wrong layout fails the links
        derived = derive_header(files, st.info.dimension or 0, st.info.param("M", DEFAULT_M),
                                st.info.param("construction_ef", DEFAULT_EFC))
        if derived is None:
            return
        files.header = derived
    h = files.header
    for name in ("data_level0.bin", "length.bin", "link_lists.bin"):
        if name not in files.present and h.cur_element_count:
            st.torn.append(f"{name} missing")
    if files.slots_in_file < h.cur_element_count:
        hole = files.level0_real()
        sparse = f" (a hole at byte {hole}: sparse file)" if hole < files.present.get("data_level0.bin", 0) else ""
        st.torn.append(
            f"header counts {h.cur_element_count} elements, data_level0.bin holds {files.slots_in_file}{sparse}"
        )
    if files.present.get("length.bin", 0) < 4 * h.cur_element_count and "length.bin" in files.present:
        st.torn.append("length.bin shorter than the element count")
    if st.info.dimension and h.dim != st.info.dimension and h.cur_element_count:
        st.torn.append(f"index dimension {h.dim} != collection dimension {st.info.dimension}")
    st.slots = files.slots(st.info.space)  # every vector judged from the blocks read anyway (BAD_VECTOR)
    nbad = int(st.slots.bad.sum())
    if derived is not None:
        if nbad > DERIVED_MAX_BAD * len(st.slots.labels):  # not this layout: nothing is read
            files.header, st.slots = None, None
            return
        st.torn.append(f"the slots read with the collection's layout (dimension {h.dim}, M {h.m}): "
                       f"{h.cur_element_count} written")
    if nbad:
        st.torn.append(f"{nbad} slots with invalid neighbour lists or flags")
    if derived is not None:  # (its upper levels are unknown: the rebuild makes new ones)
        return
    used, problem = files.link_walk()
    st.link_bytes_used = used
    if problem:
        st.torn.append(problem)
    st.torn.extend(h.loader_problems(st.info.resize_factor))
