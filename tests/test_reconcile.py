"""``chaosfix reconcile`` repairs every damage of the foundation issue's list, loses nothing,
and proves it; leaves healthy palaces byte-identical; refuses when it must.

test_scenarios.py already runs the catalogue end to end (break -> reconcile -> reopen).
Here every damage goes through the CLI (in-process, CliRunner) and the test pins what the
catalogue does not: the exact dry-run plan (strategy, counts, vector sources), that the
dry run changes nothing, the pickle format written, max_elements, that labels are never
reused, the backup beside the palace, the SQL values written, idempotency; then the
palace is judged in a fresh process by chromadb's own API (workload.observe).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    HASH_EMBEDDER,
    SPEC,
    applicable,
    assert_consistent,
    assert_judged_by_chromadb,
    damaged_palace,
    fingerprint,
    hashes,
    header,
    reconcile,
    repair,
    run_cli,
    scratch_of,
    sql_rows,
)

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.cli import main as cli_main
from chaosfix.drawers import COLLECTION, drawer
from chaosfix.errors import OperationalError
from chaosfix.palace import idmap
from chaosfix.reconcile import safety
from chaosfix.reconcile.plan import chroma_capacity
from chaosfix.reconcile.safety import PalaceLock
from chaosfix.scenario import fixture
from chaosfix.workload import PalaceSpec, apply_ops, child_env, chroma_major, fresh_palace, template

FIXTURE_06 = fixture("palace-0.6.3-300.tar.gz")  # from the installed package, as scenarios use it

# What the dry run must plan for each damage (300-drawer palace, sync_threshold 100).
# sources: where the vectors of kept (index) and added rows come from.
SQL_WIPE = dict(strategy="rebuild", keep=0, add=300, remove_labels=300, remove_ids=0,
                sources={"wal": 1, "embedder": 299}, total=600)
PLANS: dict[str, dict] = {
    "lost-hnsw-writes": dict(codes={"SQL_ONLY": 150}, strategy="incremental", keep=300, add=150, remove_labels=0,
                             remove_ids=0, sources={"index": 300, "wal": 1, "embedder": 149}, total=450,
                             **{"0.6": dict(codes={"SQL_ONLY": 100, "PENDING": 50}, pending=50, seq={"vector": 450},
                                            sources={"index": 300, "wal": 51, "embedder": 99})}),
    "stale-sqlite": dict(codes={"HNSW_ONLY": 100}, strategy="incremental", keep=300, add=0, remove_labels=100,
                         remove_ids=100, sources={"index": 300}, total=400),
    "kill-after-hnsw": dict(codes={"HOT_JOURNAL": 1, "GHOST_LABEL": 100}, strategy="incremental", keep=300, add=0,
                            remove_labels=100, remove_ids=0, sources={"index": 300}, total=400),
    "kill-after-pickle": dict(codes={"HOT_JOURNAL": 1, "HNSW_ONLY": 100}, strategy="incremental", keep=300, add=0,
                              remove_labels=100, remove_ids=100, sources={"index": 300}, total=400),
    # which 50 rows lost their slots depends on slot order; the WAL's last row may be one
    "truncated-level0": dict(codes={"TORN": 1, "SQL_ONLY": 50}, strategy="rebuild", keep=250, add=50, remove_labels=0,
                             remove_ids=0, sources={"index": 250, "wal+embedder": 50}, total=350),
    "off-by-one": dict(codes={"OFF_BY_ONE": 1}, strategy="incremental", keep=300, add=0, remove_labels=0, remove_ids=0,
                       sources={"index": 300}, total=300),
    "map-drop-both": dict(codes={"SQL_ONLY": 1, "GHOST_LABEL": 1}, strategy="incremental", keep=299, add=1,
                          remove_labels=1, remove_ids=0, sources={"index": 299, "embedder": 1}, total=301),
    "map-drop-id_to_label": dict(codes={"SQL_ONLY": 1, "OFF_BY_ONE": 1}, strategy="incremental", keep=300, add=0,
                                 remove_labels=0, remove_ids=0, sources={"index": 300}, total=300),
    "map-drop-label_to_id": dict(codes={"GHOST_LABEL": 1, "OFF_BY_ONE": 1}, strategy="incremental", keep=300, add=0,
                                 remove_labels=0, remove_ids=0, sources={"index": 300}, total=300),
    "pickle-deleted": dict(codes={"PICKLE_MISSING": 300}, **SQL_WIPE),
    "pickle-truncated": dict(codes={"PICKLE_UNREADABLE": 300}, **SQL_WIPE),
    "pickle-zeroed": dict(codes={"PICKLE_UNREADABLE": 300}, **SQL_WIPE),
    "hostile-pickle": dict(codes={"PICKLE_UNSAFE": 300}, **SQL_WIPE),
    "link-bloat-300x": dict(codes={"LINK_BLOAT": 1}, strategy="rebuild", keep=300, add=0, remove_labels=0, remove_ids=0,
                            sources={"index": 300}, total=300),
    "emptied-queue": dict(codes={"QUEUE_RESET": 2}, strategy="none", floor=300),
    "poisoned-seq-vector": dict(codes={"POISONED_SEQ": 1}, strategy="none", seq={"vector": 300}),
    "poisoned-seq-metadata": dict(codes={"POISONED_SEQ": 1}, strategy="none", seq={"metadata": 300}),
    "deleted-seq": dict(codes={"SEQ_MISSING": 1, "PENDING": 1}, strategy="none", seq={"vector": 300}),
}


def expected(name: str) -> dict:
    exp = {k: v for k, v in PLANS[name].items() if k not in ("0.6", "1.x")}
    exp.update(PLANS[name].get(chroma_major(), {}))
    return exp


# ---- helpers -----------------------------------------------------------------------


def pickle_head(raw: bytes, n: int = 5) -> list[tuple[str, object]]:
    """The first ``n`` opcodes (name, arg) of a pickle, memo and frame bookkeeping skipped:
    PROTO 3 + EMPTY_DICT is the 1.x dict, PROTO 5 + the PersistentData global the 0.6 object."""
    skip = {"FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"}
    out = []
    for op, arg, _pos in pickletools.genops(raw):
        if op.name not in skip:
            out.append((op.name, arg))
        if len(out) == n:
            break
    return out


def seq_rows(palace: Path) -> dict[str, object]:
    """segment id -> the raw stored max_seq_id (bytes in 0.6, int in 1.x)."""
    con = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT segment_id, seq_id FROM max_seq_id"))
    finally:
        con.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---- every damage ------------------------------------------------------------------


@pytest.mark.parametrize("name", applicable())
def test_damage_is_repaired(name, tmp_path, damage_cache):
    exp = expected(name)
    p = damaged_palace(name, tmp_path / "palace", damage_cache)
    marker = scratch_of(tmp_path / "palace") / "PWNED"
    before = check_palace(p)
    assert before.codes() == exp["codes"]
    rows = sql_rows(p)
    seg = faults.segment_dir(p)
    old_seg, old_db, old_seqs = hashes(seg), sha(p / "chroma.sqlite3"), seq_rows(p)
    old_map = before.states[0].idmap
    old_labels = {i: lab for lab, i in old_map.label_to_id.items()} | old_map.id_to_label if old_map else {}
    old_max_elements = header(p).max_elements
    healthy_map = idmap.loads(faults.pickle_path(template(SPEC)).read_bytes())
    old_total = max(old_map.total_elements_added if old_map else 0, healthy_map.total_elements_added)
    old_pickle = faults.pickle_path(p).read_bytes() if faults.pickle_path(p).exists() else None
    prints, beside = fingerprint(p), listing(tmp_path)

    # the dry run: the plan, the exit code a real run will return, and not one byte changed
    code, doc, err = reconcile(p, "--dry-run", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    assert doc["schema"] == "chaosfix.reconcile/1" and doc["dry_run"] is True and doc["exit_code"] == 1
    (plan,) = doc["plans"]
    assert plan["collection"] == COLLECTION and plan["segment"] == seg.name
    assert plan["strategy"] == exp["strategy"]
    assert plan["unrepaired"] == 0 and plan["unrepaired_sample"] == []
    assert doc["queue_floor"] == exp.get("floor")
    if exp["strategy"] != "none":
        assert (plan["keep"], plan["add"], plan["replace"]) == (exp["keep"], exp["add"], 0)
        assert (plan["remove_labels"], plan["remove_ids"]) == (exp["remove_labels"], exp["remove_ids"])
        assert plan["pending_applied"] == exp.get("pending", 0)
        assert plan["total_elements_added"] == exp["total"]
        assert plan["pickle_format"] == ("object" if chroma_major() == "0.6" else "dict")
        src = dict(plan["sources"])
        if "wal+embedder" in exp["sources"]:
            src["wal+embedder"] = src.pop("wal", 0) + src.pop("embedder", 0)
        assert src == exp["sources"]
    else:
        assert (plan["keep"], plan["add"], plan["remove_labels"], plan["sources"]) == (0, 0, 0, {})
    kinds = {faults.segment_id(p, "vector"): "vector", faults.segment_id(p, "metadata"): "metadata"}
    want_seq = exp.get("seq", {})
    assert {kinds[w["segment"]]: w["value"] for w in plan["seq_writes"]} == want_seq
    assert fingerprint(p) == prints and listing(tmp_path) == beside, "the dry run changed something"

    # the repair
    doc = repair(p, "--embedder", HASH_EMBEDDER)
    assert doc["dry_run"] is False and doc["exit_code"] == 1 and doc["after_consistent"] is True
    assert not marker.exists(), "the hostile pickle's payload ran"
    (plan,) = doc["plans"]
    assert plan["strategy"] == exp["strategy"]
    backup = Path(doc["backup"])
    assert backup.parent == tmp_path and backup.name.startswith("palace.chaosfix-backup-")
    assert set(listing(tmp_path)) == {*beside, backup.name}
    assert not [n for n in listing(p) if n.startswith(".chaosfix")], listing(p)
    if exp["strategy"] != "none":
        v = doc["verification"][COLLECTION]
        assert v["ok"] and v["zero_diff"] and v["ids"] == rows and v["queried"] >= exp["add"]
        assert hashes(backup / seg.name) == old_seg, "the backup must hold the old segment as it was"
        new_raw = faults.pickle_path(p).read_bytes()
        assert pickle_head(new_raw) == pickle_head(faults.pickle_path(template(SPEC)).read_bytes())
        new = idmap.loads(new_raw)
        assert set(new.id_to_label) == set(before.states[0].sql_rows)
        fresh = {i: lab for i, lab in new.id_to_label.items() if old_labels.get(i) != lab}
        assert len(fresh) == exp["add"]
        assert all(lab > old_total for lab in fresh.values()), "a label was reused"
        assert new.total_elements_added == exp["total"] >= max(new.label_to_id) and new.total_elements_added >= old_total
        h = header(p)
        assert h.cur_element_count >= rows
        if exp["strategy"] == "rebuild":
            assert h.max_elements == chroma_capacity(rows)
        else:
            # the loaded index keeps its capacity unless the adds need more (as chromadb grows it)
            assert old_max_elements <= h.max_elements <= max(old_max_elements, chroma_capacity(h.cur_element_count))
    else:
        assert hashes(seg) == old_seg and faults.pickle_path(p).read_bytes() == old_pickle
    seqs = seq_rows(p)
    for kind, value in want_seq.items():
        sid = faults.segment_id(p, kind)
        raw = seqs[sid]
        assert type(raw) is type(old_seqs.get(sid, raw)), "max_seq_id must keep the palace's encoding"
        assert (int.from_bytes(raw, "big") if isinstance(raw, bytes) else raw) == value
    if want_seq or "floor" in exp:
        assert sha(backup / "chroma.sqlite3") == old_db, "SQL changed: the backup must hold the old chroma.sqlite3"
    if "floor" in exp:
        con = sqlite3.connect(f"file:{p / 'chroma.sqlite3'}?mode=ro", uri=True)
        assert con.execute("SELECT max(seq_id) FROM embeddings_queue").fetchone() == (exp["floor"],)
        con.close()
    if "HOT_JOURNAL" in exp["codes"]:
        assert not (p / "chroma.sqlite3-journal").exists() and (backup / "chroma.sqlite3-journal").exists()
    assert sql_rows(p) == rows
    assert_consistent(p)
    code, again, err = reconcile(p, "--embedder", HASH_EMBEDDER)
    assert code == 0, (err, again and again["plans"])

    # judged by chromadb in a fresh process; then chromadb's own writes are no finding
    assert_judged_by_chromadb(p, rows)
    assert not marker.exists()
    assert_consistent(p)
    assert reconcile(p)[0] == 0


# ---- strategy, format, sizing --------------------------------------------------------


def test_forced_rebuild_and_impossible_incremental(tmp_path, damage_cache):
    p = damaged_palace("lost-hnsw-writes", tmp_path / "a", damage_cache)
    rows = sql_rows(p)
    doc = repair(p, "--strategy", "rebuild", "--embedder", HASH_EMBEDDER)
    (plan,) = doc["plans"]
    assert plan["strategy"] == "rebuild" and (plan["keep"], plan["add"]) == (300, 150)
    assert header(p).max_elements == chroma_capacity(rows)
    assert_consistent(p)  # (rebuilds are judged by chromadb in test_damage_is_repaired)

    # incremental cannot work from torn files or a lost map: the plan says rebuild, and why
    for name in ("truncated-level0", "pickle-deleted", "link-bloat-300x"):
        q = damaged_palace(name, tmp_path / name, damage_cache)
        code, doc, err = reconcile(q, "--dry-run", "--strategy", "incremental", "--embedder", HASH_EMBEDDER)
        (plan,) = doc["plans"]
        assert code == 1 and plan["strategy"] == "rebuild", (name, plan)
        assert plan["reasons"], plan


def test_link_bloat_with_forced_incremental_is_fixed(tmp_path, damage_cache):
    """--strategy incremental must not report 'nothing to do' while LINK_BLOAT remains."""
    p = damaged_palace("link-bloat-300x", tmp_path / "palace", damage_cache)
    repair(p, "--strategy", "incremental")
    assert_consistent(p)


def test_06_palace_keeps_object_pickle_and_blob_seq(tmp_path):
    """A palace written by chromadb 0.6.3 (object pickle, 8-byte blob max_seq_id), repaired
    under either chromadb: the pickle stays a PersistentData object, seq_ids stay blobs, and
    the installed chromadb reads it."""
    import tarfile

    p = tmp_path / "palace"
    with FIXTURE_06.open("rb") as raw, tarfile.open(fileobj=raw) as tf:
        tf.extractall(p, filter="data")
    template_head = pickle_head(faults.pickle_path(p).read_bytes())
    assert template_head[0] == ("PROTO", 5) and template_head[3][0] == "STACK_GLOBAL"
    faults.off_by_one(p)
    faults.poison_seq(p, "vector")
    rows = sql_rows(p)
    doc = repair(p)
    (plan,) = doc["plans"]
    assert plan["pickle_format"] == "object" and plan["strategy"] == "incremental"
    assert pickle_head(faults.pickle_path(p).read_bytes()) == template_head
    raw = seq_rows(p)[faults.segment_id(p, "vector")]
    assert isinstance(raw, bytes) and int.from_bytes(raw, "big") == 300
    assert_consistent(p)
    assert_judged_by_chromadb(p, rows)


# ---- backups -----------------------------------------------------------------------


def test_backup_of_bloated_segment_allocates_no_extra_blocks(tmp_path, damage_cache):
    p = damaged_palace("link-bloat-300x", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "metadata")  # an SQL change too: chroma.sqlite3 is backed up
    links = faults.segment_file(p, "link_lists.bin")
    size, blocks = links.stat().st_size, faults.allocated_bytes(links)
    assert size > 100 * blocks  # sparse: the apparent size is 300x
    seg = links.parent.name

    def used(folder: Path) -> int:
        return sum(faults.allocated_bytes(f) for f in folder.rglob("*") if f.is_file())

    total_before = used(tmp_path)
    doc = repair(p)
    backup = Path(doc["backup"])
    kept = backup / seg / "link_lists.bin"
    assert kept.stat().st_size == size and faults.allocated_bytes(kept) <= blocks
    assert (backup / "chroma.sqlite3").stat().st_size == (p / "chroma.sqlite3").stat().st_size
    new_seg = sum(faults.allocated_bytes(f) for f in faults.segment_dir(p).iterdir())
    db = faults.allocated_bytes(p / "chroma.sqlite3")
    assert used(tmp_path) <= total_before + new_seg + db, "the backup filled the disk"
    assert_consistent(p)


def test_no_backup_leaves_none(tmp_path, damage_cache):
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    beside = listing(tmp_path)
    doc = repair(p, "--no-backup", "--embedder", HASH_EMBEDDER)
    assert doc["backup"] is None
    assert listing(tmp_path) == beside
    assert not [n for n in listing(p) if n.startswith(".chaosfix")]
    assert_consistent(p)


# ---- palaces with nothing to do are left byte-identical ------------------------------


@pytest.mark.parametrize("kind", ["healthy", "after-deletes", "never-persisted"])
def test_nothing_to_do_is_byte_identical(kind, tmp_path):
    spec = PalaceSpec(drawers=50) if kind == "never-persisted" else SPEC
    p = fresh_palace(tmp_path / "palace", spec)
    if kind == "after-deletes":
        assert apply_ops(p, spec, [{"op": "delete", "start": 0, "count": 120}]).ok
    prints, beside = fingerprint(p), listing(tmp_path)
    for args in ([], ["--embedder", HASH_EMBEDDER], ["--strategy", "incremental"]):
        code, doc, err = reconcile(p, *args)
        assert code == 0, (err, doc)
        assert doc["backup"] is None and all(pl["strategy"] == "none" for pl in doc["plans"])
    assert fingerprint(p) == prints, "a palace with nothing to do was changed"
    assert listing(tmp_path) == beside


# ---- orphan segment folders: reported, moved to the backup only on request -----------


def test_orphan_folder_is_info_with_its_size_and_pruned_on_request(tmp_path):
    """A folder chromadb left after replacing a segment (e.g. after `mempalace repair`) is
    never read: info with its size, exit 0; --prune-orphan-dirs moves it to the backup."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    orphan = p / "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    shutil.copytree(seg, orphan)
    quarantine = p / f"{seg.name}.corrupt-20261130-101010"
    shutil.copytree(seg, quarantine)
    prints = fingerprint(p)
    rep = check_palace(p)
    assert rep.consistent and {f.code: f.severity for f in rep.findings} == {
        "SEGMENT_DIR_ORPHAN": "info", "QUARANTINED": "info"}
    (f,) = [f for f in rep.findings if f.code == "SEGMENT_DIR_ORPHAN"]
    assert f.sample == [orphan.name] and re.match(r"[0-9.]+ [KM]B on disk", f.detail), f.detail
    assert run_cli("check", str(p)).returncode == 0
    code, doc, _ = reconcile(p)
    assert code == 0 and not doc["left"] and "prune-orphan-dirs" in doc["notes"][0]
    assert fingerprint(p) == prints  # reported, not touched
    shutil.rmtree(quarantine)  # (quarantined copies are left alone; tests/test_quarantine.py)
    code, doc, _ = reconcile(p, "--prune-orphan-dirs", "--no-chromadb-check")
    assert code == 1 and not orphan.exists()
    assert (Path(doc["backup"]) / orphan.name / "data_level0.bin").is_file()  # moved, not deleted
    assert_consistent(p)
    assert reconcile(p)[0] == 0


