"""The field's repair, reduced to its core, as the baseline reconcile is measured against.

MemPalace PR #1276 (``mempalace repair --mode reconcile``): read every vector from
``data_level0.bin`` (struct parsing of each slot), keep the ids the pickle maps, embed
the SQL-only rows' documents, build a fresh persistent chroma-hnswlib index of old + new
vectors with the palace's M and ef_construction, single-threaded writes, persist, write
the pickle. No verification, no swap: only the work every full rebuild must do.

    python benchmarks/_field.py PALACE OUT_DIR

prints one JSON line: stage times and this process's peak RSS.
"""

from __future__ import annotations

import json
import pickle
import resource
import sqlite3
import struct
import sys
import time
from pathlib import Path

import numpy as np

from chaosfix.embedder import HashEmbedder
from chaosfix.palace.hnsw import HEADER_FMT

DOC_KEY = "chroma:document"


def field_rebuild(palace: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    conn = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    (coll_id,) = conn.execute("SELECT id FROM collections LIMIT 1").fetchone()
    segs = dict(conn.execute("SELECT scope, id FROM segments WHERE collection=?", (coll_id,)).fetchall())
    space = dict(conn.execute("SELECT key, str_value FROM collection_metadata WHERE collection_id=?",
                              (coll_id,)).fetchall()).get("hnsw:space") or "cosine"
    seg = palace / segs["VECTOR"]
    h = struct.unpack(HEADER_FMT, (seg / "header.bin").read_bytes())
    _ver, _off0, _maxel, count, size, label_off, data_off, _ml, _ep, max_m, _m0, m, _mult, efc = h
    dim = (label_off - data_off) // 4
    meta = pickle.loads((seg / "index_metadata.pickle").read_bytes())  # the PR's own pickle.load
    get = (lambda k: meta[k]) if isinstance(meta, dict) else (lambda k: getattr(meta, k))
    label_to_id = get("label_to_id")

    # every slot, the way the PR reads them: one struct-parsed record at a time
    raw = (seg / "data_level0.bin").read_bytes()
    vecs, labels = [], []
    for i in range(count):
        base = i * size
        label = struct.unpack_from("<Q", raw, base + label_off)[0]
        if raw[base + 2] & 1 or label not in label_to_id:
            continue
        vecs.append(np.frombuffer(raw, dtype="<f4", count=dim, offset=base + data_off))
        labels.append(label)
    del raw
    t_read = time.perf_counter()

    # SQL-only rows: re-embed their documents
    mapped = set(get("id_to_label"))
    rows = conn.execute("SELECT e.embedding_id, m.string_value FROM embeddings e JOIN embedding_metadata m "
                        "ON m.id = e.id AND m.key = ? WHERE e.segment_id = ?", (DOC_KEY, segs["METADATA"]))
    orphans = [(eid, doc) for eid, doc in rows if eid not in mapped]
    conn.close()
    new = HashEmbedder(dim)([d for _, d in orphans])
    top = max(int(get("total_elements_added")), max(labels, default=0))
    new_labels = list(range(top + 1, top + 1 + len(orphans)))
    t_embed = time.perf_counter()

    import hnswlib

    n = len(labels) + len(new_labels)
    data = np.vstack([np.stack(vecs), np.stack(new)]) if new else np.stack(vecs)
    del vecs
    out.mkdir(parents=True)
    index = hnswlib.Index(space=space, dim=dim)
    index.init_index(max_elements=max(1000, int(n * 1.2)), M=m, ef_construction=efc,
                     is_persistent_index=True, persistence_location=str(out))
    index.add_items(data, np.array(labels + new_labels, dtype=np.uint64), num_threads=1)
    index.persist_dirty()
    index.close_file_handles()
    t_build = time.perf_counter()

    id_to_label = {label_to_id[lab]: lab for lab in labels}
    id_to_label.update({eid: lab for (eid, _), lab in zip(orphans, new_labels)})
    out_meta = {"dimensionality": dim, "total_elements_added": top + len(orphans), "max_seq_id": None,
                "id_to_label": id_to_label, "label_to_id": {v: k for k, v in id_to_label.items()},
                "id_to_seq_id": {}}
    (out / "index_metadata.pickle").write_bytes(pickle.dumps(out_meta, protocol=3))
    t_end = time.perf_counter()
    return {"read": t_read - t0, "embed": t_embed - t_read, "build": t_build - t_embed,
            "persist_pickle": t_end - t_build, "total": t_end - t0, "elements": n,
            "added": len(orphans), "M": m, "ef_construction": efc, "max_m": max_m,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    print(json.dumps(field_rebuild(Path(sys.argv[1]), Path(sys.argv[2]))))
