"""Proof that a built segment is right, before it replaces anything.

1. strict zero-diff: SQL ids == map ids == ids of live index labels; maps inverse;
   total_elements_added >= max label; read back with chaosfix's own reader.
2. stored vectors: every added/replaced label holds the planned vector.
3. top-k self-query (k=10) of every repaired row and a seeded sample of the rest, at
   ``ef`` (``EF`` = 200 by default; the reconciler asks at ``EF_FIRST`` = 10, chromadb's
   own search ef, the cheapest query that still returns the top 10). A miss
   is search depth, not damage, when a deeper search finds it (on 100k random 384-d
   vectors a healthy chromadb-built graph misses ~25% of self-queries at ef=40, ~1% at
   ef=200 and none at ef=800). For cosine and l2 graphs whose every element reaches the
   entry point, the level-0 graph itself says which rows a search at a high enough ef
   returns (``chaosfix.palace.reach``: for every row, no distance computed), so misses
   are settled by it (``recovered``). Reachability alone would pass a graph that is
   connected but useless to search, so the repaired rows may not miss markedly more
   often than the untouched sample (the reconciler compares them at ``EF_GATE`` = 40,
   where the sample's own rate leaves the comparison room to fail, on up to
   ``GATE_REPAIRED`` seeded repaired rows); how deep this graph's own rows sit
   (the share of the sample no search up to ``ef_max`` finds) is measured only when
   chromadb's post-check misses more than hnswlib's known rate allows
   (``Verification.depth``). Otherwise (ip, unnormalized vectors, a graph that proves
   nothing) with ``ef_max`` (the reconciler passes ``EF_MAX``) a miss is re-queried at
   doubling ef up to ``ef_max``. A row found at any ef is reachable by search, so
   starting low proves the same for a quarter of the query time. A miss left is
   confirmed by brute force: a graph that cannot reach a vector that is still its own
   nearest neighbour is hnswlib's known quirk, tolerated up to a small rate (or three
   times the rate of the untouched sample, this graph's own); anything else fails, but
   in ip, where k other vectors may outrank a row for its own vector (norms vary), so
   that no query of it returns it: such a row passes when the level-0 graph proves it
   reachable (``outranked``), else counts with the quirks (chromadb's own ip graphs
   leave some rows unreached from the entry point).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from chaosfix.memtrim import release_freed_memory
from chaosfix.palace import idmap as idmap_mod
from chaosfix.palace import pickle_reader
from chaosfix.palace.hnsw import DELETE_MARK, HnswFiles, SlotTable
from chaosfix.palace.reach import level0_reach
from chaosfix.palace.state import firsts
from chaosfix.progress import ProgressFn
from chaosfix.reconcile.build import THREADS

K = 10
EF = 200
EF_FIRST = K  # the reconciler's self-query of the repaired rows: chromadb's own search ef
EF_GATE = 40  # ...and of the rows the repaired-against-untouched comparison asks
GATE_REPAIRED = 1000  # repaired rows (seeded) that comparison asks, beside the whole sample
EF_MAX = 1600
UNREACHABLE_RATE = 0.005
QUERY_BATCH = 2000  # self-queries per hnswlib call: one progress step
MISS_FLOOR = 10  # repaired rows' misses at the first ef below which no rate is compared


@dataclass
class Verification:
    ok: bool = True
    zero_diff: bool = False
    ids: int = 0
    queried: int = 0
    ef: int = 0  # of the self-query of every checked row not asked at gate_ef
    misses: int = 0  # not in their own top-k when asked (at ef or gate_ef)
    gate_ef: int = 0  # the comparison's rows were asked at this ef instead (0: at ef)
    gate_queried: int = 0  # repaired rows asked at gate_ef (with the whole sample)
    recovered: int = 0  # misses found again at a higher ef (<= ef_max), or proven found by the graph
    by_graph: bool = False  # misses were settled by the level-0 graph's reachability, not deeper searches
    outranked: int = 0  # ip: rows k others outrank for their own vector, proven reachable by the graph
    # by_graph: measures, when called, the share of the untouched sample that no search up
    # to ef_max finds (this graph's depth); not part of the report
    depth: Callable[[], float] | None = field(default=None, repr=False)
    unreachable: int = 0
    wrong_vectors: int = 0
    unrepaired: int = 0  # SQL rows left out of the index (no vector source): zero-diff does not hold
    problems: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)


def zero_diff(seg_dir: Path, sql_ids: set[str], v: Verification, map_digest: bytes | None = None,
              graph_of: str | None = None) -> tuple[HnswFiles, idmap_mod.IdMap, SlotTable] | None:
    """Strict zero-diff from the files as written; returns what it read for the caller to
    reuse. ``map_digest``: the SHA-256 of the map the build wrote. Bytes that match it
    are chaosfix's own pickle and skip the opcode scan (1 s of a CPU at 500k ids, which
    chromadb's post-check needs meanwhile); bytes that do not fail the verification.
    ``graph_of`` (the space): the slot pass also keeps the level-0 links and whether each
    stored vector is usable, for the reachability proof."""
    try:
        raw = (seg_dir / idmap_mod.FILENAME).read_bytes()
    except OSError as exc:
        v.fail(f"built id map unreadable: {exc}")
        return None
    ours = map_digest is not None and hashlib.sha256(raw).digest() == map_digest
    if map_digest is not None and not ours:
        v.fail("built id map is not the one the build wrote")
        return None
    # otherwise the map's opcode scan runs in a child while the slot pass reads data_level0.bin here
    with pickle_reader.Scan(b"" if ours else raw) as scan:
        files = HnswFiles.open(seg_dir)
        if files.header is None:
            v.fail("built header unreadable")
            return None
        slots = files.slots(vectors_of=graph_of, links=graph_of is not None)
        if graph_of is not None:  # the search's way down to level 0 must be sound too
            problem = files.link_walk()[1]
            if problem:
                v.fail(f"built link_lists.bin: {problem}")
                return None
        try:
            m = idmap_mod.loads(raw, scanned=scan, bounded=ours)
        except (idmap_mod.UnsafePickle, idmap_mod.UnreadablePickle) as exc:
            v.fail(f"built id map unreadable: {exc}")
            return None
        del raw
    live = np.sort(slots.labels[slots.live])
    v.ids = len(m.id_to_label)
    if m.id_to_label.keys() != sql_ids:  # a keys view against a set: compared in C, no copy
        v.fail(f"map ids != SQL ids ({len(m.id_to_label.keys() - sql_ids)} extra, "
               f"{len(sql_ids - m.id_to_label.keys())} missing)")
    if len(live) > 1 and bool((live[1:] == live[:-1]).any()):
        v.fail("duplicate live labels")
    map_labels = _sorted_labels(m)
    if map_labels is None or not np.array_equal(live[firsts(live)], map_labels):  # live is sorted
        differ = (len(set(live.tolist()) ^ set(m.label_to_id)) if map_labels is None
                  else len(np.setxor1d(live, map_labels)))
        v.fail(f"live labels != map labels ({differ} differ)")
    if m.inverse_problems():
        v.fail("id maps not inverse")
    if m.total_elements_added < m.max_label:
        v.fail("total_elements_added below max label")
    if slots.bad.any():
        v.fail(f"{int(slots.bad.sum())} malformed slots")
    v.zero_diff = v.ok
    return files, m, slots


def _sorted_labels(m: idmap_mod.IdMap) -> np.ndarray | None:
    """The map's labels as a sorted uint64 array (None when one does not fit)."""
    try:
        out = np.fromiter(m.label_to_id.keys(), dtype=np.uint64, count=len(m.label_to_id))
    except (OverflowError, ValueError, TypeError):
        return None
    out.sort()
    return out