# ---- no source, no embedder: exit 4, the rest fixed, the rows listed -----------------


def test_orphans_without_source_are_listed_and_the_rest_fixed(tmp_path, damage_cache):
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.off_by_one(p)
    faults.poison_seq(p, "metadata")
    rows = sql_rows(p)
    st = check_palace(p).states[0]
    with_wal = {w.id for w in st.pending}
    from chaosfix.palace import PalaceSql

    sql = PalaceSql(p / "chroma.sqlite3")
    try:
        with_wal |= {w.id for w in sql.wal(st.info.id, above=0, with_vectors=True) if w.vector is not None}
    finally:
        sql.close()
    orphans = sorted(set(st.sql_only()) - with_wal)
    assert len(orphans) == (99 if chroma_major() == "0.6" else 149)

    code, doc, err = reconcile(p, "--dry-run")
    assert code == 4 and doc["exit_code"] == 4
    twin = shutil.copytree(p, tmp_path / "twin", symlinks=True)  # the same partial repair, as text
    # with chromadb's post-check, which judges the palace to be before the swap: the rows
    # left out are listed (exit 4), not counted against the repair of the rest
    text = CliRunner().invoke(cli_main, ["reconcile", str(twin)])
    assert text.exit_code == 4 and "zero-diff, self-query ok" not in text.stdout, text.stdout
    assert re.search(r"chromadb \S+ post-check: ok", text.stdout), text.stdout
    assert f"no zero-diff ({len(orphans)} rows left out)" in text.stdout, text.stdout
    assert f"verdict: partly repaired; left: {len(orphans)} rows with no vector source" in text.stdout
    code, doc, err = reconcile(p, "--no-chromadb-check")
    assert code == 4, err
    (plan,) = doc["plans"]
    assert plan["unrepaired"] == len(orphans)
    assert sorted(plan["unrepaired_ids"]) == orphans, "every unrepaired row must be listed in the JSON"
    assert plan["seq_writes"] and doc["after_consistent"] is False
    for v in doc["verification"].values():  # the rebuilt index is right, but SQL ids != index ids
        assert v["ok"] and v["zero_diff"] is False and v["unrepaired"] == len(orphans)
    # everything else is fixed: only the orphans remain, no row was dropped to hide them
    after = check_palace(p)
    assert {k: v for k, v in after.codes().items() if k != "PENDING"} == {"SQL_ONLY": len(orphans)}
    assert sorted(after.states[0].sql_only()) == orphans
    assert sql_rows(p) == rows
    text = CliRunner().invoke(cli_main, ["reconcile", str(p), "--no-chromadb-check"])
    assert text.exit_code == 4 and "pass --embedder" in text.stdout
    assert f"nothing repaired; left: {len(orphans)} rows with no vector source" in text.stdout, text.stdout
    assert "zero-diff, self-query ok" not in text.stdout

    # with an embedder the rest is repaired too
    doc = repair(p, "--embedder", HASH_EMBEDDER)
    assert doc["plans"][0]["add"] == len(orphans)
    assert_consistent(p)
    assert_judged_by_chromadb(p, rows)


