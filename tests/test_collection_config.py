"""A collection's distance space and HNSW settings are read where the chromadb that wrote
it keeps them, and a rebuild keeps every row's embedding exactly (both versions).

chromadb 1.3+ records a collection made with the configuration API
(``configuration={"hnsw": {"space": ...}}``) only in ``collections.schema_str``: its
``config_json_str`` is ``{}`` and no ``hnsw:space`` metadata exists. chaosfix once read
such a cosine collection as l2, rebuilt its index in l2 without ``length.bin``, and
chromadb then returned every embedding as zeros, while the repair was reported as done.
Where metadata and schema disagree, chromadb 1.5.9 builds and searches in the schema's
space (pinned below). Every palace here is built, damaged and judged by the real chromadb.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import chromadb_script, reconcile

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.palace.hnsw import parse_header
from chaosfix.workload import chroma_major

ROWS = 200
HNSW = {"max_neighbors": 8, "ef_construction": 50, "batch_size": 10, "sync_threshold": 20}
LEGACY = {"hnsw:M": 8, "hnsw:construction_ef": 50, "hnsw:batch_size": 10, "hnsw:sync_threshold": 20}
# name -> (configuration, metadata, the space chromadb searches in); the configuration API
# is 1.x's (0.6.3's own fails to create the collection)
COLLECTIONS = {
    "meta-cosine": (None, {"hnsw:space": "cosine", **LEGACY}, "cosine"),
    "meta-l2": (None, {"hnsw:space": "l2", **LEGACY}, "l2"),
    # raw norms in ip: most rows are outranked for their own vector, so no self-query
    # returns them; the graph's reach proves them instead
    "meta-ip-raw": (None, {"hnsw:space": "ip", **LEGACY}, "ip"),
}
if chroma_major() == "1.x":
    COLLECTIONS |= {
        "cfg-cosine": ({"space": "cosine", **HNSW}, None, "cosine"),
        "cfg-ip": ({"space": "ip", **HNSW}, None, "ip"),
        "cfg-l2": ({"space": "l2", **HNSW}, None, "l2"),
        "meta-cosine-cfg-ip": ({"space": "ip", **HNSW}, {"hnsw:space": "cosine"}, "ip"),
    }

BUILD = textwrap.dedent("""
    import json, sys, numpy as np, chromadb
    path, spec = sys.argv[1], json.loads(sys.argv[2])
    c = chromadb.PersistentClient(path=path)
    rng = np.random.default_rng(7)
    for name, (cfg, meta, space) in spec["collections"].items():
        kw = {"configuration": {"hnsw": cfg}} if cfg else {}
        col = c.create_collection(name, embedding_function=None, metadata=meta, **kw)
        n = spec["rows"]  # norms from 0.1 to 10: a lost length shows
        v = rng.standard_normal((n, 8)) * rng.uniform(0.1, 10, (n, 1))
        if space == "ip" and not name.endswith("-raw"):  # unit vectors, as embedders give: its own top hit
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        for s in range(0, n, 50):
            col.add(ids=[f"r{i}" for i in range(s, min(n, s + 50))], embeddings=v[s : s + 50].astype(np.float32))
""")

OBSERVE = textwrap.dedent("""
    import json, sys, numpy as np, chromadb
    c = chromadb.PersistentClient(path=sys.argv[1])
    out = {}
    q = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    for name in json.loads(sys.argv[2]):
        col = c.get_collection(name, embedding_function=None)
        g = col.get(include=["embeddings"])
        r = col.query(query_embeddings=q, n_results=5, include=["distances"])
        out[name] = {"ids": g["ids"], "emb": np.asarray(g["embeddings"]).tolist(),
                     "near": r["ids"], "dist": r["distances"]}
    print(json.dumps(out))
