"""The reachability proof (``chaosfix.palace.reach``) against hnswlib itself.

The verification settles self-query misses by reading the level-0 graph instead of
searching deeper: a row is found by a deep enough search iff the entry point reaches it.
These tests hold that claim to chroma-hnswlib's own exhaustive search on real index
files, damaged by cutting real links, and check the verification's verdicts with and
without the proof agree.
"""

from __future__ import annotations

from pathlib import Path

import hnswlib
import numpy as np
import pytest
from helpers import SPEC

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.palace.hnsw import HnswFiles
from chaosfix.palace.reach import MAX_ROUNDS, level0_reach
from chaosfix.reconcile import verify
from chaosfix.reconcile.verify import EF_MAX, verify_segment
from chaosfix.workload import PalaceSpec, fresh_palace

N, DIM = 3000, 32


def _index(folder: Path, space: str = "cosine") -> np.ndarray:
    """A persistent chroma-hnswlib index of N random vectors (chromadb's M and
    ef_construction), as chromadb writes it; returns the vectors (label = row)."""
    vecs = np.random.default_rng(7).standard_normal((N, DIM)).astype(np.float32)
    index = hnswlib.Index(space=space, dim=DIM)
    index.init_index(max_elements=N, M=16, ef_construction=100, is_persistent_index=True,
                     persistence_location=str(folder))
    index.add_items(vecs, np.arange(N, dtype=np.uint64), num_threads=1)  # one thread: the same graph every run
    index.persist_dirty()
    index.close_file_handles()
    return vecs


def _level0_only(folder: Path) -> np.ndarray:
    """Slots with no upper level (a zero byte count in link_lists.bin)."""
    files = HnswFiles.open(folder)
    h = files.header
    raw = (folder / "link_lists.bin").read_bytes()
    off, out = 0, []
    for i in range(h.cur_element_count):
        size = int.from_bytes(raw[off : off + 4], "little")
        if size == 0 and i != h.enterpoint_node:
            out.append(i)
        off += 4 + size
    return np.array(out, dtype=np.int64)


def _cut_in_links(folder: Path, victims: np.ndarray) -> None:
    """Remove every level-0 link into ``victims`` from data_level0.bin, in place."""
    files = HnswFiles.open(folder)
    h = files.header
    mm = np.memmap(folder / "data_level0.bin", dtype=np.uint8, mode="r+",
                   shape=(h.cur_element_count, h.size_data_per_element))
    gone = set(victims.tolist())
    for slot in range(h.cur_element_count):
        count = int(mm[slot, 0:2].view("<u2")[0])
        links = mm[slot, 4 : 4 + 4 * h.max_m0].view("<u4")
        keep = [x for x in links[:count].tolist() if x not in gone]
        if len(keep) < count:
            links[: len(keep)] = keep
            mm[slot, 0:2] = np.frombuffer(np.uint16(len(keep)).tobytes(), dtype=np.uint8)
    mm.flush()


def _empty_out_links(folder: Path, slot: int) -> None:
    files = HnswFiles.open(folder)
    h = files.header
    mm = np.memmap(folder / "data_level0.bin", dtype=np.uint8, mode="r+",
                   shape=(h.cur_element_count, h.size_data_per_element))
    mm[slot, 0:2] = 0
    mm.flush()


def _found_by_exhaustive_search(folder: Path, vecs: np.ndarray) -> np.ndarray:
    """hnswlib's own answer: each vector's self-query at ef above the element count."""
    index = hnswlib.Index(space="cosine", dim=DIM)
    index.load_index(str(folder), is_persistent_index=True, max_elements=N)
    index.set_ef(N + 10)
    got, _ = index.knn_query(vecs, k=10, num_threads=1)
    index.close_file_handles()
    return (got == np.arange(N, dtype=np.uint64)[:, None]).any(axis=1)


def _reach(folder: Path):
    files = HnswFiles.open(folder)
    return level0_reach(files.slots(links=True).links, files.header.enterpoint_node)


def test_reach_says_what_hnswlibs_exhaustive_search_finds(tmp_path):
    """Cut every level-0 link into 12 elements: the proof names exactly the elements
    hnswlib's own search at ef > N cannot return, and every other element is found."""
    vecs = _index(tmp_path)
    healthy = _reach(tmp_path)
    assert healthy.proves and healthy.from_entry.all()
    victims = _level0_only(tmp_path)[::97][:12]
    _cut_in_links(tmp_path, victims)
    r = _reach(tmp_path)
    assert r.proves  # out-links untouched: every element still reaches the entry point
    # the victims, and any element only they linked to
    assert set(victims.tolist()) <= set(np.flatnonzero(~r.from_entry).tolist())
    found = _found_by_exhaustive_search(tmp_path, vecs)
    assert np.array_equal(found, r.from_entry)  # hnswlib agrees, element by element


