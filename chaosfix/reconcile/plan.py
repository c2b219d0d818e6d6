"""State -> plan: what each collection gets, and from which source.

The target is always the SQL rows: the index is made to hold exactly one live label per
row, never the other way round (a SQL row is never deleted to make a diff zero).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chaosfix.check import PALACE_CODES, CheckReport
from chaosfix.palace.hnsw import DEFAULT_EFC, DEFAULT_M
from chaosfix.palace.idmap import MAX_TOTAL, IdMap
from chaosfix.palace.sql import PalaceSql, WalRow
from chaosfix.palace.state import CollectionState
from chaosfix.reconcile.sources import (
    EMBED,
    QUARANTINE,
    SLOT,
    WAL,
    Embedder,
    embed,
    latest_wal_vectors,
    pending_effects,
)

# (sql, state) -> an embedder choice (chaosfix.embedders.select.Choice): asked only when
# some row has no vector in the index or the WAL, so the guard runs only when needed
EmbedderFor = Callable[[PalaceSql, CollectionState], Any]

PLAUSIBLE_LABEL = MAX_TOTAL  # without an id map: labels above this come from garbage bytes
DEFAULT_CAPACITY = 1000
REBUILD_CODES = {"TORN", "LINK_BLOAT", "PICKLE_MISSING", "PICKLE_UNREADABLE", "PICKLE_UNSAFE",
                 "SEGMENT_DIR_MISSING", "DUPLICATE_LABEL"}
SEQ_CODES = {"POISONED_SEQ", "SEQ_MISSING"}


@dataclass
class SeqWrite:
    segment: str
    value: int
    encoding: str  # "blob" or "int"


@dataclass
class CollectionPlan:
    collection: str
    segment: str | None
    codes: dict[str, int]
    strategy: str = "none"  # none | incremental | rebuild | sql-only
    reasons: list[str] = field(default_factory=list)
    keep: dict[str, int] = field(default_factory=dict)  # id -> label, vector stays in its slot
    replace: dict[str, int] = field(default_factory=dict)  # id -> label, vector from the WAL
    add: dict[str, int] = field(default_factory=dict)  # id -> new label
    source: dict[str, str] = field(default_factory=dict)  # id (add/replace) -> index|wal|embedder
    slot_sourced: int = 0  # kept ids, whose vector stays in its slot (source "index": not listed one by one)
    remove_labels: list[int] = field(default_factory=list)
    remove_ids: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    replay_removes: list[str] = field(default_factory=list)  # rows with no vector that chromadb's replay deletes
    pending_applied: int = 0
    total_elements_added: int = 0
    fmt: str = "dict"
    dimensionality: int | None = None  # as written into the pickle
    dim: int = 0  # vector dimension of the index to build
    max_elements: int = DEFAULT_CAPACITY
    seq_writes: list[SeqWrite] = field(default_factory=list)
    pickle_seq: int | None = None  # 0.4: the vector segment's max_seq_id, kept in the pickle
    clear_journal: bool = False  # INDEX_AHEAD from a leftover journal, every slot proven: move it aside
    unrepaired_reason: str = ""
    map_digest: bytes | None = None  # SHA-256 of the id map the build wrote
    m: int = DEFAULT_M  # a rebuild's graph: the index's own M and ef_construction (``graph_params``)
    ef_construction: int = DEFAULT_EFC
    # a rebuild's sampled kept rows -> their vectors as chromadb returned them before it (read
    # before the old index's facts are dropped; the post-check compares them after)
    kept_before: dict[str, np.ndarray] = field(default_factory=dict)
    post_check_sample: list[str] | None = None  # the post-check's seeded sample, drawn once
    vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for add/replace
    embedder: Any = field(default=None, repr=False)  # the Choice made for rows re-embedded
    state: CollectionState | None = field(default=None, repr=False)

    @property
    def index_changes(self) -> bool:
        return self.strategy in ("incremental", "rebuild")

    @property
    def has_work(self) -> bool:
        return self.index_changes or bool(self.seq_writes) or self.clear_journal

    def to_json(self) -> dict:
        src: dict[str, int] = {SLOT: self.slot_sourced} if self.slot_sourced else {}
        for s in self.source.values():
            src[s] = src.get(s, 0) + 1
        return {
            "collection": self.collection,
            "segment": self.segment,
            "findings": self.codes,
            "strategy": self.strategy,
            "reasons": self.reasons,
            "keep": len(self.keep),
            "add": len(self.add),
            "replace": len(self.replace),
            "remove_labels": len(self.remove_labels),
            "remove_ids": len(self.remove_ids),
            "pending_applied": self.pending_applied,
            "sources": src,
            "unrepaired": len(self.unrepaired),
            "unrepaired_sample": self.unrepaired[:10],
            "unrepaired_ids": self.unrepaired,
            "total_elements_added": self.total_elements_added,
            "pickle_format": self.fmt,
            "seq_writes": [vars(s) for s in self.seq_writes],
            "pickle_seq": self.pickle_seq,
            "embedder": self.embedder.to_json() if self.embedder is not None else None,
        }


def chroma_capacity(n: int, resize_factor: float = 1.2) -> int:
    """max_elements the way chromadb sizes it: capacity grows by resize_factor, floor 1000."""
    return max(DEFAULT_CAPACITY, math.ceil(n * resize_factor))


def _seq_encoding(sql: PalaceSql) -> str:
    """The palace generation's encoding, never the existing row's: a poisoned 1.x value
    is a blob, and writing a blob back makes 1.0-1.2 fail every read."""
    return sql.generation.seq_encoding


M_RANGE, EFC_RANGE = (2, 512), (1, 65536)  # hnswlib segfaults at M 0 and runs out of memory at M 1


def _note_lost_norms(plan: CollectionPlan) -> None:
    """A cosine rebuild keeps each row's direction; its norm (what chromadb's get
    multiplies back) comes from length.bin, and a torn one has lost some: said, since
    chromadb will return those rows' embeddings as unit vectors."""
    from chaosfix.reconcile.build import kept_lengths

    n = kept_lengths(plan, list(plan.keep))
    lost = int(np.isnan(n).sum()) if n is not None else 0
    if lost:
        plan.reasons.append(f"{lost} kept rows' norms are not in length.bin: chromadb will return their embeddings "
                            "as unit vectors of the same direction (search is unchanged)")