""")


def _observe(palace: Path) -> dict:
    """What chromadb reads, on a copy (opening it must not count as a change to judge)."""
    copy = palace.with_name(palace.name + "-observed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(palace, copy)
    try:
        return json.loads(chromadb_script(OBSERVE, str(copy), json.dumps(sorted(COLLECTIONS))))
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("configured") / "palace"
    chromadb_script(BUILD, str(p), json.dumps({"collections": COLLECTIONS, "rows": ROWS}))
    return p


@pytest.mark.skipif(chroma_major() != "1.x", reason="the configuration API's schema_str is chromadb 1.3+")
def test_space_and_settings_come_from_the_schema(configured):
    """check reports the space chromadb searches in, and the index's own M is the configured one."""
    rep = check_palace(configured)
    assert rep.consistent, rep.codes()
    assert {c["name"]: c["space"] for c in rep.collections} == {name: want for name, (_, _, want) in COLLECTIONS.items()}
    for name in COLLECTIONS:
        assert parse_header(faults.segment_file(configured, "header.bin", name).read_bytes()).m == HNSW["max_neighbors"]


@pytest.mark.skipif(chroma_major() != "1.x", reason="the configuration API's schema_str is chromadb 1.3+")
def test_a_large_schema_or_one_naming_no_space_is_read_as_chromadb_reads_it(configured, tmp_path):
    """chromadb records every metadata key a collection saw in its schema_str (1.4 MB at
    12,000 keys), which chaosfix once skipped above 1 MiB, reading the space from the
    metadata instead; and a schema whose vector index names no space is l2 to chromadb,
    whatever the metadata says."""
    import sqlite3

    p = tmp_path / "palace"
    shutil.copytree(configured, p)
    con = sqlite3.connect(p / "chroma.sqlite3")
    try:
        con.execute("UPDATE collections SET schema_str = json_set(schema_str, '$.keys.pad', ?)", ("x" * (3 << 20),))
        con.execute("""UPDATE collections SET schema_str = json_remove(schema_str,
                       '$.keys."#embedding".float_list.vector_index.config.space',
                       '$.defaults.float_list.vector_index.config.space') WHERE name = 'meta-cosine-cfg-ip'""")
        con.commit()
    finally:
        con.close()
    want = {name: space for name, (_, _, space) in COLLECTIONS.items()} | {"meta-cosine-cfg-ip": "l2"}
    assert {c["name"]: c["space"] for c in check_palace(p).collections} == want


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_a_rebuild_keeps_the_space_the_settings_and_every_embedding(name, configured, tmp_path):
    """A bloated link_lists.bin makes reconcile rebuild the index (the strategy that reads
    every kept vector back from data_level0.bin and length.bin): chromadb then returns
    every embedding exactly as before, finds the same neighbours at the same distances,
    and the index keeps the configured M."""
    p = tmp_path / "palace"
    shutil.copytree(configured, p)
    before = _observe(p)
    faults.files.sparse_extend(faults.segment_file(p, "link_lists.bin", name), 300)
    code, doc, err = reconcile(p)
    assert code == 1, err
    assert [(pl["collection"], pl["strategy"]) for pl in doc["plans"] if pl["strategy"] != "none"] == [(name, "rebuild")]
    assert doc["chromadb"]["ok"] is True, doc["chromadb"]
    judged = doc["chromadb"]["collections"][name]  # the post-check compared the kept sample too
    assert judged["kept_compared"] > 0 and judged["wrong_vector_count"] == 0, judged
    after = _observe(p)
    for col in COLLECTIONS:
        b, a = before[col], after[col]
        assert a["ids"] == b["ids"]
        emb_a, emb_b = np.asarray(a["emb"], dtype=np.float32), np.asarray(b["emb"], dtype=np.float32)
        assert np.array_equal(emb_a, emb_b), (col, np.abs(emb_a - emb_b).max())
        assert a["near"] == b["near"], col
        assert np.allclose(a["dist"], b["dist"], rtol=1e-5, atol=1e-6), col
    assert parse_header(faults.segment_file(p, "header.bin", name).read_bytes()).m == HNSW["max_neighbors"]


