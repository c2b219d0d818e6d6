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
