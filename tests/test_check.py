"""``chaosfix check`` names every damage exactly and calls every healthy state clean.

Every palace is built by the installed chromadb in a child process (PalaceSpec(): 300
drawers, sync_threshold 100, batch 50, so three persists and a WAL purged to its last
row), and every damage is made the way it happens for real: a snapshot restored after a
committed persist (power loss), an older SQLite file restored, a SIGKILL at a 0.6 kill
point or by strace on a named file, direct file damage for what disks and tools do.
Each test asserts the exact ``report.codes()`` (code -> count).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    ADD100,
    NEW_IDS,
    assert_consistent,
    chromadb_script,
    fingerprint,
    reconcile,
    repair,
    run_cli,
    wal_rows,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaosfix import faults
from chaosfix.check import SCHEMA, check_palace
from chaosfix.cli import main as cli_main
from chaosfix.drawers import drawer
from chaosfix.palace import idmap, map_child
from chaosfix.palace.hnsw import HEADER_SIZE, parse_header
from chaosfix.palace.sql import SeqValue
from chaosfix.palace.state import SqlIds
from chaosfix.workload import (
    PalaceSpec,
    apply_ops,
    chroma_major,
    chromadb_version,
    copy_palace,
    fresh_palace,
    template,
)

needs_strace = pytest.mark.skipif(not faults.strace_available(), reason="strace not installed or ptrace not permitted")
only_06 = "0.6.x-only kill point: 1.x commits SQL before it persists the index"


def codes(palace: Path) -> dict[str, int]:
    """The report's codes, with the map read both ways (see ``deferred_agrees``)."""
    rep = check_palace(palace)
    deferred_agrees(palace, rep)
    return rep.codes()


def deferred_agrees(palace: Path, rep) -> None:  # noqa: ANN001 - a CheckReport
    """A map of 4 MiB or more is read by a helper process and deferred (``map_child``);
    these palaces' maps are smaller, so the same check runs again with that path forced:
    the findings, their samples and the summaries must be the same."""
    def facts(r) -> list:  # noqa: ANN001
        return [sorted((f.code, f.severity, f.collection, f.count, tuple(f.sample)) for f in r.findings),
                r.collections]

    old = map_child.MIN_BYTES
    map_child.MIN_BYTES = 0
    try:
        forced = check_palace(palace)
    finally:
        map_child.MIN_BYTES = old
    assert facts(forced) == facts(rep)


def state(palace: Path):
    (st_,) = check_palace(palace).states
    return st_


# ---- healthy states ---------------------------------------------------------------


def test_template_palace_is_consistent(small_palace):
    rep = check_palace(small_palace)
    assert rep.codes() == {}
    assert rep.consistent
    (c,) = rep.collections
    assert (c["rows"], c["mapped"], c["live_labels"], c["pending"]) == (300, 300, 300, 0)
    assert wal_rows(small_palace) == 1  # purged down to its last row


@pytest.mark.skipif(chroma_major() == "0.6", reason="a 0.6 map is read in-process: every check compares its seq_ids")
def test_pending_updates_leave_a_healthy_map_unread(small_palace, monkeypatch):
    """WAL rows still pending (here: updates of existing rows, as any palace between two
    flushes has) made check unpickle a deferred map to ask whether it held their ids:
    2.2-2.8 s warm at 500k drawers against 1.2-1.4 s. The map's ids are SQL's (the
    helper said so), so SQL's ids answer."""
    from chaosfix.drawers import drawer

    chromadb_script(textwrap.dedent("""
        import sys, numpy as np, chromadb
        col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("mempalace_drawers", embedding_function=None)
        col.update(ids=sys.argv[2:], embeddings=np.ones((len(sys.argv) - 2, 384), dtype=np.float32))
    """), str(small_palace), *(drawer(i)[0] for i in range(3)))
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    rep = check_palace(small_palace)
    (st_,) = rep.states
    assert rep.codes() == {"PENDING": 3}, rep.codes()
    assert "_raw" in st_.idmap.__dict__ and st_.map_diff.empty  # still deferred: never unpickled
    assert st_.pending_vector_ids == {drawer(i)[0] for i in range(3)}


@pytest.mark.skipif(chroma_major() == "0.6", reason="a 0.6 map is read in-process: every check compares its seq_ids")
def test_pending_adds_orphans_and_phantoms_leave_a_healthy_map_unread(small_palace, monkeypatch):
    """Adds still pending (1.x's SQL holds them, its index not yet: any palace between two
    flushes) made the map helper's answer "not the same ids", and check then unpickled the
    map to find the few that differ: 2.5-2.8 s warm at 500k drawers against 1.8 s with
    none pending. The helper names them (``idmap.id_diff``); the findings are the ones
    the in-process read gives (``deferred_agrees``), here and once they turn into orphans
    (their WAL rows purged) and beside a phantom."""
    import sqlite3

    from chaosfix.drawers import drawer

    new = [f"late-{i}" for i in range(3)]
    chromadb_script(textwrap.dedent("""
        import sys, numpy as np, chromadb
        col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("mempalace_drawers", embedding_function=None)
        col.add(ids=sys.argv[2:], embeddings=np.ones((len(sys.argv) - 2, 384), dtype=np.float32))
    """), str(small_palace), *new)
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)

    def deferred_check(want: dict[str, int]):  # noqa: ANN202 - a CollectionState
        rep = check_palace(small_palace)
        (st_,) = rep.states
        assert {c: n for c, n in rep.codes().items() if c != "QUEUE_RESET"} == want, rep.codes()
        assert "_raw" in st_.idmap.__dict__, "the map was unpickled"
        deferred_agrees(small_palace, rep)
        return st_

    st_ = deferred_check({"PENDING": 3})
    assert st_.map_diff.sql_alone == set(new) and not st_.map_diff.map_alone
    assert st_.pending_vector_ids == set(new) and st_.replay_labels() == range(301, 304)
    faults.empty_queue(small_palace)  # the WAL rows purged: the three rows are orphans (and the queue reset)
    assert deferred_check({"SQL_ONLY": 3}).sql_only() == sorted(new)
    gone = drawer(7)[0]
    con = sqlite3.connect(small_palace / "chroma.sqlite3")
    with con:
        con.execute("DELETE FROM embeddings WHERE embedding_id = ?", (gone,))
    con.close()
    st_ = deferred_check({"SQL_ONLY": 3, "HNSW_ONLY": 1, "STALE_ROWS": 1})  # (its metadata rows stay)
    assert st_.hnsw_only() == [gone] and st_.map_diff.map_alone == {gone}


@pytest.mark.skipif(chroma_major() == "0.6", reason="a 0.6 map is read in-process: every check compares its seq_ids")
def test_the_map_helper_names_ids_exactly_as_the_map_holds_them(small_palace, monkeypatch):
    """A pickle's key may hold a surrogate pair as two lone code points (pickle decodes
    with surrogatepass); sent back in JSON it came back one astral character, so check
    took a pending add of that character for a mapped id (a false SQL_ONLY, a missed
    phantom; found by a review subagent). The helper now names SQL's side by position
    and the map's in bytes: the findings are the in-process read's."""
    split, joined = "\ud83d\ude00", "\U0001F600"
    chromadb_script(textwrap.dedent("""
        import sys, numpy as np, chromadb
        col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("mempalace_drawers", embedding_function=None)
        col.add(ids=[sys.argv[2]], embeddings=np.ones((1, 384), dtype=np.float32))
    """), str(small_palace), joined)
    p = faults.pickle_path(small_palace)
    m = idmap.loads(p.read_bytes())
    lab = m.id_to_label.pop(drawer(0)[0])
    m.id_to_label[split], m.label_to_id[lab] = lab, split
    p.write_bytes(idmap.dumps(m))
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    rep = check_palace(small_palace)
    deferred_agrees(small_palace, rep)
    assert rep.codes() == {"SQL_ONLY": 1, "HNSW_ONLY": 1, "PENDING": 1}, rep.codes()
    (st_,) = rep.states
    assert "_raw" in st_.idmap.__dict__ and st_.map_diff.map_alone == {split}


