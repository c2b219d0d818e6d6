"""Helpers shared by the test modules: file fingerprints, SQL counts, the CLI in a child,
and every damage of the foundation issue's list made the way test_check makes it, with a
per-session cache of damaged palaces (shared by xdist workers) for the ones that need a
chromadb write to make."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.cli import main as cli_main
from chaosfix.drawers import drawer
from chaosfix.palace import PalaceSql
from chaosfix.palace.hnsw import parse_header
from chaosfix.workload import PalaceSpec, apply_ops, child_env, chroma_major, copy_palace, fresh_palace, observe

ADD100 = [{"op": "add", "start": 300, "count": 100}]
NEW_IDS = {drawer(i)[0] for i in range(300, 400)}
HASH_EMBEDDER = "chaosfix.embedder:HashEmbedder"
SPEC = PalaceSpec()


def fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under ``root``."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(root))] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return out


def hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {k: v[0] for k, v in fingerprint(folder).items()}


def wal_rows(palace: Path) -> int:
    sql = PalaceSql(palace / "chroma.sqlite3")
    try:
        return sql.conn.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0]
    finally:
        sql.close()


def sql_rows(palace: Path) -> int:
    """Committed record rows (``embeddings``), read from a private copy so a hot journal
    left by a kill is rolled back there and never in the palace itself."""
    with tempfile.TemporaryDirectory(prefix="chaosfix-count-") as tmp:
        db = Path(tmp) / "chroma.sqlite3"
        shutil.copyfile(palace / "chroma.sqlite3", db)
        journal = palace / "chroma.sqlite3-journal"
        if journal.exists():
            shutil.copyfile(journal, str(db) + "-journal")
        con = sqlite3.connect(db)
        try:
            return con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        finally:
            con.close()


def chromadb_script(script: str, *args: str, timeout: float = 300) -> str:
    """Run ``script`` (Python that uses chromadb) in a child with ``args``: its stdout.
    For a palace a test writes with chromadb's own API in ways the workload child does not."""
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=child_env(),
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from chaosfix.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def processes_with_tmpdir(tmp: Path) -> list[int]:
    """The live processes whose environment has ``TMPDIR=tmp``: a run started with it and
    every child it made (zombies have no environment left)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"TMPDIR={tmp}".encode() in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def kill_run(proc: subprocess.Popen, tmp: Path, within: float = 10.0, settle: float = 0.0) -> list[str]:
    """SIGKILL a chaosfix run started with ``TMPDIR=tmp`` ``settle`` seconds after one of
    its children was forked; the processes of that run still alive ``within`` seconds
    later (none: its children, in sessions of their own, die with it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(processes_with_tmpdir(tmp)) < 2:
        time.sleep(0.01)
    time.sleep(settle)
    assert proc.poll() is None, "the run ended before it started a child"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and processes_with_tmpdir(tmp):
        time.sleep(0.05)
    return [_described(pid) for pid in processes_with_tmpdir(tmp)]


def _described(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
        state = " ".join(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(("State", "PPid")))
        state += " " + " ".join(e.decode() for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if e.startswith(b"CHAOSFIX_PARENT"))
    except (OSError, StopIteration):
        return f"{pid} (gone)"
    return f"{pid} {state} {cmd}"


def header(palace: Path):
    return parse_header(faults.segment_file(palace, "header.bin").read_bytes())


# ---- running reconcile and judging the result --------------------------------------


def reconcile(palace: Path, *args: str) -> tuple[int, dict | None, str]:
    """``chaosfix reconcile PALACE --json ARGS`` in-process: (exit code, JSON, stderr)."""
    res = CliRunner().invoke(cli_main, ["reconcile", str(palace), "--json", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.stdout + res.stderr
    doc = json.loads(res.stdout) if res.stdout.strip() else None
    return res.exit_code, doc, res.stderr


def repair(palace: Path, *args: str) -> dict:
    code, doc, err = reconcile(palace, "--no-chromadb-check", *args)
    assert code == 1, err
    assert doc is not None
    return doc


def assert_judged_by_chromadb(palace: Path, rows: int, spec: PalaceSpec = SPEC) -> dict:
    """A fresh process opens the palace with chromadb: every row, each with its document's
    embedding, self-query and filtered query hits, and a new add lands and is found."""
    obs = observe(palace, spec, write_probe=True)
    assert obs.get("errors") == [], obs.get("errors")
    assert obs["count"] == rows and obs["ids"] == rows
    assert obs["bad_embedding_count"] == 0, obs["bad_embeddings"]
    assert obs["sampled"] > 0
    assert obs["query_misses"] == [] and obs["filtered_misses"] == []
    assert obs["probe_found"] is True
    return obs


def assert_consistent(palace: Path) -> None:
    rep = check_palace(palace)
    assert rep.consistent, rep.codes()
    assert set(rep.codes()) <= {"PENDING"}, rep.codes()


# ---- damages (issue 2 section 4), made as tests/test_check.py makes them ---------------


@dataclass(frozen=True)
class Damage:
    make: Callable[[Path, PalaceSpec, Path], object]
    versions: tuple[str, ...] = ("0.6", "1.x")
    cached: bool = False  # needs a chromadb write: build once per session, copy per use


def _lost_hnsw_writes(p: Path, spec: PalaceSpec, scratch: Path) -> None:
    """Power loss after the SQL commit: the persist's unsynced index writes are gone and
    the WAL is purged (0.6 keeps the last 50 rows pending: its persist ran at 400)."""
    snap = faults.snapshot_segment(p, dst=scratch / "snap")
    assert apply_ops(p, spec, [{"op": "add", "start": 300, "count": 150}]).ok
    faults.restore_segment(p, snap)


def _stale_sqlite(p: Path, spec: PalaceSpec, scratch: Path) -> None:
    old = faults.copy_sqlite(p, scratch / "older.sqlite3")
    assert apply_ops(p, spec, ADD100).ok
    faults.restore_older_sqlite(p, old)


def _kill06(point: str) -> Callable[[Path, PalaceSpec, Path], None]:
    def make(p: Path, spec: PalaceSpec, scratch: Path) -> None:
        assert apply_ops(p, spec, ADD100, kill=faults.kill_point(point)).killed
    return make


def _truncate_level0(p: Path, spec: PalaceSpec, scratch: Path) -> None:
    f = faults.segment_file(p, "data_level0.bin")
    faults.truncate(f, size=250 * header(p).size_data_per_element + 100)  # mid-slot 250


def _zero_pickle(p: Path, spec: PalaceSpec, scratch: Path) -> None:
    f = faults.pickle_path(p)
    faults.zero_fill(f, 0, f.stat().st_size)


DAMAGES: dict[str, Damage] = {
    "lost-hnsw-writes": Damage(_lost_hnsw_writes, cached=True),
    "stale-sqlite": Damage(_stale_sqlite, cached=True),
    "kill-after-hnsw": Damage(_kill06("after-hnsw"), ("0.6",), cached=True),
    "kill-after-pickle": Damage(_kill06("after-pickle"), ("0.6",), cached=True),
    "truncated-level0": Damage(_truncate_level0),
    "off-by-one": Damage(lambda p, s, t: faults.off_by_one(p)),
    "map-drop-both": Damage(lambda p, s, t: faults.drop_map_entry(p, "both")),
    "map-drop-id_to_label": Damage(lambda p, s, t: faults.drop_map_entry(p, "id_to_label")),
    "map-drop-label_to_id": Damage(lambda p, s, t: faults.drop_map_entry(p, "label_to_id")),
    "pickle-deleted": Damage(lambda p, s, t: faults.pickle_path(p).unlink()),
    "pickle-truncated": Damage(lambda p, s, t: faults.truncate(faults.pickle_path(p), fraction=0.5)),
    "pickle-zeroed": Damage(_zero_pickle),
    "hostile-pickle": Damage(lambda p, s, t: faults.hostile_payload(p, t / "PWNED")),
    "link-bloat-300x": Damage(lambda p, s, t: faults.sparse_extend(faults.segment_file(p, "link_lists.bin"), 300)),
    "emptied-queue": Damage(lambda p, s, t: faults.empty_queue(p)),
    "poisoned-seq-vector": Damage(lambda p, s, t: faults.poison_seq(p, "vector")),
    "poisoned-seq-metadata": Damage(lambda p, s, t: faults.poison_seq(p, "metadata")),
    "deleted-seq": Damage(lambda p, s, t: faults.delete_seq(p, "vector")),
}


def applicable(names: list[str] | None = None) -> list[str]:
    major = chroma_major()
    return [n for n in (names or DAMAGES) if major in DAMAGES[n].versions]


def scratch_of(dst: Path) -> Path:
    """Where a damage's by-products live (e.g. the hostile pickle's PWNED marker)."""
    return dst.parent / f"{dst.name}-scratch"


def damaged_palace(name: str, dst: Path, cache: Path, spec: PalaceSpec | None = None) -> Path:
    """A private copy of the small template palace with damage ``name`` made in it.
    Damages that need a chromadb write are made once per session in ``cache`` (the
    ``damage_cache`` fixture: shared by xdist workers) and copied."""
    spec = spec or PalaceSpec()
    d = DAMAGES[name]
    scratch = scratch_of(dst)
    scratch.mkdir(parents=True, exist_ok=True)
    if not d.cached:
        p = fresh_palace(dst, spec)
        d.make(p, spec, scratch)
        return p
    root = cache / f"{name}-{spec.key()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "chroma.sqlite3").exists():
            work = Path(tempfile.mkdtemp(prefix=".build-", dir=root.parent))
            p = fresh_palace(work / "p", spec)
            d.make(p, spec, work)
            os.rename(p, root)
            shutil.rmtree(work, ignore_errors=True)
    return copy_palace(root, dst)