def graph_params(st: CollectionState) -> tuple[int, int, str | None]:
    """A rebuild's M and ef_construction: the index header's, or where it is torn or
    gone the collection's settings (0.6 accepts any int there). A value hnswlib cannot
    build with is replaced by chromadb's default, and said (the note)."""
    h = st.files.header if st.files is not None else None
    if h is not None and not st.torn:
        m, efc, where = h.m, h.ef_construction, "the index header"
    else:
        m, efc, where = st.info.param("M", DEFAULT_M), st.info.param("construction_ef", DEFAULT_EFC), \
            "the collection's settings"
    bad = []
    if not M_RANGE[0] <= m <= M_RANGE[1]:
        bad.append(f"M {m}")
        m = DEFAULT_M
    if not EFC_RANGE[0] <= efc <= EFC_RANGE[1]:
        bad.append(f"ef_construction {efc}")
        efc = DEFAULT_EFC
    note = (f"{' and '.join(bad)} from {where} cannot build a graph (M {M_RANGE[0]}..{M_RANGE[1]}, ef_construction "
            f"{EFC_RANGE[0]}..{EFC_RANGE[1]}): rebuilt with chromadb's defaults M {DEFAULT_M}, ef_construction "
            f"{DEFAULT_EFC}") if bad else None
    return m, efc, note


def plan_collection(sql: PalaceSql, st: CollectionState, report: CheckReport, embedder: EmbedderFor | None,
                    strategy: str = "auto", apply_pending: bool = False,
                    stale: dict[str, np.ndarray] | None = None) -> CollectionPlan:
    """``stale``: id -> its document's vector, for rows ``check --deep`` found holding
    another vector (STALE_VECTOR); they are replaced in place."""
    info = st.info
    codes = {k: v for k, v in report.codes(info.label).items() if k not in PALACE_CODES}
    plan = CollectionPlan(info.label, info.vector_segment, codes, state=st)
    # the generation's own format: 1.x rewrites a migrated 0.6 object pickle as a dict
    plan.fmt = sql.generation.pickle_format
    problems = {c for c in codes if c != "PENDING"}
    dir_missing = st.seg_dir is None or not st.seg_dir.is_dir()
    if dir_missing and not problems & {"SEGMENT_DIR_MISSING", "REPLAY_QUIRK"}:
        return plan  # never persisted: chromadb builds it from the WAL (unless 0.x's replay errs)
    index_work = bool(problems - SEQ_CODES) or strategy == "rebuild" or (apply_pending and "PENDING" in codes)
    if index_work:
        _plan_index(sql, st, plan, embedder, problems, strategy, stale or {})
    _plan_seqs(sql, st, plan, problems)
    return plan


