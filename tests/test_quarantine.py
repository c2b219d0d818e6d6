"""Quarantined copies of a segment are recognised, validated like a live segment, and
used as a vector source before re-embedding (real palaces, both chromadb families)."""

from __future__ import annotations

import shutil

import pytest
from helpers import SPEC, assert_judged_by_chromadb, reconcile, sql_rows

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.workload import fresh_palace


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    """No embedder can be found: every vector must come from the palace itself."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEMPALACE_CONFIG_DIR", raising=False)


@pytest.mark.parametrize("suffix", [".corrupt-20261130-101010", ".drift-20261130-101010",
                                    ".hnsw-backup-20261130T101010"])
def test_missing_segment_is_rebuilt_from_its_quarantined_copy(suffix, tmp_path):
    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    rows = sql_rows(p)
    shutil.move(seg, p / f"{seg.name}{suffix}")
    rep = check_palace(p)
    assert rep.codes().get("SEGMENT_DIR_MISSING") and rep.codes().get("QUARANTINED") == 1
    code, doc, err = reconcile(p, "--no-chromadb-check")
    assert code == 1, (err, doc and doc["plans"][0]["reasons"])
    (plan,) = doc["plans"]
    assert plan["sources"].get("quarantine", 0) >= rows - 1 and "embedder" not in plan["sources"]
    assert plan["unrepaired"] == 0
    assert (p / f"{seg.name}{suffix}").is_dir()  # the copy is left as it was
    after = check_palace(p)
    assert after.consistent and set(after.codes()) <= {"PENDING", "QUARANTINED"}, after.codes()
    assert_judged_by_chromadb(p, rows)


def test_a_torn_quarantined_copy_is_not_used(tmp_path, major):
    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    copy = p / f"{seg.name}.corrupt-20261130-101010"
    shutil.copytree(seg, copy)
    faults.truncate(copy / "data_level0.bin", size=4096)  # a few slots of 300
    shutil.rmtree(seg)
    code, doc, _ = reconcile(p, "--dry-run")
    (plan,) = doc["plans"]
    assert "quarantine" not in plan["sources"]
    if major == "1.x":  # 0.6 keeps every row's WAL vector: repaired from there
        assert code == 4 and plan["unrepaired"] >= sql_rows(p) - 1


def test_copies_whose_maps_hold_none_of_the_ids_are_never_read(tmp_path, monkeypatch):
    """Backups pile up beside a palace reconciled again and again, and each copy read
    costs an opcode scan, an unpickle and a slot pass. The map helper (``map_child``,
    forced here for these small maps) answers first how many wanted ids a copy's map
    holds: a sound map holding none is skipped unread, while the copy that holds the
    vectors is read and used, and an unsafe map is left to ``load_copy``, which refuses it."""
    import pickle
    import subprocess

    import numpy as np

    from chaosfix.palace import idmap, map_child
    from chaosfix.reconcile import quarantine

    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    (st_,) = check_palace(p).states
    m = idmap.loads(faults.pickle_path(p).read_bytes())
    wanted = sorted(m.id_to_label)[:20]
    live = st_.live_label_slots
    expect = st_.files.vectors(np.array([live[m.id_to_label[r]] for r in wanted], dtype=np.int64))

    holds = p / f"{seg.name}.corrupt-20261130-101010"  # the oldest: holds them all
    shutil.copytree(seg, holds)
    lacks = p / f"{seg.name}.drift-20261130-111111"  # newer: its map holds none of them
    shutil.copytree(seg, lacks)
    for rid in wanted:
        faults.drop_map_entry(lacks / "index_metadata.pickle", "both", id=rid)
    hostile = p / f"{seg.name}.hnsw-backup-20261130T121212"  # newest: a global outside the allow-list
    shutil.copytree(seg, hostile)
    d = {"id_to_label": m.id_to_label, "label_to_id": m.label_to_id, "total_elements_added": m.total_elements_added,
         "pad": subprocess.Popen}
    (hostile / "index_metadata.pickle").write_bytes(pickle.dumps(d, protocol=3))

    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    read: list[str] = []
    real_load = quarantine.load_copy
    monkeypatch.setattr(quarantine, "load_copy", lambda st, folder: read.append(folder.name) or real_load(st, folder))
    out, used = quarantine.quarantine_vectors(st_, wanted, st_.info.dimension)
    assert used == [str(holds)] and sorted(out) == wanted
    assert np.array_equal(np.stack([out[r] for r in wanted]), expect)
    assert read == [hostile.name, holds.name]  # the copy that holds none was never read
