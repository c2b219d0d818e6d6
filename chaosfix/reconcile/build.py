"""Plan -> a new segment folder built aside, in the palace's own format.

incremental: copy the sound segment (sparse-aware), load it with chroma-hnswlib, mark
removed labels deleted, add or replace the planned vectors, persist. Cost grows with
the changes, not the palace (plus one file copy).
rebuild: a fresh persistent index from every readable kept vector plus the planned
vectors, with the palace's M, ef_construction and space.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

import numpy as np

from chaosfix.filecopy import CopyProcess, copy_tree_sparse, reflink, sparse_copy
from chaosfix.memtrim import release_freed_memory
from chaosfix.palace import idmap as idmap_mod
from chaosfix.palace.hnsw import HnswFiles
from chaosfix.progress import ProgressFn
from chaosfix.reconcile.plan import CollectionPlan
from chaosfix.reconcile.safety import fsync_tree, killpoint

# vectors per hnswlib add_items call: hnswlib holds no GIL while it inserts, so Ctrl-C waits
# for the call to return (20,000 took 5-10 s); a call costs nothing measurable beside its inserts
BATCH = 2000
# hnswlib threads for inserts and queries: every CPU this process may run on (hnswlib's
# own default, std::thread::hardware_concurrency, ignores affinity and cgroup limits)
THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _hnswlib():
    import hnswlib  # chroma-hnswlib; imported late so `check` never needs it

    return hnswlib


def _space(plan: CollectionPlan) -> str:
    assert plan.state is not None
    return plan.state.info.space


def kept_vectors(plan: CollectionPlan, ids: list[str]) -> np.ndarray:
    """Original vectors of kept ids: for cosine, stored (normalized) x length.bin norm,
    where the row's norm is there to read (else its stored unit vector)."""
    st = plan.state
    assert st is not None and st.files is not None
    slots = _kept_slots(plan, ids)
    vecs = st.files.vectors(slots)
    n = _kept_lengths(plan, slots)
    return vecs * np.where(np.isnan(n), 1.0, n).astype(np.float32)[:, None] if n is not None else vecs


def _kept_slots(plan: CollectionPlan, ids: list[str]) -> np.ndarray:
    assert plan.state is not None
    slots_of = plan.state.live_label_slots
    return np.array([slots_of[plan.keep[i]] for i in ids], dtype=np.int64)


def kept_lengths(plan: CollectionPlan, ids: list[str]) -> np.ndarray | None:
    """``_kept_lengths`` of kept ids."""
    return _kept_lengths(plan, _kept_slots(plan, ids))


def _kept_lengths(plan: CollectionPlan, slots: np.ndarray) -> np.ndarray | None:
    """The old length.bin norms of ``slots`` for a cosine index, NaN for a slot whose norm
    is not there to read (a torn or short file, a value that is no norm); None when the
    index keeps none (not cosine, no length.bin). Row by row: a file cut in half still
    holds the first half's norms."""
    st = plan.state
    assert st is not None and st.files is not None
    if _space(plan) != "cosine" or "length.bin" not in st.files.present:
        return None
    norms = np.memmap(st.files.dir / "length.bin", dtype="<f4", mode="r") \
        if st.files.present["length.bin"] >= 4 else np.zeros(0, dtype="<f4")
    inside = slots < len(norms)
    n = np.full(len(slots), np.nan, dtype=np.float32)
    n[inside] = norms[slots[inside]]
    n[~(np.isfinite(n) & (n > 0))] = np.nan
    return n