def _plan_index(sql: PalaceSql, st: CollectionState, plan: CollectionPlan, embedder: EmbedderFor | None,
                problems: set[str], strategy: str, stale: dict[str, np.ndarray]) -> None:
    m = st.idmap
    rebuild = strategy == "rebuild" or bool(problems & REBUILD_CODES) or m is None
    plan.strategy = "rebuild" if rebuild and strategy != "incremental" else "incremental"
    if plan.strategy == "incremental" and (m is None or st.slots is None or st.torn):
        plan.strategy = "rebuild"
        plan.reasons.append("index files or id map not sound: incremental impossible")
    elif plan.strategy == "incremental" and problems & REBUILD_CODES:
        # e.g. LINK_BLOAT: an incremental persist keeps the bloated file and would end "nothing to do"
        plan.strategy = "rebuild"
        plan.reasons.append("incremental cannot fix " + ", ".join(sorted(problems & REBUILD_CODES)))
    plan.reasons.extend(sorted(problems & REBUILD_CODES))
    plan.reasons.extend(f"TORN: {t}" for t in st.torn)  # (what in the files is unsound)
    h = st.files.header if st.files is not None else None
    if plan.strategy == "rebuild":
        plan.m, plan.ef_construction, note = graph_params(st)
        if note:
            plan.reasons.append(note)
    dim = plan.dim = h.dim if h is not None and not st.torn else (st.info.dimension or 0)
    # the 0.6 object format needs the dimension (0.6 fails every read without it)
    plan.dimensionality = m.dimensionality if m is not None else None
    if (plan.fmt == "object" and plan.dimensionality is None) or (
            plan.dimensionality is not None and dim and plan.dimensionality != dim):  # (DIMENSION_LOST)
        plan.dimensionality = dim

    # only WAL rows the SQL rows already reflect (up to the metadata segment's seq) are
    # folded in; later ones stay for chromadb to replay into both segments
    wal = [w for w in sql.wal(st.info.id, above=0, with_vectors=True) if w.seq_id <= st.reflected_seq]
    above = st.vector_seq.value if st.vector_seq is not None and not st.vector_seq.poisoned else 0
    wal = _without_rejected_adds(sql, st, wal, above)
    pending = [w for w in wal if w.seq_id > above]
    plan.pending_applied = len(pending)
    any_wal = latest_wal_vectors(wal)

    # live label -> the one id it can be proven to hold
    target = st.sql_rows
    live = st.live_label_slots
    bad = set(st.slots.labels[st.slots.bad].tolist()) if st.slots is not None else set()
    vec_ok = _slot_vectors_ok(st, live)
    owner: dict[int, str] = {}
    held: dict[str, int] = {}  # keyed by the SQL rows' own id strings, not the pickle's equal
    # copies: those then go with the id map before the index loads (42 MB at 500k rows)
    in_map = -1  # how many SQL ids the map names (counted on the healthy path)
    if m is not None:
        labs = sorted(live)
        usable = list(itertools.compress(labs, map(vec_ok.get, labs)))
        if bad:
            usable = [lab for lab in usable if lab not in bad]
        healthy = not m.inverse_problems()  # one id per label, both maps agree
        of_row = list(map(m.id_to_label.get, target)) if healthy else []
        if healthy and set(map(type, of_row)) <= {int, type(None)}:
            # each SQL row's own label (plain ints), kept when its slot is usable: in C,
            # one pass over the ids, keyed by SQL's strings
            ok = set(usable)
            held = dict(itertools.compress(zip(target, of_row), map(ok.__contains__, of_row)))
            in_map = len(of_row) - of_row.count(None)
            owner = dict(zip(held.values(), held))
            del ok
        else:
            if healthy:  # a label of another type (a bool): the slots' own ints
                rids = list(map(m.label_to_id.get, usable))
                owner = dict(itertools.compress(zip(usable, rids), map(target.__contains__, rids)))
            else:
                owner = _owners_of_damaged_map(m, usable, target)
            canon = dict(zip(target, target))
            rids = owner.values()
            held = dict(zip(map(canon.get, rids, rids), owner))  # in C: canon.get(rid, rid)
            del canon, rids
        del of_row
    newer, reset = pending_effects(pending, held.keys())
    for rid in reset & held.keys():
        owner.pop(held.pop(rid))
    plan.remove_labels = sorted(live.keys() - owner.keys())
    plan.remove_ids = ([] if m is None or st.same_ids or in_map == len(m.id_to_label)
                       else sorted(m.id_to_label.keys() - target.keys()))

    # never adopt a label the palace could not have issued (torn-slot garbage), nor a
    # garbage total_elements_added: chromadb's next add would fail inside its consumer
    bound = st.label_bound() if m is not None else PLAUSIBLE_LABEL
    next_label = max(m.sane_total() if m else 0, _top_plausible_label(st, bound)) + 1
    ahead = set(st.index_ahead())
    rolled_back: list[str] = []  # held labels whose slot holds a rolled-back vector: re-embed
    # only ids with a newer vector, a stale slot or a rolled-back write change (not all 10^5)
    for rid in sorted(held.keys() & (newer.keys() | stale.keys() | ahead), key=id_order):
        if rid in newer:
            plan.replace[rid] = held[rid]
            plan.vectors[rid], plan.source[rid] = newer[rid], WAL
        elif rid in stale:  # check --deep: the slot holds another vector than the document's
            plan.replace[rid] = held[rid]
            plan.vectors[rid], plan.source[rid] = stale[rid], EMBED
        elif rid in ahead and rid in any_wal:  # the committed write's WAL row is still there
            plan.replace[rid] = held[rid]
            plan.vectors[rid], plan.source[rid] = any_wal[rid], WAL
        elif rid in ahead:
            rolled_back.append(rid)
    drop = plan.replace.keys() | set(rolled_back)
    plan.keep = {rid: lab for rid, lab in held.items() if rid not in drop} if drop else dict(held)
    if plan.strategy == "rebuild" and plan.keep:
        _note_lost_norms(plan)
    missing: list[str] = []
    # (a row a pending delete removes once chromadb replays it needs no vector)
    plan.replay_removes = sorted(st.replay_removes - held.keys(), key=id_order)
    for rid in sorted(target.keys() - held.keys() - st.replay_removes, key=id_order):
        vec = newer.get(rid) if rid in newer else any_wal.get(rid)
        if vec is not None:
            plan.vectors[rid], plan.source[rid] = vec, WAL
            plan.add[rid] = next_label
            next_label += 1
        else:
            missing.append(rid)
    if missing:
        # quarantined copies of the segment (repair tools' .corrupt/.drift/.hnsw-backup,
        # chaosfix backups) before re-embedding
        from chaosfix.reconcile.quarantine import quarantine_vectors

        found, used = quarantine_vectors(st, missing, dim)
        for rid in missing:
            if rid in found:
                plan.vectors[rid], plan.source[rid] = found[rid], QUARANTINE
                plan.add[rid] = next_label
                next_label += 1
        if used:
            plan.reasons.append(f"{len(found)} vectors from quarantined copies: {', '.join(used)}")
        missing = [r for r in missing if r not in found]
    if missing and embedder is not None:
        docs = sql.documents(st.info.metadata_segment, missing) if st.info.metadata_segment else {}
        have_doc = [r for r in missing if docs.get(r)]
        emb = _chosen_embedder(plan, embedder, sql, st) if have_doc else None
        if emb is not None:
            vecs = embed(emb, [docs[r] for r in have_doc], dim)
            for rid, v in zip(have_doc, vecs):
                plan.vectors[rid], plan.source[rid] = v, EMBED
                plan.add[rid] = next_label
                next_label += 1
        missing = [r for r in missing if r not in plan.add]
    if st.written_in_rollback:
        emb = _chosen_embedder(plan, embedder, sql, st) if embedder is not None else None
        rolled_back += _rolled_back_slots(sql, st, plan, any_wal, emb, dim, exclude=set(rolled_back))
    emb = _chosen_embedder(plan, embedder, sql, st) if rolled_back and embedder is not None else None
    if emb is not None:
        docs = sql.documents(st.info.metadata_segment, rolled_back) if st.info.metadata_segment else {}
        have_doc = [r for r in rolled_back if docs.get(r)]
        for rid, v in zip(have_doc, embed(emb, [docs[r] for r in have_doc], dim) if have_doc else []):
            plan.replace[rid] = held[rid]
            plan.vectors[rid], plan.source[rid] = v, EMBED
    for rid in rolled_back:
        if rid not in plan.replace:  # no source: the slot stays as it is, and the row is listed
            plan.keep[rid] = held[rid]
            missing.append(rid)
    plan.unrepaired = missing
    if m is None and missing and live:
        # the map is gone and some rows have no other source: their vectors may still sit
        # in unattributable slots, so the index stays as it is until an embedder is given
        plan.strategy = "none"
        why = plan.embedder.line() if plan.embedder is not None else "pass --embedder to rebuild"
        plan.reasons.append(f"{len(missing)} rows have no vector source; {why}")
        plan.add, plan.replace, plan.vectors, plan.source = {}, {}, {}, {}
        return
    plan.slot_sourced = len(plan.keep)  # kept ids are never in add/replace
    plan.total_elements_added = next_label - 1
    slots_total = st.files.header.cur_element_count if (st.files and st.files.header and not st.torn) else 0
    n_final = len(plan.keep) + len(plan.replace) + len(plan.add)
    if plan.strategy == "incremental":
        # (an implausible capacity is TORN: Header.loader_problems; a torn index is rebuilt)
        plan.max_elements = max(h.max_elements if h else 0, chroma_capacity(slots_total + len(plan.add)))
    else:
        plan.max_elements = chroma_capacity(n_final)
    if plan.strategy == "incremental" and not (plan.add or plan.replace or plan.remove_labels or plan.remove_ids
                                               or m.total_elements_added != plan.total_elements_added
                                               or m.dimensionality != plan.dimensionality
                                               or m.inverse_problems()
                                               # (the index is right, but 0.x would replay its pending
                                               # rows wrongly: the rewrite moves max_seq_id past them)
                                               or "REPLAY_QUIRK" in problems):
        plan.strategy = "none"