# ---- safety: refuse, in one line, and touch nothing -----------------------------------


def assert_refused(palace: Path, *args: str, want: str, child: bool = False, code_wanted: int = 8) -> None:
    """exit 8 (or ``code_wanted``), one line on stderr naming ``want``, nothing on stdout,
    nothing changed. ``child``: run the real command in another process (else in-process,
    CliRunner)."""
    prints = fingerprint(palace)
    beside = listing(palace.parent)
    if child:
        r = run_cli("reconcile", str(palace), *args)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        res = CliRunner().invoke(cli_main, ["reconcile", str(palace), *args])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        code, out, err = res.exit_code, res.stdout, res.stderr
    assert code == code_wanted, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert want in lines[0], lines[0]
    assert out == ""
    assert fingerprint(palace) == prints and listing(palace.parent) == beside


HOLD_FILE = textwrap.dedent("""
    import sys, time
    f = open(sys.argv[1], "rb")
    print("ready", flush=True)
    time.sleep(600)
""")
HOLD_CHROMADB = textwrap.dedent("""
    import sys, time
    import chromadb
    from chromadb.config import Settings
    client = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))
    col = client.get_collection(sys.argv[2])
    col.count()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("holder", ["file", "chromadb"])
def test_refuses_while_another_process_has_the_palace_open(holder, tmp_path):
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.off_by_one(p)
    code = HOLD_FILE if holder == "file" else HOLD_CHROMADB
    args = [str(p / "chroma.sqlite3")] if holder == "file" else [str(p), COLLECTION]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env())
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        assert_refused(p, "--no-chromadb-check", want=str(proc.pid), child=True)
        # the dry run answers what the real run would (exit 8, the same reason)
        r = run_cli("reconcile", str(p), "--dry-run", "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 8 and doc["exit_code"] == 8 and str(proc.pid) in doc["refusal"], (r.stdout, r.stderr)
    finally:
        proc.kill()
        proc.communicate()
    assert reconcile(p, "--no-chromadb-check")[0] == 1  # once it is closed


def test_refuses_while_another_chaosfix_holds_the_lock(tmp_path):
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.off_by_one(p)
    with PalaceLock(p):
        assert_refused(p, "--no-chromadb-check", want="another chaosfix holds the palace lock", child=True)
    assert reconcile(p, "--no-chromadb-check")[0] == 1


DYING_HOLDER = """
import os, signal, sys, time
from pathlib import Path
from chaosfix.reconcile.safety import PalaceLock
PalaceLock(Path(sys.argv[1])).__enter__()
pid = os.fork()  # the child has the lock's open file, as one between fork and exec has
if pid == 0:
    for fd in (1, 2):  # (the caller reads the parent's output to its end)
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    time.sleep(float(sys.argv[2]))
    os._exit(0)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (a zombie counts: it is another parent's to reap)."""
    deadline = time.monotonic() + 60
    while not safety._gone(pid):
        assert time.monotonic() < deadline, pid
        time.sleep(0.02)


def _killed_holder(palace: Path, child_holds: float, reap: bool = True) -> tuple[int, subprocess.Popen]:
    """A process that took the palace lock, forked, and was SIGKILLed (reaped here unless
    ``reap`` is False: then a zombie); returns the PID of its child, which still has the
    lock's file open, and the killed process."""
    proc = subprocess.Popen([sys.executable, "-c", DYING_HOLDER, str(palace), str(child_holds)],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.stdout.close()
    _wait_gone(proc.pid)  # (dead: a zombie, not reaped yet)
    if reap:
        assert proc.wait(timeout=60) == -9
    return child, proc


def _held(palace: Path) -> bool:
    import fcntl

    fd = os.open(palace / ".chaosfix.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_rerun_right_after_a_killed_chaosfix_waits_for_its_lock_to_be_let_go(tmp_path):
    """A SIGKILLed reconcile's lock outlives it while a child it was forking still has the
    file open (CI saw a rerun refused so, exit 8). The lock names its holder's PID: a dead
    holder's lock is waited for (bounded), dead whether reaped or a zombie."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.off_by_one(p)
    for reap in (True, False):
        child, proc = _killed_holder(p, 1.0, reap=reap)
        assert _held(p)  # (the old code refused here)
        with PalaceLock(p):
            assert safety._gone(child)
        proc.wait(timeout=60)
    _killed_holder(p, 1.5)
    assert _held(p)
    code, _doc, err = reconcile(p, "--no-chromadb-check")  # the command, at once
    assert code == 1, err
    assert_consistent(p)


def test_a_dead_holders_lock_kept_by_another_process_is_refused_after_a_bounded_wait(tmp_path):
    """The wait is bounded: a process that keeps the dead holder's lock for good (a
    forked child that never exits) gets the usual refusal after ``DYING_WAIT``; one that
    holds the lock without naming itself (an old chaosfix) is refused at once."""
    import fcntl

    child, _ = _killed_holder(tmp_path, 60)
    try:
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="another chaosfix holds the palace lock"):
            PalaceLock(tmp_path).__enter__()
        assert PalaceLock.DYING_WAIT <= time.monotonic() - t0 < PalaceLock.DYING_WAIT + 5
    finally:
        os.kill(child, 9)
    _wait_gone(child)
    for planted in (b"", b"99999999999999999", b"-1", b"\xff" * 16):
        (tmp_path / ".chaosfix.lock").write_bytes(planted)
        fd = os.open(tmp_path / ".chaosfix.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            t0 = time.monotonic()
            with pytest.raises(OperationalError, match="another chaosfix holds the palace lock"):
                PalaceLock(tmp_path).__enter__()
            assert time.monotonic() - t0 < 1, planted
        finally:
            os.close(fd)


def test_the_lock_never_writes_through_a_hard_link_planted_as_its_file(tmp_path):
    """The holder writes its PID into ``.chaosfix.lock``: a palace whose lock file is a
    second name of a file elsewhere must not have that file overwritten."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.off_by_one(p)
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"a user's notes, not a lock\n")
    os.link(victim, p / ".chaosfix.lock")
    code, _doc, err = reconcile(p, "--no-chromadb-check")
    assert code == 1, err
    assert victim.read_bytes() == b"a user's notes, not a lock\n"
    assert_consistent(p)


def test_lock_is_not_shared_after_an_unlink_race(tmp_path, monkeypatch):
    """A holds the lock; B opens the lock file; A exits (unlinking it); C locks a new file;
    then B's flock on the unlinked inode succeeds. B must notice and refuse, not run
    beside C."""
    from chaosfix.errors import OperationalError

    a = PalaceLock(tmp_path).__enter__()
    real_flock = safety.fcntl.flock
    held: list[PalaceLock] = []
    raced = []

    def racing_flock(fd, op):
        if not raced:
            raced.append(True)
            a.__exit__(None, None, None)
            held.append(PalaceLock(tmp_path).__enter__())  # C
        return real_flock(fd, op)

    monkeypatch.setattr(safety.fcntl, "flock", racing_flock)
    with pytest.raises(OperationalError, match="another chaosfix holds the palace lock"):
        PalaceLock(tmp_path).__enter__()  # B
    monkeypatch.undo()
    held[0].__exit__(None, None, None)
    with PalaceLock(tmp_path):
        pass


def test_rolls_back_a_hot_journal_in_one_run(tmp_path):
    """A synced journal means chroma.sqlite3 may hold uncommitted pages. SQLite's own
    rollback (what chromadb's next open does) is safe, so reconcile does it itself after
    copying the db and the journal into the backup, then repairs the rest in the same run."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    rows = sql_rows(p)
    faults.off_by_one(p)
    journal = faults.leave_hot_journal(p, spill=True)
    hot_db, hot_journal = sha(p / "chroma.sqlite3"), sha(journal)
    assert check_palace(p).codes().keys() >= {"HOT_JOURNAL", "OFF_BY_ONE"}
    prints = fingerprint(p)
    code, doc, err = reconcile(p, "--dry-run")
    assert code == 1 and doc["journal_rollback"] is True, err
    assert fingerprint(p) == prints, "the dry run changed something"

    doc = repair(p)
    assert doc["journal_rollback"] is True and doc["after_consistent"] is True
    backup = Path(doc["backup"])
    assert sha(backup / "chroma.sqlite3") == hot_db and sha(backup / "chroma.sqlite3-journal") == hot_journal
    assert not journal.exists()
    assert sql_rows(p) == rows
    assert_consistent(p)
    assert reconcile(p)[0] == 0
    assert_judged_by_chromadb(p, rows)


def _delete_newest_record_in_sql(p: Path, metadata_too: bool) -> int:
    """What a tool that deletes records in SQL does: the newest record's embeddings row
    (and, if ``metadata_too``, its metadata rows) goes; its full-text document stays."""
    con = sqlite3.connect(p / "chroma.sqlite3")
    try:
        top = con.execute("SELECT max(id) FROM embeddings").fetchone()[0]
        if metadata_too:
            con.execute("DELETE FROM embedding_metadata WHERE id = ?", (top,))
        con.execute("DELETE FROM embeddings WHERE id = ?", (top,))
        con.commit()
    finally:
        con.close()
    return top


@pytest.mark.parametrize("metadata_too", [False, True], ids=["metadata+fulltext-left", "fulltext-left"])
def test_leftovers_of_a_record_deleted_in_sql_are_deleted_and_the_next_add_lands(metadata_too, tmp_path):
    """A record deleted in SQL behind chromadb's back leaves rows keyed by its
    embeddings.id, which chromadb gives the next add: 1.5.9 then fails to apply that add
    ("Failed to apply logs to the metadata segment"; every later write and count() fail
    too), 0.6.3 gives the new record the deleted one's metadata. check names STALE_ROWS;
    reconcile, its chromadb post-check (which adds a record with a document) included,
    deletes the leftovers only, and chromadb's next add lands with its own metadata."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    top = _delete_newest_record_in_sql(p, metadata_too)
    rows, meta_rows, leftover = sql_rows(p), _count(p, "embedding_metadata"), _count(p, "embedding_metadata", top)
    assert leftover == (0 if metadata_too else 4)  # wing, room, n, chroma:document
    assert check_palace(p).codes() == {"STALE_ROWS": 1, "HNSW_ONLY": 1}
    prints = fingerprint(p)
    code, doc, err = reconcile(p, "--dry-run")
    assert code == 1 and doc["stale_rows"] == {"ids": 1, "metadata": int(not metadata_too), "fulltext": 1}, err
    assert fingerprint(p) == prints, "the dry run changed something"

    code, doc, err = reconcile(p)
    assert code == 1 and doc["chromadb"]["ok"] is True, (err, doc and doc["chromadb"])
    assert sql_rows(p) == rows  # no record row touched
    assert _count(p, "embedding_metadata") == meta_rows - leftover
    assert sha(Path(doc["backup"]) / "chroma.sqlite3") == prints["chroma.sqlite3"][0]
    assert_consistent(p)
    assert reconcile(p)[0] == 0
    assert_judged_by_chromadb(p, SPEC.drawers - 1)  # its probe add lands (and has a document)
    con = sqlite3.connect(p / "chroma.sqlite3")
    try:
        got = con.execute("SELECT m.key, coalesce(m.string_value, m.int_value) FROM embedding_metadata m "
                          "JOIN embeddings e ON e.id = m.id WHERE e.embedding_id = ?",
                          (drawer(10**9 + 7)[0],)).fetchall()
        new_id = con.execute("SELECT id FROM embeddings WHERE embedding_id = ?", (drawer(10**9 + 7)[0],)).fetchone()
    finally:
        con.close()
    _, doc_text, meta = drawer(10**9 + 7)
    assert new_id == (top,)  # the id the leftovers held
    assert dict(got) == {**meta, "chroma:document": doc_text}  # its own metadata, nothing inherited


_DELETE_COLLECTION_WITH_ARRAYS = """
import sys, chromadb
client = chromadb.PersistentClient(path=sys.argv[1])
col = client.create_collection("scratch", embedding_function=None)
col.add(ids=["x1", "x2", "x3"], embeddings=[[0.1] * 4] * 3, metadatas=[{"tags": ["a", "b"]}] * 3, documents=["d"] * 3)
client.delete_collection("scratch")
"""


@pytest.mark.skipif(chroma_major() == "0.6", reason="array metadata is 1.x's (embedding_metadata_array)")
def test_array_metadata_chromadb_left_behind_is_deleted_and_not_inherited(tmp_path):
    """chromadb 1.5.9's own delete_collection leaves the deleted records' array metadata
    (embedding_metadata_array, keyed by embeddings.id; found by a review subagent): the
    next add gets the id and inherits the tags. check names STALE_ROWS; reconcile deletes
    them, and chromadb's next add carries its own metadata alone."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    subprocess.run([sys.executable, "-c", _DELETE_COLLECTION_WITH_ARRAYS, str(p)], check=True, env=child_env())
    assert _count(p, "embedding_metadata_array") == 6  # 3 records x 2 tags, their records gone
    orphan = {"SEGMENT_DIR_ORPHAN": 1}  # (info: the deleted collection's folder, left by chromadb too)
    assert check_palace(p).codes() == {"STALE_ROWS": 3, **orphan}
    code, doc, err = reconcile(p)
    assert code == 1 and doc["chromadb"]["ok"] is True, (err, doc and doc["chromadb"])
    assert doc["stale_rows"] == {"ids": 3, "metadata": 3, "fulltext": 0} and doc["backup"]
    assert _count(p, "embedding_metadata_array") == 0
    assert check_palace(p).codes() == orphan
    assert apply_ops(p, SPEC, [{"op": "add", "start": SPEC.drawers, "count": 3}]).ok
    assert _count(p, "embedding_metadata_array") == 0  # the new records inherited no tags


def test_a_full_text_index_that_refuses_the_delete_leaves_its_documents_and_the_rest_is_repaired(tmp_path):
    """A damaged FTS5 index (quick_check does not read inside it) refuses the delete of a
    leftover document (found by a review subagent: it failed every SQL write of the run,
    after the swap, on every rerun). Now the delete runs under a savepoint: the document
    is left and named (exit 4), the rest of the repair lands."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    _delete_newest_record_in_sql(p, metadata_too=True)
    con = sqlite3.connect(p / "chroma.sqlite3")
    con.execute("UPDATE embedding_fulltext_search_data SET block = x'ffffffffffffffffffff' WHERE id = 10")
    con.commit()
    con.close()
    assert check_palace(p).codes() == {"STALE_ROWS": 1, "HNSW_ONLY": 1}
    code, doc, err = reconcile(p, "--no-chromadb-check")
    assert code == 4, err
    assert any(x.startswith("STALE_ROWS: 1 full-text document(s)") for x in doc["left"]), doc["left"]
    assert check_palace(p).codes() == {"STALE_ROWS": 1}  # the index entry went; the document stayed


def _count(p: Path, table: str, rid: int | None = None) -> int:
    con = sqlite3.connect(p / "chroma.sqlite3")
    try:
        if rid is not None:
            return con.execute(f"SELECT count(*) FROM {table} WHERE id = ?", (rid,)).fetchone()[0]
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("ref, want", [
    ("chaosfix.embedder", "expected MODULE:ATTR"),
    ("no_such_module_xyz:Embed", "no_such_module_xyz"),
    ("chaosfix.embedder:NoSuchEmbedder", "NoSuchEmbedder"),
    ("chaosfix.embedder:DEFAULT_DIM", "not callable"),
])
def test_bad_embedder_is_one_line(ref, want, tmp_path):
    """A reference that names nothing this interpreter can call is a bad argument: exit 2
    (it was 8, an operational error), before anything is read or changed."""
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.pickle_path(p).unlink()
    assert_refused(p, "--embedder", ref, want=want, code_wanted=2)


def test_embedder_of_the_wrong_dimension_is_one_line(tmp_path, monkeypatch):
    p = fresh_palace(tmp_path / "palace", SPEC)
    faults.pickle_path(p).unlink()
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "tiny_embedder_for_test.py").write_text("def embed(docs):\n    return [[0.5] * 8 for _ in docs]\n")
    monkeypatch.syspath_prepend(str(mod))
    assert_refused(p, "--embedder", "tiny_embedder_for_test:embed", "--no-chromadb-check", want="384")


def test_cli_is_one_line_for_not_a_palace(tmp_path):
    r = run_cli("reconcile", str(tmp_path / "nope"))
    assert r.returncode == 8 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    res = CliRunner().invoke(cli_main, ["reconcile", str(tmp_path)])
    assert res.exit_code == 8 and len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""



def test_post_check_child_started_ahead_takes_any_path(tmp_path):
    """The child started ahead gets its spec's path on stdin, as one JSON string: a palace
    path with a newline and leading spaces reaches it whole."""
    from chaosfix.chromadb_probe import StartedChild, Target, verify_with_chromadb

    p = fresh_palace(tmp_path / "  pal\nace" / "palace", SPEC)
    gen = check_palace(p).generation
    some = [drawer(i)[0] for i in range(0, SPEC.drawers, 7)]
    res = verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=some, expect_count=SPEC.drawers)], gen,
                               started=StartedChild(None))
    assert res["ok"] is True and res["collections"][COLLECTION]["probe_found"], res
    assert res["seconds"]["chromadb_start"] is not None