@pytest.mark.skipif(chroma_major() == "0.6", reason="a 0.6 map is read in-process: every check compares its seq_ids")
def test_check_reads_in_process_when_the_map_helper_cannot_run(small_palace, monkeypatch):
    """No interpreter for the map helper (here: a missing one) is no verdict: check reads
    the map itself, scan first, and says what the helper would have said."""
    import sys

    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    (st_,) = check_palace(small_palace).states
    assert "_raw" in st_.idmap.__dict__  # the helper answered: the map is deferred
    # and SQL's ids, the map's: still the one string SQLite built, counted, never split
    assert isinstance(st_.sql_rows, SqlIds) and st_.sql_rows._rows is None and len(st_.sql_rows) == 300
    assert sorted(st_.sql_rows) == sorted(st_.idmap.id_to_label)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    rep = check_palace(small_palace)
    (st_,) = rep.states
    assert rep.codes() == {} and "_raw" not in st_.idmap.__dict__ and st_.idmap.count == 300
    faults.truncate(faults.pickle_path(small_palace), fraction=0.5)
    assert "PICKLE_UNREADABLE" in check_palace(small_palace).codes()


def test_the_check_command_starts_the_map_helper_before_it_needs_it(small_palace, monkeypatch):
    """``chaosfix check`` starts the map helper (``map_child.prestart``) before it imports
    the rest of chaosfix, for a palace with a large 1.x map only, and the check's reader
    then takes that very process: the report is the one a helper started late gives.
    A spare nobody takes is reaped (``drop_spare``)."""
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    one_x = chroma_major() != "0.6"
    assert map_child._wants_helper(small_palace) == one_x  # (0.6's map is a protocol-4/5 object)
    taken: list[int] = []
    take = map_child._take_spare

    def spy():  # noqa: ANN202 - the real function, its answer noted
        proc = take()
        taken.append(proc.pid if proc is not None else None)
        return proc

    monkeypatch.setattr(map_child, "_take_spare", spy)
    started: list[int] = []
    spawn = map_child.prestart

    def noted(palace):  # noqa: ANN001, ANN202
        spawn(palace)
        started.append(map_child._spare[0].pid if map_child._spare is not None else None)

    monkeypatch.setattr(map_child, "prestart", noted)
    res = CliRunner().invoke(cli_main, ["check", str(small_palace), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["consistent"] is True
    assert map_child._spare is None
    if one_x:
        assert started[0] is not None and taken == started  # the spare, taken by the one reader
    else:
        assert started == [None] and not taken  # nothing started; 0.6 reads its map in-process
    # a spare the check never takes is reaped at exit
    map_child.prestart(small_palace)
    spare = map_child._spare
    assert (spare is not None) == one_x
    map_child.drop_spare()
    assert map_child._spare is None and (spare is None or spare[0].returncode is not None)
    if one_x:  # nor is one taken that runs another interpreter than a helper started now would
        map_child.prestart(small_palace)
        spare = map_child._spare
        monkeypatch.setattr(sys, "executable", "/nonexistent/python")
        assert map_child._take_spare() is None and spare[0].returncode is not None


@pytest.mark.skipif(chroma_major() == "0.6", reason="the hint looks for 1.x maps only")
def test_the_helpers_early_start_trusts_no_folder_it_looks_into(small_palace, monkeypatch, tmp_path):
    """``map_child._wants_helper`` is a hint read from a palace nobody vouches for: a
    symlinked folder or map, a FIFO in the map's place (an open would block), a map
    below ``MIN_BYTES`` and a folder without chroma.sqlite3 start nothing; folders with
    no map beside the one that has it do not stop the look, which never blocks or fails."""
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    seg = faults.pickle_path(small_palace).parent
    assert map_child._wants_helper(small_palace)
    for i in range(20):  # folders of collections never persisted (no map), listed before it or not
        (small_palace / f"{i:08d}-0000-0000-0000-000000000000").mkdir()
    assert map_child._wants_helper(small_palace)
    monkeypatch.setattr(map_child, "MIN_BYTES", faults.pickle_path(small_palace).stat().st_size + 1)
    assert not map_child._wants_helper(small_palace)
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    aside = tmp_path / "aside"
    seg.rename(aside)
    (small_palace / seg.name).symlink_to(aside)  # the folder a link
    assert not map_child._wants_helper(small_palace)
    (small_palace / seg.name).unlink()
    seg.mkdir()
    (seg / "index_metadata.pickle").symlink_to(aside / "index_metadata.pickle")  # the map a link
    assert not map_child._wants_helper(small_palace)
    (seg / "index_metadata.pickle").unlink()
    os.mkfifo(seg / "index_metadata.pickle")  # nobody writes it: an open without O_NONBLOCK would hang
    assert not map_child._wants_helper(small_palace)
    assert not map_child._wants_helper(tmp_path / "no such palace")
    (seg / "index_metadata.pickle").unlink()
    shutil.copy(aside / "index_metadata.pickle", seg / "index_metadata.pickle")
    assert map_child._wants_helper(small_palace)
    monkeypatch.delattr(os, "O_DIRECTORY")  # a system without it: no hint, no error
    assert not map_child._wants_helper(small_palace)
    monkeypatch.undo()
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    assert map_child._wants_helper(small_palace)
    (small_palace / "chroma.sqlite3").rename(tmp_path / "db")  # not a palace: no helper for it
    assert not map_child._wants_helper(small_palace)


def test_never_persisted_segment_is_healthy(tmp_path):
    spec = PalaceSpec(drawers=50)  # below sync_threshold: no pickle, every row still in the WAL
    p = fresh_palace(tmp_path / "p", spec)
    assert not faults.pickle_path(p).exists()
    rep = check_palace(p)
    assert rep.codes() == {"PENDING": 50}
    assert rep.consistent


def test_pending_wal_rows_are_healthy(small_palace, small_spec):
    assert apply_ops(small_palace, small_spec, [{"op": "add", "start": 300, "count": 30}]).ok
    rep = check_palace(small_palace)
    assert rep.codes() == {"PENDING": 30}
    assert rep.consistent
    assert state(small_palace).pending_ids == {drawer(i)[0] for i in range(300, 330)}


def test_after_deletes_is_healthy(small_palace, small_spec):
    # 100 deletes reach sync_threshold: persisted, total_elements_added (300) > live labels (200)
    assert apply_ops(small_palace, small_spec, [{"op": "delete", "start": 0, "count": 100}]).ok
    rep = check_palace(small_palace)
    assert rep.codes() == {}
    st_ = rep.states[0]
    assert st_.idmap.total_elements_added == 300 and len(st_.idmap.id_to_label) == 200
    assert len(st_.sql_rows) == 200


# ---- power loss and stale files ---------------------------------------------------


def test_lost_hnsw_writes_after_committed_persist(small_palace, small_spec, tmp_path):
    """Power loss after the SQL commit: the persist's unsynced HNSW/pickle writes are gone,
    the WAL is already purged, so 100 rows exist only in SQLite."""
    snap = faults.snapshot_segment(small_palace, dst=tmp_path / "snap")
    assert apply_ops(small_palace, small_spec, ADD100).ok
    faults.restore_segment(small_palace, snap)
    rep = check_palace(small_palace)
    assert rep.codes() == {"SQL_ONLY": 100}
    st_ = rep.states[0]
    assert set(st_.sql_only()) == NEW_IDS
    assert st_.pending == [] and wal_rows(small_palace) == 1  # WAL purged: no copy of the vectors


def test_older_sqlite_beside_newer_index(small_palace, small_spec, tmp_path):
    old = faults.copy_sqlite(small_palace, tmp_path / "backup.sqlite3")
    assert apply_ops(small_palace, small_spec, ADD100).ok
    faults.restore_older_sqlite(small_palace, old)
    rep = check_palace(small_palace)
    assert rep.codes() == {"HNSW_ONLY": 100}
    assert set(rep.states[0].hnsw_only()) == NEW_IDS


# ---- SIGKILL inside the persist ---------------------------------------------------


def test_sigkill_after_hnsw_files(small_palace, small_spec, major):
    """Killed after the HNSW files, before the pickle. 0.6: the kill point fires just before
    ``open(pickle, "wb")``: the old pickle is intact, the 100 new labels are ghosts and the
    add's transaction never commits. 1.x (strace, first write to the pickle): the SQL rows
    committed first and wait in the WAL, the truncated pickle is unreadable."""
    if major == "0.6":
        res = apply_ops(small_palace, small_spec, ADD100, kill=faults.kill_point("after-hnsw"))
        assert res.killed
        assert codes(small_palace) == {"HOT_JOURNAL": 1, "GHOST_LABEL": 100}
        return
    else:
        if not faults.strace_available():
            pytest.skip("strace not installed")
        prefix = faults.strace_kill_prefix(faults.pickle_path(small_palace), 1, "write")
        res = apply_ops(small_palace, small_spec, ADD100, prefix=prefix)
        want = {"PICKLE_UNREADABLE": 300, "PENDING": 100}
    assert res.killed
    assert faults.pickle_path(small_palace).stat().st_size == 0
    assert codes(small_palace) == want


def test_sigkill_after_pickle_gives_phantoms(small_palace, small_spec, major):
    """0.6: index and pickle hold the 100 new ids, the add's transaction never commits."""
    if major != "0.6":
        pytest.skip(only_06)
    res = apply_ops(small_palace, small_spec, ADD100, kill=faults.kill_point("after-pickle"))
    assert res.killed
    rep = check_palace(small_palace)
    assert rep.codes() == {"HOT_JOURNAL": 1, "HNSW_ONLY": 100}
    assert set(rep.states[0].hnsw_only()) == NEW_IDS


@needs_strace
def test_sigkill_before_pickle_open_gives_ghost_labels(small_palace, small_spec, major):
    """0.6: killed on the pickle's 2nd openat (the write, after the HNSW files): the index
    has 100 labels the old pickle does not know, and the transaction rolls back."""
    if major != "0.6":
        pytest.skip("1.x opens the pickle from several threads and strace counts per thread; "
                    "1.x ghost labels are covered by the torn-persist test")
    prefix = faults.strace_kill_prefix(faults.pickle_path(small_palace), 2, "openat")
    res = apply_ops(small_palace, small_spec, ADD100, prefix=prefix)
    assert res.killed
    rep = check_palace(small_palace)
    assert rep.codes() == {"HOT_JOURNAL": 1, "GHOST_LABEL": 100}
    assert rep.states[0].ghost_labels() == list(range(301, 401))


@needs_strace
def test_sigkill_mid_persist_is_torn(small_palace, small_spec, major):
    """Killed on the first write to link_lists.bin: header and data say 400 elements, the
    link lists still hold 300 (1.x then fails with 'Failed to apply logs')."""
    prefix = faults.strace_kill_prefix(faults.segment_file(small_palace, "link_lists.bin"), 1, "write,writev")
    res = apply_ops(small_palace, small_spec, ADD100, prefix=prefix)
    assert res.killed
    want = {"TORN": 1, "GHOST_LABEL": 100}
    want |= {"HOT_JOURNAL": 1} if major == "0.6" else {"PENDING": 100}
    rep = check_palace(small_palace)
    assert rep.codes() == want
    (torn,) = [f for f in rep.findings if f.code == "TORN"]
    assert "link_lists.bin ends at element 300 of 400" in torn.detail
    assert "Do not open this palace with chromadb before repair" in torn.detail  # and why
    assert "hundreds of GB" in torn.detail


@needs_strace
def test_sigkill_mid_persist_of_a_delete_is_a_replay_conflict(small_palace, small_spec, major):
    """1.x: killed on the 2nd write to link_lists.bin while 101 deletes persist: the delete
    marks reached data_level0.bin, the pickle and max_seq_id did not, and chromadb 1.5.9's
    replay of the deletes fails ('Failed to apply logs'). 0.6 writes no link list there."""
    prefix = faults.strace_kill_prefix(faults.segment_file(small_palace, "link_lists.bin"), 2, "write,writev")
    res = apply_ops(small_palace, small_spec, [{"op": "delete", "start": 0, "count": 101}], prefix=prefix)
    if major == "0.6":
        assert not res.killed and codes(small_palace) in ({}, {"PENDING": 1})
        return
    assert res.killed
    assert codes(small_palace) == {"REPLAY_CONFLICT": 101, "PENDING": 101}


# ---- file damage ------------------------------------------------------------------


def test_truncated_data_level0(small_palace):
    f = faults.segment_file(small_palace, "data_level0.bin")
    h = parse_header(faults.segment_file(small_palace, "header.bin").read_bytes())
    faults.truncate(f, size=250 * h.size_data_per_element + 100)  # mid-slot 250
    rep = check_palace(small_palace)
    # the 50 rows whose slots are gone have no vector anywhere
    assert rep.codes() == {"TORN": 1, "SQL_ONLY": 50}


def test_pickle_off_by_one(small_palace):
    assert faults.off_by_one(small_palace) == 299
    assert codes(small_palace) == {"OFF_BY_ONE": 1}


@pytest.mark.parametrize("which, want", [
    ("both", {"SQL_ONLY": 1, "GHOST_LABEL": 1}),
    ("id_to_label", {"SQL_ONLY": 1, "OFF_BY_ONE": 1}),
    ("label_to_id", {"GHOST_LABEL": 1, "OFF_BY_ONE": 1}),
])
def test_one_map_entry_dropped(small_palace, which, want):
    rid, label = faults.drop_map_entry(small_palace, which)
    rep = check_palace(small_palace)
    assert rep.codes() == want
    st_ = rep.states[0]
    if "SQL_ONLY" in want:
        assert st_.sql_only() == [rid]
    if "GHOST_LABEL" in want:
        assert st_.ghost_labels() == [label]


PENDING_UPDATE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "col", embedding_function=None, metadata={"hnsw:batch_size": 10, "hnsw:sync_threshold": 20})
    col.add(ids=[f"r{i}" for i in range(100)], embeddings=np.random.default_rng(1).standard_normal((100, 4)))
    if sys.argv[2] == "metadata":
        col.update(ids=["r0"], metadatas=[{"tag": "x"}])  # no embedding: it stays in the WAL
    else:
        col.update(ids=["r0"], embeddings=[[9.0, 9.0, 9.0, 9.0]])  # stays in the WAL
""")


@pytest.mark.parametrize("update", ["metadata", "vector"])
def test_a_pending_update_of_a_row_the_map_lost_brings_no_vector(tmp_path, update):
    """A row whose index entry is lost is SQL_ONLY even while an update of it is pending:
    a metadata-only update carries no vector, and chromadb (0.6 and 1.x) skips an update
    of an id its map does not hold, so after its replay search still never finds the row.
    reconcile puts the row back with the pending update's vector, the newest one."""
    p = tmp_path / "palace"
    chromadb_script(PENDING_UPDATE, str(p), update)
    rid, label = faults.drop_map_entry(faults.segment_dir(p, "col"), "both", id="r0")
    assert rid == "r0"
    rep = check_palace(p)
    assert rep.codes() == {"SQL_ONLY": 1, "GHOST_LABEL": 1, "PENDING": 1}, rep.codes()
    assert rep.states[0].sql_only() == ["r0"] and rep.states[0].pending_ids == {"r0"}
    if update == "vector":
        repair(p)
        assert_consistent(p)
        got = chromadb_script(textwrap.dedent("""
            import sys, chromadb
            col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("col")
            print(col.query(query_embeddings=[[9.0, 9.0, 9.0, 9.0]], n_results=1)["ids"][0][0])
        """), str(p))
        assert got.split()[-1] == "r0", got


def test_a_delete_the_metadata_segment_has_not_applied_is_no_orphan(tmp_path):
    """chromadb 1.x commits a delete to its WAL, then the metadata segment applies it in a
    transaction of its own: a kill between leaves the row in SQL and its delete pending.
    chromadb's replay deletes the row, so it is no SQL_ONLY row; check called it one and
    reconcile's post-check then failed (exit 8: 'rows without an embedding'). Made here
    from the palace before the delete plus the delete's WAL row (helper-30's case)."""
    import sqlite3

    p = tmp_path / "palace"
    chromadb_script(ADD_THEN_PENDING, str(p))
    db = p / "chroma.sqlite3"
    before = tmp_path / "before.sqlite3"
    src, dst = sqlite3.connect(db), sqlite3.connect(before)
    src.backup(dst)
    src.close()
    dst.close()
    chromadb_script(DELETE_N0, str(p))
    new, old = sqlite3.connect(db), sqlite3.connect(before)
    top = old.execute("SELECT max(seq_id) FROM embeddings_queue").fetchone()[0]
    rows = new.execute("SELECT * FROM embeddings_queue WHERE seq_id > ?", (top,)).fetchall()
    assert [r[4] for r in rows] == ["n0"]
    with old:
        old.executemany(f"INSERT INTO embeddings_queue VALUES ({','.join('?' * len(rows[0]))})", rows)
    new.close()
    old.close()
    shutil.copy2(before, db)
    rep = check_palace(p)
    assert rep.consistent and set(rep.codes()) == {"PENDING"}, rep.codes()
    assert rep.states[0].replay_removes == {"n0"}
    for strategy in ("auto", "rebuild"):  # (rebuild: a repair that runs, judged by chromadb)
        q = tmp_path / strategy
        shutil.copytree(p, q)
        code, doc, err = reconcile(q, "--strategy", strategy)
        assert code == (0 if strategy == "auto" else 1) and "Traceback" not in err, (strategy, code, err)
        if strategy == "rebuild":
            assert doc["chromadb"]["ok"] and doc["verification"]["col"]["zero_diff"], doc["chromadb"]
        assert set(check_palace(q).codes()) <= {"PENDING"}


DUPLICATE_ADD = textwrap.dedent("""
    import sys, time, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "col", embedding_function=None, metadata={"hnsw:batch_size": 10, "hnsw:sync_threshold": 20})
    col.add(ids=[f"r{i}" for i in range(100)], embeddings=np.random.default_rng(1).standard_normal((100, 4)),
            metadatas=[{"v": "orig"}] * 100)
    time.sleep(1.1)  # (a later second: see _refused_later's rule 2)
    col.add(ids=["r0"], embeddings=[[9.0, 9.0, 9.0, 9.0]], metadatas=[{"v": "dup"}])  # SQL refuses it; WAL keeps it
""")


@pytest.mark.parametrize("after", ["nothing", "metadata-update", "blob-id"])
def test_an_add_sql_refused_gives_its_vector_to_no_row(tmp_path, after):
    """An add of an id SQL already holds is skipped by the metadata segment (the row keeps
    its document, metadata and seq_id) but stays in the WAL. When the id map has lost the
    id, reconcile took that add's vector for the row (helper-30): a vector of a write the
    row never got. It is no source now: the row is left unrepaired and listed (exit 4).
    A later metadata-only update raised the row's seq_id above the add's, which then
    passed again (helper-33); a blob id beside the text ones made the lookup sort fail
    (exit 8, internal error). 0.4 keeps its whole WAL, so there r0's own add restores it."""
    import sqlite3

    p = tmp_path / "palace"
    chromadb_script(DUPLICATE_ADD, str(p))
    if after == "metadata-update":
        chromadb_script(textwrap.dedent("""
            import sys, chromadb
            chromadb.PersistentClient(path=sys.argv[1]).get_collection("col").update(
                ids=["r0"], metadatas=[{"v": "later"}])
        """), str(p))
    faults.drop_map_entry(faults.segment_dir(p, "col"), "both", id="r0")
    if after == "blob-id":
        with sqlite3.connect(p / "chroma.sqlite3") as con:  # (damage: the same bytes, stored as a BLOB)
            con.execute("UPDATE embeddings_queue SET id = ? WHERE id = 'r99'", (b"r99",))
            con.execute("UPDATE embeddings SET embedding_id = ? WHERE embedding_id = 'r99'", (b"r99",))
        con.close()
    code, doc, err = reconcile(p, "--no-chromadb-check")
    assert "internal error" not in err, err
    if after == "blob-id":
        return  # (what the blob id itself is judged to be is another matter: no crash, one line)
    if chromadb_version().startswith("0.4."):  # 0.4 never purges its WAL: r0's own add is a source
        assert code == 1 and doc["plans"][0]["unrepaired_ids"] == [], err
        got = json.loads(chromadb_script(textwrap.dedent("""
            import json, sys, chromadb
            col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("col")
            print(json.dumps([float(x) for x in col.get(ids=["r0"], include=["embeddings"])["embeddings"][0]]))
        """), str(p)))
        assert np.allclose(got, np.random.default_rng(1).standard_normal((100, 4))[0]), got
        return
    assert code == 4, err
    assert doc["plans"][0]["unrepaired_ids"] == ["r0"] and doc["plans"][0]["add"] == 0, doc["plans"][0]


SAME_SECOND_DUPLICATE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "col", embedding_function=None, metadata={"hnsw:batch_size": 10, "hnsw:sync_threshold": 20})
    col.add(ids=[f"r{i}" for i in range(100)], embeddings=np.random.default_rng(1).standard_normal((100, 4)))
    col.add(ids=["r0"], embeddings=[[9.0, 9.0, 9.0, 9.0]])  # SQL refuses it; r0's own add is purged
    col.update(ids=["r0"], metadatas=[{"tag": "x"}])  # raises r0's seq_id above the duplicate's
