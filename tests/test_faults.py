"""Each fault primitive on its own, on real palaces built by the installed chromadb.

The point of each test is that the primitive does exactly what it says to the real
files: a power loss really leaves the pre-persist bytes, a kill point really stops
there (the child dies by SIGKILL and the files show where), strace really kills on the
Nth call, a sparse extension really allocates nothing.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.errors import OperationalError
from chaosfix.faults import kill as kill_mod
from chaosfix.faults.powerloss import PAGE
from chaosfix.faults.sqlite_edits import poisoned_value
from chaosfix.palace import PalaceSql, idmap
from chaosfix.palace.hnsw import parse_header
from chaosfix.palace.sql import journal_synced
from chaosfix.workload import apply_ops, copy_palace, observe

ADD100 = [{"op": "add", "start": 300, "count": 100}]
needs_strace = pytest.mark.skipif(not faults.strace_available(), reason="strace not installed or ptrace not permitted")
SEG_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seg_digests(palace: Path) -> dict[str, str]:
    seg = faults.segment_dir(palace)
    return {f.name: digest(f) for f in sorted(seg.iterdir()) if f.is_file()}


def element_count(palace: Path) -> int:
    return parse_header(faults.segment_file(palace, "header.bin").read_bytes()).cur_element_count


def load_map(palace: Path) -> idmap.IdMap:
    return idmap.loads(faults.pickle_path(palace).read_bytes())


def committed(palace: Path, sql: str) -> list[tuple]:
    """Run ``sql`` on the committed state (a hot journal is rolled back in a private copy)."""
    db = PalaceSql(palace / "chroma.sqlite3")
    try:
        return db.conn.execute(sql).fetchall()
    finally:
        db.close()


# ---- files ------------------------------------------------------------------------


def test_truncate(small_palace):
    f = faults.segment_file(small_palace, "data_level0.bin")
    size = f.stat().st_size
    assert faults.truncate(f, fraction=0.5) == size // 2 == f.stat().st_size
    assert faults.truncate(f, size=1000) == 1000 == f.stat().st_size
    assert faults.truncate(f, size=10**9) == 1000  # never extends
    with pytest.raises(ValueError):
        faults.truncate(f)
    with pytest.raises(ValueError):
        faults.truncate(f, size=1, fraction=0.5)
    with pytest.raises(ValueError):
        faults.truncate(f, fraction=1.5)


def test_zero_fill(small_palace):
    f = faults.segment_file(small_palace, "data_level0.bin")
    before = f.read_bytes()
    assert faults.zero_fill(f, 5000, 3000) == 3000
    after = f.read_bytes()
    assert after[5000:8000] == bytes(3000)
    assert after[:5000] == before[:5000] and after[8000:] == before[8000:]
    assert faults.zero_fill(f, len(before) - 10, 100) == 10  # clamped, no growth
    assert f.stat().st_size == len(before)


def test_garbage_sectors_are_seeded_and_confined(small_palace, tmp_path):
    f = faults.segment_file(small_palace, "data_level0.bin")
    twin = tmp_path / "twin.bin"
    twin.write_bytes(f.read_bytes())
    before = f.read_bytes()
    picked = faults.garbage_sectors(f, seed=7, n=5)
    assert faults.garbage_sectors(twin, seed=7, n=5) == picked and twin.read_bytes() == f.read_bytes()
    assert len(picked) == 5 and len(set(picked)) == 5
    after = f.read_bytes()
    assert len(after) == len(before)
    for s in range((len(before) + 4095) // 4096):
        lo, hi = s * 4096, (s + 1) * 4096
        assert (after[lo:hi] != before[lo:hi]) == (s in picked)


def test_bit_flips_flip_exactly_n_bits(small_palace):
    f = faults.pickle_path(small_palace)
    before = f.read_bytes()
    flips = faults.bit_flips(f, seed=3, n=17)
    after = f.read_bytes()
    diff = [(i, a ^ b) for i, (a, b) in enumerate(zip(before, after)) if a != b]
    got = sorted((i, bit) for i, x in diff for bit in range(8) if x >> bit & 1)
    assert got == flips and len(flips) == 17


def test_sparse_extend_allocates_no_blocks(small_palace):
    f = faults.segment_file(small_palace, "link_lists.bin")
    size, blocks = f.stat().st_size, faults.allocated_bytes(f)
    assert faults.sparse_extend(f, 10**6) == size * 10**6 == f.stat().st_size  # ~2.8 GB apparent
    assert faults.allocated_bytes(f) == blocks
    assert f.read_bytes()[:size] != b""  # the real content is still at the front


# ---- pickle edits ------------------------------------------------------------------


def test_off_by_one_keeps_format_and_maps(small_palace, major):
    m0 = load_map(small_palace)
    assert faults.off_by_one(small_palace) == m0.max_label - 1
    m1 = load_map(small_palace)
    assert m1.fmt == m0.fmt == ("object" if major == "0.6" else "dict")
    assert m1.total_elements_added == m0.max_label - 1 == 299
    assert (m1.id_to_label, m1.label_to_id, m1.dimensionality) == (m0.id_to_label, m0.label_to_id, m0.dimensionality)


@pytest.mark.parametrize("which", ["both", "id_to_label", "label_to_id"])
def test_drop_map_entry(small_palace, which):
    m0 = load_map(small_palace)
    rid, label = faults.drop_map_entry(small_palace, which)
    assert label == 1 and m0.label_to_id[1] == rid
    m1 = load_map(small_palace)
    assert (rid in m1.id_to_label) == (which == "label_to_id")
    assert (label in m1.label_to_id) == (which == "id_to_label")
    assert len(m1.id_to_label) + len(m1.label_to_id) == 600 - (2 if which == "both" else 1)
    assert m1.total_elements_added == m0.total_elements_added and m1.fmt == m0.fmt


def test_dimensionality_none_and_what_chromadb_does(small_palace, small_spec, major):
    prev = faults.dimensionality_none(small_palace)
    assert prev == (384 if major == "0.6" else None)  # 1.x writes None itself
    assert load_map(small_palace).dimensionality is None
    seen = observe(small_palace, small_spec, sample=5)
    errors = {stage for stage, _ in seen["errors"]}
    if major == "0.6":
        # 0.6 skips loading the index and then fails on every vector read
        assert errors == {"get_embeddings", "query"}
        assert all("TypeError" in msg for _, msg in seen["errors"])
    else:
        assert errors == set() and seen["count"] == 300


def test_hostile_payload_is_a_real_hostile_pickle(small_palace, small_spec, major, tmp_path):
    marker = tmp_path / "PWNED"
    p = faults.hostile_payload(small_palace, marker)
    with pytest.raises(idmap.UnsafePickle):
        idmap.loads(p.read_bytes())
    assert not marker.exists()
    # plain pickle.load in a child (it may import chromadb for the 0.6 class) runs the payload
    code = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, capture_output=True, timeout=120)
    assert marker.exists()
    marker.unlink()
    # and so does the real chromadb 0.6.3 on open; 1.x refuses the pickle
    seen = observe(small_palace, small_spec, sample=5)
    if major == "0.6":
        assert marker.exists() and seen["errors"] == [] and seen["count"] == 300
    else:
        assert not marker.exists()
        assert seen["errors"] and "unresolved global reference" in seen["errors"][0][1]


# ---- sqlite edits -------------------------------------------------------------------


def test_empty_queue(small_palace):
    assert faults.empty_queue(small_palace) == 1
    assert committed(small_palace, "SELECT count(*) FROM embeddings_queue") == [(0,)]


@pytest.mark.parametrize("segment", ["vector", "metadata"])
def test_poison_seq_uses_the_palace_encoding(small_palace, segment, major):
    sid = faults.segment_id(small_palace, segment)
    value = faults.poison_seq(small_palace, segment)
    assert value == poisoned_value(300) > 2**53
    (raw,) = committed(small_palace, f"SELECT seq_id FROM max_seq_id WHERE segment_id='{sid}'")[0]
    if major == "0.6":
        assert raw == value.to_bytes(8, "big")
    else:
        assert raw == value
    with pytest.raises(ValueError):
        faults.poison_seq(small_palace, segment, value=5)


def test_delete_seq(small_palace):
    sid = faults.segment_id(small_palace, "vector")
    assert faults.delete_seq(small_palace, "vector") == 1
    assert committed(small_palace, f"SELECT * FROM max_seq_id WHERE segment_id='{sid}'") == []
    assert faults.delete_seq(small_palace, sid) == 0


@pytest.mark.parametrize("spill", [False, True])
def test_leave_hot_journal_is_a_real_interrupted_transaction(small_palace, spill, tmp_path):
    db = small_palace / "chroma.sqlite3"
    before = digest(db)
    journal = faults.leave_hot_journal(small_palace, spill=spill)
    assert journal.name == "chroma.sqlite3-journal" and journal.stat().st_size > 0
    left = digest(db)
    # spilled: SQLite synced the journal (magic header) and wrote uncommitted pages into
    # the db file; not spilled: nothing reached the file and the header is still zeroed
    assert (left != before) == spill
    assert journal_synced(db) == spill
    if spill:  # read as it lies, the file shows a half-applied transaction
        raw = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
        try:
            seen = raw.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            seen = str(exc)
        finally:
            raw.close()
        assert seen != 300
    # SQLite itself (read-write, on a copy) recovers the committed state
    copy = copy_palace(small_palace, tmp_path / "copy")
    con = sqlite3.connect(copy / "chroma.sqlite3")
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 300
    con.close()
    assert digest(copy / "chroma.sqlite3") == before
    assert digest(db) == left and journal.stat().st_size > 0  # the original is untouched


def test_restore_older_sqlite(small_palace, small_spec, tmp_path):
    old = faults.copy_sqlite(small_palace, tmp_path / "old.sqlite3")
    assert apply_ops(small_palace, small_spec, ADD100).ok
    assert committed(small_palace, "SELECT count(*) FROM embeddings")[0][0] == 400
    faults.restore_older_sqlite(small_palace, old)
    assert digest(small_palace / "chroma.sqlite3") == digest(old)
    assert committed(small_palace, "SELECT count(*) FROM embeddings")[0][0] == 300
    assert element_count(small_palace) == 400  # the newer index stays


# ---- power loss ---------------------------------------------------------------------


def test_power_loss_leaves_the_pre_persist_bytes(small_palace, small_spec, tmp_path):
    pre = seg_digests(small_palace)
    snap = faults.snapshot_segment(small_palace, dst=tmp_path / "snap")
    assert apply_ops(small_palace, small_spec, ADD100).ok
    post = seg_digests(small_palace)
    assert post != pre and element_count(small_palace) == 400
    faults.restore_segment(small_palace, snap)
    assert seg_digests(small_palace) == pre
    assert element_count(small_palace) == 300 and len(load_map(small_palace).id_to_label) == 300
    # SQLite's commit survived
    assert committed(small_palace, "SELECT count(*) FROM embeddings")[0][0] == 400


def test_snapshot_of_a_missing_folder_restores_to_missing(small_palace, tmp_path):
    seg = faults.segment_dir(small_palace)
    snap = faults.snapshot_segment(small_palace, seg_id="00000000-0000-0000-0000-000000000000",
                                   dst=tmp_path / "snap")
    faults.restore_segment(small_palace, snap, seg_id="00000000-0000-0000-0000-000000000000")
    assert not (small_palace / "00000000-0000-0000-0000-000000000000").exists() and seg.is_dir()


def test_torn_mix_takes_each_page_from_old_or_new(small_palace, small_spec, tmp_path):
    old = faults.snapshot_segment(small_palace, dst=tmp_path / "old")
    assert apply_ops(small_palace, small_spec, ADD100).ok
    new = faults.snapshot_segment(small_palace, dst=tmp_path / "new")
    twin = faults.snapshot_segment(small_palace, dst=tmp_path / "twin")
    live = faults.segment_dir(small_palace)
    chosen = faults.torn_mix(old, live, seed=11)
    assert faults.torn_mix(old, twin, seed=11) == chosen  # seeded
    assert set(chosen) == {f.name for f in new.iterdir()}
    mixed_somewhere = False
    for name, pages in chosen.items():
        o, n, m = ((d / name).read_bytes() if (d / name).exists() else b"" for d in (old, new, live))
        assert len(m) == len(n)
        assert (live / name).read_bytes() == (twin / name).read_bytes()
        for i in range((len(n) + PAGE - 1) // PAGE):
            lo, hi = i * PAGE, min((i + 1) * PAGE, len(n))
            want = n[lo:hi] if i in pages else (o[lo:hi] + bytes(hi - lo))[: hi - lo]
            assert m[lo:hi] == want, (name, i)
        mixed_somewhere |= 0 < len(pages) < (len(n) + PAGE - 1) // PAGE and o != n
    assert mixed_somewhere


# ---- kill points --------------------------------------------------------------------


@pytest.mark.parametrize("point", ["start", "after-hnsw", "after-pickle", "before-commit"])
def test_kill_point_stops_exactly_there(small_palace, small_spec, major, point):
    if major != "0.6":
        pytest.skip("the persist-path kill points hook chromadb 0.6.x")
    pre = seg_digests(small_palace)
    res = apply_ops(small_palace, small_spec, ADD100, kill=faults.kill_point(point))
    assert res.killed and res.returncode == -9 and res.result == {}
    # the add's transaction never committed: chromadb (and check) roll it back
    assert (small_palace / "chroma.sqlite3-journal").stat().st_size > 0
    assert committed(small_palace, "SELECT count(*) FROM embeddings") == [(300,)]
    post = seg_digests(small_palace)
    if point == "start":
        assert post == pre and element_count(small_palace) == 300
        return
    assert element_count(small_palace) == 400  # the HNSW files were written
    assert post["data_level0.bin"] != pre["data_level0.bin"]
    if point == "after-hnsw":
        assert len(load_map(small_palace).id_to_label) == 300  # the old pickle, untouched
    else:
        m = load_map(small_palace)
        assert len(m.id_to_label) == 400 and m.total_elements_added == 400


def test_kill_point_rejects_unknown_names():
    with pytest.raises(ValueError):
        faults.kill_point("after-lunch")
    assert faults.kill_point("start", 2) == {"point": "start", "hit": 2}


@needs_strace
@pytest.mark.parametrize("nth", [1, 3])
def test_strace_kills_on_the_nth_open(tmp_path, nth):
    target = tmp_path / "target.txt"
    target.write_text("x")
    other = tmp_path / "other.txt"
    code = ("import sys\nfor i in range(5):\n    open(sys.argv[2]).close()\n"
            "    open(sys.argv[1]).close()\n    print(i + 1, flush=True)\n")
    prefix = faults.strace_kill_prefix(target, nth)
    assert prefix[0].endswith("strace") and "-P" in prefix and f"inject=openat:signal=KILL:when={nth}" in prefix
    other.write_text("y")
    r = subprocess.run([*prefix, sys.executable, "-c", code, str(target), str(other)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -9
    assert r.stdout.split() == [str(i) for i in range(1, nth)]  # opens of other files do not count


@needs_strace
def test_strace_kill_of_chromadb_at_first_pickle_open(small_palace, small_spec, major):
    pre = seg_digests(small_palace)
    res = apply_ops(small_palace, small_spec, ADD100, prefix=faults.strace_kill_prefix(faults.pickle_path(small_palace), 1))
    assert res.killed
    assert seg_digests(small_palace) == pre  # killed while loading the index
    rep = check_palace(small_palace)
    # 0.6 loads the index before its write transaction; 1.x commits the WAL rows first
    assert rep.codes() == ({} if major == "0.6" else {"PENDING": 100})


def test_strace_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(kill_mod.shutil, "which", lambda name: None)
    kill_mod.strace_path.cache_clear()
    try:
        with pytest.raises(OperationalError) as ei:
            faults.strace_kill_prefix("/tmp/x", 1)
        assert str(ei.value) == "strace not found: apt-get install strace"
        assert not faults.strace_available()
    finally:
        kill_mod.strace_path.cache_clear()


def test_seeded_delay():
    d = faults.seeded_delay(42, 1.0, 2.0)
    assert d == faults.seeded_delay(42, 1.0, 2.0) and 1.0 <= d < 2.0
    assert len({faults.seeded_delay(s, 0, 10) for s in range(20)}) == 20
    with pytest.raises(ValueError):
        faults.seeded_delay(1, 2.0, 1.0)


def test_timed_kill_during_a_large_add(small_palace, small_spec):
    # a 50,000-drawer add takes far longer than the timer's 1.5-3 s (a 5,000-drawer one
    # finished first on a fast machine): the timer always wins, and the add never runs long
    delay = faults.seeded_delay(5, 1.5, 3.0)
    res = apply_ops(small_palace, small_spec, [{"op": "add", "start": 300, "count": 50000}], kill_after=delay)
    assert res.killed and res.result == {}
    rep = check_palace(small_palace)  # whatever state it left, check reads it
    assert 300 <= len(rep.states[0].sql_rows) <= 50300


def test_registry_names_every_primitive():
    assert set(faults.REGISTRY) == {
        "truncate", "zero_fill", "garbage_sectors", "bit_flips", "sparse_extend",
        "off_by_one", "drop_map_entry", "dimensionality_none", "hostile_payload",
        "empty_queue", "poison_seq", "delete_seq", "leave_hot_journal", "copy_sqlite", "restore_older_sqlite",
        "snapshot_segment", "restore_segment", "torn_mix",
        "kill_point", "strace_kill_prefix", "seeded_delay",
    }
    for name, fn in faults.REGISTRY.items():
        assert fn.__name__ == name and fn.__doc__, name


def test_faults_never_import_chromadb():
    code = ("import sys, chaosfix.faults, chaosfix.check\n"
            "sys.exit(1 if any(m == 'chromadb' or m.startswith('chromadb.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_fault_paths_accept_palace_segment_or_file(small_palace):
    seg = faults.segment_dir(small_palace)
    pk = seg / "index_metadata.pickle"
    assert faults.pickle_path(small_palace) == faults.pickle_path(seg) == faults.pickle_path(pk) == pk
    assert os.path.basename(faults.segment_file(small_palace, "header.bin")) == "header.bin"
    assert faults.segment_id(small_palace, "metadata") != faults.segment_id(small_palace, "vector")