def test_chromadb_post_check_can_fail(tmp_path):
    """The post-check's verdict is its own, on a copy: a collection chromadb cannot open fails it."""
    from chaosfix.chromadb_probe import Target, verify_with_chromadb

    p = fresh_palace(tmp_path / "palace", SPEC)
    gen = check_palace(p).generation
    assert verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=["drawer_x"])], gen)["ok"] is False
    some = [drawer(i)[0] for i in range(0, SPEC.drawers, 7)]
    good = verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=some, expect_count=SPEC.drawers)], gen)
    assert good["ok"] is True and good["collections"][COLLECTION]["probe_found"], good
    bad = verify_with_chromadb(p, [Target("no-such-collection", "cosine")], gen)
    assert bad["ok"] is False and bad["collections"]["no-such-collection"]["errors"]


def test_post_check_compares_every_repaired_rows_vector(tmp_path):
    """chromadb returns each repaired row's embedding, compared with what chaosfix planned
    as the batches arrive (the child keeps only the self-queried ones): one wrong vector
    and one row chromadb does not have fail the check, and name the rows."""
    from chaosfix.chromadb_probe import Target, verify_with_chromadb
    from chaosfix.embedder import embed_text

    p = fresh_palace(tmp_path / "palace", SPEC)
    gen = check_palace(p).generation
    rows = [drawer(i) for i in range(0, SPEC.drawers, 3)]
    planned = {rid: embed_text(doc, SPEC.dim) for rid, doc, _ in rows}
    good = verify_with_chromadb(p, [Target(COLLECTION, "cosine", planned, expect_count=SPEC.drawers)], gen)
    c = good["collections"][COLLECTION]
    assert good["ok"] and c["wrong_vector_count"] == 0 and c["missing_count"] == 0, good
    assert c["queried"] == min(len(planned), 500)
    wrong = rows[len(rows) // 2][0]
    planned[wrong] = -planned[wrong]
    planned["drawer_not_in_the_palace"] = planned[rows[0][0]]
    bad = verify_with_chromadb(p, [Target(COLLECTION, "cosine", planned, expect_count=SPEC.drawers)], gen)
    c = bad["collections"][COLLECTION]
    assert not bad["ok"] and c["wrong_vectors"] == [wrong] and c["missing"] == ["drawer_not_in_the_palace"], bad


def test_post_check_compares_a_rebuilds_kept_sample(tmp_path):
    """A rebuild re-inserts every kept row: the post-check compares the sampled ones with
    the vectors chromadb returned before (a rebuild in the wrong space once returned them
    all as zeros): one changed vector fails it, and is named."""
    from chaosfix.chromadb_probe import Target, verify_with_chromadb
    from chaosfix.embedder import embed_text

    p = fresh_palace(tmp_path / "palace", SPEC)
    gen = check_palace(p).generation
    kept = {rid: embed_text(doc, SPEC.dim) for rid, doc, _ in (drawer(i) for i in range(0, SPEC.drawers, 5))}
    sample = sorted(kept)

    def judged() -> dict:
        return verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=sample, kept=dict(kept),
                                               expect_count=SPEC.drawers)], gen)

    good = judged()
    c = good["collections"][COLLECTION]
    assert good["ok"] and c["kept_compared"] == len(kept) and c["wrong_vector_count"] == 0, good
    kept[sample[3]] = np.zeros(SPEC.dim, dtype=np.float32)
    bad = judged()
    c = bad["collections"][COLLECTION]
    assert not bad["ok"] and c["wrong_vectors"] == [sample[3]], bad
    assert any("kept rows with another vector" in e for e in bad["errors"]), bad["errors"]