""")


@pytest.mark.skipif(chromadb_version().startswith("0.4."), reason="0.4 keeps the vector seq_id in its pickle")
def test_a_refused_add_of_the_same_second_below_max_seq_id_is_no_source(tmp_path):
    """helper-38: a documentless duplicate add within the second its row was made
    (created_at ties: set so here), below the vector segment's max_seq_id (a persist
    whose purge a kill stopped: set so here), then a metadata update and the id lost
    from the map. chromadb never replays it, so it is only a candidate for the orphan's
    lost vector, and without a document to show it is the row's, it is none: r0 is left
    unrepaired, where 197d909 gave it [9, 9, 9, 9] and exit 1."""
    import sqlite3

    from chaosfix.palace.sql import decode_seq

    p = tmp_path / "palace"
    chromadb_script(SAME_SECOND_DUPLICATE, str(p))
    with sqlite3.connect(p / "chroma.sqlite3") as con:
        (dup_at,) = con.execute("SELECT created_at FROM embeddings_queue WHERE id = 'r0' AND operation = 0").fetchone()
        con.execute("UPDATE embeddings SET created_at = ? WHERE embedding_id = 'r0'", (dup_at,))
        top = max(decode_seq(s) for (s,) in con.execute("SELECT seq_id FROM embeddings_queue"))
        seg = faults.segment_dir(p, "col").name
        (raw,) = con.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (seg,)).fetchone()
        con.execute("UPDATE max_seq_id SET seq_id = ? WHERE segment_id = ?",
                    (top.to_bytes(8, "big") if isinstance(raw, bytes) else top, seg))
    con.close()
    faults.drop_map_entry(faults.segment_dir(p, "col"), "both", id="r0")
    code, doc, err = reconcile(p, "--no-chromadb-check")
    assert code == 4, err[-2000:]
    assert doc["plans"][0]["unrepaired_ids"] == ["r0"], doc["plans"][0]


ADD_THEN_UPDATE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "col", embedding_function=None, metadata={"hnsw:batch_size": 10, "hnsw:sync_threshold": 20})
    col.add(ids=[f"r{i}" for i in range(40)], embeddings=np.random.default_rng(1).standard_normal((40, 4)))
    col.add(ids=["n0"], embeddings=[[9.0, 9.0, 9.0, 9.0]])  # pending (no persist), no document
    col.update(ids=["n0"], metadatas=[{"tag": "x"}])  # a metadata-only update raises its row's seq_id
""")


