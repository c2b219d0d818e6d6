"""Palaces whose collections live in several chromadb databases (``PersistentClient(path,
tenant=, database=)``): a name is unique per database only, so two applications sharing a
palace may each have a ``docs``, written by different models. Each collection is found,
guarded, repaired and judged by chromadb as its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import HASH_EMBEDDER, chromadb_script, reconcile, run_cli

from chaosfix.check import check_palace
from chaosfix.embedder import embed_text

OTHER = "test_databases:OtherAppEmbedder"
DB2 = "default_tenant/db2/docs"


class OtherAppEmbedder:
    """The second application's model: same shape, unrelated vectors."""

    def __call__(self, input: list[str]) -> list[np.ndarray]:  # noqa: A002
        return [embed_text("other-app:" + t) for t in input]


MODELS = {"default_database": lambda t: embed_text(t), "db2": lambda t: embed_text("other-app:" + t)}

BUILD = r"""
import shutil, sqlite3, sys
import chromadb
from chromadb.config import Settings
from chaosfix.embedder import embed_text
p = sys.argv[1]
S = Settings(anonymized_telemetry=False, is_persistent=True, persist_directory=p)
chromadb.AdminClient(S).create_database("db2")
model = {"default_database": lambda t: embed_text(t), "db2": lambda t: embed_text("other-app:" + t)}
meta = {"hnsw:space": "cosine", "hnsw:sync_threshold": 10, "hnsw:batch_size": 10}
for db in model:
    c = chromadb.PersistentClient(path=p, settings=S, database=db).create_collection("docs", metadata=meta,
                                                                                   embedding_function=None)
    ids = [f"{db}-{i}" for i in range(300)]
    docs = [f"{db} document {i}" for i in ids]
    c.add(ids=ids, embeddings=[model[db](d) for d in docs], documents=docs)
con = sqlite3.connect(p + "/chroma.sqlite3")
for db in model:  # each loses its last index flush (power loss after the SQL commit)
    seg, = con.execute("SELECT s.id FROM segments s JOIN collections c ON c.id = s.collection JOIN databases d "
                       "ON d.id = c.database_id WHERE d.name = ? AND s.scope = 'VECTOR'", (db,)).fetchone()
    shutil.copytree(f"{p}/{seg}", f"{p}.aside")
    c = chromadb.PersistentClient(path=p, settings=S, database=db).get_collection("docs", embedding_function=None)
    ids = [f"{db}-new{i}" for i in range(40)]
    docs = [f"{db} new document {i}" for i in ids]
    c.add(ids=ids, embeddings=[model[db](d) for d in docs], documents=docs)
    shutil.rmtree(f"{p}/{seg}")
    shutil.move(f"{p}.aside", f"{p}/{seg}")
"""

READ = r"""
import json, shutil, sys, tempfile
import chromadb
from chromadb.config import Settings
t = tempfile.mkdtemp()
shutil.copytree(sys.argv[1], t + "/p")  # (an open writes)
out = {}
for db in ("default_database", "db2"):
    c = chromadb.PersistentClient(path=t + "/p", settings=Settings(anonymized_telemetry=False),
                                  database=db).get_collection("docs", embedding_function=None)
    g = c.get(include=["embeddings", "documents"])
    out[db] = {i: [d, [float(x) for x in e]] for i, d, e in zip(g["ids"], g["documents"], g["embeddings"])}
shutil.rmtree(t)
print(json.dumps(out))
"""


def test_same_named_collections_in_two_databases_are_each_repaired_with_their_own_model(tmp_path: Path):
    """Both ``docs`` lost their last flush; each application's model is given. The guard
    picks each collection's own (it cached the first ``docs``'s choice for the second,
    which then got the other application's vectors), and chromadb's post-check finds
    the db2 collection in db2 (it looked every name up in the default database: exit 8,
    "Collection [docs] does not exist" or the wrong ``docs``'s count)."""
    p = tmp_path / "palace"
    chromadb_script(BUILD, str(p))
    rep = check_palace(p)
    found = {(f.collection, f.code): f.count for f in rep.findings if f.code == "SQL_ONLY"}
    assert found == {("docs", "SQL_ONLY"): 40, (DB2, "SQL_ONLY"): 40}, rep.codes()
    assert {(c["name"], c["database"]) for c in rep.collections} == {("docs", "default_database"),
                                                                     (DB2, "db2")}
    # a bare name is the default database's, as for chromadb's default client (it matched every
    # database's "docs", and reconcile --collection docs repaired another tenant's: helper-43)
    assert [c["name"] for c in check_palace(p, "docs").collections] == ["docs"]
    assert [c["name"] for c in check_palace(p, DB2).collections] == [DB2]
    # a name no collection has is a bad argument (exit 2, it was 8), naming where one is
    for cmd in (["check"], ["reconcile", "--dry-run"]):
        r = run_cli(*cmd, str(p), "--collection", "db2/docs")
        assert r.returncode == 2 and "no collection named 'db2/docs'" in r.stderr, (r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    r = run_cli("check", str(p), "--collection", "nosuch")
    assert r.returncode == 2 and "no collection named 'nosuch' (see" in r.stderr, r.stderr  # no other database's

    code, doc, err = reconcile(p, "--embedder", HASH_EMBEDDER, "--embedder", OTHER)
    assert code == 1 and doc["after_consistent"], err[-2000:]
    chosen = {pl["collection"]: pl["embedder"]["chosen"] for pl in doc["plans"]}
    assert chosen == {"docs": HASH_EMBEDDER, DB2: OTHER}, chosen
    assert set(doc["verification"]) == {"docs", DB2}
    assert doc["chromadb"]["ok"] and set(doc["chromadb"]["collections"]) == {"docs", DB2}, doc["chromadb"]

    served = json.loads(chromadb_script(READ, str(p)).strip().splitlines()[-1])
    for db, rows in served.items():
        assert len(rows) == 340, (db, len(rows))
        want = np.array([MODELS[db](d) for d, _ in rows.values()])
        got = np.array([e for _, e in rows.values()])
        cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
        assert (cos > 0.999).all(), (db, int((cos <= 0.999).sum()))