def test_post_check_judges_unreachable_rows_against_the_graphs_own_rate():
    """chromadb's misses at the largest k are judged per group (repaired rows, untouched
    sample) against hnswlib's known rate or three times the rate chaosfix's own
    verification measured on the same files: a large random-vector graph's quirks pass
    (a correct 1M-drawer repair was judged unrepaired), an unlinked repair does not."""
    from chaosfix.chromadb_probe import QUERY_REPAIRED, Target, judge, unreachable_allowed

    repaired = {f"r{i}": None for i in range(5000)}  # (the judge reads only the ids)
    sample = [f"s{i}" for i in range(200)]

    def verdict(unreachable: list[str], rate: float) -> dict:
        rec = {"collections": {"c": {"errors": [], "queried": QUERY_REPAIRED + 200, "unreachable": unreachable,
                                     "probe_found": True}}}
        return judge(rec, {"c": Target("c", "cosine", repaired, sample, quirk_rate=rate)}, None)

    assert QUERY_REPAIRED == 100
    quirks = ["r1", "r2", "r3", "s1"]
    assert unreachable_allowed(200, 0.0) == 2 and unreachable_allowed(200, 0.004) == 3
    assert unreachable_allowed(500, 0.0) == 2 and unreachable_allowed(500, 0.004) == 6
    assert unreachable_allowed(100, 0.004) == 2 and unreachable_allowed(100, 0.01) == 3
    assert verdict(quirks, 0.01)["ok"]  # a graph whose own verification missed 1%
    assert not verdict(quirks, 0.0)["ok"]  # a graph that reached everything in verification
    assert not verdict(quirks, 0.004)["ok"]  # 3 of 100 repaired rows: beyond 0.4% (1M random vectors)
    assert not verdict([f"r{i}" for i in range(60)], 0.01)["ok"]  # repaired rows left unlinked
    assert not verdict([f"s{i}" for i in range(50)], 0.01)["ok"]  # the repair broke old rows

    # a verification that settled its misses by the graph measures the graph's depth only
    # when chromadb misses more than the known rate allows, and at most once
    asked = []

    def depth() -> float:
        asked.append(1)
        return 0.01

    def verdict_by_graph(unreachable: list[str]) -> dict:
        rec = {"collections": {"c": {"errors": [], "queried": QUERY_REPAIRED + 200, "unreachable": unreachable,
                                     "probe_found": True}}}
        return judge(rec, {"c": Target("c", "cosine", repaired, sample, depth=depth)}, None)

    assert verdict_by_graph(["r1", "s1"])["ok"] and not asked  # within max(2, 0.5%): never measured
    assert verdict_by_graph(quirks)["ok"] and asked == [1]  # measured once, for both groups
    assert not verdict_by_graph([f"r{i}" for i in range(60)])["ok"]