def test_an_add_followed_by_a_metadata_update_keeps_its_vector(tmp_path):
    """The mirror of the test above (helper-37): a pending add without a document, then a
    metadata-only update of the same row, the usual way to tag a new record. The row's
    seq_id is the update's, and the add was taken for one SQL had refused: a repair that
    folded the pending rows in (``--apply-pending``; a rebuild of a segment never
    persisted does it by default) dropped the row's only vector and moved max_seq_id past
    it, so chromadb, which served the row, could never replay it again."""
    p = tmp_path / "palace"
    chromadb_script(ADD_THEN_UPDATE, str(p))
    assert "n0" in {w.id for w in check_palace(p).states[0].pending}
    code, doc, err = reconcile(p, "--apply-pending")
    assert code == 1 and doc["after_consistent"] is True, err[-2000:]
    assert doc["plans"][0]["unrepaired_ids"] == [], doc["plans"][0]
    got = json.loads(chromadb_script(textwrap.dedent("""
        import json, sys, chromadb
        col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("col")
        row = col.get(ids=["n0"], include=["embeddings", "metadatas"])
        near = col.query(query_embeddings=[[9.0, 9.0, 9.0, 9.0]], n_results=1)["ids"][0]
        print(json.dumps([[float(x) for x in row["embeddings"][0]], row["metadatas"][0], near]))
    """), str(p)))
    assert got == [[9.0, 9.0, 9.0, 9.0], {"tag": "x"}, ["n0"]], got