def _owners_of_damaged_map(m: IdMap, usable: list[int], target: dict[str, int]) -> dict[int, str]:
    """live label -> the one SQL id it can be proven to hold, when the two maps disagree or
    a label has several ids: every id either map names for it, and exactly one a row."""
    first: dict[int, str] = {}
    more: dict[int, set[str]] = {}
    for rid, lab in m.id_to_label.items():
        if first.setdefault(lab, rid) != rid:
            more.setdefault(lab, set()).add(rid)
    owner: dict[int, str] = {}
    held: set[str] = set()
    for lab in usable:
        cands = {first.get(lab), m.label_to_id.get(lab), *more.get(lab, ())} - {None}
        cands &= target.keys()
        if len(cands) == 1:
            rid = cands.pop()
            if rid not in held:  # an id on two live labels keeps the first
                owner[lab] = rid
                held.add(rid)
    return owner


def _top_plausible_label(st: CollectionState, bound: int) -> int:
    """The highest label any slot (deleted too) or the map holds, those above ``bound``
    (what the palace could have issued) aside: new labels start above it, so none is
    ever reused and no garbage label is adopted."""
    top = 0
    if st.slots is not None:
        labs = st.slots.labels[~st.slots.bad]
        labs = labs[labs <= bound]
        top = int(labs.max()) if len(labs) else 0
    if st.idmap is not None and st.idmap.label_to_id:
        mx = max(st.idmap.label_to_id)
        if mx > bound:
            mx = max((lab for lab in st.idmap.label_to_id if lab <= bound), default=0)
        top = max(top, mx)
    return top