def test_chromadbs_child_gets_its_work_only_once_the_verification_has_ended(tmp_path):
    """The post-check's copy is made while the verification runs; given a ``verified``
    event that is not set (reconcile's way where the machine cannot hold both indexes:
    ``loads_beside``), chromadb's child is handed its spec only after (the two never hold
    an index at once); a verification that fails kills the child and removes the copy,
    and its error is the caller's."""
    from chaosfix.chromadb_probe import COPY_PREFIX, Target, start_post_check, verify_with_chromadb

    p = fresh_palace(tmp_path / "palace", SPEC)
    gen = check_palace(p).generation
    some = [drawer(i)[0] for i in range(0, SPEC.drawers, 7)]
    seen: dict[str, object] = {}

    def copies() -> list[Path]:
        return [d for d in tmp_path.iterdir() if d.name.startswith(f".palace{COPY_PREFIX}")]

    def run(fail: bool) -> dict:
        verified = threading.Event()
        started = start_post_check(gen, None)

        def meanwhile() -> None:
            try:
                deadline = time.monotonic() + 30
                while not (copies() and (copies()[0] / "palace" / "chroma.sqlite3").exists()):
                    assert time.monotonic() < deadline, "no copy made beside the verification"
                    time.sleep(0.05)
                handed = []
                for _ in range(100):  # a second: chromadb's child would have had its spec, and done
                    handed += [f.name for d in copies() for f in d.iterdir() if f.suffix == ".json"]
                    handed += [] if copies() else ["the copy is gone"]
                    time.sleep(0.01)
                seen["spec while verifying"] = sorted(set(handed))
                if fail:
                    raise OperationalError("verification failed")
            finally:
                verified.set()

        return verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=some)], gen, started=started,
                                    meanwhile=meanwhile, verified=verified)

    assert run(fail=False)["ok"]
    assert seen["spec while verifying"] == [] and not copies()
    with pytest.raises(OperationalError, match="verification failed"):
        run(fail=True)
    assert not copies()
    # Ctrl-C before the verification's end was announced: no wait for it, no copy left
    out: dict[str, object] = {}

    def interrupted() -> None:
        def meanwhile() -> None:
            while not copies():
                time.sleep(0.01)
            raise KeyboardInterrupt

        try:
            verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=some)], gen,
                                 started=start_post_check(gen, None), meanwhile=meanwhile,
                                 verified=threading.Event())
        except BaseException as exc:  # noqa: BLE001 - judged below
            out["raised"] = exc

    caller = threading.Thread(target=interrupted, daemon=True)
    caller.start()
    caller.join(60)
    assert not caller.is_alive(), "the post-check waited for a verification that was interrupted"
    assert isinstance(out.get("raised"), KeyboardInterrupt) and not copies()
    # with no verification to wait for, ``verified`` is not waited on
    alone = threading.Thread(target=lambda: out.update(alone=verify_with_chromadb(
        p, [Target(COLLECTION, "cosine", sample=some)], gen, verified=threading.Event())), daemon=True)
    alone.start()
    alone.join(120)
    assert not alone.is_alive(), "the post-check waited for a verification nobody runs"
    assert out["alone"]["ok"] and not copies()