ADD_THEN_PENDING = textwrap.dedent("""
    import sys, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "col", embedding_function=None, metadata={"hnsw:batch_size": 10, "hnsw:sync_threshold": 20})
    col.add(ids=[f"r{i}" for i in range(40)], embeddings=np.random.default_rng(1).standard_normal((40, 4)))
    col.add(ids=["n0"], embeddings=[[9.0, 9.0, 9.0, 9.0]])  # pending: no persist
""")
DELETE_N0 = textwrap.dedent("""
    import sys, chromadb
    chromadb.PersistentClient(path=sys.argv[1]).get_collection("col").delete(ids=["n0"])
""")


@pytest.mark.parametrize("secret_key", [True, False])
def test_two_labels_swap_their_ids_in_label_to_id(small_palace, monkeypatch, secret_key):
    """label_to_id gives two labels each other's id: both dicts keep their sizes and their
    labels, only two (id, label) pairs differ, and chromadb's queries would return the
    wrong ids for both. The maps are compared by the ids' keyed hashes, or, when
    PYTHONHASHSEED made the key known, by the strings (``idmap.SECRET_HASH_KEY``); both
    must see it (``codes`` also runs the map helper, whose key is always secret)."""
    monkeypatch.setattr(idmap, "SECRET_HASH_KEY", secret_key)
    p = faults.pickle_path(small_palace)
    m = idmap.loads(p.read_bytes())
    a, b = sorted(m.label_to_id)[100:102]
    m.label_to_id[a], m.label_to_id[b] = m.label_to_id[b], m.label_to_id[a]
    p.write_bytes(idmap.dumps(m))
    assert codes(small_palace) == {"OFF_BY_ONE": 4}  # each side's two pairs


def twin(rid: str) -> str:
    """Another id with the same hash as ``rid`` (of even length, Latin-1) under any key:
    CPython hashes a string's buffer, and ``rid``'s bytes read two at a time are one
    two-byte-wide character each ("ab" and "\\u6261" share ``61 62``; little-endian)."""
    return "".join(chr(ord(rid[i]) | ord(rid[i + 1]) << 8) for i in range(0, len(rid), 2))


@pytest.mark.parametrize("secret_key", [True, False])
@pytest.mark.parametrize("where", ["label_to_id", "both"])
def test_an_id_swapped_for_its_hash_twin_is_found(small_palace, monkeypatch, secret_key, where):
    """One id replaced by a crafted id of the same hash (found by a review subagent): in
    label_to_id only (the halves disagree) or in both halves (the map names an id SQL
    lacks). The comparisons by hash also compare lengths, so both are still found, in
    process and in the map helper (``codes`` runs both)."""
    monkeypatch.setattr(idmap, "SECRET_HASH_KEY", secret_key)
    p = faults.pickle_path(small_palace)
    m = idmap.loads(p.read_bytes())
    victim = next(r for r in sorted(m.id_to_label) if len(r) % 2 == 0)
    assert hash(twin(victim)) == hash(victim) and twin(victim) != victim
    label = m.id_to_label[victim]
    m.label_to_id[label] = twin(victim)
    if where == "both":
        m.id_to_label[twin(victim)] = m.id_to_label.pop(victim)
    p.write_bytes(idmap.dumps(m))
    want = {"OFF_BY_ONE": 2} if where == "label_to_id" else {"SQL_ONLY": 1, "HNSW_ONLY": 1}
    assert codes(small_palace) == want


def test_an_sql_id_holding_a_nul_is_one_id(small_palace):
    """SQL's ids are read as one NUL-joined string (``PalaceSql.id_blob``); an id that
    holds a NUL itself would split into two ids there, so such a string is refused (the
    separators are counted) and the rows are read one by one: the renamed row is one
    SQL_ONLY under its whole id, its old id one HNSW_ONLY, in process and in the map
    helper (``codes`` runs both)."""
    old, new = drawer(7)[0], drawer(7)[0] + "\0tail"
    con = sqlite3.connect(small_palace / "chroma.sqlite3")
    with con:
        assert con.execute("UPDATE embeddings SET embedding_id = ? WHERE embedding_id = ?", (new, old)).rowcount == 1
    con.close()
    rep = check_palace(small_palace)
    assert codes(small_palace) == {"SQL_ONLY": 1, "HNSW_ONLY": 1}
    (st_,) = rep.states
    assert st_.sql_only() == [new] and st_.hnsw_only() == [old]


@pytest.mark.skipif(chroma_major() == "0.6", reason="a 0.6 map is read in-process, with SQL's seq_ids")
def test_sql_rows_twice_and_a_map_with_seq_ids_are_read_with_their_seq_ids(small_palace, monkeypatch):
    """An embeddings table without its UNIQUE clause holding one id twice, and a 1.x map
    that keeps seq_ids: SQL's ids are read as one string first, and the seq_ids the map's
    are compared with must then be read too (found by a review subagent: a TypeError)."""
    import sqlite3

    monkeypatch.setattr(map_child, "MIN_BYTES", 0)
    p = faults.pickle_path(small_palace)
    m = idmap.loads(p.read_bytes())
    m.id_to_seq_id = dict.fromkeys(m.id_to_label, 1)
    p.write_bytes(idmap.dumps(m))
    con = sqlite3.connect(small_palace / "chroma.sqlite3")
    con.executescript("""
        CREATE TABLE e2 (id INTEGER PRIMARY KEY, segment_id TEXT NOT NULL, embedding_id TEXT NOT NULL,
                         seq_id BLOB NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
        INSERT INTO e2 SELECT * FROM embeddings; DROP TABLE embeddings; ALTER TABLE e2 RENAME TO embeddings;
        INSERT INTO embeddings (segment_id, embedding_id, seq_id)
            SELECT segment_id, embedding_id, seq_id FROM embeddings LIMIT 1;
    """)
    con.commit()
    con.close()
    rep = check_palace(small_palace)
    assert "SQLITE_CORRUPT" not in rep.codes(), [f.detail for f in rep.findings]
    assert rep.collections[0]["rows"] == 300


@pytest.mark.parametrize("seed, secret", [("", True), ("random", True), ("0", False), ("123", False)])
def test_hashes_are_trusted_only_under_a_random_key(seed, secret):
    """``idmap.SECRET_HASH_KEY``: a PYTHONHASHSEED the interpreter started with makes the
    key known, even when the variable is gone from ``os.environ`` by the time chaosfix
    is imported; under ``-I`` (the map helper) the key is always random."""
    import subprocess
    import sys

    code = "import os; os.environ.pop('PYTHONHASHSEED', None); from chaosfix.palace import idmap; " \
           "print(idmap.SECRET_HASH_KEY)"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(secret)
    isolated = subprocess.run([sys.executable, "-I", "-c", code], env=env, capture_output=True, text=True,
                              check=True)
    assert isolated.stdout.strip() == "True"