def _chosen_embedder(plan: CollectionPlan, embedder: EmbedderFor, sql: PalaceSql,
                     st: CollectionState) -> Embedder | None:
    """The collection's embedder, chosen (and guarded) once, on first need."""
    if plan.embedder is None:
        plan.embedder = embedder(sql, st)
    return plan.embedder.embedder if plan.embedder is not None else None


def _rolled_back_slots(sql: PalaceSql, st: CollectionState, plan: CollectionPlan, any_wal: dict,
                       embedder: Embedder | None, dim: int, exclude: set[str]) -> list[str]:
    """The index was written by a transaction that rolled back (0.6): compare every kept
    row's slot vector with its WAL vector, else its re-embedded document; a differing
    one moves from keep to replace (WAL) or is returned for re-embedding. Without an
    embedder, rows with no WAL vector cannot be proven and are listed (exit 4)."""
    if st.files is None or not plan.keep:
        return []
    ids = [r for r in plan.keep if r not in exclude]
    slots = np.array([st.live_label_slots[plan.keep[r]] for r in ids], dtype=np.int64)
    have = st.files.vectors(slots) if len(slots) else np.zeros((0, dim), dtype=np.float32)
    docs = (sql.documents(st.info.metadata_segment, [r for r in ids if r not in any_wal])
            if embedder is not None and st.info.metadata_segment else {})
    doc_ids = [r for r in ids if r not in any_wal and docs.get(r)]
    embedded = dict(zip(doc_ids, embed(embedder, [docs[r] for r in doc_ids], dim))) if doc_ids else {}
    out: list[str] = []
    unproven = 0
    for rid, got in zip(ids, have):
        ref = any_wal.get(rid)
        ref = embedded.get(rid) if ref is None else ref
        if ref is None:
            unproven += 1
            continue
        want = np.asarray(ref, dtype=np.float32)
        if st.info.space == "cosine":
            want = want / max(float(np.linalg.norm(want)), 1e-12)
        if np.allclose(got, want, atol=1e-4):
            continue
        lab = plan.keep.pop(rid)
        if rid in any_wal:
            plan.replace[rid] = lab
            plan.vectors[rid], plan.source[rid] = any_wal[rid], WAL
        else:
            out.append(rid)  # the caller re-embeds it into replace
    if unproven:
        plan.unrepaired_reason = (f"{unproven} rows may hold vectors of a rolled-back batch (INDEX_AHEAD); "
                                  "pass --embedder to check them")
        plan.reasons.append(plan.unrepaired_reason)
    else:
        plan.clear_journal = True  # every slot proven: the journal's evidence is consumed
    return out