def _restore_kept(plan: CollectionPlan, out_dir: Path, keep_ids: list[str]) -> None:
    """Put each kept row's old stored bytes back in a rebuilt cosine index. hnswlib is
    given stored vector x length and normalizes it again, which lands a rounding step
    away from the old bytes in about half the rows: chromadb would then return a changed
    embedding for a row the repair only kept. The graph was built from vectors within
    that step of these, so only the bytes change (vector in data_level0.bin, norm in
    length.bin), in the slots hnswlib gave the rows' labels."""
    st = plan.state
    assert st is not None and st.files is not None
    files = HnswFiles.open(out_dir)
    h, table = files.header, files.slots()
    assert h is not None
    live = np.flatnonzero(table.live)
    where = dict(zip(table.labels[live].tolist(), live.tolist()))
    n_slots, size, lo, hi = files.readable_slots, h.size_data_per_element, h.offset_data, h.label_offset
    level0 = np.memmap(out_dir / LEVEL0, dtype=np.uint8, mode="r+", shape=(n_slots, size))
    lengths = np.memmap(out_dir / "length.bin", dtype="<f4", mode="r+")
    try:
        for s in range(0, len(keep_ids), BATCH):
            chunk = keep_ids[s : s + BATCH]
            old = _kept_slots(plan, chunk)
            new = np.array([where[plan.keep[i]] for i in chunk], dtype=np.int64)
            level0[new, lo:hi] = st.files.vectors(old).view(np.uint8)
            n = _kept_lengths(plan, old)
            if n is not None:  # (a norm not there to read: hnswlib's own norm of the unit vector stays)
                ok = ~np.isnan(n)
                lengths[new[ok]] = n[ok]
        level0.flush()
        lengths.flush()
    finally:
        del level0, lengths


LEVEL0 = "data_level0.bin"


class _Level0Copy:
    """The build folder's data_level0.bin (0.8 GB at 500k drawers), copied while hnswlib
    loads the index instead of before: the folder first holds a hard link to the palace's
    own file, which the load only reads; a child process copies the file beside it
    meanwhile (a thread stalled on the GIL, which the load holds throughout), and
    ``settle`` (after the load, with the index's write handles closed) renames the copy
    over the link. hnswlib writes the folder's files only in ``persist_dirty``, so
    nothing is ever written through the link. Where a reflink works, or hard links do
    not, the file is simply copied first."""

    def __init__(self, src: Path, out_dir: Path) -> None:
        self.dst = out_dir / LEVEL0
        self.tmp = out_dir / f".{LEVEL0}.copy"
        self.copying: CopyProcess | None = None
        if reflink(src, self.dst):
            return
        try:
            os.link(src, self.dst)
        except OSError:
            sparse_copy(src, self.dst)
            return
        self.copying = CopyProcess(self.dst, self.tmp)  # (from the link: it pins the inode the load reads)

    def settle(self, index: object) -> None:
        """Replace the link by the copy (``index``: loaded from the folder, its write
        handles reopened on the copy)."""
        if self.copying is None:
            return
        index.close_file_handles()  # type: ignore[attr-defined]
        self.copying.wait()
        os.replace(self.tmp, self.dst)
        if self.dst.stat().st_nlink != 1:
            raise OSError(f"{self.dst} is still linked after its copy")
        index.open_file_handles()  # type: ignore[attr-defined]

    def abandon(self) -> None:
        """Stop a copy still running before the caller removes the folder (after
        ``settle`` there is none; its error, if any, was settle's to raise)."""
        if self.copying is not None:
            self.copying.cancel()


def _early_flush(folder: Path) -> None:
    """Best-effort head start on the final fsync (which still runs and reports errors)."""
    try:
        fsync_tree(folder)
    except OSError:
        pass