@pytest.mark.parametrize("secret_key", [True, False])
def test_same_id_set_is_exact(monkeypatch, secret_key):
    """What the map helper answers as same_ids: a permutation of the map's ids, no more."""
    monkeypatch.setattr(idmap, "SECRET_HASH_KEY", secret_key)
    m = {f"drawer-{i}": i for i in range(1000)}
    ids = list(reversed(m))
    assert idmap.same_id_set(m, ids)
    assert not idmap.same_id_set(m, ids[:-1] + ["drawer-x"])
    assert not idmap.same_id_set(m, ids[:-1] + ids[:1])  # one twice, one missing
    assert not idmap.same_id_set(m, ids + ids[:1])
    assert not idmap.same_id_set(m, ids[:-1])
    assert not idmap.same_id_set({"ab": 1}, ["\u6261"])  # the same hash, not the same id


def _pairs_truth(a: dict[str, int], b: dict[int, str]) -> bool:
    """The plain definition ``idmap._same_pairs`` answers faster: every id's label maps
    back to that id, and neither side holds more."""
    return len(a) == len(b) and all(b.get(lab) == rid for rid, lab in a.items())


@pytest.mark.parametrize("secret_key", [True, False])
@pytest.mark.parametrize("spread", [1, 10])
def test_same_pairs_agrees_with_a_lookup_of_every_pair(monkeypatch, secret_key, spread):
    """``idmap._same_pairs`` (is label_to_id id_to_label's inverse?) both ways it works:
    labels as dense as chromadb issues them index a table (spread 1), labels beyond
    ``_TABLE_MOST`` times their count are sorted (spread 10). Each edit below breaks the
    pairs in its own way, or, reordering, does not."""
    import random

    monkeypatch.setattr(idmap, "SECRET_HASH_KEY", secret_key)
    rng = random.Random(spread)
    n = 2000
    labels = rng.sample(range(1, n * spread + 1), n)
    assert (max(labels) < idmap._TABLE_MOST * n) == (spread == 1)
    a = {f"drawer-{i:05d}": lab for i, lab in enumerate(labels)}
    b = {lab: rid for rid, lab in reversed(list(a.items()))}  # (1.x writes them in different orders)
    x, y, z = (f"drawer-{i:05d}" for i in (3, 500, 1999))
    cases = {
        "healthy": (a, b, True),
        "reordered": (dict(reversed(list(a.items()))), dict(sorted(b.items())), True),
        "two ids swapped in label_to_id": (a, {**b, a[x]: y, a[y]: x}, False),
        "two ids share a label": ({**a, x: a[y]}, b, False),
        "a label label_to_id lacks": ({**a, z: n * spread + 7}, b, False),
        "a label id_to_label lacks": (a, {**{k: v for k, v in b.items() if k != a[z]}, n * spread + 7: z}, False),
        "an id replaced by its hash twin": (a, {**b, a[x]: twin(x)}, False),
        "an id replaced by another": (a, {**b, a[x]: "drawer-x"}, False),
    }
    for name, (ma, mb, want) in cases.items():
        assert _pairs_truth(ma, mb) == want, name
        assert idmap._same_pairs(ma, mb) == want, name
        assert idmap._same_pairs(ma, mb, idmap._fingerprints(ma)) == want, name
        m = idmap.IdMap("dict", 3, len(ma), dict(ma), dict(mb))
        assert (m.inverse_problems() == 0) == want, name


def test_a_replaced_id_map_dict_is_compared_anew():
    """What an IdMap remembers of its dicts (``inverse_problems``, ``key_fingerprints``)
    was keyed by their addresses and sizes: a dict replaced by another of the same size,
    which may take the freed one's address, kept the old fingerprints and passed a map
    that is not inverse (found by a review subagent). Replacing a dict forgets them."""
    for _ in range(20):
        m = idmap.IdMap("dict", 3, 2, {"x": 1, "y": 2}, {1: "x", 2: "y"})
        assert m.inverse_problems() == 0 and len(m.key_fingerprints()) == 2
        m.id_to_label = {"x": 1, "y": 2}
        m.id_to_label = {"p": 1, "q": 2}  # (the first replacement freed; this one may sit where it was)
        m.label_to_id = {1: "x", 2: "y"}
        assert m.inverse_problems() == 4
        assert np.array_equal(m.key_fingerprints(), idmap._fingerprints(m.id_to_label))


def test_sorted_labels_keep_their_repeats_dense_or_spread():
    """``idmap.sort_labels`` (a count where labels are dense, a sort elsewhere) is np.sort."""
    rng = np.random.default_rng(7)
    for labels in (rng.integers(0, 500, 1000), rng.integers(0, 10**12, 1000), np.zeros(3, dtype=np.int64),
                   np.array([2**64 - 1, 5], dtype=np.uint64), np.zeros(0, dtype=np.int64), np.arange(9),
                   np.arange(9)[::-1], np.array([7])):
        labels = labels.astype(np.uint64)
        got = idmap.sort_labels(labels.copy())
        assert got.dtype == np.uint64 and np.array_equal(got, np.sort(labels))


def test_a_written_map_is_what_chromadb_itself_unpickles(small_palace):
    """``idmap.dumps`` writes the palace's own format (0.6: a PersistentData object whose
    state the C pickler writes behind hand-written opcodes; 1.x: a dict). chromadb's own
    unpickling, with the real class, reads every field back, ids shared between the two
    halves as chromadb's own pickle shares them, and chaosfix reads it back the same."""
    import pickle

    raw = faults.pickle_path(small_palace).read_bytes()
    m = idmap.loads(raw)
    m.max_seq_id = m.max_seq_id if m.fmt == "dict" else 7  # 0.6 writes the field only when set
    out = idmap.dumps(m)
    theirs = pickle.loads(out)  # noqa: S301 - chaosfix's own output, chromadb's own classes
    if chroma_major() == "0.6":
        from chromadb.segment.impl.vector.local_persistent_hnsw import PersistentData

        assert m.fmt == "object" and type(theirs) is PersistentData
        fields = vars(theirs)
    else:
        assert m.fmt == "dict" and type(theirs) is dict
        fields = theirs
    assert fields["id_to_label"] == m.id_to_label and fields["label_to_id"] == m.label_to_id
    assert fields["id_to_seq_id"] == m.id_to_seq_id and fields["max_seq_id"] == m.max_seq_id
    assert (fields["total_elements_added"], fields["dimensionality"]) == (m.total_elements_added, m.dimensionality)
    rid, mine = next(iter(fields["id_to_label"])), next(iter(m.id_to_label))
    shared = m.label_to_id[m.id_to_label[mine]] is mine  # 0.6's own pickle shares them
    assert (fields["label_to_id"][fields["id_to_label"][rid]] is rid) == shared
    assert shared or chroma_major() != "0.6"
    again = idmap.loads(out)
    assert (again.fmt, again.id_to_label, again.label_to_id, again.id_to_seq_id, again.max_seq_id) == (
        m.fmt, m.id_to_label, m.label_to_id, m.id_to_seq_id, m.max_seq_id)


seq_values = st.one_of(st.integers(-3, 3), st.integers(2**62, 2**64 - 1), st.integers(-(2**64) + 1, -(2**62)),
                       st.booleans())


@settings(max_examples=300, deadline=None)
@given(map_seqs=st.dictionaries(st.sampled_from("abcdef"), seq_values),
       sql_seqs=st.dictionaries(st.sampled_from("abcdefg"), seq_values),
       labelled=st.sets(st.sampled_from("abcdef")))
def test_index_ahead_is_its_definition(map_seqs, sql_seqs, labelled):
    """``index_ahead`` compares seq_ids in numpy when they fit an int64; whatever the
    values (wide, negative, bools, ids on one side only), it names exactly the ids whose
    map seq_id is above their SQL row's and that the map labels."""
    from chaosfix.palace.state import CollectionState

    m = idmap.IdMap("object", 3, 9, {i: n for n, i in enumerate(sorted(labelled))},
                    {n: i for n, i in enumerate(sorted(labelled))}, map_seqs, None, {})
    state = CollectionState.__new__(CollectionState)
    state.idmap, state.sql_rows, state.metadata_seq = m, sql_seqs, None
    want = sorted(rid for rid, seq in map_seqs.items()
                  if rid in sql_seqs and rid in labelled and isinstance(seq, int) and seq > sql_seqs[rid])
    assert state.index_ahead() == want
    top = max((v for v in map_seqs.values() if type(v) is int), default=0)
    state.metadata_seq = SeqValue(abs(top), "blob")  # (a max_seq_id past every map seq_id proves nothing)
    assert state.index_ahead() == want


