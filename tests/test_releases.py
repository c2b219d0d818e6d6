"""Palaces written by every supported chromadb release: the generation is read from the
palace's own files, every value a repair writes is in that generation's encoding, no
repair changes the palace's schema, and the chromadb post-check runs on a copy (with a
chromadb of the palace's own generation only; skipped with a note otherwise).

The fixtures (``tests/fixtures/lost-flush-<version>.tar.gz``, made by
``tests/fixtures/make_release_fixtures.py`` with each release) are 400 drawers of
32-d cosine vectors whose last HNSW flush (100 drawers) was lost. Every leg runs every
fixture; the leg whose chromadb wrote a fixture also judges the repair with it.
"""

from __future__ import annotations

import ast
import shutil
import sqlite3
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import chromadb_script, run_cli

from chaosfix.check import check_palace
from chaosfix.chromadb_probe import CHILD, Target, verify_with_chromadb
from chaosfix.embedder import HashEmbedder, embed_text
from chaosfix.palace import idmap
from chaosfix.palace.generation import of_version
from chaosfix.reconcile import ReconcileOptions, reconcile_palace
from chaosfix.workload import PalaceSpec, chromadb_version, observe

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# release -> (generation, seq encoding as SQLite's typeof(), pickle format)
RELEASES = {
    "0.4.24": ("0.4", "blob", "object"),
    "0.5.23": ("0.5-0.6", "blob", "object"),
    "0.6.3": ("0.5-0.6", "blob", "object"),
    "1.0.21": ("1.0-1.2", "integer", "dict"),
    "1.1.1": ("1.0-1.2", "integer", "dict"),
    "1.2.2": ("1.0-1.2", "integer", "dict"),
    "1.3.7": ("1.3-1.4", "integer", "dict"),
    "1.4.1": ("1.3-1.4", "integer", "dict"),
    "1.5.9": ("1.5", "integer", "dict"),
}
FIXTURE_SPEC = PalaceSpec(drawers=400, dim=32, sync_threshold=100, batch_size=50)
INSTALLED_GEN = of_version(chromadb_version())