def test_an_abandoned_early_copy_is_never_handed_over(tmp_path):
    """A failed verification abandons the post-check's early copy (``verify_with_chromadb``
    does on any error): the copy stops between two files and ``take`` raises, leaving
    nothing, so the failure is not held up by the built folders' copy (855 MB at 500k)."""
    from chaosfix.chromadb_probe import COPY_PREFIX, EarlyCopy

    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    early = EarlyCopy(p, {seg.name}, ())
    early.abandon()
    with pytest.raises(InterruptedError, match="copy abandoned"):
        early.take({seg.name: seg})
    early.discard()
    assert not [d for d in tmp_path.iterdir() if COPY_PREFIX in d.name]


def test_post_check_judges_the_built_folders_and_the_repairs_sql_on_its_copy(tmp_path):
    """The post-check's copy is the palace the swap would make: a built folder takes its
    segment's place (an empty one, whose rows no query finds, fails chromadb's judgement
    of a palace whose own folder passes), and ``prepare`` writes into the copy's database
    before chromadb opens it (a row it deletes there is missing to chromadb), never into
    the palace's."""
    from chaosfix.chromadb_probe import Target, verify_with_chromadb

    p = fresh_palace(tmp_path / "palace", SPEC)
    gen = check_palace(p).generation
    seg = faults.segment_dir(p)
    some = [drawer(i)[0] for i in range(0, SPEC.drawers, 7)]
    prints = fingerprint(p)

    def judge(built: dict[str, Path], drop: str | None = None) -> dict:
        def prepare(db: Path) -> None:
            if drop is not None:
                conn = sqlite3.connect(db)
                conn.execute("DELETE FROM embeddings WHERE embedding_id = ?", (drop,))
                conn.commit()
                conn.close()

        return verify_with_chromadb(p, [Target(COLLECTION, "cosine", sample=some)], gen, built=built,
                                    prepare=prepare)

    same = tmp_path / "built-same"
    shutil.copytree(seg, same)
    assert judge({seg.name: same})["ok"]
    gone = judge({seg.name: same}, drop=some[3])
    assert not gone["ok"] and gone["collections"][COLLECTION]["missing"] == [some[3]], gone
    empty = tmp_path / "built-empty"
    empty.mkdir()
    bad = judge({seg.name: empty})
    assert not bad["ok"], bad
    assert fingerprint(p) == prints
    assert not [d for d in tmp_path.iterdir() if ".chaosfix-verify-" in d.name]  # copies removed