@pytest.mark.skipif(chroma_major() != "0.6", reason="0.6 persists the index inside the add's transaction")
def test_index_ahead_survives_writes_that_reuse_the_rolled_back_seq_ids(tmp_path):
    """A kill before an upsert's commit leaves the index holding its vectors (INDEX_AHEAD);
    SQLite then issues the rolled-back seq_ids again, so after more writes the metadata
    segment's max_seq_id passes every seq_id in the map. A shortcut that trusted it
    reported this palace clean while chromadb served 100 wrong vectors (helper-32)."""
    spec = PalaceSpec(dim=16, sync_threshold=100, batch_size=50)
    p = fresh_palace(tmp_path / "palace", spec)
    assert apply_ops(p, spec, [{"op": "upsert", "start": 200, "count": 150, "version": 1}],
                     kill=faults.kill_point("before-commit")).killed
    assert apply_ops(p, spec, [{"op": "add", "start": 1000, "count": 300}]).ok
    st = check_palace(p).states[0]
    assert st.metadata_seq.value >= max(st.idmap.id_to_seq_id.values())
    assert check_palace(p).codes().get("INDEX_AHEAD", 0) >= 100, check_palace(p).codes()


@pytest.mark.parametrize("seq", [2**64, -(2**64), [1, [2]], "7"])
def test_a_seq_id_map_with_a_wide_int_or_a_nested_value_is_refused_or_read_whole(small_palace, seq):
    """id_to_seq_id's flat str -> int shape is judged in C; anything else (an int wider
    than 64 bits, a list, a string) still goes through the generic walk, which refuses
    the wide ints and reads the rest as values, in 0.6's object pickle (0.6 loads them);
    in 1.x's dict pickle they are refused too (1.x's loader fails on them)."""
    m = idmap.loads(faults.pickle_path(small_palace).read_bytes())
    m.id_to_seq_id = dict.fromkeys(m.id_to_label, 1)
    m.id_to_seq_id[next(iter(m.id_to_label))] = seq
    out = idmap.dumps(m)
    if isinstance(seq, int):
        with pytest.raises(idmap.UnreadablePickle, match="integer of 65 bits|not seq_ids"):
            idmap.loads(out)
    elif m.fmt == "dict":
        with pytest.raises(idmap.UnreadablePickle, match="not seq_ids"):
            idmap.loads(out)
    else:
        assert idmap.loads(out).id_to_seq_id == m.id_to_seq_id


def test_pickle_deleted(small_palace):
    faults.pickle_path(small_palace).unlink()
    assert codes(small_palace) == {"PICKLE_MISSING": 300}


def test_pickle_truncated(small_palace):
    faults.truncate(faults.pickle_path(small_palace), fraction=0.5)
    assert codes(small_palace) == {"PICKLE_UNREADABLE": 300}


def test_pickle_zero_filled(small_palace):
    p = faults.pickle_path(small_palace)
    faults.zero_fill(p, 0, p.stat().st_size)
    assert codes(small_palace) == {"PICKLE_UNREADABLE": 300}


def test_hostile_pickle_is_never_run(small_palace, tmp_path):
    marker = tmp_path / "PWNED"
    faults.hostile_payload(small_palace, marker)
    rep = check_palace(small_palace)
    assert rep.codes() == {"PICKLE_UNSAFE": 300}
    assert "open" in rep.findings[0].detail  # the refused global
    res = CliRunner().invoke(cli_main, ["check", str(small_palace), "--json"])
    assert res.exit_code == 4
    assert not marker.exists()


@pytest.mark.parametrize("factor, want", [(10, {}), (10**4, {"LINK_BLOAT": 1}), (10**6, {"LINK_BLOAT": 1})])
def test_sparse_link_lists_bloat(small_palace, factor, want):
    """Bloat is reported once the waste exceeds both 1 MiB and what the elements use:
    a 10x file of a 300-element index (28 KB) wastes no disk worth a finding."""
    f = faults.segment_file(small_palace, "link_lists.bin")
    faults.sparse_extend(f, factor)
    assert codes(small_palace) == want


@pytest.mark.parametrize("which", ["newest", "middle"])
@pytest.mark.parametrize("helper", ["child", "thread"])
def test_a_record_deleted_in_sql_leaves_stale_rows(small_palace, which, helper, monkeypatch):
    """A record's embeddings row deleted in SQL (by a tool, behind chromadb's back) leaves
    its metadata rows and full-text document: STALE_ROWS names its embeddings.id, the
    newest record's (the id chromadb's next add gets) or one in the middle (met once
    the records above it are deleted), beside the index entry it also left (HNSW_ONLY).
    The scans run beside quick_check, in its helper process (large files) or thread; the
    in-process fallback must not be needed."""
    import sqlite3

    from chaosfix.palace import sql as sql_mod

    monkeypatch.setattr(sql_mod, "QUICK_CHECK_CHILD_BYTES", 0 if helper == "child" else 1 << 40)
    asked_here = []
    real = sql_mod.PalaceSql.stale_rows

    def spy(self, answers=()):  # noqa: ANN001,ANN202
        asked_here.append([a is None for a in answers])
        return real(self, answers)

    monkeypatch.setattr(sql_mod.PalaceSql, "stale_rows", spy)

    con = sqlite3.connect(small_palace / "chroma.sqlite3")
    rid = con.execute("SELECT max(id) FROM embeddings" if which == "newest" else
                      "SELECT id FROM embeddings ORDER BY id LIMIT 1 OFFSET 150").fetchone()[0]
    con.execute("DELETE FROM embeddings WHERE id = ?", (rid,))
    con.commit()
    con.close()
    rep = check_palace(small_palace)
    # metadata (1.x: and array metadata) and full-text, each answered by the helper
    assert len(asked_here) == 1 and len(asked_here[0]) == (2 if chroma_major() == "0.6" else 3)
    assert not any(asked_here[0])
    deferred_agrees(small_palace, rep)
    assert rep.codes() == {"STALE_ROWS": 1, "HNSW_ONLY": 1}
    stale = next(f for f in rep.findings if f.code == "STALE_ROWS")
    assert stale.sample == [str(rid)] and stale.collection is None
    assert "1 record(s)' metadata rows and 1 full-text" in stale.detail


def test_emptied_embeddings_queue(small_palace):
    assert faults.empty_queue(small_palace) == 1
    # count = segments whose max_seq_id is ahead of the restarted WAL (vector + metadata)
    assert codes(small_palace) == {"QUEUE_RESET": 2}


def test_emptied_queue_then_writes_vanish(small_palace, small_spec):
    faults.empty_queue(small_palace)
    assert apply_ops(small_palace, small_spec, [{"op": "add", "start": 300, "count": 10}]).ok
    rep = check_palace(small_palace)
    assert rep.codes() == {"QUEUE_RESET": 2}  # seq_ids 1..10 sit below max_seq_id 300: skipped
    assert wal_rows(small_palace) == 0  # ...and purged at once: the WAL keeps restarting at 1
    assert len(rep.states[0].sql_rows) == 300  # the add "succeeded" and never appeared


@pytest.mark.parametrize("segment", ["vector", "metadata"])
def test_poisoned_max_seq_id(small_palace, segment):
    assert faults.poison_seq(small_palace, segment) > 2**53
    assert codes(small_palace) == {"POISONED_SEQ": 1}


def test_deleted_max_seq_id(small_palace):
    assert faults.delete_seq(small_palace, "vector") == 1
    # chromadb replays the WAL from 0 on open: the one row left is pending again
    assert codes(small_palace) == {"SEQ_MISSING": 1, "PENDING": 1}