def unpack(version: str, tmp_path: Path) -> Path:
    with tarfile.open(FIXTURES / f"lost-flush-{version}.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "palace"


def schema(palace: Path) -> tuple[list, list]:
    """The migrations rows and every schema object's SQL: what a chromadb migration changes."""
    con = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return (con.execute("SELECT dir, version, filename, hash FROM migrations ORDER BY dir, version").fetchall(),
                con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall())
    finally:
        con.close()


def seq_types(palace: Path) -> dict[str, set[str]]:
    con = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return {t: {r[0] for r in con.execute(f"SELECT DISTINCT typeof(seq_id) FROM {t}")}
                for t in ("max_seq_id", "embeddings")}
    finally:
        con.close()


# every leg repairs every fixture (the encodings need no chromadb); a release leg's
# `-m releases` keeps the fixtures of its own generation, which its chromadb judges
@pytest.mark.parametrize("version", [pytest.param(v, marks=[pytest.mark.releases] if g == INSTALLED_GEN else [])
                                     for v, (g, _, _) in sorted(RELEASES.items())])
def test_release_palace_checked_exactly_and_repaired_in_its_own_encoding(tmp_path, version):
    gen, enc, fmt = RELEASES[version]
    palace = unpack(version, tmp_path)
    before_schema, before_seqs = schema(palace), seq_types(palace)
    rep = check_palace(palace)
    assert rep.generation is not None and rep.generation.name == gen, rep.generation
    assert rep.to_json()["generation"]["migrations"] == dict(rep.generation.migrations)
    if gen == "0.4":
        # 0.4 keeps every WAL row and reads the vector seq from the pickle: the lost flush
        # is replayed on open, so it is pending (healthy), never SQL_ONLY or SEQ_MISSING
        assert rep.consistent and rep.codes() == {"PENDING": 100}
    else:
        assert rep.codes() == {"SQL_ONLY": 100}

    r = reconcile_palace(palace, ReconcileOptions(embedder=HashEmbedder(32), apply_pending=gen == "0.4"))
    assert r.exit_code == 1, r.to_json()
    after = check_palace(palace)
    assert after.consistent and after.codes() == {}, after.codes()
    assert schema(palace) == before_schema  # no migration, no schema change
    assert seq_types(palace) == before_seqs and seq_types(palace)["max_seq_id"] <= {enc}
    seg = after.states[0].seg_dir
    m = idmap.loads((seg / idmap.FILENAME).read_bytes())
    assert m.fmt == fmt and len(m.id_to_label) == 400
    if gen == "0.4":  # the vector segment's seq lives in the pickle, not in max_seq_id
        assert m.max_seq_id == 400 and after.states[0].info.vector_segment not in _seq_rows(palace)

    # the post-check never opens the palace itself: a chromadb of the palace's generation
    # judges a copy; any other generation is skipped with a note, never run
    assert r.chromadb is not None
    if INSTALLED_GEN == gen:
        assert r.chromadb["ok"] and not r.chromadb.get("skipped") and r.chromadb["on"] == "copy", r.chromadb
        c = r.chromadb["collections"]["mempalace_drawers"]
        assert c["repaired"] == 100 and c["probe_found"] and not c["unreachable"], c  # 0.4: folded from the WAL
        # and the release itself then reads every row with its exact embedding
        seen = observe(palace, FIXTURE_SPEC, sample=400)
        assert seen["errors"] == [] and seen["count"] == seen["ids"] == 400, seen
        assert seen["bad_embedding_count"] == 0 and not seen["query_misses"], seen
    else:
        assert r.chromadb["ok"] and r.chromadb["skipped"], r.chromadb
        assert not list(palace.parent.glob(".palace.chaosfix-verify-*"))


def _seq_rows(palace: Path) -> set[str]:
    con = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT segment_id FROM max_seq_id")}
    finally:
        con.close()


def _native_fixture() -> str:
    native = [v for v, (g, _, _) in RELEASES.items() if g == INSTALLED_GEN and g != "0.4"]
    if not native:
        pytest.skip(f"no lost-flush fixture of generation {INSTALLED_GEN}")
    return chromadb_version() if chromadb_version() in native else native[0]


@pytest.mark.releases
def test_post_check_fails_on_an_unrepaired_palace(tmp_path):
    """The post-check can fail: chromadb does not find the lost rows' embeddings."""
    palace = unpack(_native_fixture(), tmp_path)
    st = check_palace(palace).states[0]
    lost = st.sql_only()
    docs = {i: i for i in lost}  # only ids matter: chromadb must return an embedding
    t = Target("mempalace_drawers", "cosine", {i: embed_text(docs[i], 32) for i in lost}, [], 400)
    res = verify_with_chromadb(palace, [t], check_palace(palace).generation)
    assert res["ok"] is False and res["errors"], res
    assert check_palace(palace).codes() == {"SQL_ONLY": 100}  # the palace itself untouched


@pytest.mark.releases
def test_cli_chromadb_python(tmp_path):
    """--chromadb-python: the application's interpreter judges; one without chromadb is
    refused with one line before anything changes."""
    palace = unpack(_native_fixture(), tmp_path)
    nochroma = tmp_path / "python-without-chromadb"
    nochroma.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    nochroma.chmod(nochroma.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "emb32.py").write_text(
        "from chaosfix.embedder import HashEmbedder\n\ndef emb(docs):\n    return HashEmbedder(32)(docs)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    bad = run_cli("reconcile", str(palace), "--embedder", "emb32:emb", "--chromadb-python", str(nochroma), env=env)
    assert bad.returncode == 8 and len(bad.stderr.strip().splitlines()) == 1 and "no chromadb" in bad.stderr
    assert check_palace(palace).codes() == {"SQL_ONLY": 100}
    stale = tmp_path / ".palace.chaosfix-verify-killed_1"  # what a post-check killed mid-way leaves
    (stale / "palace").mkdir(parents=True)
    ok = run_cli("reconcile", str(palace), "--embedder", "emb32:emb", "--chromadb-python", sys.executable,
                 env=env, timeout=600)
    assert ok.returncode == 1, ok.stdout + ok.stderr
    assert f"chromadb {chromadb_version()} post-check: ok (on a copy)" in ok.stdout
    assert not stale.exists() and not list(tmp_path.glob(".palace.chaosfix-verify-*"))


@pytest.mark.releases
def test_verify_child_is_standalone():
    """The post-check child runs in any interpreter that has chromadb: it imports only
    the standard library, numpy and chromadb (never chaosfix)."""
    tree = ast.parse(CHILD.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "collections", "concurrent", "ctypes", "itertools", "json", "math", "os", "resource",
                    "sqlite3", "sys", "time", "numpy", "chromadb"}, mods


@pytest.mark.releases
def test_the_filtered_self_query_keeps_a_few_rows_per_thousand():
    """The post-check's filter keeps about 4 sqrt(count) rows, judged on the sampled rows'
    metadata: one row makes chromadb 0.6 walk the whole graph, a wing of 20% makes it read
    20% of the ids from SQL, an int value is read by a scan there, so strings first."""
    from chaosfix import _verify_child as child
    from chaosfix.drawers import drawer

    metas = [drawer(i)[2] for i in range(400)]  # wing (5 values), room (7), n (unique int)
    row = metas[3]
    assert child._where_for(row, metas, 100_000) == {"$and": [{"wing": row["wing"]}, {"room": row["room"]}]}
    # the post-check's 100-row sample holds a wing+room pair once or not at all (its
    # share, 2.9%, is 0 or 1 row in 100 one time in five): the pair is still judged by its
    # keys' shares, not taken for one row and passed over for a room of 14%
    seen_once = [m for m in metas[:140] if (m["wing"], m["room"]) != (row["wing"], row["room"])][:99] + [row]
    assert child._where_for(row, seen_once, 510_000) == {"$and": [{"wing": row["wing"]}, {"room": row["room"]}]}
    assert child._where_for(row, seen_once[:99], 510_000) == {"$and": [{"wing": row["wing"]}, {"room": row["room"]}]}
    assert child._where_for({"n": 7, "flag": True}, [{"n": i, "flag": True} for i in range(400)], 100_000) == {"n": 7}
    assert child._where_for({"flag": True, "chroma:document": "x"}, metas, 100_000) is None
    half = [{"kind": "a" if i % 2 else "b", "file": f"f{i}"} for i in range(400)]  # 50% or one row each
    assert child._where_for(half[1], half, 100_000) == {"kind": "a"}
    tenth = [{"kind": f"k{i % 10}", "file": f"f{i // 4}"} for i in range(400)]  # 10% or 4 rows per 400
    assert child._where_for(tenth[0], tenth, 100_000) == {"file": "f0"}
    # keys 1.x refuses in a where (0.6 stored them), an empty key, an empty collection
    assert child._where_for({"$x": "a", "": "b", "room": "r"}, [{"room": "r"}] * 4, 100) == {"room": "r"}
    assert child._where_for({"$x": "a"}, [{"$x": "a"}], 100) is None
    assert child._where_for({"wing": "w"}, [{"wing": "w"}] * 3, 0) == {"wing": "w"}
    # a per-file key beside wing and room (MemPalace's source_file): the pair is still a
    # candidate (the one conjunction of all three was "one row", and a room of 14% won)
    filed = [{**m, "source_file": f"/notes/{i // 3}.md"} for i, m in enumerate(metas)]
    row_f = {**row, "source_file": "/elsewhere/x.md"}
    assert child._where_for(row_f, filed[:100], 510_000) == {"$and": [{"wing": row["wing"]}, {"room": row["room"]}]}
    # one wing holds the palace, the row's room is not in the sample: never the wing (100%)
    one_wing = [{"wing": "A", "room": f"r{i % 60}"} for i in range(1, 100)]
    assert child._where_for({"wing": "A", "room": "r0"}, one_wing, 510_000) == {"room": "r0"}


@pytest.mark.releases
def test_the_post_check_child_asks_chromadb_1x_two_calls_at_a_time(tmp_path):
    """chromadb 1.x's bindings release the GIL in a query, so the child keeps two in flight
    (its self-queries took half the time at 100k); the answers are the same, in order,
    and no more than two calls run at once. The releases before 1.0 are pure Python,
    where a second thread only contends for the GIL: one at a time."""
    import threading

    import chromadb
    import numpy as np

    from chaosfix import _verify_child as child

    assert child.workers_for(chromadb.__version__) == (2 if chromadb.__version__ >= "1" else 1)
    assert child.workers_for("0.6.3") == child.workers_for("odd") == 1
    # two calls overlap (each waits for the other at the barrier), never three, in order
    meet, lock, now, most = threading.Barrier(2, timeout=10), threading.Lock(), [0], [0]

    def call(x: int) -> int:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        if x < 2:
            meet.wait()
        with lock:
            now[0] -= 1
        return x * x

    assert list(child._in_order(call, list(range(9)), 2)) == [x * x for x in range(9)]
    assert most[0] == 2
    # the same misses from a real collection, whatever the number of workers
    client = chromadb.PersistentClient(path=str(tmp_path / "p"))
    col = client.create_collection("drawers", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    vecs = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(600)]
    col.add(ids=ids, embeddings=vecs.tolist())
    assert (child._found(col, list(vecs), ids, [10, 600], 600, workers=1)
            == child._found(col, list(vecs), ids, [10, 600], 600, workers=2) == [])


@pytest.mark.releases
def test_check_works_without_hnswlib(tmp_path):
    palace = unpack("1.5.9", tmp_path)
    code = "import sys; sys.modules['hnswlib'] = None; from chaosfix.cli import main; main()"
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, "check", str(palace), "--json"], capture_output=True, text=True)
    assert r.returncode == 4 and '"SQL_ONLY"' in r.stdout, r.stderr