def test_a_rebuild_keeps_every_norm_a_torn_length_bin_still_holds(configured, tmp_path):
    """length.bin cut to half its elements (TORN): the rebuild keeps the norm of every row
    whose norm is still there (it once dropped them all when one was missing, and
    chromadb then returned every row as a unit vector, passed by the post-check's
    direction-only comparison), gives the others their direction, and says so."""
    p = tmp_path / "palace"
    shutil.copytree(configured, p)
    before = _observe(p)["meta-cosine"]
    lengths = faults.segment_file(p, "length.bin", "meta-cosine")
    h = parse_header(faults.segment_file(p, "header.bin", "meta-cosine").read_bytes())
    os.truncate(lengths, 4 * (h.cur_element_count // 2))
    code, doc, err = reconcile(p)
    assert code == 1 and doc["chromadb"]["ok"], err
    (plan,) = [pl for pl in doc["plans"] if pl["collection"] == "meta-cosine"]
    assert plan["strategy"] == "rebuild" and any("norms are not in length.bin" in r for r in plan["reasons"])
    after = _observe(p)["meta-cosine"]
    assert after["ids"] == before["ids"]
    b, a = np.asarray(before["emb"], dtype=np.float32), np.asarray(after["emb"], dtype=np.float32)
    same = (a == b).all(axis=1)
    assert same.sum() >= h.cur_element_count // 2 - 1, same.sum()  # every norm still there: exact
    unit = np.abs(np.linalg.norm(a[~same], axis=1) - 1) < 1e-5
    assert unit.all() and not same.all()  # the rest: their direction, as unit vectors


IP_PALACE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    n, step, scale = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])  # rows, rows a persist, norm scale
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "ip-wide", embedding_function=None,
        metadata={"hnsw:space": "ip", "hnsw:sync_threshold": step, "hnsw:batch_size": step})
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, 16)) * rng.uniform(0.1, 50, (n, 1)) * scale
    for s in range(0, n, step):
        col.add(ids=[f"r{i}" for i in range(s, s + step)], embeddings=v[s : s + step].astype(np.float32))
""")


@pytest.mark.parametrize(("rows", "step", "scale"), [(3000, 100, 1), (20000, 1000, 1), (2000, 500, 1e18)])
def test_an_ip_graph_of_varied_norms_is_repaired(tmp_path, rows, step, scale):
    """ip, norms 0.1-50, 16-d rows: many rows are outranked for their own vector, and
    chromadb's own graph leaves some of those unreached from its entry point (2,807 of
    3,000 reached). A repair (here: one row gone from SQL, its label marked deleted)
    failed its verification on the first such row (exit 8 on every repair, both
    versions), then chromadb 0.6.3's post-check on hnswlib's refusal of a k its search
    cannot fill; both are judged by rate now. At 20,000 rows the post-check's probe, a
    unit vector, was outranked by more rows than any k it asks (exit 8); at norms of
    1e17-5e19 the probe scaled past them overflowed float32 to inf, which chromadb 1.x
    refuses (exit 8)."""
    import sqlite3

    p = tmp_path / "palace"
    chromadb_script(IP_PALACE, str(p), str(rows), str(step), str(scale))
    before = _observe_one(p, "ip-wide")
    con = sqlite3.connect(p / "chroma.sqlite3")
    try:
        rid = con.execute("SELECT id FROM embeddings WHERE embedding_id = 'r3'").fetchone()[0]
        for table in ("embedding_metadata", "embeddings"):
            con.execute(f"DELETE FROM {table} WHERE id = ?", (rid,))
        con.commit()
    finally:
        con.close()
    for strategy in ("auto", "rebuild"):
        q = tmp_path / strategy
        shutil.copytree(p, q)
        code, doc, err = reconcile(q, "--strategy", strategy)
        assert code == 1 and doc["chromadb"]["ok"], (strategy, err, doc and doc.get("chromadb"))
        after = _observe_one(q, "ip-wide")
        i = before["ids"].index("r3")
        assert after["ids"] == before["ids"][:i] + before["ids"][i + 1:]
        assert after["emb"] == before["emb"][:i] + before["emb"][i + 1:]


GET_ALL = textwrap.dedent("""
    import json, sys, numpy as np, chromadb
    g = chromadb.PersistentClient(path=sys.argv[1]).get_collection(sys.argv[2], embedding_function=None).get(
        include=["embeddings"])
    print(json.dumps({"ids": g["ids"], "emb": np.asarray(g["embeddings"]).tolist()}))
""")


def _observe_one(palace: Path, name: str) -> dict:
    """Every id and embedding chromadb returns, read on a copy."""
    copy = palace.with_name(palace.name + "-observed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(palace, copy)
    try:
        return json.loads(chromadb_script(GET_ALL, str(copy), name))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