def verify_segment(seg_dir: Path, space: str, sql_ids: set[str], planned: dict[str, np.ndarray],
                   sample: int = 1000, seed: int = 0, full: bool = False, k: int = K, ef: int = EF,
                   ef_max: int | None = None, progress: ProgressFn | None = None,
                   map_digest: bytes | None = None, graph: bool = False, gate_ef: int | None = None) -> Verification:
    """Zero-diff, planned vectors in place, and self-query (top-``k`` at ``ef``) of planned +
    sampled rows; with ``graph`` misses settled by the level-0 graph where it can prove
    it, else re-queried at doubling ef up to ``ef_max``; then brute force. ``gate_ef``
    (above ``ef``): ``GATE_REPAIRED`` seeded repaired rows and the whole sample are asked
    at that ef instead, and the repaired rows' miss rate is compared with the sample's
    there (at chromadb's ef 10 a quarter to a half of random 384-d vectors miss, and a
    rate of a third or more would pass any repaired rows; at ef 40 a self-query costs
    three times as much, so the other repaired rows are asked at ``ef``)."""
    v = Verification()
    # cosine (unit vectors) and l2: no other vector is closer to a row than itself, so a
    # search that reaches a row returns it in its top k (but for k exact duplicates of it,
    # which are as good an answer), and a miss is settled by the graph's reach; ip
    # promises no such thing: there the reach speaks only for the rows other vectors
    # outrank (brute force below), which no self-query can return
    settle = graph and space in ("cosine", "l2")
    got = zero_diff(seg_dir, sql_ids, v, map_digest, space if graph else None)
    del sql_ids  # the caller passes a temporary: its memory goes to the index below
    if got is None or not v.ok:
        return v
    files, m, slots = got
    del got
    live_idx = np.flatnonzero(slots.live)
    live_labels = slots.labels[live_idx]
    by_label = np.argsort(live_labels)  # zero-diff held: live labels are unique and mapped
    # in the map's own order (fixed by the file: seeded runs repeat), not sorted: at 500k
    # ids a sort costs more than the sample's queries
    rest = list(itertools.filterfalse(planned.__contains__, m.id_to_label))
    if not full and len(rest) > sample:
        rest = sorted(random.Random(seed).sample(rest, sample))
    check_ids = sorted(planned) + rest
    if not check_ids:
        return v
    labels = np.fromiter((m.id_to_label[i] for i in check_ids), dtype=np.uint64, count=len(check_ids))
    check_slots = live_idx[by_label[np.searchsorted(live_labels, labels, sorter=by_label)]]
    stored = files.vectors(check_slots)
    # before the index loads (its links are 128 bytes a slot at M=16): which slots a deep
    # enough search reaches, when every live vector is usable and every slot reaches the entry
    reached = None
    if slots.links is not None and slots.vector_ok is not None and bool(slots.vector_ok[live_idx].all()):
        assert files.header is not None
        r = level0_reach(slots.links, files.header.enterpoint_node)
        reached = r.from_entry[check_slots] if r.proves else None
    slots.links = None
    n_planned = sum(1 for i in check_ids if i in planned)  # planned ids come first
    if n_planned:
        want = np.stack([planned[i] for i in check_ids[:n_planned]]).astype(np.float64)
        if space == "cosine":
            norms = np.linalg.norm(want, axis=1, keepdims=True)
            want /= np.where(norms == 0, 1.0, norms)
        v.wrong_vectors = int((~np.isclose(stored[:n_planned], want, atol=1e-5).all(axis=1)).sum())
    if v.wrong_vectors:
        v.fail(f"{v.wrong_vectors} labels do not hold their planned vector")
    n_live = len(live_idx)
    # the id map (about 300 bytes per row in Python) and the slot table are done with: at
    # 500k rows freeing them before the index loads is 0.2x of data_level0.bin in peak RSS
    del m, slots, live_idx, live_labels, by_label
    release_freed_memory()
    import hnswlib

    h = files.header
    assert h is not None
    index = hnswlib.Index(space=space, dim=h.dim)
    index.load_index(str(seg_dir), is_persistent_index=True, max_elements=h.max_elements)
    k = min(k, n_live)
    cur = v.ef = max(ef, k)  # hnswlib needs ef >= k
    n_rest = len(check_ids) - n_planned
    # each row is asked once: at gate_ef the rows the comparison below needs (a seeded
    # part of the repaired rows and the whole sample), at ef the other repaired rows
    at_gate = np.zeros(len(check_ids), dtype=bool)
    if reached is not None and settle and gate_ef is not None and gate_ef > cur and n_planned and n_rest:
        pick = random.Random(seed).sample(range(n_planned), min(GATE_REPAIRED, n_planned))
        at_gate[pick] = at_gate[n_planned:] = True
        v.gate_ef, v.gate_queried = gate_ef, len(pick)
        if at_gate.all():  # (1,000 repaired rows or fewer: every row is asked at gate_ef)
            v.ef = gate_ef
    miss_rows = np.empty(0, dtype=np.int64)
    for rows, at in ((np.flatnonzero(~at_gate), cur), (np.flatnonzero(at_gate), gate_ef)):
        if len(rows):
            miss_rows = np.union1d(miss_rows, _self_misses(index, stored, labels, rows, k, at, progress))
    v.queried = len(check_ids)
    v.misses = len(miss_rows)
    v.by_graph = reached is not None and settle

    if reached is not None and settle:
        # the comparison below and the depth: on the rows asked at gate_ef, or on all
        g_ef, g_rows = (gate_ef, np.flatnonzero(at_gate)) if at_gate.any() else (cur, np.arange(len(check_ids)))
        g_miss = miss_rows[at_gate[miss_rows]] if at_gate.any() else miss_rows
        # how deep this graph's own rows sit, measured only if chromadb's post-check asks
        # (its misses beyond the known rate): the untouched sample's misses climb the ladder
        deep = g_miss[g_miss >= n_planned]
        if n_rest:
            v.depth = partial(_deep_rate, seg_dir, space, stored[deep], labels[deep], n_rest, k, g_ef, ef_max)
        # the repaired rows may not be found markedly less often than the untouched ones
        # (a graph that is connected but useless to search would pass reachability alone)
        n_asked = int((g_rows < n_planned).sum())
        if n_asked and n_rest:
            p_miss = int((g_miss < n_planned).sum())
            p_rate, s_rate = p_miss / n_asked, float((g_miss >= n_planned).sum()) / n_rest
            if p_miss > max(MISS_FLOOR, (3 * s_rate + 0.02) * n_asked):
                v.fail(f"repaired rows miss their self-query at ef {g_ef} far more often than untouched "
                       f"ones ({p_rate:.1%} against {s_rate:.1%})")
        # a search at ef >= the element count finds every reached row; the rest the brute
        # force below judges
        miss_rows = miss_rows[~reached[miss_rows]]
    else:
        miss_rows = miss_rows[_still_missed(index, stored[miss_rows], labels[miss_rows], k, cur, ef_max)]
    v.recovered = v.misses - len(miss_rows)
    index.close_file_handles()
    del index  # the brute force below must not hold a second copy of the index
    if len(miss_rows):
        closer = _closer_than_self(files, space, stored[miss_rows])
        quirks_in_rest = 0
        for j, n_closer in zip(miss_rows.tolist(), closer.tolist()):
            if n_closer < k:
                v.unreachable += 1  # still among its own k nearest: the graph's quirk, not corruption
                quirks_in_rest += j >= n_planned
            elif space == "ip" and reached is not None and reached[j]:
                v.outranked += 1  # ip: k others score higher than the row itself; the graph reaches it
            elif space == "ip":
                # outranked, and not reached from the entry point: an ip graph leaves some so
                # (6% of chromadb's own graph of 3,000 16-d rows): judged by rate, as a quirk
                v.unreachable += 1
                quirks_in_rest += j >= n_planned
            else:
                v.fail(f"self-query of {check_ids[j]} fails even by brute force")
        # the untouched sample is this graph's own quirk rate (a large random-vector graph
        # has more: 0.4% at 1M drawers); the repaired rows may not do markedly worse
        base = quirks_in_rest / n_rest if n_rest else 0.0
        if v.unreachable > max(2, UNREACHABLE_RATE * len(check_ids), math.ceil(3 * base * len(check_ids))):
            v.fail(f"{v.unreachable} of {len(check_ids)} vectors unreachable from themselves")
    return v


