"""State -> plan: what each collection gets, and from which source.

The target is always the SQL rows: the index is made to hold exactly one live label per
row, never the other way round (a SQL row is never deleted to make a diff zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from chaosfix.check import CheckReport
from chaosfix.palace.idmap import MAX_TOTAL
from chaosfix.palace.sql import PalaceSql, SeqValue
from chaosfix.palace.state import CollectionState
from chaosfix.reconcile.sources import EMBED, SLOT, WAL, Embedder, embed, latest_wal_vectors, pending_effects

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
    remove_labels: list[int] = field(default_factory=list)
    remove_ids: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    pending_applied: int = 0
    total_elements_added: int = 0
    fmt: str = "dict"
    dimensionality: int | None = None  # as written into the pickle
    dim: int = 0  # vector dimension of the index to build
    max_elements: int = DEFAULT_CAPACITY
    seq_writes: list[SeqWrite] = field(default_factory=list)
    clear_journal: bool = False  # INDEX_AHEAD from a leftover journal, every slot proven: move it aside
    unrepaired_reason: str = ""
    vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for add/replace
    state: CollectionState | None = field(default=None, repr=False)

    @property
    def index_changes(self) -> bool:
        return self.strategy in ("incremental", "rebuild")

    @property
    def has_work(self) -> bool:
        return self.index_changes or bool(self.seq_writes) or self.clear_journal

    def to_json(self) -> dict:
        src: dict[str, int] = {}
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
        }


def chroma_capacity(n: int, resize_factor: float = 1.2) -> int:
    """max_elements the way chromadb sizes it: capacity grows by resize_factor, floor 1000."""
    return max(DEFAULT_CAPACITY, math.ceil(n * resize_factor))


def _seq_encoding(sql: PalaceSql, existing: SeqValue | None) -> str:
    if existing is not None:
        return existing.stored_as
    return "blob" if sql.schema == "0.6" else "int"


def plan_collection(sql: PalaceSql, st: CollectionState, report: CheckReport, embedder: Embedder | None,
                    strategy: str = "auto", apply_pending: bool = False) -> CollectionPlan:
    info = st.info
    codes = {k: v for k, v in report.codes(info.name).items()
             if k not in ("HOT_JOURNAL", "SQLITE_CORRUPT", "QUEUE_RESET", "SEGMENT_DIR_ORPHAN")}
    plan = CollectionPlan(info.name, info.vector_segment, codes, state=st)
    plan.fmt = st.idmap.fmt if st.idmap is not None else ("object" if sql.schema == "0.6" else "dict")
    problems = {c for c in codes if c != "PENDING"}
    dir_missing = st.seg_dir is None or not st.seg_dir.is_dir()
    if dir_missing and "SEGMENT_DIR_MISSING" not in problems:
        return plan  # never persisted: chromadb builds it from the WAL
    index_work = bool(problems - SEQ_CODES) or strategy == "rebuild" or (apply_pending and "PENDING" in codes)
    if index_work:
        _plan_index(sql, st, plan, embedder, problems, strategy)
    _plan_seqs(sql, st, plan, problems)
    return plan


def _plan_index(sql: PalaceSql, st: CollectionState, plan: CollectionPlan, embedder: Embedder | None,
                problems: set[str], strategy: str) -> None:
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
    h = st.files.header if st.files is not None else None
    dim = plan.dim = h.dim if h is not None and not st.torn else (st.info.dimension or 0)
    # the 0.6 object format needs the dimension (0.6 fails every read without it)
    plan.dimensionality = m.dimensionality if m is not None else None
    if plan.fmt == "object" and plan.dimensionality is None:
        plan.dimensionality = dim

    # only WAL rows the SQL rows already reflect (up to the metadata segment's seq) are
    # folded in; later ones stay for chromadb to replay into both segments
    wal = [w for w in sql.wal(st.info.id, above=0, with_vectors=True) if w.seq_id <= st.reflected_seq]
    above = st.vector_seq.value if st.vector_seq is not None and not st.vector_seq.poisoned else 0
    pending = [w for w in wal if w.seq_id > above]
    plan.pending_applied = len(pending)
    any_wal = latest_wal_vectors(wal)

    # live label -> the one id it can be proven to hold
    target = st.sql_rows
    live = st.live_label_slots
    bad = set(st.slots.labels[st.slots.bad].tolist()) if st.slots is not None else set()
    vec_ok = _slot_vectors_ok(st, live)
    by_label: dict[int, set[str]] = {}
    for rid, lab in (m.id_to_label.items() if m else ()):
        by_label.setdefault(lab, set()).add(rid)
    owner: dict[int, str] = {}
    held: dict[str, int] = {}
    for lab in sorted(live):
        if m is None or lab in bad or not vec_ok.get(lab, False):
            continue
        cands = by_label.get(lab, set()) | ({m.label_to_id[lab]} if lab in m.label_to_id else set())
        cands &= target.keys()
        if len(cands) == 1:
            rid = cands.pop()
            if rid not in held:  # an id on two live labels keeps the first
                owner[lab], held[rid] = rid, lab
    newer, reset = pending_effects(pending, set(held))
    for rid in reset & held.keys():
        owner.pop(held.pop(rid))
    plan.remove_labels = sorted(lab for lab in live if lab not in owner)
    plan.remove_ids = sorted(i for i in (m.id_to_label if m else {}) if i not in target)

    all_slot_labels = st.slots.labels[~st.slots.bad].tolist() if st.slots is not None else []  # deleted too
    # never adopt a label the palace could not have issued (torn-slot garbage), nor a
    # garbage total_elements_added: chromadb's next add would fail inside its consumer
    bound = st.label_bound() if m is not None else PLAUSIBLE_LABEL
    labels_seen = [lab for lab in [*all_slot_labels, *(m.label_to_id if m else {})] if lab <= bound]
    next_label = max([m.sane_total() if m else 0, *labels_seen, 0]) + 1
    missing: list[str] = []
    ahead = set(st.index_ahead())
    stale: list[str] = []  # held labels whose slot holds a rolled-back vector: re-embed
    for rid in sorted(target):
        lab = held.get(rid)
        if lab is not None:
            if rid in newer:
                plan.replace[rid] = lab
                plan.vectors[rid], plan.source[rid] = newer[rid], WAL
            elif rid in ahead and rid in any_wal:  # the committed write's WAL row is still there
                plan.replace[rid] = lab
                plan.vectors[rid], plan.source[rid] = any_wal[rid], WAL
            elif rid in ahead:
                stale.append(rid)
            else:
                plan.keep[rid] = lab
            continue
        vec = newer.get(rid) if rid in newer else any_wal.get(rid)
        if vec is not None:
            plan.vectors[rid], plan.source[rid] = vec, WAL
            plan.add[rid] = next_label
            next_label += 1
        else:
            missing.append(rid)
    if missing and embedder is not None:
        docs = sql.documents(st.info.metadata_segment, missing) if st.info.metadata_segment else {}
        have_doc = [r for r in missing if docs.get(r)]
        if have_doc:
            vecs = embed(embedder, [docs[r] for r in have_doc], dim)
            for rid, v in zip(have_doc, vecs):
                plan.vectors[rid], plan.source[rid] = v, EMBED
                plan.add[rid] = next_label
                next_label += 1
        missing = [r for r in missing if r not in plan.add]
    if st.written_in_rollback:
        stale += _rolled_back_slots(sql, st, plan, any_wal, embedder, dim, exclude=set(stale))
    if stale and embedder is not None:
        docs = sql.documents(st.info.metadata_segment, stale) if st.info.metadata_segment else {}
        have_doc = [r for r in stale if docs.get(r)]
        for rid, v in zip(have_doc, embed(embedder, [docs[r] for r in have_doc], dim) if have_doc else []):
            plan.replace[rid] = held[rid]
            plan.vectors[rid], plan.source[rid] = v, EMBED
    for rid in stale:
        if rid not in plan.replace:  # no source: the slot stays as it is, and the row is listed
            plan.keep[rid] = held[rid]
            missing.append(rid)
    plan.unrepaired = missing
    if m is None and missing and live:
        # the map is gone and some rows have no other source: their vectors may still sit
        # in unattributable slots, so the index stays as it is until an embedder is given
        plan.strategy = "none"
        plan.reasons.append(f"{len(missing)} rows have no vector source; pass --embedder to rebuild")
        plan.add, plan.replace, plan.vectors, plan.source = {}, {}, {}, {}
        return
    for rid in plan.keep:
        plan.source.setdefault(rid, SLOT)
    plan.total_elements_added = next_label - 1
    slots_total = st.files.header.cur_element_count if (st.files and st.files.header and not st.torn) else 0
    n_final = len(plan.keep) + len(plan.replace) + len(plan.add)
    if plan.strategy == "incremental":
        plan.max_elements = max(h.max_elements if h else 0, chroma_capacity(slots_total + len(plan.add)))
    else:
        plan.max_elements = chroma_capacity(n_final)
    if plan.strategy == "incremental" and not (plan.add or plan.replace or plan.remove_labels or plan.remove_ids
                                               or m.total_elements_added != plan.total_elements_added
                                               or m.dimensionality != plan.dimensionality
                                               or m.inverse_problems()):
        plan.strategy = "none"


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
    docs = sql.documents(st.info.metadata_segment, [r for r in ids if r not in any_wal])         if embedder is not None and st.info.metadata_segment else {}
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


def _slot_vectors_ok(st: CollectionState, live: dict[int, int]) -> dict[int, bool]:
    """label -> its stored vector is finite (and unit-norm for cosine, which stores normalized)."""
    if st.files is None or not live:
        return {}
    labels = np.fromiter(live.keys(), dtype=np.uint64, count=len(live))
    slots = np.fromiter(live.values(), dtype=np.int64, count=len(live))
    ok = np.ones(len(slots), dtype=bool)
    for s in range(0, len(slots), 65536):
        v = st.files.vectors(slots[s : s + 65536])
        fin = np.isfinite(v).all(axis=1)
        if st.info.space == "cosine":
            with np.errstate(all="ignore"):
                # float64 sums without a float64 copy of the block (4x faster than linalg.norm)
                fin &= np.abs(np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)) - 1.0) < 1e-3
        ok[s : s + 65536] = fin
    return dict(zip(labels.tolist(), ok.tolist()))


def _plan_seqs(sql: PalaceSql, st: CollectionState, plan: CollectionPlan, problems: set[str]) -> None:
    """Restore poisoned/missing max_seq_id and advance the vector segment after a rewrite."""
    info = st.info
    meta, meta_val = st.metadata_seq, st.reflected_seq
    if meta is not None and meta.poisoned and info.metadata_segment:
        plan.seq_writes.append(SeqWrite(info.metadata_segment, meta_val, _seq_encoding(sql, meta)))
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
        plan.seq_writes.append(SeqWrite(info.vector_segment, want, _seq_encoding(sql, vec)))
