"""Runs inside a disposable child process that imports the real chromadb.

Everything that needs chromadb happens here, so the parent (check, reconcile, the test
process) never imports it and a SIGKILL hits only this process. Reads one JSON spec from
argv[1], prints one JSON result line on stdout.

Modes:
  build    create/open a palace and apply ``ops`` (add/upsert/update/delete), optionally
           with a kill point armed (0.6.x persist path)
  observe  reopen a palace and record what chromadb does: counts, embeddings, queries,
           a filtered query, and optionally a probe write that must land
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from chaosfix.drawers import drawer
from chaosfix.embedder import embed_text
from chaosfix.filecopy import die_with_starter
from chaosfix.progress import child_line

KILL_POINTS = ("start", "after-hnsw", "after-pickle", "before-commit")


def _client(path: str):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(
        path=path, settings=Settings(anonymized_telemetry=False, allow_reset=False)
    )


def _arm_kill_point(point: str, hit: int) -> None:
    """SIGKILL this process the ``hit``-th time the 0.6.x persist reaches ``point``.

    Wraps PersistentLocalHnswSegment._persist (start / before-commit) and the module's
    ``open``/``pickle`` (after-hnsw = about to open the pickle for writing, after-pickle =
    pickle.dump returned).
    """
    if point not in KILL_POINTS:
        raise SystemExit(f"unknown kill point {point!r}")
    import pickle as real_pickle

    from chromadb.segment.impl.vector import local_persistent_hnsw as lph

    counter = {"n": 0}

    def reach(name: str) -> None:
        if name != point:
            return
        counter["n"] += 1
        if counter["n"] >= hit:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    class PickleShim:
        HIGHEST_PROTOCOL = real_pickle.HIGHEST_PROTOCOL
        load = staticmethod(real_pickle.load)

        @staticmethod
        def dump(obj, f, protocol=None):
            real_pickle.dump(obj, f, protocol)
            f.flush()
            reach("after-pickle")

    lph.pickle = PickleShim  # type: ignore[assignment]

    def open_shim(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        # _persist opens the pickle with "wb" (truncating it) before pickle.dump: the
        # HNSW files are written and the old pickle is still intact right here.
        if str(file).endswith("index_metadata.pickle") and "w" in mode:
            reach("after-hnsw")
        return open(file, mode, *args, **kwargs)

    lph.open = open_shim  # module global shadows the builtin inside _persist
    original = lph.PersistentLocalHnswSegment._persist

    def persist(self):  # type: ignore[no-untyped-def]
        reach("start")
        original(self)
        reach("before-commit")

    lph.PersistentLocalHnswSegment._persist = persist


def _progress(spec: dict, stage: str, done: int, total: int) -> None:
    """Report progress to the parent (``chaosfix.progress``) when it asked for it."""
    if spec.get("progress"):
        sys.stderr.write(child_line(stage, done, total))
        sys.stderr.flush()


def _records(op: dict, seed: int, dim: int):
    rows = [drawer(i, seed, op.get("version", 0)) for i in range(op["start"], op["start"] + op["count"])]
    ids = [r[0] for r in rows]
    docs = [r[1] for r in rows]
    metas = [r[2] for r in rows]
    embs = [embed_text(d, dim).tolist() for d in docs]
    return ids, docs, metas, embs


def build(spec: dict) -> dict:
    import chromadb

    if spec.get("kill"):
        _arm_kill_point(spec["kill"]["point"], int(spec["kill"].get("hit", 1)))
    client = _client(spec["path"])
    meta = {
        "hnsw:space": spec.get("space", "cosine"),
        "hnsw:sync_threshold": int(spec.get("sync_threshold", 1000)),
        "hnsw:batch_size": int(spec.get("batch_size", 100)),
    }
    col = client.get_or_create_collection(spec["collection"], metadata=meta, embedding_function=None)
    seed, dim = int(spec.get("seed", 0)), int(spec.get("dim", 384))
    chunk_max = int(spec.get("chunk", 5000))
    done = []
    total, written = sum(int(op["count"]) for op in spec.get("ops", [])), 0
    for op in spec.get("ops", []):
        kind = op["op"]
        if kind == "delete":
            ids = [drawer(i, seed)[0] for i in range(op["start"], op["start"] + op["count"])]
            col.delete(ids=ids)
        else:
            ids, docs, metas, embs = _records(op, seed, dim)
            fn = {"add": col.add, "upsert": col.upsert, "update": col.update}[kind]
            step = int(op.get("chunk", chunk_max))
            for s in range(0, len(ids), step):
                fn(ids=ids[s : s + step], documents=docs[s : s + step],
                   metadatas=metas[s : s + step], embeddings=embs[s : s + step])
                _progress(spec, "chromadb writes", written + min(s + step, len(ids)), total)
        written += int(op["count"])
        done.append(kind)
    return {"version": chromadb.__version__, "ops": done, "count": col.count()}


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _filter_of(meta: dict | None) -> dict | bool:
    """A filter the row matches: its wing (a drawer's), else its first scalar metadata
    value (a palace of another application); False when it has none."""
    if meta and "wing" in meta:
        return {"wing": meta["wing"]}
    for k, v in sorted((meta or {}).items()):
        if isinstance(v, (str, int, float, bool)) and not k.startswith("chroma:"):
            return {k: v}
    return False


def observe(spec: dict) -> dict:
    """Reopen with chromadb and record every outcome as data, never raising."""
    import chromadb

    out: dict = {"version": chromadb.__version__, "errors": []}
    seed, dim = int(spec.get("seed", 0)), int(spec.get("dim", 384))
    compare, by_doc = spec.get("check_vectors", True), spec.get("query_by", "document") == "document"
    try:
        client = _client(spec["path"])
        col = client.get_collection(spec["collection"], embedding_function=None)
        out["count"] = col.count()
    except Exception as exc:  # noqa: BLE001 - the point is to record it
        out["errors"].append(("open", _err(exc)))
        return out
    # every row with its embedding, page by page
    ids: list[str] = []
    bad_embeddings: list[str] = []
    try:
        got = col.get(include=["embeddings", "documents", "metadatas"])
        ids = list(got["ids"])
        embs = got["embeddings"]
        if embs is None or len(embs) != len(ids):
            out["errors"].append(("get_embeddings", f"{0 if embs is None else len(embs)} embeddings for {len(ids)} ids"))
        elif compare:
            for rid, doc, emb in zip(ids, got["documents"], embs):
                want = embed_text(doc, dim)
                if doc is None or sum((float(a) - float(b)) ** 2 for a, b in zip(emb, want)) > 1e-6:
                    bad_embeddings.append(rid)
    except Exception as exc:  # noqa: BLE001
        out["errors"].append(("get_embeddings", _err(exc)))
        try:
            ids = list(col.get()["ids"])
        except Exception as exc2:  # noqa: BLE001
            out["errors"].append(("get_ids", _err(exc2)))
    out["ids"] = len(ids)
    out["bad_embeddings"] = bad_embeddings[:20]
    out["bad_embedding_count"] = len(bad_embeddings)
    # self-query a sample, unfiltered and filtered. Not by the stored embeddings of an ip
    # collection: there a row of a small norm is outranked for its own vector by rows of
    # larger ones, so no search need return it (a palace chaosfix built holds unit vectors)
    foreign_ip = not by_doc and spec.get("space") == "ip"
    if foreign_ip:
        out["self_query_skipped"] = "ip: rows of larger norms outrank a row for its own vector"
    sample = ids[:: max(1, len(ids) // int(spec.get("sample", 50)))] if ids and not foreign_ip else []
    misses, fmisses = [], []
    deeper: tuple[list[str], list[str]] = ([], [])  # missed at k=10, found by a deeper search
    for rid in sample:
        try:
            got = col.get(ids=[rid], include=["documents", "metadatas"] + ([] if by_doc else ["embeddings"]))
            doc, meta = got["documents"][0], got["metadatas"][0]
            q = embed_text(doc, dim).tolist() if by_doc else [float(x) for x in got["embeddings"][0]]
            for where, missed, later in ((None, misses, deeper[0]), (_filter_of(meta), fmisses, deeper[1])):
                if where is False:
                    continue  # (a row with no metadata value to filter on)
                found = _self_found(col, q, rid, where, out.get("count") or len(ids))
                if found is None:
                    missed.append(rid)
                elif found > 10:
                    later.append(rid)
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(("query", _err(exc)))
            break
    # a few are search depth (chromadb's own ann_accuracy invariant allows recall 0.95);
    # more say the graph is no use to chromadb's search, and all of them are misses
    allowed = int(DEEPER_SHARE * len(sample))  # (none of a sample under 20: it proves little)
    for later, missed in zip(deeper, (misses, fmisses)):
        if len(later) > allowed:
            missed += later
            later.clear()
    out["sampled"] = len(sample)
    out["query_misses"] = misses
    out["filtered_misses"] = fmisses
    out["found_deeper"] = deeper[0] + deeper[1]
    if spec.get("write_probe"):
        pid, pdoc, pmeta = drawer(10**9 + 7, seed)
        try:
            col.add(ids=[pid], documents=[pdoc], metadatas=[pmeta], embeddings=[embed_text(pdoc, dim).tolist()])
            res = col.query(query_embeddings=[embed_text(pdoc, dim).tolist()], n_results=3)
            landed = len(col.get(ids=[pid])["ids"]) == 1
            out["probe_found"] = landed and (foreign_ip or pid in res["ids"][0])
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(("probe", _err(exc)))
            out["probe_found"] = False
    return out


DEEPER_K = (10, 100, 1600)
DEEPER_SHARE = 0.05  # of the sample, excused as search depth


def _self_found(col, q: list[float], rid: str, where: dict | None, count: int) -> int | None:
    """The smallest k in ``DEEPER_K`` at which a row's own vector returns it among its
    true top-10, or None.

    chromadb searches at ef = max(its search ef (10), k), and a healthy graph built by
    several threads misses a few self-queries at k=10 from run to run (chromadb's own
    ``ann_accuracy`` invariant tolerates missed neighbours: recall >= 0.95). A row a
    deeper search returns no farther than the k=10 answer's last is one that answer
    should have held: search depth (the caller excuses a few, ``DEEPER_SHARE``).
    Anything else (no search finds it, or it comes back farther: a stale vector) is a
    miss. 0.6.3 and 1.5.9 answer a k above a filter's matches with fewer ids; a release
    that refuses it is asked how many match. hnswlib refuses a k its search cannot fill
    (a row no search reaches, in 0.6): a miss."""
    kw = {"where": where} if where else {}
    bound = float("inf")
    for k in DEEPER_K:
        try:
            res = col.query(query_embeddings=[q], n_results=min(k, count), include=["distances"], **kw)
        except Exception:  # noqa: BLE001 - see above (at k=10 the caller's error)
            if k == DEEPER_K[0]:
                raise
            if not where:
                return None
            try:
                matching = len(col.get(where=where, include=[])["ids"])
                res = col.query(query_embeddings=[q], n_results=max(1, min(k, matching)), include=["distances"],
                                **kw)
            except Exception:  # noqa: BLE001 - a k the search cannot fill
                return None
        got, dist = res["ids"][0], res["distances"][0]
        if rid in got and dist[got.index(rid)] <= bound + 1e-6:
            return k
        if k == DEEPER_K[0] and len(got) >= k:
            bound = float(dist[-1])
        if k >= count:
            return None
    return None


def main() -> None:
    die_with_starter()
    spec = json.loads(sys.argv[1])
    try:
        result = {"build": build, "observe": observe}[spec["mode"]](spec)
        result.setdefault("ok", True)
    except Exception as exc:  # noqa: BLE001
        result = {"ok": False, "error": _err(exc), "trace": traceback.format_exc()[-2000:]}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip chromadb's atexit work: the parent decides what is durable


if __name__ == "__main__":
    main()
