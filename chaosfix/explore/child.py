"""Runs inside a disposable chromadb child for ``chaosfix explore``.

Modes (one JSON spec in argv[1], one JSON result line on stdout):
  run    apply a workload's batches, appending each batch's number to an acknowledgement
         log (``ack``) only after chromadb returned: a line in that log is a write the
         application was told succeeded
  judge  chromadb's view of a palace in a fresh process: every row with its document
         and whether its embedding is exactly the document's, a self-query of every row,
         ids a query returns that the palace does not hold (phantoms), and a probe write
         that must land and be found
"""

from __future__ import annotations

import json
import os
import sys

from chaosfix._child import _client, _err
from chaosfix.drawers import drawer
from chaosfix.embedder import embed_text
from chaosfix.filecopy import die_with_starter

PROBE_INDEX = 10**9 + 7


def run(spec: dict) -> dict:
    client = _client(spec["path"])
    meta = {"hnsw:space": spec["space"], "hnsw:sync_threshold": int(spec["sync_threshold"]),
            "hnsw:batch_size": int(spec["batch_size"])}
    col = client.get_or_create_collection(spec["collection"], metadata=meta, embedding_function=None)
    seed, dim = int(spec["seed"]), int(spec["dim"])
    with open(spec["ack"], "a", buffering=1) as ack:
        for n, batch in enumerate(spec["batches"]):
            rows = [drawer(i, seed, int(batch.get("version", 0))) for i in batch["idx"]]
            ids = [r[0] for r in rows]
            if batch["op"] == "delete":
                col.delete(ids=ids)
            else:
                fn = {"add": col.add, "upsert": col.upsert, "update": col.update}[batch["op"]]
                fn(ids=ids, documents=[r[1] for r in rows], metadatas=[r[2] for r in rows],
                   embeddings=[embed_text(r[1], dim).tolist() for r in rows])
            ack.write(f"{n}\n")  # line-buffered: reaches the file before the next batch starts
    return {"batches": len(spec["batches"])}


def _found_deeper(col, vec: list[float], rid: str, n: int) -> bool:  # noqa: ANN001 - a chromadb collection
    """``rid`` among chromadb's answers for more results (a larger ef): a healthy HNSW
    graph misses now and then at chromadb's low default ef, so a miss at k=10 is asked
    again before it is called damage. hnswlib refuses a k its search cannot fill
    ("Cannot return the results in a contigious 2D array": a graph with deleted elements
    yields fewer live ones than k, on any palace of that shape), so k is halved then."""
    k = n
    while k > 10:
        try:
            return rid in col.query(query_embeddings=[vec], n_results=k)["ids"][0]
        except RuntimeError as exc:
            if "contigious" not in str(exc) and "contiguous" not in str(exc):
                raise
            k //= 2
    return False


def judge(spec: dict) -> dict:
    out: dict = {"errors": [], "rows": {}, "self_miss": [], "phantoms": [], "bad_vectors": []}
    dim = int(spec["dim"])
    try:
        col = _client(spec["path"]).get_collection(spec["collection"], embedding_function=None)
        out["count"] = col.count()
        got = col.get(include=["embeddings", "documents"])
    except Exception as exc:  # noqa: BLE001 - recorded, judged by the parent
        out["errors"].append(f"open/get: {_err(exc)}")
        return out
    embs = got["embeddings"]
    ids, docs = list(got["ids"]), list(got["documents"])
    if embs is None or len(embs) != len(ids):
        out["errors"].append(f"get: {0 if embs is None else len(embs)} embeddings for {len(ids)} ids")
        embs = [None] * len(ids)
    known = set(ids)
    for rid, doc, emb in zip(ids, docs, embs):
        out["rows"][rid] = doc
        want = embed_text(doc or "", dim)
        if emb is None or float(sum((float(a) - float(b)) ** 2 for a, b in zip(emb, want))) > 1e-6:
            out["bad_vectors"].append(rid)
            if emb is not None:  # the parent tells a stale vector (an older text's) from garbage
                out.setdefault("bad_vector_values", {})[rid] = [float(x) for x in emb]
    k = min(10, max(1, len(ids)))
    for rid, doc in zip(ids, docs):
        try:
            res = col.query(query_embeddings=[embed_text(doc or "", dim).tolist()], n_results=k)
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(f"query: {_err(exc)}")
            break
        hits = res["ids"][0]
        if rid not in hits and not _found_deeper(col, embed_text(doc or "", dim).tolist(), rid, min(100, len(ids))):
            out["self_miss"].append(rid)
        out["phantoms"] += [h for h in hits if h not in known and h not in out["phantoms"]]
    if spec.get("probe", True):
        # more rows than a batch, so chromadb inserts them into the HNSW graph itself
        # (a single row could sit in 0.6's brute-force buffer and hide a broken index)
        rows = [drawer(PROBE_INDEX + i, int(spec["seed"])) for i in range(int(spec.get("probe_rows", 1)))]
        try:
            vecs = [embed_text(r[1], dim).tolist() for r in rows]
            col.add(ids=[r[0] for r in rows], documents=[r[1] for r in rows], metadatas=[r[2] for r in rows],
                    embeddings=vecs)
            for r, vec in zip((rows[0], rows[-1]), (vecs[0], vecs[-1])):
                res = col.query(query_embeddings=[vec], n_results=1)
                back = col.get(ids=[r[0]], include=["embeddings"])
                if res["ids"][0][:1] != [r[0]] or back["ids"] != [r[0]]:
                    out["errors"].append("probe: a new write was not found by query and get")
                    break
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(f"probe: {_err(exc)}")
    return out


def main() -> None:
    die_with_starter()
    spec = json.loads(sys.argv[1])
    try:
        result = {"run": run, "judge": judge}[spec["mode"]](spec)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001
        result = {"ok": False, "error": _err(exc)}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip chromadb's atexit work: what is durable is what a crash would leave


if __name__ == "__main__":
    main()
