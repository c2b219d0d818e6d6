"""Which embedder re-embeds a palace's rows, and the guard that proves it reproduces the
palace before anything is re-embedded (real palaces, both chromadb families).

chromadb's default model is never on disk here (HOME points at an empty folder), so the
resolution falls through to a one-line "what is missing, what helps"; the end-to-end leg
(test_mempalace_e2e.py) runs the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import HASH_EMBEDDER, SPEC, assert_judged_by_chromadb, damaged_palace, fingerprint, reconcile, sql_rows

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.cli import main as cli_main
from chaosfix.embedder import embed_text
from chaosfix.embedders.server import ChildEmbedder
from chaosfix.errors import OperationalError
from chaosfix.palace.hnsw import HnswFiles
from chaosfix.workload import apply_ops, fresh_palace

SALTED = "test_embedders:SaltedEmbedder"


class SaltedEmbedder:
    """Another model: same shape, unrelated vectors."""

    def __call__(self, input: list[str]) -> list[np.ndarray]:  # noqa: A002
        return [embed_text("salt:" + t) for t in input]


class ScaledEmbedder:
    """The palace's own model, its vectors at twice the length."""

    def __call__(self, input: list[str]) -> list[np.ndarray]:  # noqa: A002
        return [2.0 * embed_text(t) for t in input]


SCALED = "test_embedders:ScaledEmbedder"


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    """No chromadb model and no MemPalace config: nothing is found by accident."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("MEMPALACE_CONFIG_DIR", "MEMPALACE_EMBEDDING_MODEL", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def orphaned(tmp_path, damage_cache) -> Path:
    """Lost HNSW writes: SQL rows with no vector in the index and no WAL row."""
    return damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)


def cli(*args: str):
    res = CliRunner().invoke(cli_main, list(args))
    assert "Traceback" not in res.stdout + res.stderr
    return res


def test_guard_passes_the_palaces_own_embedder_and_reports_it(orphaned):
    dry = cli("reconcile", str(orphaned), "--dry-run", "--embedder", HASH_EMBEDDER)
    assert dry.exit_code == 1
    assert f"embedder {HASH_EMBEDDER} (--embedder); reproduces the palace: cosine 1.0000" in dry.stdout
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    (plan,) = doc["plans"]
    g = plan["embedder"]["guard"]
    assert plan["embedder"]["chosen"] == HASH_EMBEDDER and not plan["embedder"]["trusted"]
    assert g["passed"] and g["similarity"] == 1.0 and g["sampled"] == sum(g["sources"].values()) == 32


def test_wrong_embedder_is_refused_with_the_measured_similarity(orphaned):
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", SALTED)
    assert code == 4, err
    (plan,) = doc["plans"]
    g = plan["embedder"]["guard"]
    assert g["passed"] is False and abs(g["similarity"]) < 0.3 and g["threshold"] == 0.98
    assert plan["sources"].get("embedder") is None and plan["unrepaired"] > 0
    text = cli("reconcile", str(orphaned), "--dry-run", "--embedder", SALTED)
    line = next(x for x in text.stdout.splitlines() if "does not reproduce the palace" in x)
    assert "cosine 0.0" in line or "cosine -0.0" in line, line
    assert "--trust-embedder" in line


def test_a_torn_index_still_guards_the_embedder_with_the_slots_it_keeps(orphaned):
    """A power-loss tear of data_level0.bin leaves the slots below it intact, and the
    repair keeps them as vector sources: the guard compares the candidate with them too.
    (It skipped every slot of a torn index, so with the WAL purged a wrong model was
    used "not verified: no intact vectors to compare", exit 1.)"""
    seg = next(d for d in orphaned.iterdir() if (d / "data_level0.bin").is_file())
    h = HnswFiles.open(seg).header
    assert h is not None
    faults.truncate(seg / "data_level0.bin", size=h.cur_element_count * 6 // 10 * h.size_data_per_element)
    assert "TORN" in check_palace(orphaned).codes()
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", SALTED)
    assert code == 4, err
    (plan,) = doc["plans"]
    g = plan["embedder"]["guard"]
    assert g["passed"] is False and g["sampled"] >= 3 and g["reproduced"] == 0, g
    assert plan["sources"].get("embedder") is None and plan["sources"].get("index"), plan["sources"]
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["after_consistent"], err
    g = doc["plans"][0]["embedder"]["guard"]
    assert g["passed"] and g["sampled"] >= 3, g


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_in_an_l2_index_a_model_that_scales_the_vectors_is_another_model(space, tmp_path, damage_cache):
    """An l2 (or ip) index keeps a model's vectors as given and ranks by their length:
    re-embedded rows twice as long as the rest would sit apart from every query. Every
    direction matches (cosine 1.0), so the guard passed such a model; it now asks the
    stored length there too. A cosine index stores unit vectors: there it is the same
    model."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache, SPEC.with_(space=space))
    code, doc, err = reconcile(p, "--no-chromadb-check", "--embedder", SCALED)
    g = doc["plans"][0]["embedder"]["guard"]
    assert g["similarity"] == 1.0, g
    if space == "l2":
        assert code == 4 and g["passed"] is False and g["reproduced"] == 0 and g["norm_ratio"] == 2.0, (g, err)
        line = next(x for x in cli("reconcile", str(p), "--dry-run", "--embedder", SCALED).stdout.splitlines()
                    if "does not reproduce the palace" in x)
        assert "cosine 1.0000, 2.00x the stored vectors' length" in line, line
        assert reconcile(p, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)[0] == 1
    else:
        assert code == 1 and g["passed"] and g["norm_ratio"] is None, (g, err)