def test_an_element_that_cannot_reach_the_entry_point_proves_nothing(tmp_path):
    """A search may enter level 0 anywhere above, so the proof needs every element to
    reach the entry point; one with no out-links breaks that, and the graph says nothing."""
    _index(tmp_path)
    _empty_out_links(tmp_path, int(_level0_only(tmp_path)[5]))
    assert not _reach(tmp_path).proves


def test_a_chain_too_deep_for_the_rounds_proves_nothing_and_stays_fast():
    """A hostile graph (a chain: one breadth-first round per element) is given up after
    MAX_ROUNDS rounds, not walked in O(n^2)."""
    n = 200_000
    links = np.full((n, 32), n, dtype=np.uint32)
    links[:-1, 0] = np.arange(1, n)  # i -> i+1
    links[1:, 1] = np.arange(0, n - 1)  # i -> i-1: everything reaches the entry
    r = level0_reach(links, 0)
    assert not r.proves and r.from_entry.sum() == MAX_ROUNDS + 1


def test_a_graph_deep_only_backwards_is_given_up_within_its_budget():
    """Shallow forwards (a 31-ary tree from the entry point) but a chain backwards (each
    element's only way back is its predecessor): the backward pass stops after reading
    the link table MAX_BACKWARD_READS times, and proves nothing."""
    n = 300_000
    links = np.full((n, 32), n, dtype=np.uint32)
    parents = np.arange(n)
    for c in range(31):
        child = parents * 31 + 1 + c
        ok = child < n
        links[parents[ok], c] = child[ok]
    links[1:, 31] = np.arange(0, n - 1)
    r = level0_reach(links, 0)  # (a pass per chain step would be 300k passes: hours)
    assert r.from_entry.all() and not r.proves


@pytest.mark.parametrize("cut", [2, 3])
def test_verification_with_and_without_the_graph_agree(tmp_path, cut):
    """On a real palace whose graph lost every link into ``cut`` rows, verified as the
    repair's own rows: the verification that settles misses by the graph and the one that
    searches up to ef 1600 count the same unreachable rows and reach the same verdict
    (2 are hnswlib's tolerated quirk; 3, with none in the untouched rows, fail)."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    st = check_palace(p).states[0]
    victims = _level0_only(seg)[::50][:cut]
    files = HnswFiles.open(seg)
    labels = files.slots().labels[victims]
    planned = dict(zip((st.idmap.label_to_id[int(lab)] for lab in labels), files.vectors(victims)))
    _cut_in_links(seg, victims)
    ids = set(st.sql_rows)
    lost = int((~_reach(seg).from_entry).sum())  # the victims (and any element only they linked to)
    assert lost >= cut
    by_graph = verify_segment(seg, "cosine", ids, planned, full=True, ef=10, ef_max=EF_MAX, graph=True)
    by_search = verify_segment(seg, "cosine", ids, planned, full=True, ef=10, ef_max=EF_MAX)
    assert by_graph.by_graph and not by_search.by_graph
    assert by_graph.unreachable == by_search.unreachable == lost
    assert by_graph.ok == by_search.ok == (lost <= 2), (by_graph.problems, by_search.problems)
    assert by_graph.problems == by_search.problems


def _only_far_in_links(folder: Path, victims: np.ndarray, seed: int = 0) -> None:
    """Give each victim (its in-links cut) one in-link from a random other element: it
    stays reachable, but no search near its own vector goes that way."""
    files = HnswFiles.open(folder)
    h = files.header
    mm = np.memmap(folder / "data_level0.bin", dtype=np.uint8, mode="r+",
                   shape=(h.cur_element_count, h.size_data_per_element))
    counts = mm[:, 0:2].copy().view("<u2").ravel()
    free = np.setdiff1d(np.flatnonzero(counts < h.max_m0), victims)  # a slot to spare: no link is lost
    hosts = np.random.default_rng(seed).choice(free, size=len(victims), replace=False)
    for x, y in zip(victims.tolist(), hosts.tolist()):
        count = int(counts[y])
        mm[y, 4 : 4 + 4 * h.max_m0].view("<u4")[count] = x
        mm[y, 0:2] = np.frombuffer(np.uint16(count + 1).tobytes(), dtype=np.uint8)
    mm.flush()


@pytest.mark.parametrize("ef, gate_ef, gate_repaired", [(40, None, None), (10, 40, None), (10, 40, 50)],
                         ids=["ef-40", "reconciler", "reconciler-50-of-150-compared"])
def test_a_connected_graph_that_search_cannot_use_fails_the_verification(tmp_path, monkeypatch, ef, gate_ef,
                                                                          gate_repaired):
    """Reachability alone is not enough: 150 repaired rows reachable only through one
    link from a random element are all reachable, yet a self-query near them never finds
    them, so they miss at ef 40 far more often than the untouched rows and the
    verification fails (the reconciler asks every row at ef 10 and compares at ef 40, on
    up to GATE_REPAIRED seeded repaired rows)."""
    if gate_repaired:
        monkeypatch.setattr(verify, "GATE_REPAIRED", gate_repaired)
    p = fresh_palace(tmp_path / "palace", PalaceSpec(drawers=2000, sync_threshold=100, batch_size=100))
    seg = faults.segment_dir(p)
    st = check_palace(p).states[0]
    victims = _level0_only(seg)[::10][:150]
    files = HnswFiles.open(seg)
    labels = files.slots().labels[victims]
    planned = dict(zip((st.idmap.label_to_id[int(lab)] for lab in labels), files.vectors(victims)))
    _cut_in_links(seg, victims)
    _only_far_in_links(seg, victims)
    assert _reach(seg).proves and _reach(seg).from_entry.all()
    v = verify_segment(seg, "cosine", set(st.sql_rows), planned, sample=1000, ef=ef, ef_max=EF_MAX, graph=True,
                       gate_ef=gate_ef)
    every_row_at_gate = gate_ef and (gate_repaired or verify.GATE_REPAIRED) >= 150
    assert v.by_graph and v.unreachable == 0 and v.ef == (gate_ef if every_row_at_gate else ef)
    assert v.gate_ef == (gate_ef or 0)
    assert v.gate_queried == (min(gate_repaired or 150, 150) if gate_ef else 0)
    assert not v.ok and "at ef 40 far more often than untouched" in v.problems[0], v


def test_the_graph_is_not_used_when_a_stored_vector_is_not_a_unit_vector(tmp_path):
    """Cosine's "nothing is closer to a row than itself" needs unit vectors: one stored
    vector scaled by 2 and the verification searches instead."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    ids = set(check_palace(p).states[0].sql_rows)
    files = HnswFiles.open(seg)
    h = files.header
    mm = np.memmap(seg / "data_level0.bin", dtype=np.uint8, mode="r+",
                   shape=(h.cur_element_count, h.size_data_per_element))
    mm[3, h.offset_data : h.label_offset].view("<f4")[:] *= 2
    mm.flush()
    v = verify_segment(seg, "cosine", ids, {}, sample=50, ef=10, ef_max=EF_MAX, graph=True)
    assert not v.by_graph


