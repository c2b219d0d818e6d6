"""Proof that a built segment is right, before it replaces anything.

1. strict zero-diff: SQL ids == map ids == ids of live index labels; maps inverse;
   total_elements_added >= max label; read back with chaosfix's own reader.
2. stored vectors: every added/replaced label holds the planned vector.
3. top-k self-query (k=10, ef >= 200) of every repaired row and a seeded sample of the
   rest; with ``ef_max`` (the reconciler passes ``EF_MAX``) a miss is first re-queried at
   doubling ef up to ``ef_max`` (``recovered``: search depth, not damage: on 100k random
   384-d vectors a healthy chromadb-built graph misses ~0.5% of self-queries at ef=200
   and none at ef=800); a miss left is confirmed by brute force: a graph that cannot
   reach a vector that is still its own nearest neighbour is hnswlib's known quirk,
   tolerated up to a small rate; anything else fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chaosfix.palace import idmap as idmap_mod
from chaosfix.palace.hnsw import HnswFiles
from chaosfix.progress import ProgressFn

K = 10
EF = 200
EF_MAX = 1600
UNREACHABLE_RATE = 0.005
QUERY_BATCH = 2000  # self-queries per hnswlib call: one progress step


@dataclass
class Verification:
    ok: bool = True
    zero_diff: bool = False
    ids: int = 0
    queried: int = 0
    misses: int = 0
    recovered: int = 0  # misses found again at a higher ef (<= ef_max)
    unreachable: int = 0
    wrong_vectors: int = 0
    unrepaired: int = 0  # SQL rows left out of the index (no vector source): zero-diff does not hold
    problems: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)


def zero_diff(seg_dir: Path, sql_ids: set[str], v: Verification) -> tuple[HnswFiles, idmap_mod.IdMap] | None:
    try:
        m = idmap_mod.loads((seg_dir / idmap_mod.FILENAME).read_bytes())
    except (OSError, idmap_mod.UnsafePickle, idmap_mod.UnreadablePickle) as exc:
        v.fail(f"built id map unreadable: {exc}")
        return None
    files = HnswFiles.open(seg_dir)
    if files.header is None:
        v.fail("built header unreadable")
        return None
    slots = files.slots()
    live = slots.labels[slots.live]
    live_set = set(live.tolist())
    map_ids = set(m.id_to_label)
    v.ids = len(map_ids)
    if map_ids != sql_ids:
        v.fail(f"map ids != SQL ids ({len(map_ids - sql_ids)} extra, {len(sql_ids - map_ids)} missing)")
    if len(live_set) != len(live):
        v.fail("duplicate live labels")
    if live_set != set(m.label_to_id):
        v.fail(f"live labels != map labels ({len(live_set ^ set(m.label_to_id))} differ)")
    if m.inverse_problems():
        v.fail("id maps not inverse")
    if m.total_elements_added < m.max_label:
        v.fail("total_elements_added below max label")
    if slots.bad.any():
        v.fail(f"{int(slots.bad.sum())} malformed slots")
    v.zero_diff = v.ok
    return files, m


def verify_segment(seg_dir: Path, space: str, sql_ids: set[str], planned: dict[str, np.ndarray],
                   sample: int = 1000, seed: int = 0, full: bool = False, k: int = K, ef: int = EF,
                   ef_max: int | None = None, progress: ProgressFn | None = None) -> Verification:
    """Zero-diff, planned vectors in place, and self-query (top-``k`` at ``ef``) of planned +
    sampled rows; misses re-queried at doubling ef up to ``ef_max`` before brute force."""
    v = Verification()
    got = zero_diff(seg_dir, sql_ids, v)
    if got is None or not v.ok:
        return v
    files, m = got
    slots = files.slots()
    live_idx = np.flatnonzero(slots.live)
    slot_of = dict(zip(slots.labels[live_idx].tolist(), live_idx.tolist()))
    rest = sorted(set(m.id_to_label) - planned.keys())
    if not full and len(rest) > sample:
        rest = random.Random(seed).sample(rest, sample)
    check_ids = sorted(planned) + rest
    if not check_ids:
        return v
    labels = np.array([m.id_to_label[i] for i in check_ids], dtype=np.uint64)
    stored = files.vectors(np.array([slot_of[int(lab)] for lab in labels], dtype=np.int64))
    for j, rid in enumerate(check_ids):
        want = planned.get(rid)
        if want is None:
            continue
        want = want.astype(np.float64)
        if space == "cosine":
            want = want / (np.linalg.norm(want) or 1.0)
        if not np.allclose(stored[j], want, atol=1e-5):
            v.wrong_vectors += 1
    if v.wrong_vectors:
        v.fail(f"{v.wrong_vectors} labels do not hold their planned vector")
    import hnswlib

    h = files.header
    assert h is not None
    index = hnswlib.Index(space=space, dim=h.dim)
    index.load_index(str(seg_dir), is_persistent_index=True, max_elements=h.max_elements)
    index.set_ef(max(ef, k))  # hnswlib needs ef >= k
    k = min(k, len(slot_of))
    found = np.empty((len(stored), k), dtype=np.uint64)
    for s in range(0, len(stored), QUERY_BATCH):
        found[s : s + QUERY_BATCH], _ = index.knn_query(stored[s : s + QUERY_BATCH], k=k)
        if progress:
            progress(f"self-queries (top-{k}, ef {max(ef, k)})", min(s + QUERY_BATCH, len(stored)), len(stored))
    v.queried = len(check_ids)
    miss_rows = [j for j in range(len(check_ids)) if int(labels[j]) not in set(found[j].tolist())]
    v.misses = len(miss_rows)
    cur = max(ef, k)
    while miss_rows and ef_max is not None and cur < ef_max:
        cur = min(2 * cur, ef_max)
        index.set_ef(cur)
        found, _ = index.knn_query(stored[miss_rows], k=k)
        miss_rows = [j for j, f in zip(miss_rows, found) if int(labels[j]) not in set(f.tolist())]
    v.recovered = v.misses - len(miss_rows)
    index.close_file_handles()
    if miss_rows:
        allv = files.vectors(live_idx)
        for j in miss_rows:
            q = stored[j]
            if space == "cosine" or space == "ip":
                d = 1.0 - allv @ q
            else:
                d = ((allv - q) ** 2).sum(axis=1)
            nearest = set(slots.labels[live_idx[np.argsort(d)[:k]]].tolist())
            if int(labels[j]) in nearest:
                v.unreachable += 1  # the graph's quirk, not corruption
            else:
                v.fail(f"self-query of {check_ids[j]} fails even by brute force")
        if v.unreachable > max(2, UNREACHABLE_RATE * len(check_ids)):
            v.fail(f"{v.unreachable} of {len(check_ids)} vectors unreachable from themselves")
    return v