def _self_misses(index: object, vecs: np.ndarray, labels: np.ndarray, rows: np.ndarray, k: int, ef: int,
                 progress: ProgressFn | None) -> np.ndarray:
    """Those of ``rows`` (indices into ``vecs``) whose top-``k`` self-query at ``ef``
    misses them (a batch of vectors copied at a time: with ``full`` they are every row)."""
    index.set_ef(ef)  # type: ignore[attr-defined]
    hit = np.empty(len(rows), dtype=bool)
    for s in range(0, len(rows), QUERY_BATCH):
        part = rows[s : s + QUERY_BATCH]
        found, _ = index.knn_query(vecs[part], k=k, num_threads=THREADS)  # type: ignore[attr-defined]
        hit[s : s + len(part)] = (found == labels[part, None]).any(axis=1)
        if progress:
            progress(f"self-queries (top-{k}, ef {ef})", min(s + QUERY_BATCH, len(rows)), len(rows))
    return rows[~hit]


def _deep_rate(seg_dir: Path, space: str, vecs: np.ndarray, labels: np.ndarray, n_rest: int, k: int, ef: int,
               ef_max: int | None) -> float:
    """The share of ``n_rest`` sampled rows that self-queries up to ``ef_max`` miss: those
    that missed at ``ef`` (``vecs``, ``labels``) asked again at doubling ef."""
    import hnswlib

    if not len(vecs) or ef_max is None:
        return len(vecs) / n_rest
    h = HnswFiles.open(seg_dir).header
    assert h is not None
    index = hnswlib.Index(space=space, dim=h.dim)
    index.load_index(str(seg_dir), is_persistent_index=True, max_elements=h.max_elements)
    try:
        return int(_still_missed(index, vecs, labels, k, ef, ef_max).sum()) / n_rest
    finally:
        index.close_file_handles()