def build(plan: CollectionPlan, out_dir: Path, progress: ProgressFn | None = None, sync: bool = True) -> None:
    """Build the plan's segment into ``out_dir``; ``sync=False`` leaves its final fsync
    to the caller (``safety.Syncing``, before the swap)."""
    st = plan.state
    assert st is not None
    hnswlib = _hnswlib()
    dim = plan.dim
    if not dim and plan.vectors:
        dim = len(next(iter(plan.vectors.values())))
    # the new map first: its transient dicts are freed before hnswlib's index is allocated
    map_bytes = idmap_mod.dumps(new_map(plan))
    index = hnswlib.Index(space=_space(plan), dim=dim)
    flushing: threading.Thread | None = None
    if plan.strategy == "incremental":
        assert st.seg_dir is not None
        copy_tree_sparse(st.seg_dir, out_dir, skip=(LEVEL0, idmap_mod.FILENAME))  # (the big file below)
        st.drop_index_facts()  # the old map and slot table are done with: free them for the index
        release_freed_memory()
        level0 = _Level0Copy(st.seg_dir / LEVEL0, out_dir)
        try:
            index.load_index(str(out_dir), is_persistent_index=True, max_elements=plan.max_elements)
            killpoint("linked")
            level0.settle(index)
        finally:
            level0.abandon()
        # the copy's pages go to disk while hnswlib inserts (it drops the GIL); the
        # fsync at the end then only waits for what the persist rewrote
        flushing = threading.Thread(target=_early_flush, args=(out_dir,), daemon=True)
        flushing.start()
        for lab in plan.remove_labels:
            index.mark_deleted(lab)
    else:
        out_dir.mkdir(parents=True, exist_ok=False)
        index.init_index(max_elements=plan.max_elements, M=plan.m, ef_construction=plan.ef_construction,
                         is_persistent_index=True, persistence_location=str(out_dir))
        keep_ids = sorted(plan.keep, key=plan.keep.__getitem__)
        for s in range(0, len(keep_ids), BATCH):
            chunk = keep_ids[s : s + BATCH]
            index.add_items(kept_vectors(plan, chunk), np.array([plan.keep[i] for i in chunk], dtype=np.uint64),
                            num_threads=THREADS)
            if progress:
                progress(f"rebuilding {plan.collection}: kept vectors", s + len(chunk), len(keep_ids))
    new = {**plan.replace, **plan.add}
    new_ids = sorted(new, key=new.__getitem__)
    for s in range(0, len(new_ids), BATCH):
        chunk = new_ids[s : s + BATCH]
        vecs = np.stack([plan.vectors[i] for i in chunk]).astype(np.float32)
        index.add_items(vecs, np.array([new[i] for i in chunk], dtype=np.uint64), num_threads=THREADS)
        if progress:
            progress(f"building {plan.collection}: new vectors", s + len(chunk), len(new_ids))
    index.persist_dirty()
    index.close_file_handles()
    del index
    if plan.strategy != "incremental" and _space(plan) == "cosine" and plan.keep:
        _restore_kept(plan, out_dir, keep_ids)
    (out_dir / idmap_mod.FILENAME).write_bytes(map_bytes)
    plan.map_digest = hashlib.sha256(map_bytes).digest()  # the verification knows its own map by it
    if flushing is not None:
        flushing.join()
    if sync:
        fsync_tree(out_dir)


def new_map(plan: CollectionPlan) -> idmap_mod.IdMap:
    """The id map after the plan, in the palace's own pickle format."""
    st = plan.state
    assert st is not None
    old = st.idmap
    id_to_label = {**plan.keep, **plan.replace, **plan.add}
    id_to_seq: dict[str, int] = {}
    if plan.fmt == "object":
        # a kept id keeps its seq_id, a written one takes its SQL row's; one lookup per
        # kept id, in C (a comprehension of three took 0.1 s at 100k)
        prev = old.id_to_seq_id if old is not None else {}
        id_to_seq = dict(zip(plan.keep, map(prev.get, plan.keep)))
        if None in id_to_seq.values():  # (a kept id the old map gave no seq_id)
            id_to_seq = {i: st.sql_rows[i] if s is None else s for i, s in id_to_seq.items()}
        for i in itertools.chain(plan.replace, plan.add):
            id_to_seq[i] = st.sql_rows[i]
    return idmap_mod.IdMap(
        fmt=plan.fmt,
        dimensionality=plan.dimensionality,
        total_elements_added=plan.total_elements_added,
        id_to_label=id_to_label,
        label_to_id=dict(zip(id_to_label.values(), id_to_label)),
        id_to_seq_id=id_to_seq,
        max_seq_id=plan.pickle_seq if plan.pickle_seq is not None else (old.max_seq_id if old is not None else None),
        extra=dict(old.extra) if old is not None else {},
    )

