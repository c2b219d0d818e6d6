"""Deep check: re-embed every row's document and compare it with the vector the index
holds, to find stale vectors (STALE_VECTOR) that no structural check can see.

An upsert whose HNSW flush a power cut loses leaves SQL with the new document and the
index with the old vector under the same label: SQL ids == index ids, chromadb returns
the old embedding and search finds the row by its old text. Only re-embedding shows it.
The embedder is chosen and guarded exactly as for a repair (``chaosfix.embedders``);
rows still pending in the WAL are skipped (chromadb replays them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chaosfix.embedders.guard import THRESHOLD
from chaosfix.palace.sql import PalaceSql
from chaosfix.palace.state import CollectionState
from chaosfix.reconcile.sources import Embedder, embed

BATCH = 256


@dataclass
class DeepResult:
    compared: int = 0
    stale: dict[str, np.ndarray] = field(default_factory=dict)  # id -> its document's vector
    worst: float | None = None


def stale_vectors(sql: PalaceSql, st: CollectionState, embedder: Embedder, threshold: float = THRESHOLD,
                  ) -> DeepResult:
    """Rows whose live, mapped index vector is not their document's embedding."""
    out = DeepResult()
    m, files = st.idmap, st.files
    if m is None or files is None or st.slots is None or not st.info.metadata_segment:
        return out
    live, pend = st.live_label_slots, st.pending_ids
    # a torn index too (explore: 0.6.3 upsert powerloss:torn:1 kept 19 old vectors in slots
    # that read fine): every readable, well-formed slot is compared; malformed ones are
    # the structural repair's
    bad = set(np.flatnonzero(st.slots.bad).tolist()) if st.torn else set()
    # in slot order: each batch's vectors are then one short run of data_level0.bin, read
    # in blocks (the kernel reads ahead), not hundreds of scattered reads from a cold file
    pairs = sorted(((rid, live[lab]) for rid, lab in m.id_to_label.items()
                    if rid in st.sql_rows and rid not in pend and lab in live and live[lab] not in bad),
                   key=lambda p: (p[1], p[0]))
    dim = files.header.dim if files.header else 0
    worst = 1.0
    for s in range(0, len(pairs), BATCH):
        # documents a batch at a time: a palace's text may not fit in memory at once
        docs = sql.documents(st.info.metadata_segment, [r for r, _ in pairs[s : s + BATCH]])
        chunk = [(r, x) for r, x in pairs[s : s + BATCH] if docs.get(r)]
        if not chunk:
            continue
        got = embed(embedder, [docs[r] for r, _ in chunk], dim)  # type: ignore[misc]
        have = files.vectors(np.array([x for _, x in chunk], dtype=np.int64)).astype(np.float64)
        g = got.astype(np.float64)
        with np.errstate(all="ignore"):
            cos = np.einsum("ij,ij->i", g, have) / (np.linalg.norm(g, axis=1) * np.linalg.norm(have, axis=1))
        cos = np.nan_to_num(cos, nan=-1.0)
        worst = min(worst, float(cos.min()))
        for (rid, _), c, v in zip(chunk, cos.tolist(), got):
            if c < threshold:
                out.stale[rid] = v
        out.compared += len(chunk)
    out.worst = round(worst, 4) if out.compared else None
    return out


def deep_check(path, collection: str | None = None, embedder=None, trust: bool = False):  # noqa: ANN001, ANN201
    """``check`` plus STALE_VECTOR findings: a CheckReport. ``embedder``: as for
    reconcile (None: the palace's own record, its config, or chromadb's default on disk)."""
    from chaosfix.check import check_palace, deep_findings
    from chaosfix.embedders.select import EmbedderSelector
    from chaosfix.palace import palace_db

    rep = check_palace(path, collection)
    db = palace_db(path)
    selector = EmbedderSelector(db.parent, embedder, trust)
    sql = PalaceSql(db)
    try:
        deep_findings(sql, rep, selector)
    finally:
        sql.close()
        selector.close()
    return rep