def _still_missed(index: object, vecs: np.ndarray, labels: np.ndarray, k: int, ef: int,
                  ef_max: int | None) -> np.ndarray:
    """Bool per row: its self-query (missed at ``ef``) still misses when asked again at
    doubling ef up to ``ef_max``."""
    left = np.arange(len(vecs))
    while len(left) and ef_max is not None and ef < ef_max:
        ef = min(2 * ef, ef_max)
        left = _self_misses(index, vecs, labels, left, k, ef, None)
    out = np.zeros(len(vecs), dtype=bool)
    out[left] = True
    return out


def _closer_than_self(files: HnswFiles, space: str, q: np.ndarray) -> np.ndarray:
    """For each query row (a stored vector), how many live stored vectors are strictly
    closer to it than itself: brute force in one streamed pass over data_level0.bin.
    (A palace's inf or 1e19-norm rows overflow float32: a NaN compares as no closer.)"""
    h = files.header
    assert h is not None
    qt = q.T.astype(np.float32)
    closer = np.zeros(len(q), dtype=np.int64)
    with np.errstate(all="ignore"):
        if space in ("cosine", "ip"):
            self_d = 1.0 - np.einsum("ij,ij->i", q, q)
        else:
            self_d = np.zeros(len(q), dtype=np.float32)
        for _, rows in files.blocks():
            live = (rows[:, 2] & DELETE_MARK) == 0
            vecs = rows[live, h.offset_data : h.label_offset].view("<f4")
            if space in ("cosine", "ip"):
                d = 1.0 - vecs @ qt
            else:
                d = (vecs * vecs).sum(axis=1)[:, None] - 2.0 * (vecs @ qt) + (q * q).sum(axis=1)[None, :]
            closer += (d < self_d[None, :] - 1e-6).sum(axis=0)
    return closer