def test_trust_embedder_overrides_and_is_reported(orphaned):
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", SALTED, "--trust-embedder")
    assert code == 1, err
    emb = doc["plans"][0]["embedder"]
    assert emb["trusted"] and emb["guard"]["passed"] is False


def test_of_several_embedders_the_guard_picks_the_one_that_reproduces(orphaned):
    code, doc, err = reconcile(orphaned, "--no-chromadb-check", "--embedder", SALTED, "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    emb = doc["plans"][0]["embedder"]
    assert emb["chosen"] == HASH_EMBEDDER
    assert [c["guard"]["passed"] for c in emb["candidates"]] == [False, True]


def test_no_record_and_no_model_is_one_line_naming_what_is_missing(orphaned, empty_home):
    res = cli("reconcile", str(orphaned), "--dry-run")
    assert res.exit_code == 4
    line = next(x for x in res.stdout.splitlines() if "all-MiniLM-L6-v2 is not on disk" in x)
    assert str(empty_home / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx") in line
    assert "--embedder" in line and "never downloads" in line


def test_mempalace_record_is_read_and_named(orphaned, empty_home):
    (orphaned / "mempalace_embedder.json").write_text(json.dumps(
        {"mempalace_drawers": {"model_name": "minilm", "dimension": 384}}))
    code, doc, _ = reconcile(orphaned, "--dry-run")
    assert code == 4
    emb = doc["plans"][0]["embedder"]
    assert "mempalace_embedder.json records 'minilm'" in emb["refused"] and "not on disk" in emb["refused"]
    # the user's MemPalace config when the palace has no record
    (orphaned / "mempalace_embedder.json").unlink()
    cfg = empty_home / ".mempalace"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"embedding_model": "openai-compat"}))
    code, doc, _ = reconcile(orphaned, "--dry-run")
    emb = doc["plans"][0]["embedder"]
    assert code == 4 and "network service chaosfix never calls" in emb["refused"], emb


def test_explicit_minilm_without_the_model_is_exit_8_one_line(orphaned):
    res = cli("reconcile", str(orphaned), "--embedder", "minilm")
    assert res.exit_code == 8 and len(res.stderr.strip().splitlines()) == 1
    assert "all-MiniLM-L6-v2 is not on disk" in res.stderr


def test_torn_map_guard_matches_documents_to_unmapped_slots(tmp_path, damage_cache, major):
    """With the id map gone nothing pairs a slot with its row; the guard finds each
    sampled document's own vector among the slots (on 1.x: 0.6 keeps enough WAL rows
    with vectors to fill the sample)."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.pickle_path(p).unlink()
    code, doc, err = reconcile(p, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    g = doc["plans"][0]["embedder"]["guard"]
    assert g["passed"] and g["similarity"] == 1.0 and sum(g["sources"].values()) == 32
    assert g["sources"].get("unmapped-index") or major == "0.6", g
    code, doc, _ = reconcile(tmp_path / "palace", "--dry-run")
    assert code == 0


def test_check_deep_finds_stale_vectors_and_reconcile_deep_replaces_them(tmp_path):
    """A power cut loses the flush of an upsert of existing drawers: SQL holds the new
    documents, the index the old vectors under the same labels (SQL ids == index ids, so
    the structural check is clean). check --deep re-embeds and reports STALE_VECTOR;
    reconcile --deep replaces them in place; chromadb then reads every row with its
    document's embedding."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    snap = faults.snapshot_segment(p, dst=tmp_path / "snap")  # (its own folder: none left in $TMPDIR)
    assert apply_ops(p, SPEC, [{"op": "upsert", "start": 0, "count": 150, "version": 1}]).ok
    faults.restore_segment(p, snap)
    assert "STALE_VECTOR" not in check_palace(p).codes()
    before = fingerprint(p)
    res = cli("check", str(p), "--deep", "--embedder", HASH_EMBEDDER, "--json")
    assert res.exit_code == 4, res.stdout
    (f,) = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "STALE_VECTOR"]
    assert f["count"] >= 100 and "lowest cosine" in f["detail"]
    assert fingerprint(p) == before  # check --deep changes nothing
    code, doc, err = reconcile(p, "--no-chromadb-check", "--deep", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    assert doc["plans"][0]["replace"] >= f["count"] and doc["plans"][0]["sources"]["embedder"] >= f["count"]
    assert cli("check", str(p), "--deep", "--embedder", HASH_EMBEDDER).exit_code == 0
    assert_judged_by_chromadb(p, sql_rows(p))


def test_check_deep_without_an_embedder_is_one_line(small_palace):
    res = cli("check", str(small_palace), "--deep")
    assert res.exit_code == 8 and len(res.stderr.strip().splitlines()) == 1
    assert "all-MiniLM-L6-v2 is not on disk" in res.stderr and "--embedder" in res.stderr


def test_chromadb_default_in_the_child_never_downloads(empty_home):
    """Even asked directly, the child refuses to fetch chromadb's model."""
    child = ChildEmbedder({"kind": "chromadb", "config": {"name": "default", "config": {}}}, "chromadb default")
    try:
        with pytest.raises(OperationalError, match="never downloads"):
            child(["a drawer"])
    finally:
        child.close()
    assert not any((empty_home / ".cache").rglob("*.tar.gz"))