@pytest.mark.parametrize("pick", ["scattered", "dense", "run", "shuffled-with-repeats", "one", "none"])
def test_vectors_are_read_in_the_callers_order(tmp_path: Path, pick: str) -> None:
    """``HnswFiles.vectors`` reads scattered slots one by one and dense ones in blocks (never
    through a memmap); both give each asked slot's stored vector, in the caller's order."""
    vecs = _index(tmp_path)
    files = HnswFiles.open(tmp_path)
    h = files.header
    rng = np.random.default_rng(3)
    slots = {"scattered": rng.choice(N, 40, replace=False), "dense": rng.choice(N, N // 2, replace=False),
             "run": np.arange(1000, 1700), "shuffled-with-repeats": rng.integers(0, N, 5000),
             "one": np.array([N - 1]), "none": np.zeros(0, dtype=np.int64)}[pick]
    got = files.vectors(slots)
    raw = np.fromfile(tmp_path / "data_level0.bin", dtype=np.uint8)[: N * h.size_data_per_element]
    want = raw.reshape(N, -1)[slots, h.offset_data : h.label_offset].copy().view("<f4").reshape(len(slots), DIM)
    assert got.shape == (len(slots), DIM) and np.array_equal(got, want)
    labels = raw.reshape(N, -1)[slots, h.label_offset : h.label_offset + 8].copy().view("<u8").ravel()
    unit = vecs[labels.astype(np.int64)] / np.linalg.norm(vecs[labels.astype(np.int64)], axis=1, keepdims=True)
    assert np.allclose(got, unit, atol=1e-6)  # cosine stores each row normalized
    with pytest.raises(IndexError):
        files.vectors(np.array([0, N]))


@pytest.mark.parametrize("pick", ["scattered", "dense"])
def test_vectors_of_a_file_that_shrank_is_an_error(tmp_path: Path, pick: str) -> None:
    """A file cut short after its size was read: an error, never zeros for the lost slots."""
    _index(tmp_path)
    files = HnswFiles.open(tmp_path)
    h = files.header
    assert files.readable_slots == N  # sized when opened and first read: it shrinks only after
    with open(tmp_path / "data_level0.bin", "r+b") as f:
        f.truncate((N // 2) * h.size_data_per_element)
    slots = np.array([0, N - 1]) if pick == "scattered" else np.arange(N // 4, N)
    with pytest.raises(OSError, match="shrank"):
        files.vectors(slots)
