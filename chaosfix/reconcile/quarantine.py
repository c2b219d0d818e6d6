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

from chaosfix.palace.leftovers import quarantined
from chaosfix.palace.state import PICKLE_OK, CollectionState, _read_files, _read_pickle


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


def quarantine_vectors(st: CollectionState, ids: list[str], dim: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """id -> vector for ``ids`` found in sound quarantined copies, and the copies used."""
    if st.seg_dir is None or not st.info.vector_segment or not ids:
        return {}, []
    root = st.seg_dir.parent
    want = set(ids)
    out: dict[str, np.ndarray] = {}
    used: list[str] = []
    for copy in reversed(quarantined(root, st.info.vector_segment)):
        q = load_copy(st, copy.path)
        if q is None or q.idmap is None or q.files is None or q.files.header is None or q.files.header.dim != dim:
            continue
        live = q.live_label_slots
        found = [(rid, live[lab]) for rid, lab in q.idmap.id_to_label.items()
                 if rid in want and rid not in out and lab in live]
        if not found:
            continue
        vecs = q.files.vectors(np.array([s for _, s in found], dtype=np.int64))
        n = 0
        for (rid, _), v in zip(found, vecs):
            norm = float(np.linalg.norm(v)) if np.isfinite(v).all() else 0.0
            if norm > 0 and (st.info.space != "cosine" or abs(norm - 1.0) < 1e-3):
                out[rid] = v.copy()
                n += 1
        if n:
            used.append(str(copy.path))
        if len(out) == len(want):
            break
    return out, used
