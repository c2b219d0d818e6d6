"""chromadb's own judgement of a repaired palace, run on a throwaway copy of it.

Standalone on purpose: it imports only the standard library, numpy and chromadb, so the
application's own interpreter (``reconcile --chromadb-python PATH``, a venv that has
chromadb but not chaosfix) can run it by path. Reads its JSON spec from the file named
by argv[1] (or, with ``-``, by a JSON string on one stdin line once chromadb is
imported) and prints one JSON line on stdout; it records what chromadb does and never
judges (the parent does, in ``chaosfix.chromadb_probe``). Progress goes to stderr in
``chaosfix.progress``'s line format (spelled out here: this file cannot import it).

It proves what changed instead of reading every embedding: the count, every repaired
row's embedding against the vector chaosfix planned, self-queries of a seeded sample of
the repaired rows and of the others, filtered queries, and a probe write that must land
and be found.
chromadb searches at its own low ef (10 by default), where a healthy large graph misses
some self-queries, so a miss is queried again with a larger ``n_results`` (hnswlib
searches with ef = max(ef, k)): only a row still missing at the largest k is reported.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator

BATCH = 256
RESULTS_PER_CALL = 25600  # ids per query call's answer (BATCH queries at k=100)
GET_BATCH = 100  # chromadb 1.5.9 keeps ~50 MB after a get of 1000 ids with embeddings, ~13 MB after 100
GET_BATCH_PLAIN = 400  # embeddings alone: chromadb 0.6 answers 500 ids in half the time of 100 x 5
PAIRED = 12  # narrow metadata keys whose pairs the filtered query's choice weighs (66 pairs)
FILTERED = 1  # each one a metadata scan plus a query: ~0.15 s at 100k, ~1.3 s at 500k
PROBE_ID = "__chaosfix_probe__"
PROBE_NORM_MAX = 1e19  # an ip probe's largest norm: its float32 dot product with itself stays finite


def _err(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _progress(spec: dict, stage: str, done: int, total: int) -> None:
    if spec.get("progress"):
        sys.stderr.write(f"chaosfix-progress {done} {total} {stage}\n")  # chaosfix.progress.child_line
        sys.stderr.flush()


def _peak_rss_mb() -> float:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):  # not on every platform
        return 0.0


def _migrations(path: str) -> dict:
    try:
        conn = sqlite3.connect(f"file:{path}/chroma.sqlite3?mode=ro", uri=True)
        try:
            return {d: v for d, v in conn.execute("SELECT dir, max(version) FROM migrations GROUP BY dir")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return {"error": _err(exc)}


def workers_for(version: str) -> int:
    """Query calls in flight at once: 2 (the cores the parent's repair has finished with)
    where chromadb's Rust bindings release the GIL for a query (1.x), 1 for the
    pure-Python releases before it, where threads only contend for the GIL. Measured on
    repaired palaces, the child alone, 3 runs each: 1.5.9's 200 self-queries at 100k
    0.25-0.35 s -> 0.14-0.18 s; 0.6.3's got slower (0.26-0.33 s -> 0.37-0.42 s). The get
    stays one call at a time: at 500k two in flight cost 1.5.9's child 16-21 MB of peak
    (1.50x of data_level0.bin) and no time."""
    try:
        return 2 if int(version.split(".")[0]) >= 1 else 1
    except ValueError:
        return 1


def _in_order(fn: Callable, items: list, workers: int) -> Iterator:
    """``map(fn, items)``, ``workers`` calls at a time, answers in order; at most
    ``workers`` answers wait unread (an answer is up to ``RESULTS_PER_CALL`` ids)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        pending = [ex.submit(fn, x) for x in items[:workers]]
        for nxt in items[workers:]:
            done = pending.pop(0).result()
            pending.append(ex.submit(fn, nxt))
            yield done
        for f in pending:
            yield f.result()


def _found(col, vectors: list, ids: list[str], ks: list[int], count: int, where: dict | None = None,
           workers: int = 1) -> list[str]:
    """ids whose own vector does not return them at any k in ``ks`` (batched queries;
    each batch becomes Python lists only while it is asked, so 5,000 vectors of 384-d
    never sit in memory as 2 million float objects)."""
    todo = list(zip(ids, vectors))
    for k in ks:
        k = max(1, min(k, count))
        left = []
        # answers as Python lists: at k=1600, 256 queries would be 400k id strings at once;
        # a batch per worker at least, so that a few hundred queries use every worker
        step = max(1, min(BATCH, RESULTS_PER_CALL // k, -(-len(todo) // workers)))
        chunks = [todo[s : s + step] for s in range(0, len(todo), step)]
        asked = _in_order(lambda c, k=k: _query(col, [v.tolist() for _, v in c], k, where), chunks, workers)
        for chunk, res in zip(chunks, asked):
            left += [(rid, v) for (rid, v), got in zip(chunk, res["ids"]) if rid not in got]
        todo = left
        if not todo or k >= count:
            break
    return [rid for rid, _ in todo]


def _query(col, vectors: list, k: int, where: dict | None) -> dict:
    """``col.query`` for ``k`` results, halved while hnswlib refuses a k its search cannot
    fill ("Cannot return the results in a contigious 2D array": a graph holding deleted
    elements, or an ip graph some rows of which its entry point does not reach, yields
    fewer live ones than k; chromadb 0.6.3 asks hnswlib for k itself). A row not among
    the fewer answers stays a miss at this k."""
    kw = {"where": where} if where else {}
    while True:
        try:
            return col.query(query_embeddings=vectors, n_results=k, include=["distances"], **kw)
        except RuntimeError as exc:
            if k <= 1 or ("contigious" not in str(exc) and "contiguous" not in str(exc)):
                raise
            k //= 2


def _get(col, ids: list[str], keep: set[str], check) -> tuple[dict, list[str]]:
    """Fetch ``ids`` in batches and judge each row as it arrives: ``check(id, embedding)``
    (the planned-vector test) and the ids with no embedding. Only ``keep`` (the ids to
    self-query) is fetched with its metadata, and only its embeddings and metadata stay in
    memory: at 500k drawers the 10,000 repaired rows' arrays and metadata dicts, kept
    whole, were ~45 MB of the child's peak, and the metadata of rows nobody queries
    doubled chromadb 0.6's time (1.5 s against 0.6 s for 5,200 rows at 100k)."""
    import numpy as np

    kept: dict = {}
    missing: list[str] = []
    returned: set[str] = set()
    with_meta = [r for r in ids if r in keep]
    plain = [r for r in ids if r not in keep]
    for batch_ids, step, include in ((with_meta, GET_BATCH, ["embeddings", "metadatas"]),
                                     (plain, GET_BATCH_PLAIN, ["embeddings"])):
        for s in range(0, len(batch_ids), step):
            got = col.get(ids=batch_ids[s : s + step], include=include)
            embs = got["embeddings"]
            metas = got.get("metadatas") if "metadatas" in include else None
            for i, rid in enumerate(got["ids"]):
                returned.add(rid)
                meta = (metas[i] if metas is not None else None) or {}
                if embs is None or embs[i] is None:
                    missing.append(rid)
                    continue
                emb = np.asarray(embs[i], dtype=np.float32)
                check(rid, emb)
                if rid in keep:
                    kept[rid] = (emb, meta)
            del got, embs, metas
    missing += [r for r in ids if r not in returned]
    return kept, missing


def _where_for(meta: dict, metas: list[dict], count: int) -> dict | None:
    """A ``where`` that keeps the row with metadata ``meta`` and that chromadb answers fast:
    about ``4 * sqrt(count)`` matches, judged by how many of ``metas`` (the untouched
    rows' seeded sample) it keeps. Both ends are slow in chromadb 0.6: a filter keeping
    one row walks the whole graph with a Python check per node (0.11 s at 100k drawers),
    and every match's id comes back from SQL (20% of 100k rows: 0.25 s); an int value is
    never served by an index there (0.26 s for one row at 100k), so strings come first.
    1.5.9 pays for every match in memory: at 510k rows a filter keeping 14% of them raised
    the child's peak by 57 MB (0.58 s), one keeping 2.9% by 12 MB (0.36 s)."""
    usable = {k: v for k, v in meta.items()  # ($-keys: 0.6 stored them, 1.x refuses them in a where)
              if isinstance(v, (str, int)) and not isinstance(v, bool) and k and not k.startswith(("chroma:", "$"))}
    pool = {k: v for k, v in usable.items() if isinstance(v, str)} or usable
    if not pool:
        return None

    def kept(c: dict) -> int:
        return sum(all(type(m.get(k)) is type(v) and m.get(k) == v for k, v in c.items()) for m in metas)

    single = {k: kept({k: v}) for k, v in pool.items()}  # (each key counted once: it is asked thrice)

    def share(c: dict) -> float | None:  # a value seen once in the sample may be the row's own
        n = single[next(iter(c))] if len(c) == 1 else kept(c)
        return n / len(metas) if n >= 2 and metas else None

    def estimate(c: dict) -> float:
        s = share(c)
        if s is None and len(c) > 1:  # keys too rare together for the sample (0 or 1 of 100
            parts = [share({k: v}) for k, v in c.items()]  # is noise): their shares, as if independent
            if None not in parts:
                s = math.prod(parts)
        return max(1.0, count * s) if s is not None else 1.0

    cands = [{k: v} for k, v in pool.items()]
    narrow = {k: v for k, v in pool.items() if single[k] < len(metas) / 2}
    # every pair of narrow keys, not only all of them at once: a per-file key (MemPalace's
    # source_file) beside wing and room made the one conjunction "one row", and the filter
    # fell back to a room of 14%
    # (of the PAIRED keys whose values the sample holds most often: rarer ones pair to "one
    # row" anyway, and a palace with thousands of keys must not cost millions of pairs)
    paired = sorted(narrow.items(), key=lambda kv: -single[kv[0]])[:PAIRED]
    cands += [dict(p) for p in itertools.combinations(paired, 2)]
    if len(narrow) >= 3:
        cands.append(narrow)
    # a clause the sample puts above half the rows is a last resort: one wing holding the
    # whole palace would match every row (+400 MB in 1.5.9's child at 510k)
    cands = [c for c in cands if (share(c) or 0.0) <= 0.5] or cands
    target = 4 * math.sqrt(max(count, 1))
    best = min(cands, key=lambda c: (abs(math.log(estimate(c) / target)), len(c)))
    return best if len(best) == 1 else {"$and": [{k: v} for k, v in best.items()]}


def _same(a: list, b: list, cosine: bool) -> bool:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return False
    if np.allclose(x, y, atol=1e-4):
        return True
    if cosine:  # a normalized copy of the same direction
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        return bool(nx > 0 and ny > 0 and float(x @ y) / (nx * ny) > 1 - 1e-5)
    return False


def judge_collection(client, name: str, spec: dict, ks: list[int], seed: int, top: dict, workers: int = 1) -> dict:
    import numpy as np

    res: dict = {"errors": [], "seconds": {}, "peak_rss_mb": {}}
    t = [time.perf_counter()]

    def step(n: int, what: str) -> None:
        now = time.perf_counter()
        res["seconds"][what] = round(now - t[0], 3)
        res["peak_rss_mb"][what] = _peak_rss_mb()  # where the child's memory goes, for the benchmark
        t[0] = now
        _progress(top, f"chromadb post-check {name}", n, 5)

    col = client.get_collection(spec.get("collection") or name, embedding_function=None)
    count = res["count"] = col.count()  # 1.x loads the index here
    step(1, "open")
    repaired, sample = list(spec.get("repaired", [])), list(spec.get("sample", []))
    # read in place: at 10,000 repaired rows the planned vectors are 15 MB the child need not hold
    planned = np.load(spec["planned"], mmap_mode="r") if spec.get("planned") else None
    # (the planned file holds the repaired rows' vectors, then the kept sample rows' old ones)
    at = {r: i for i, r in enumerate(repaired + list(spec.get("kept", [])))} if planned is not None else {}
    cosine = spec.get("space") == "cosine"
    wrong: list[str] = []

    def check(rid: str, emb) -> None:
        i = at.get(rid)
        # a kept row (after the repaired ones) must come back as it was: no direction-only
        # match, which would pass a rebuild that lost its norms
        if i is not None and not _same(emb, planned[i], cosine and i < len(repaired)):
            wrong.append(rid)

    # chromadb answers a query in ~3 ms whatever k, so it self-queries the ids it is given
    # (a seeded sample of the repaired rows plus the sample): chaosfix's own verification
    # already self-queried every repaired row in the index it built
    asked = spec.get("query", repaired + sample)
    got, missing = _get(col, list(dict.fromkeys(repaired + sample)), set(asked), check)
    step(2, "get")
    res.update(asked=len(repaired) + len(sample), repaired=len(repaired), kept_compared=len(spec.get("kept", [])),
               missing=missing[:20],
               missing_count=len(missing), wrong_vectors=wrong[:20], wrong_vector_count=len(wrong))
    have = [r for r in asked if r in got]
    first = _found(col, [got[r][0] for r in have], have, ks[:1], count)
    res["queried"], res["misses_at_k10"] = len(have), len(first)
    res["unreachable"] = _found(col, [got[r][0] for r in first], first, ks[1:], count) if first else []
    step(3, "self_query")
    # a filtered query per queried row (up to FILTERED): the metadata path chromadb 1.x fails on for orphans
    fmiss, fasked = [], 0
    # shares judged on the untouched sample: the repaired rows are often one lost batch
    # (one wing, one room, one file), which would make their values look common
    metas = [got[r][1] for r in sample if r in got] or [got[r][1] for r in have]
    for rid in have[:FILTERED]:
        where = _where_for(got[rid][1], metas, count)
        if where is None:
            continue
        fasked += 1
        try:  # (0.6.3 and 1.5.9 answer a k above the filter's matches with fewer ids)
            fmiss += _found(col, [got[rid][0]], [rid], ks, count, where=where)
        except Exception as exc:  # noqa: BLE001 - some releases refuse it: ask how many match (0.5 s in 0.6 at 100k)
            res["filtered_retried"] = _err(exc)  # (kept in the record: a refusal of anything else shows)
            try:
                matching = len(col.get(where=where, include=[])["ids"])
                fmiss += _found(col, [got[rid][0]], [rid], ks, matching, where=where)
            except Exception as again:  # noqa: BLE001 - this release refuses the filter itself
                res["filtered_error"] = _err(again)
                fasked -= 1
    res["filtered_queried"], res["filtered_misses"] = fasked, fmiss
    step(4, "filtered")
    # a probe write (on the copy) must land and be found
    dim = len(got[have[0]][0]) if have else int(spec.get("dim") or 0)
    if dim:
        rng = np.random.default_rng(seed)
        vec = rng.standard_normal(dim).astype(np.float32)
        vec = vec / np.linalg.norm(vec)
        outranked = False
        if spec.get("space") == "ip" and have:
            # in ip a unit probe scores below the rows of larger norms, and a new row of a
            # small norm gets no edges in (measured: a 60k-row graph of norms 0.1-50 never
            # returned it, even filtered to it), so the probe takes twice the largest norm
            # read: its own top hit, as a new row in any space is. Its own float32 dot
            # product must stay finite (norm 1e19: 1e38), so rows beyond that may outrank
            # it; then its landing is proven by get alone.
            norms = [float(np.linalg.norm(np.asarray(got[r][0], dtype=np.float64))) for r in have]
            want = 2 * max((n for n in norms if math.isfinite(n)), default=1.0)
            vec = vec * min(max(1.0, want), PROBE_NORM_MAX)
            outranked = want > PROBE_NORM_MAX
        col.add(ids=[PROBE_ID], embeddings=[vec.tolist()], documents=["chaosfix probe"], metadatas=[{"chaosfix": "probe"}])
        landed = len(col.get(ids=[PROBE_ID])["ids"]) == 1
        ok = landed and (outranked or not _found(col, [vec], [PROBE_ID], ks, count + 1))
        if outranked:
            res["probe_outranked"] = True
        res["probe_found"] = ok
    step(5, "probe")
    return res


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the chaosfix that started it dies (a killed
    reconcile's rerun removes the copy this child works on). Best effort elsewhere."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(0)


def main() -> None:
    """``_verify_child.py SPEC.json``, or ``_verify_child.py -``: import chromadb first, then
    read the spec file's path from one stdin line (the parent starts the child while it
    still repairs, so chromadb's 2-3 s import overlaps the repair); EOF: exit quietly."""
    t0 = time.perf_counter()
    _die_with_parent()
    out: dict = {"collections": {}}
    try:
        import chromadb
        from chromadb.config import Settings
    except Exception as exc:  # noqa: BLE001 - recorded, judged by the parent
        chromadb, out["error"] = None, _err(exc)
    imported = time.perf_counter() - t0
    if len(sys.argv) > 1 and sys.argv[1] != "-":
        where = sys.argv[1]
    else:  # one JSON string: any path survives (newlines, bytes that are not UTF-8)
        line = sys.stdin.readline()
        if not line.strip():
            os._exit(0)  # the parent had nothing to check after all
        where = json.loads(line)
    with open(where, encoding="utf-8") as f:
        spec = json.load(f)
    t1 = time.perf_counter()
    try:
        if chromadb is not None:
            out["version"] = chromadb.__version__
            out["migrations_before"] = _migrations(spec["path"])
            clients: dict = {}

            def client_of(cspec: dict):  # noqa: ANN202 - a chromadb client
                """A client of the collection's own tenant and database: a name is unique
                per database only, and a client sees one."""
                where = {k: cspec[k] for k in ("tenant", "database") if cspec.get(k)}
                key = tuple(sorted(where.items()))
                if key not in clients:
                    clients[key] = chromadb.PersistentClient(path=spec["path"], settings=settings, **where)
                return clients[key]

            settings = Settings(anonymized_telemetry=False)
            client_of({})
            out["seconds_start"] = round(imported + time.perf_counter() - t1, 3)  # import chromadb + open
            ks = [int(k) for k in spec.get("ks", [10, 100, 400, 1600])]
            workers = workers_for(chromadb.__version__)
            for name, cspec in spec["collections"].items():
                try:
                    out["collections"][name] = judge_collection(client_of(cspec), name, cspec, ks,
                                                                int(spec.get("seed", 0)), spec, workers)
                except Exception as exc:  # noqa: BLE001 - recorded, judged by the parent
                    out["collections"][name] = {"errors": [_err(exc)]}
            out["migrations_after"] = _migrations(spec["path"])
    except Exception as exc:  # noqa: BLE001
        out["error"] = _err(exc)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip chromadb's atexit work on a copy that is thrown away


if __name__ == "__main__":
    main()