def test_a_failed_post_check_changes_nothing_and_a_rerun_repairs(tmp_path, damage_cache):
    """chromadb judges the palace to be before the swap: when its post-check fails (here
    its child is SIGKILLed, through an --chromadb-python that dies on start), reconcile
    exits 8 with one line, the palace is as it was (every byte and mtime, no leftover
    folder or copy), and a rerun repairs it."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    fake = tmp_path / "python-that-dies"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # the version query (-I -c CODE) runs the real interpreter; the post-check child dies
        if [ "$2" = "-c" ]; then exec {sys.executable} "$@"; fi
        kill -9 $$
        """))
    fake.chmod(0o755)
    prints, beside = fingerprint(p), listing(tmp_path)
    code, doc, err = reconcile(p, "--embedder", HASH_EMBEDDER, "--chromadb-python", str(fake))
    assert code == 8, err
    last = err.strip().splitlines()[-1]  # (after the log lines of the stages it went through)
    assert "post-check" in last and "nothing was changed" in last and "Traceback" not in err, err
    assert fingerprint(p) == prints, "a failed post-check changed the palace"
    assert listing(tmp_path) == beside and not [n for n in listing(p) if n.startswith(".chaosfix-")]
    code, doc, err = reconcile(p, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc and doc["chromadb"]["ok"], err
    assert_consistent(p)


def test_chromadb_loads_beside_the_verification_only_where_the_machine_holds_both(tmp_path, damage_cache):
    """chromadb's child takes its work at once where the machine's available memory is
    three times the built folders and more (the post-check then ends with the
    verification), and waits for the verification to free its index where it is not,
    or where the machine does not say."""
    from chaosfix.chromadb_probe import BESIDE_FACTOR, BESIDE_MARGIN, loads_beside
    from chaosfix.sysmem import available_memory

    built = tmp_path / "built"
    built.mkdir()
    (built / "data_level0.bin").write_bytes(b"\0" * 1_000_000)
    (built / "header.bin").write_bytes(b"\0" * 100)
    need = BESIDE_FACTOR * 1_000_100 + BESIDE_MARGIN
    assert loads_beside([built], need) and not loads_beside([built], need - 1)
    assert not loads_beside([built, built], need) and not loads_beside([built], None)
    assert not loads_beside([built], need, others=[built])  # (the child loads the others too)
    have = available_memory()
    assert have is not None and have > BESIDE_MARGIN  # (Linux: MemAvailable)
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    code, doc, err = reconcile(p, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc and doc["chromadb"]["ok"], err
    assert doc["chromadb"]["beside_verification"] is True  # (a palace of a few MB)
    assert_consistent(p)


def test_available_memory_heeds_the_cgroups_limits(tmp_path):
    """In a container (``--memory``) or a systemd unit (``MemoryMax``), /proc/meminfo shows
    the whole host: the room left under the process's cgroup limits (v2 and v1, each
    group up to the root, its droppable page cache counted as room) bounds what
    ``available_memory`` says, so both indexes are never loaded at once into a limit
    that holds one."""
    from chaosfix.sysmem import _cgroup_rooms, _meminfo, available_memory

    root = tmp_path / "cgroup"

    def group(rel: str, **files: str) -> None:
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name.replace("_", ".", 1)).write_text(text)

    group("a", memory_max="max\n", memory_current="5000\n")
    group("a/b", memory_max="1000\n", memory_current="400\n", memory_stat="anon 300\ninactive_file 100\n")
    group("memory/x", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="1\n")
    group("memory/x/y", memory_limit_in_bytes="2000\n", memory_usage_in_bytes="1500\n",
          memory_stat="inactive_file 0\ntotal_inactive_file 300\n")  # (v1: the subtree's page cache)
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("4:memory:/x/../x/y\n3:cpu:/x\n0::/a/b\n")
    assert sorted(_cgroup_rooms(membership, root)) == [700, 800]
    membership.write_text("0::/gone/c\n")  # (a group not mounted here: the ones above it, none limited)
    assert _cgroup_rooms(membership, root) == []
    assert _cgroup_rooms(tmp_path / "none", root) == []
    have, machine = available_memory(), _meminfo()
    assert have is not None and machine is not None and have <= machine


def test_verification_refuses_a_built_map_that_is_not_the_one_written(tmp_path):
    """The verification skips the opcode scan only for the bytes the build wrote (their
    SHA-256): other bytes in the built folder fail it."""
    from chaosfix.reconcile.verify import verify_segment

    p = fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    ids = set(check_palace(p).states[0].sql_rows)
    raw = faults.pickle_path(p).read_bytes()
    good = verify_segment(seg, "cosine", ids, {}, sample=20, map_digest=hashlib.sha256(raw).digest())
    assert good.ok and good.zero_diff, good.problems
    bad = verify_segment(seg, "cosine", ids, {}, sample=20, map_digest=hashlib.sha256(raw + b".").digest())
    assert not bad.ok and "not the one the build wrote" in bad.problems[0]