@pytest.mark.releases
def test_generation_tables():
    from chaosfix.palace.generation import NEWER, classify, hnsw_config

    assert classify({"sysdb": 4, "metadb": 3, "embeddings_queue": 1}) == "0.4"
    assert classify({"sysdb": 9, "metadb": 4, "embeddings_queue": 2}) == "0.5-0.6"
    assert classify({"sysdb": 9, "metadb": 5, "embeddings_queue": 2}) == "1.0-1.2"
    assert classify({"sysdb": 10, "metadb": 5, "embeddings_queue": 2}) == "1.3-1.4"
    assert classify({"sysdb": 10, "metadb": 6, "embeddings_queue": 2}) == "1.5"
    assert classify({"sysdb": 11, "metadb": 6, "embeddings_queue": 2}) == NEWER
    assert [of_version(v) for v in ("0.4.24", "0.5.23", "0.6.3", "1.0.21", "1.2.2", "1.4.1", "1.5.9", "1.6.0")] == [
        "0.4", "0.5-0.6", "0.5-0.6", "1.0-1.2", "1.0-1.2", "1.3-1.4", "1.5", NEWER]
    # every generation's config layout reads the same HNSW parameters
    assert hnsw_config({"vector_index": {"hnsw": {"space": "cosine", "max_neighbors": 16, "ef_construction": 100}}}) \
        == {"space": "cosine", "M": 16, "construction_ef": 100}
    assert hnsw_config({"hnsw_configuration": {"M": 32, "ef_search": 10, "_type": "HNSWConfigurationInternal"}}) \
        == {"M": 32, "search_ef": 10}
    assert hnsw_config({"hnsw": {"space": "ip"}}) == {"space": "ip"}