@pytest.mark.parametrize("spill", [False, True])
def test_leftover_journal(small_palace, spill):
    """A writer killed mid-transaction. With ``spill`` its uncommitted deletions are in the
    db file itself; check must report the committed state (as chromadb will roll back)."""
    before = fingerprint(small_palace)
    journal = faults.leave_hot_journal(small_palace, spill=spill)
    after_kill = fingerprint(small_palace)
    assert (after_kill["chroma.sqlite3"][0] != before["chroma.sqlite3"][0]) == spill
    rep = check_palace(small_palace)
    assert rep.codes() == {"HOT_JOURNAL": 1}
    assert len(rep.states[0].sql_rows) == 300
    assert journal.is_file() and fingerprint(small_palace) == after_kill  # still hot, untouched


def test_a_killed_reads_copy_of_a_hot_journal_is_removed_by_the_next_one(small_palace, tmp_path, monkeypatch):
    """A hot journal is rolled back in a private copy in $TMPDIR. A check killed while it
    held one (here: SIGKILL, right after the copy) left it for good: 31 GB of a journal's
    data were found so, 9 hours after. The next read of such a palace removes the copies
    whose lock no process holds, and only those (helper-36: not by pid, which another pid
    namespace sharing $TMPDIR reuses; never a folder without the lock, such as a scenario
    named journal-99999's; and an odd name, "chaosfix-journal-²", crashed check)."""
    import fcntl

    from chaosfix.scratch import JOURNAL_SCRATCH, SCRATCH_LOCK

    faults.leave_hot_journal(small_palace, spill=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from chaosfix.palace import PalaceSql, palace_db
        sql = PalaceSql(palace_db(Path(sys.argv[1])))
        os.kill(os.getpid(), signal.SIGKILL)
    """), str(small_palace)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    (left,) = tmp.iterdir()
    assert left.name.startswith(JOURNAL_SCRATCH) and (left / "chroma.sqlite3").exists()  # (rolled back)
    held = tmp / f"{JOURNAL_SCRATCH}1-held"  # a live reader's (whatever its pid says): kept
    held.mkdir()
    fd = os.open(held / SCRATCH_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    unmarked = tmp / f"{JOURNAL_SCRATCH}99999-scenario"  # no lock file: not a reader's
    unmarked.mkdir()
    (tmp / f"{JOURNAL_SCRATCH}\u00b2").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    try:
        assert check_palace(small_palace).codes() == {"HOT_JOURNAL": 1}
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp.iterdir()) == sorted([held.name, unmarked.name, f"{JOURNAL_SCRATCH}\u00b2"])


def test_a_scratch_folder_whose_lock_cannot_be_made_is_not_left(tmp_path, monkeypatch):
    """No lock file (a full $TMPDIR): the folder would never be swept, so it goes at once."""
    from chaosfix import scratch

    real_open = os.open

    def no_lock(path, *a, **kw):  # noqa: ANN001, ANN202
        if os.path.basename(str(path)).startswith(scratch.SCRATCH_LOCK):  # (.lock.new, renamed once locked)
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "open", no_lock)
    with pytest.raises(OSError):
        scratch.Scratch(scratch.JOURNAL_SCRATCH)
    assert list(tmp_path.iterdir()) == []


# ---- the CLI contract -------------------------------------------------------------


def test_cli_contract_exit_codes_json_and_read_only(small_palace, tmp_path):
    healthy = small_palace
    damaged = copy_palace(small_palace, tmp_path / "damaged")
    faults.sparse_extend(faults.segment_file(damaged, "link_lists.bin"), 10**4)
    faults.leave_hot_journal(damaged, spill=True)
    faults.hostile_payload(damaged, tmp_path / "PWNED")
    prints = {p: fingerprint(p) for p in (healthy, damaged)}

    r = run_cli("check", str(healthy))
    assert r.returncode == 0, r.stderr
    assert "verdict: consistent" in r.stdout

    r = run_cli("check", str(damaged), "--json")
    assert r.returncode == 4, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == SCHEMA == "chaosfix.check/1"
    assert doc["consistent"] is False
    assert {f["code"] for f in doc["findings"]} == {"HOT_JOURNAL", "LINK_BLOAT", "PICKLE_UNSAFE"}
    for f in doc["findings"]:
        assert set(f) == {"code", "severity", "collection", "segment", "count", "sample", "detail"}
    assert isinstance(doc["collections"], list) and doc["palace"] == str(damaged)

    r = run_cli("check", str(healthy), "--json", "--collection", "mempalace_drawers")
    assert r.returncode == 0 and json.loads(r.stdout)["consistent"] is True

    for p in (healthy, damaged):
        assert fingerprint(p) == prints[p], "check changed a byte or an mtime"
    assert not (tmp_path / "PWNED").exists()

    for bad in (tmp_path / "nope", tmp_path, faults.segment_file(healthy, "header.bin")):
        r = run_cli("check", str(bad))
        assert r.returncode == 8
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stdout == ""
    r = run_cli("check", str(healthy), "--collection", "no_such_collection")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# ---- random damage: findings or one line, never a traceback, never a write ---------

TARGETS = ["chroma.sqlite3", "header.bin", "data_level0.bin", "length.bin", "link_lists.bin",
           "index_metadata.pickle"]


def _used_bytes(palace: Path, name: str) -> int:
    """How much of ``name`` a healthy reader depends on (truncation below it must be found)."""
    seg = faults.segment_dir(palace)
    h = parse_header((seg / "header.bin").read_bytes())
    return {
        "header.bin": HEADER_SIZE,
        "data_level0.bin": h.cur_element_count * h.size_data_per_element,
        "length.bin": 4 * h.cur_element_count,
        "link_lists.bin": (seg / "link_lists.bin").stat().st_size,
        "index_metadata.pickle": (seg / "index_metadata.pickle").stat().st_size,
    }.get(name, 0)


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flips"), st.integers(0, 2**16), st.integers(1, 64)),
    st.tuples(st.just("garbage"), st.integers(0, 2**16), st.integers(1, 3)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(TARGETS), how=damage)
def test_random_damage_never_crashes_or_writes(small_spec, target, how):
    src = template(small_spec)
    work = Path(tempfile.mkdtemp(prefix="chaosfix-hyp-"))
    try:
        p = copy_palace(src, work / "p")
        f = p / target if target == "chroma.sqlite3" else faults.segment_file(p, target)
        used = _used_bytes(p, target)
        kind = how[0]
        if kind == "truncate":
            new_size = faults.truncate(f, fraction=how[1])
            must_find = new_size < used
        elif kind == "flips":
            faults.bit_flips(f, how[1], how[2])
            must_find = False  # a flipped bit inside a vector or free space is undetectable
        else:
            faults.garbage_sectors(f, how[1], how[2])
            must_find = target in ("header.bin", "index_metadata.pickle")
        before = fingerprint(p)
        res = CliRunner().invoke(cli_main, ["check", str(p), "--json"])
        out, err = res.stdout, res.stderr
        assert res.exit_code in (0, 4, 8), (res.exit_code, err)
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert "Traceback" not in out + err
        assert "internal error" not in err, err  # unparseable data is a finding, not an exception
        if res.exit_code == 8:
            assert len(err.strip().splitlines()) == 1
        else:
            doc = json.loads(out)
            assert doc["schema"] == SCHEMA
            assert doc["consistent"] == (res.exit_code == 0)
        if must_find:
            assert res.exit_code != 0, f"{kind} of {target} went unnoticed"
        assert fingerprint(p) == before
        assert sorted(os.listdir(p)) == sorted(os.listdir(work / "p"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_palace_another_process_holds_locked_is_exit_8_never_corrupt(tmp_path):
    """A write transaction held longer than the read waits (a sqlite3 shell, a long import)
    was reported as SQLITE_CORRUPT (exit 4), and reconcile then advised restoring the file,
    which loses rows (helper-41). It is an operational error: exit 8, one line, "locked"."""
    p = fresh_palace(tmp_path / "p", PalaceSpec(drawers=20, dim=8, sync_threshold=10, batch_size=5))
    holder = sqlite3.connect(p / "chroma.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        runs = [run_cli(*args) for args in (["check", str(p)], ["reconcile", str(p), "--dry-run"])]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for res in runs:
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 8 and len(lines) == 1 and "is locked by another process" in lines[0], res.stderr
        assert "SQLITE_CORRUPT" not in res.stdout and "restore" not in res.stderr
    assert run_cli("check", str(p)).returncode == 0