def id_order(rid: object) -> tuple[str, object]:
    """A sort key for SQL's ids: a damaged table mixes text ids with blob (or integer)
    ones, which Python does not order against each other."""
    return type(rid).__name__, rid


def _without_rejected_adds(sql: PalaceSql, st: CollectionState, wal: list[WalRow], above: int) -> list[WalRow]:
    """The WAL rows less the adds SQL may have refused: an add of an id SQL already held
    is skipped by the metadata segment (the row keeps its older seq_id, document and
    metadata), so its vector belongs to no row. (chromadb's vector segment skips it too,
    unless the id map lost the id: then its replay would give the row that vector.)

    An add is the row's when the row's seq_id is the add's, never when it is older or
    unreadable. A later one (a later write raised it: a metadata-only update) is judged
    by ``_refused_later``; ``above``: the vector segment's max_seq_id."""
    adds = [w for w in wal if w.op == 0 and w.id in st.sql_rows]
    if not adds or st.info.metadata_segment is None:
        return wal
    seqs = sql.row_seqs(st.info.metadata_segment, [w.id for w in adds])
    refused = {(w.seq_id, w.id) for w in adds if seqs.get(w.id, -1) < w.seq_id}
    later = [w for w in adds if seqs.get(w.id, -1) > w.seq_id]
    if later:
        refused |= _refused_later(sql, st, wal, later, above)
    return [w for w in wal if (w.seq_id, w.id) not in refused] if refused else wal