@pytest.mark.releases
def test_newer_generation_is_checked_but_never_written(tmp_path):
    palace = unpack("1.5.9", tmp_path)
    con = sqlite3.connect(palace / "chroma.sqlite3")
    con.execute("INSERT INTO migrations (dir, version, filename, sql, hash) VALUES ('sysdb', 11, 'x', '', '')")
    con.commit()
    con.close()
    rep = check_palace(palace)
    assert rep.generation.name == "newer" and rep.codes() == {"SQL_ONLY": 100}
    before = schema(palace)
    r = run_cli("reconcile", str(palace), "--embedder", "chaosfix.embedder:HashEmbedder")
    assert r.returncode == 8 and len(r.stderr.strip().splitlines()) == 1 and "does not know" in r.stderr
    assert schema(palace) == before and check_palace(palace).codes() == {"SQL_ONLY": 100}


UNREADABLE_READ = r"""
import sys
import chromadb
from chromadb.config import Settings
col = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False)).get_collection(
    "notes", embedding_function=None)
try:
    print(col.count())
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.releases
def test_a_migrated_0x_palace_whose_pending_rows_1x_cannot_read_is_an_error_and_repaired(tmp_path):
    """chromadb 0.6.3 wrote 10 pending rows without documents (``"chroma:document": null``
    in their WAL metadata), then 1.5.9 opened the palace: it migrated it and panics
    replaying those rows, so every read fails. check said consistent (PENDING, info) and
    reconcile "nothing to do"; now check names them, and reconcile folds them into the
    index, past which 1.x never reads them (``tests/fixtures/make_upgraded_fixture.py``)."""
    with tarfile.open(FIXTURES / "upgraded-null-documents.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    p = tmp_path / "palace"
    rep = check_palace(p)
    assert rep.generation is not None and rep.generation.name == "1.5"
    (f,) = [f for f in rep.findings if f.code == "WAL_UNREADABLE"]
    assert f.severity == "error" and f.count == 10 and f.collection == "notes" and not rep.consistent
    if chromadb_version() == "1.5.9":
        copy = tmp_path / "copy"
        shutil.copytree(p, copy)
        assert chromadb_script(UNREADABLE_READ, str(copy)).split()[-1] == "InternalError"  # the panic, as found
    res = run_cli("reconcile", str(p), "--json")
    assert res.returncode == 1, res.stderr[-1500:]
    assert check_palace(p).consistent
    if chromadb_version() == "1.5.9":
        assert chromadb_script(UNREADABLE_READ, str(p)).split()[-1] == "30"
