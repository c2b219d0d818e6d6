"""Vectors from quarantined copies of a segment, before anything is re-embedded.

Repair tools move a damaged segment aside rather than delete it (MemPalace:
``<uuid>.corrupt-<time>``, ``<uuid>.drift-<time>``, ``<uuid>.hnsw-backup-<time>``;
chaosfix: ``<palace>.chaosfix-backup-<time>/<uuid>``). When the live folder is missing
or damaged, the rows' vectors often still sit there. Each copy is read and validated
exactly like a live segment (header, slots, link lists, the allow-listed id map); a copy
that is torn or unmapped is not used, and only live, mapped, plausible vectors of the
collection's dimension are taken. The newest copy wins (names carry their time).
A copy is as old as its quarantine: ``check --deep`` finds a vector a later upsert made
stale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chaosfix.palace import idmap as idmap_mod
from chaosfix.palace import map_child, pickle_reader
from chaosfix.palace.leftovers import quarantined
from chaosfix.palace.state import PICKLE_OK, CollectionState, _read_files, _read_pickle
from chaosfix.safe_fs import is_link


def load_copy(st: CollectionState, folder: Path) -> CollectionState | None:
    """The copy's state when it is sound (mapped, not torn), else None."""
    q = CollectionState(info=st.info, seg_dir=folder, sql_rows=st.sql_rows, vector_seq=None, metadata_seq=None,
                        pending=[])
    _read_pickle(q)
    if q.pickle_status != PICKLE_OK:
        return None
    _read_files(q)
    if q.torn or q.files is None or q.files.header is None or q.slots is None:
        return None
    return q


def _ask_holds(folder: Path, ids: list[str]) -> map_child.MapFacts | None:
    """The map helper (``map_child``, ``ask="hits"``) started on the copy's map, asked how
    many of ``ids`` it holds; None where the copy must simply be read (a small map, an id
    the NUL-joined list cannot carry, a file that cannot be read here)."""
    p = folder / idmap_mod.FILENAME
    try:
        if not p.is_file() or is_link(p) or p.stat().st_size < map_child.MIN_BYTES or any("\0" in i for i in ids):
            return None
        raw = pickle_reader.read_bounded(p)
    except (OSError, pickle_reader.PickleBoundsError):
        return None
    helper = map_child.MapFacts(raw, ask="hits")
    helper.send_ids("\0".join(ids))
    return helper


def _holds_none(helper: map_child.MapFacts | None) -> bool:
    """The helper read the map as sound and found none of the ids in it: ``load_copy``
    would find none either (the same bytes, the same restricted read), so its opcode
    scan, unpickle and slot pass are skipped. Any other answer (unsafe, unreadable, no
    helper) leaves the verdict to ``load_copy``."""
    if helper is None:
        return False
    with helper:
        got = helper.result()
    return got is not None and got[0] == "ok" and got[1].get("hits") == 0


def quarantine_vectors(st: CollectionState, ids: list[str], dim: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """id -> vector for ``ids`` found in sound quarantined copies, and the copies used."""
    if st.seg_dir is None or not st.info.vector_segment or not ids:
        return {}, []
    want = set(ids)
    out: dict[str, np.ndarray] = {}
    used: list[str] = []
    copies = list(reversed(quarantined(st.seg_dir.parent, st.info.vector_segment)))  # newest first
    # the next copy's helper runs while this one's answers or this copy is read: two at a
    # time, one per core (and one map's memory each)
    started: list[map_child.MapFacts | None] = []
    try:
        for i, copy in enumerate(copies):
            for j in range(len(started), min(i + 2, len(copies))):
                started.append(_ask_holds(copies[j].path, sorted(want - out.keys())))
            helper, started[i] = started[i], None
            if _holds_none(helper):
                continue
            if _take_vectors(st, copy.path, dim, want, out):
                used.append(str(copy.path))
            if len(out) == len(want):
                break
    finally:
        for h in started:
            if h is not None:
                h.close()
    return out, used


def _take_vectors(st: CollectionState, folder: Path, dim: int, want: set[str], out: dict[str, np.ndarray]) -> int:
    """Add to ``out`` the plausible vectors the copy in ``folder`` holds for ids of
    ``want`` not in it yet (live, mapped, of the collection's dimension, unit for
    cosine); how many it added."""
    q = load_copy(st, folder)
    if q is None or q.idmap is None or q.files is None or q.files.header is None or q.files.header.dim != dim:
        return 0
    live = q.live_label_slots
    found = [(rid, live[lab]) for rid, lab in q.idmap.id_to_label.items()
             if rid in want and rid not in out and lab in live]
    if not found:
        return 0
    vecs = q.files.vectors(np.array([s for _, s in found], dtype=np.int64))
    n = 0
    for (rid, _), v in zip(found, vecs):
        norm = float(np.linalg.norm(v)) if np.isfinite(v).all() else 0.0
        if norm > 0 and (st.info.space != "cosine" or abs(norm - 1.0) < 1e-3):
            out[rid] = v.copy()
            n += 1
    return n