def _refused_later(sql: PalaceSql, st: CollectionState, wal: list[WalRow], later: list[WalRow],
                   above: int) -> set[tuple[int, str]]:
    """(seq_id, id) of the adds in ``later`` SQL refused. Whether the row was there just
    before the add, from the first of these that tells:

    1. the id's own earlier WAL rows: after an add or upsert SQL held it, after a delete
       not; none in a WAL that holds every write (0.4 purges none, and an add or upsert
       of every row is there): the add made the row;
    2. the row's created_at against the add's (an update leaves it): earlier, the row was
       there; later, the add made it (one-second resolution: a tie tells nothing);
    3. an add above the vector segment's max_seq_id (pending) of an id the id map holds:
       the row was there at the persist;
    4. the documents: a pending add (of an id the map lacks) made the row unless it
       carries another document than the row's, as chromadb's own replay takes it (a
       row SQL held and the map lost, re-added within the same second without a
       document, gets the add's vector, as in chromadb); an add below max_seq_id
       (chromadb will not replay it: only a source for a lost vector) is the row's only
       when it carries the row's own document.

    Judging every add by its document lost rows: an add without one followed by a
    metadata-only update (any embeddings-only collection) was taken for refused, and a
    rebuild of a segment never persisted, whose vectors live only in the WAL, dropped
    the row's vector where chromadb served it (helper-37). Taking no document on both
    sides for a match gave a row a refused add's vector (helper-38)."""
    assert st.info.metadata_segment is not None
    seg, keys = st.info.metadata_segment, {(w.seq_id, w.id) for w in later}
    held: dict[tuple[int, str], bool] = {}
    last: dict[str, int] = {}  # id -> the op of its latest add/upsert/delete so far
    for w in wal:
        if (w.seq_id, w.id) in keys and w.id in last:
            held[(w.seq_id, w.id)] = last[w.id] != 3
        if w.op in (0, 2, 3):
            last[w.id] = w.op
    todo = [w for w in later if (w.seq_id, w.id) not in held]
    if todo and sql.generation.keeps_whole_wal:
        made_by = {w.id for w in wal if w.op in (0, 2)}
        if all(map(made_by.__contains__, st.sql_rows)):  # (no row's first write pruned)
            held.update(((w.seq_id, w.id), False) for w in todo)
            todo = []
    if todo:
        made = sql.created(seg, [w.id for w in todo])
        logged = sql.wal_created(st.info.id, {w.seq_id for w in todo}) if made else {}
        for w in todo:
            a, b = made.get(w.id), logged.get(w.seq_id)
            if a is not None and b is not None and a != b:
                held[(w.seq_id, w.id)] = a < b
    mapped = st.map_ids()
    for w in later:
        if (w.seq_id, w.id) not in held and w.seq_id > above and w.id in mapped:
            held[(w.seq_id, w.id)] = True
    docs = sql.documents(seg, [w.id for w in later if (w.seq_id, w.id) not in held])

    def refused(w: WalRow) -> bool:
        if (w.seq_id, w.id) in held:
            return held[(w.seq_id, w.id)]
        if w.seq_id > above:  # (pending, an id the map lacks)
            return w.document is not None and w.document != docs.get(w.id)
        return w.document is None or w.document != docs.get(w.id)

    return {(w.seq_id, w.id) for w in later if refused(w)}


def _slot_vectors_ok(st: CollectionState, live: dict[int, int]) -> dict[int, bool]:
    """label -> its stored vector is finite (and unit-norm for cosine, which stores normalized);
    judged by the state's one slot pass."""
    if st.files is None or st.slots is None or not live:
        return {}
    labels = np.fromiter(live.keys(), dtype=np.uint64, count=len(live))
    slots = np.fromiter(live.values(), dtype=np.int64, count=len(live))
    assert st.slots.vector_ok is not None  # (every slot pass judges them)
    return dict(zip(labels.tolist(), st.slots.vector_ok[slots].tolist()))


def _plan_seqs(sql: PalaceSql, st: CollectionState, plan: CollectionPlan, problems: set[str]) -> None:
    """Restore poisoned/missing max_seq_id and advance the vector segment after a rewrite."""
    info = st.info
    meta, meta_val = st.metadata_seq, st.reflected_seq
    if meta is not None and meta.poisoned and info.metadata_segment:
        plan.seq_writes.append(SeqWrite(info.metadata_segment, meta_val, _seq_encoding(sql)))
    vec = st.vector_seq
    if info.vector_segment is None:
        return
    want = None
    if plan.index_changes:
        want = meta_val
    elif vec is not None and vec.poisoned:
        want = meta_val
    elif vec is None and "SEQ_MISSING" in problems:
        want = meta_val
    if want is not None and vec is not None and not vec.poisoned:
        want = max(want, vec.value)  # never move a segment backwards: chromadb would replay rows twice
    if want is not None and (vec is None or vec.value != want):
        if sql.generation.vector_seq_in_pickle:  # 0.4: the rewritten pickle carries it
            if plan.index_changes:
                plan.pickle_seq = want
        else:
            plan.seq_writes.append(SeqWrite(info.vector_segment, want, _seq_encoding(sql)))
