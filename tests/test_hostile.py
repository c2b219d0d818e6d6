"""Hostile and unusual palaces: chaosfix never runs a palace's SQL, never leaves the
palace, never writes during check, and stays bounded by the files' real sizes.

Every palace is built by the installed chromadb (0.6.3 or 1.5.9) and then edited the
way an attacker (or another tool) would: triggers and views planted in its SQLite file,
ids turned into paths, symlinks planted where chaosfix creates or reads files, WAL mode,
tiny files whose headers or pickles claim huge sizes. Each test asserts what the issue
asks: no SQL row lost (ids and counts before/after), no byte changed outside the palace
(a snapshot of the parent folder and of a sentinel folder, symlink targets included),
check changes no byte and no mtime, one-line errors with documented exit codes, and peak
RSS measured in the child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import HASH_EMBEDDER, assert_judged_by_chromadb, reconcile, sql_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaosfix import faults
from chaosfix.check import check_palace
from chaosfix.palace import idmap, map_child, pickle_reader
from chaosfix.palace.hnsw import HEADER_FMT, parse_header
from chaosfix.reconcile.run import FOREIGN_SQL_FILE, ReconcileReport
from chaosfix.report import render_reconcile
from chaosfix.workload import PalaceSpec, child_env, copy_palace, fresh_palace

SPEC = PalaceSpec()  # 300 drawers, sync_threshold 100
MB = 1 << 20


# ---- observation helpers ---------------------------------------------------------------


def tree(folder: Path) -> dict[str, tuple]:
    """relpath -> (kind, content hash or link target, mtime_ns) of every entry, symlinks
    recorded as links (never followed) and their targets' own state not included."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(folder))
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p), st_.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("dir", "", 0)
            elif not stat.S_ISREG(st_.st_mode):  # a FIFO or socket: never opened (a FIFO blocks)
                out[rel] = ("special", stat.S_IFMT(st_.st_mode), st_.st_mtime_ns)
            else:
                out[rel] = ("file", file_hash(p), st_.st_size, st_.st_mtime_ns)
    return out


def file_hash(p: Path) -> str:
    """sha256 over the data extents (offset, bytes) in 1 MiB reads: a sparse 1 TB file
    costs only its real bytes, and this test process stays small."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break  # only holes left
            end = os.lseek(fd, off, os.SEEK_HOLE)
            h.update(off.to_bytes(8, "little"))
            f.seek(off)
            while off < end:
                chunk = f.read(min(MB, end - off))
                h.update(chunk)
                off += len(chunk)
    return h.hexdigest()


def outside(world: Path, palace: Path) -> dict[str, tuple]:
    """Everything under ``world`` but the palace and chaosfix's backup folders beside it."""
    return {k: v for k, v in tree(world).items()
            if not (k == palace.name or k.startswith(palace.name + os.sep) or ".chaosfix-backup-" in k)}


def sql_state(palace: Path) -> tuple[list[str], int]:
    """(sorted embeddings ids, embedding_metadata row count), read from a private copy."""
    tmp = palace.parent / f".{palace.name}-count"
    tmp.mkdir(exist_ok=True)
    db = tmp / "c.sqlite3"
    shutil.copyfile(palace / "chroma.sqlite3", db)
    for ext in ("-wal", "-journal"):
        if (palace / f"chroma.sqlite3{ext}").exists():
            shutil.copyfile(palace / f"chroma.sqlite3{ext}", f"{db}{ext}")
    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        emb = "embeddings" if "embeddings" in tables else next(t for t in tables if "emb" in t and "meta" not in t)
        ids = sorted(r[0] for r in con.execute(f"SELECT embedding_id FROM {emb}"))
        meta = "embedding_metadata" if "embedding_metadata" in tables else None
        n = con.execute(f"SELECT count(*) FROM {meta}").fetchone()[0] if meta else -1
        return ids, n
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)


_HWM_CHILD = """
import atexit, sys
out = sys.argv.pop(1)
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(out, 'w').write(line.split()[1])
atexit.register(hwm)
sys.argv[0] = 'chaosfix'
from chaosfix.cli import main
main()
"""


def run_rss(*args: str, timeout: float = 300) -> tuple[int, str, str, int]:
    """``python -m chaosfix ARGS`` in a child: (exit code, stdout, stderr, the child's own
    peak RSS in bytes from wait4's rusage)."""
    out_f = subprocess.PIPE
    hwm = Path(tempfile.mkstemp(prefix="chaosfix-hwm-")[1])
    proc = subprocess.Popen([sys.executable, "-c", _HWM_CHILD, str(hwm), *args], stdout=out_f, stderr=out_f,
                            env=child_env())
    deadline = time.monotonic() + timeout
    out = err = b""
    os.set_blocking(proc.stdout.fileno(), False)
    os.set_blocking(proc.stderr.fileno(), False)
    while True:
        for f, name in ((proc.stdout, "out"), (proc.stderr, "err")):
            chunk = f.read() or b""
            if name == "out":
                out += chunk
            else:
                err += chunk
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    out += proc.stdout.read() or b""
    err += proc.stderr.read() or b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    # VmHWM of the child's own address space: wait4's ru_maxrss would also count this
    # (forking) test process's peak, which the kernel carries across exec
    kb = int(hwm.read_text() or 0) if hwm.exists() else 0
    hwm.unlink(missing_ok=True)
    return proc.returncode, out.decode(), err.decode(), (kb or ru.ru_maxrss) * 1024


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("chaosfix: ") and "backing up" not in ln]
    assert "Traceback" not in err, err
    assert len(lines) >= 1, err
    return lines[-1]


def assert_check_read_only(palace: Path, *, rc: set[int] = frozenset({0, 4})) -> dict:
    """``chaosfix check --json`` in a child changes no byte and no mtime; returns its JSON."""
    before = tree(palace)
    code, out, err, _ = run_rss("check", str(palace), "--json")
    assert code in rc, err
    assert tree(palace) == before
    return json.loads(out) if code != 8 else {}


def codes_of(doc: dict, severity: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in doc.get("findings", []):
        if severity is None or f["severity"] == severity:
            out[f["code"]] = out.get(f["code"], 0) + f["count"]
    return out


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A parent folder holding the palace and a sentinel folder an attack would target."""
    w = tmp_path / "world"
    (w / "sentinel").mkdir(parents=True)
    (w / "sentinel" / "keep.txt").write_text("do not touch")
    return w


@pytest.fixture
def palace(world: Path) -> Path:
    return fresh_palace(world / "palace", SPEC)


def vector_dir(p: Path) -> Path:
    return faults.segment_dir(p)


def sql(p: Path, script: str) -> None:
    con = sqlite3.connect(p / "chroma.sqlite3", isolation_level=None)
    try:
        con.executescript(script)
    finally:
        con.close()


# ---- 1. the palace's own SQL never runs ---------------------------------------------------

TRIGGERS = {
    "trigger-on-max_seq_id": "CREATE TRIGGER t_seq AFTER INSERT ON max_seq_id BEGIN "
                             "DELETE FROM embeddings WHERE id % 2 = 0; END;",
    "update-trigger-on-max_seq_id": "CREATE TRIGGER t_upd BEFORE UPDATE ON max_seq_id BEGIN "
                                    "DELETE FROM embedding_metadata; END;",
    "delete-trigger-on-max_seq_id": "CREATE TRIGGER \"T Del\" AFTER DELETE ON \"max_seq_id\" BEGIN "
                                    "DELETE FROM [embeddings]; END;",
    "trigger-on-queue": "CREATE TRIGGER t_q AFTER INSERT ON embeddings_queue BEGIN "
                        "DELETE FROM embeddings; DELETE FROM embedding_metadata; END;",
    "view-instead-of-max_seq_id": "ALTER TABLE max_seq_id RENAME TO msi_real; "
                                  "CREATE VIEW max_seq_id AS SELECT * FROM msi_real; "
                                  "CREATE TRIGGER t_v INSTEAD OF INSERT ON max_seq_id BEGIN "
                                  "DELETE FROM embeddings; END;",
    "view-reading-embeddings": "CREATE VIEW v_half AS SELECT * FROM embeddings WHERE id % 2 = 0;",
}


def _damage_for_sql_writes(p: Path) -> None:
    """Damage whose repair writes both tables reconcile writes: max_seq_id (poisoned
    vector seq) and embeddings_queue (emptied WAL: a floor row)."""
    faults.poison_seq(p, "vector")
    faults.empty_queue(p)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_foreign_sql_is_refused_then_dropped_on_request(palace: Path, world: Path, name: str):
    _damage_for_sql_writes(palace)
    sql(palace, TRIGGERS[name])
    ids0, meta0 = sql_state(palace)
    doc = assert_check_read_only(palace, rc={4, 8})
    if doc:  # a view standing in for max_seq_id: the schema is incomplete (SQLITE_CORRUPT) too
        assert codes_of(doc, "error").get("FOREIGN_SQL", 0) >= 1, doc["findings"]
    out0, pal0 = outside(world, palace), tree(palace)

    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 8, err
    line = one_line_error(err)
    assert "chromadb never creates" in line or "stands in" in line or "corrupt" in line, line
    assert tree(palace) == pal0 and outside(world, palace) == out0
    assert sql_state(palace) == (ids0, meta0)

    # with chromadb's post-check: its copy gets the same DROPs and rows before chromadb opens it
    code, _, err, _ = run_rss("reconcile", str(palace), "--drop-foreign-sql")
    if name == "view-instead-of-max_seq_id":
        assert code == 8, err  # the table itself is gone: restore it first; nothing dropped
        assert sql_state(palace) == (ids0, meta0)
        return
    assert code == 1, err
    assert sql_state(palace) == (ids0, meta0)  # no row lost
    con = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    left = con.execute("SELECT count(*) FROM sqlite_master WHERE type IN ('trigger','view')").fetchone()[0]
    con.close()
    assert left == 0
    (backup,) = world.glob("palace.chaosfix-backup-*")
    assert (backup / FOREIGN_SQL_FILE).read_text().startswith("CREATE ")
    assert outside(world, palace) == out0
    assert check_palace(palace).consistent


def test_harmless_foreign_trigger_is_info_and_left_alone(palace: Path):
    sql(palace, "CREATE TABLE notes(x); CREATE TRIGGER n AFTER INSERT ON notes BEGIN SELECT 1; END;")
    doc = assert_check_read_only(palace, rc={0})
    assert codes_of(doc) == {"FOREIGN_SQL": 1} and doc["consistent"]
    code, _, err = reconcile(palace, "--no-chromadb-check")
    assert code == 0, err


def _blind_schema_guard(monkeypatch) -> None:
    """The first line of defence sees no foreign object (to test the ones behind it)."""
    from chaosfix.palace import schema_guard

    real = schema_guard.inspect

    def blind(conn):
        rep = real(conn)
        rep.foreign = []
        return rep

    monkeypatch.setattr(schema_guard, "inspect", blind)


def test_second_line_authorizer_denies_trigger_when_the_guard_misses(palace: Path, world: Path, monkeypatch):
    """With the schema guard blinded, SQLite itself refuses the statement that would fire
    the trigger, the transaction rolls back, and no backup folder is left behind."""

    _damage_for_sql_writes(palace)
    sql(palace, TRIGGERS["trigger-on-max_seq_id"])
    ids0, meta0 = sql_state(palace)
    _blind_schema_guard(monkeypatch)
    code, _, err = reconcile(palace, "--no-chromadb-check")
    assert code == 8 and "not authorized" in err, err
    assert sql_state(palace) == (ids0, meta0)
    assert list(world.glob("palace.chaosfix-backup-*")) == []  # failed run: no backup folder
    assert not (palace / ".chaosfix-txn").exists()


def test_second_line_row_fingerprint_rolls_back(palace: Path, monkeypatch):
    """With both the guard and the authorizer blinded, the pre-COMMIT comparison of the
    rows reconcile never writes catches the trigger's deletes and rolls them back."""
    from chaosfix.palace import schema_guard

    _damage_for_sql_writes(palace)
    sql(palace, TRIGGERS["trigger-on-queue"])
    ids0, meta0 = sql_state(palace)
    _blind_schema_guard(monkeypatch)
    monkeypatch.setattr(schema_guard, "writer_authorizer", lambda *_: (lambda *a: 0))
    code, _, err = reconcile(palace, "--no-chromadb-check")
    assert code == 8 and "differ from the plan" in err and "rolled back" in err, err
    assert sql_state(palace) == (ids0, meta0)


# ---- 2. names from the palace are never paths -------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested", "wildcard-collection"])
def test_non_uuid_ids_are_never_used_as_paths(palace: Path, world: Path, kind: str):
    seg = faults.segment_id(palace)
    victim = world / "victim"
    shutil.copytree(vector_dir(palace), victim)  # looks like a segment: a naive tool would use it
    if kind == "wildcard-collection":
        col = faults.segment_id(palace, "vector", None)
        con = sqlite3.connect(palace / "chroma.sqlite3", isolation_level=None)
        cid = con.execute("SELECT collection FROM segments WHERE id=?", (col,)).fetchone()[0]
        new = "%"
        con.executescript(f"UPDATE collections SET id='{new}' WHERE id='{cid}'; "
                          f"UPDATE segments SET collection='{new}' WHERE collection='{cid}'; "
                          f"UPDATE collection_metadata SET collection_id='{new}' WHERE collection_id='{cid}';")
        con.close()
    else:
        new = {"dotdot": "../victim", "absolute": str(victim), "nested": f"{seg}/../../victim"}[kind]
        sql(palace, f"UPDATE segments SET id='{new}' WHERE id='{seg}'; "
                    f"UPDATE max_seq_id SET segment_id='{new}' WHERE segment_id='{seg}';")
        faults.poison_seq(palace, new)  # work for reconcile on that segment
    ids0, meta0 = sql_state(palace)
    out0 = outside(world, palace)
    doc = assert_check_read_only(palace, rc={4})
    assert codes_of(doc, "error").get("UNSAFE_ID") == 1, doc["findings"]
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 8, err
    assert "is not a UUID" in one_line_error(err)
    assert outside(world, palace) == out0
    assert sql_state(palace) == (ids0, meta0)


# ---- 3. symlinks are refused, never followed ---------------------------------------------


@pytest.mark.parametrize("entry", [".chaosfix-txn", ".chaosfix.lock", "chroma.sqlite3-journal",
                                   ".chaosfix-build-{seg}", ".chaosfix-old-{seg}"])
def test_planted_symlink_where_chaosfix_creates(palace: Path, world: Path, entry: str):
    faults.poison_seq(palace, "vector")
    target = world / "sentinel" / "created-by-chaosfix"
    name = entry.format(seg=faults.segment_id(palace))
    os.symlink(target, palace / name)  # dangling: following it would create the target
    out0 = outside(world, palace)
    ids0 = sql_state(palace)
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check")
    assert code == 8, err
    assert "symlink" in one_line_error(err)
    assert not target.exists() and outside(world, palace) == out0
    assert sql_state(palace) == ids0


def test_planted_backup_folder_symlinks_are_skipped(palace: Path, world: Path):
    faults.poison_seq(palace, "vector")
    now = time.time()
    for dt in range(0, 30):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + dt))
        os.symlink(world / "sentinel", world / f"palace.chaosfix-backup-{stamp}")
    out0 = tree(world / "sentinel")
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check")
    assert code == 1, err
    assert tree(world / "sentinel") == out0
    backups = [b for b in world.glob("palace.chaosfix-backup-*") if not b.is_symlink()]
    assert len(backups) == 1 and (backups[0] / "chroma.sqlite3").is_file()


@pytest.mark.parametrize("what", ["segment-folder", "header.bin", "data_level0.bin", "index_metadata.pickle"])
def test_symlinked_segment_parts_are_not_read(palace: Path, world: Path, what: str):
    seg = vector_dir(palace)
    elsewhere = world / "elsewhere"
    if what == "segment-folder":
        shutil.move(seg, elsewhere)
        os.symlink(elsewhere, seg)
    else:
        elsewhere.mkdir()
        shutil.move(seg / what, elsewhere / what)
        os.symlink(elsewhere / what, seg / what)
    faults.poison_seq(palace, "vector")
    out0 = outside(world, palace)
    doc = assert_check_read_only(palace, rc={4})
    assert codes_of(doc, "error").get("SYMLINK") == 1, doc["findings"]
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 8 and "symlink" in one_line_error(err), err
    assert outside(world, palace) == out0


def test_symlinked_sqlite_is_checked_but_never_written(palace: Path, world: Path):
    real = world / "elsewhere.sqlite3"
    shutil.move(palace / "chroma.sqlite3", real)
    os.symlink(real, palace / "chroma.sqlite3")
    doc = assert_check_read_only(palace, rc={0})
    assert codes_of(doc) == {"SYMLINK": 1} and doc["consistent"]
    faults.poison_seq(palace, "vector")
    before = hashlib.sha256(real.read_bytes()).hexdigest()
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check")
    assert code == 8 and "symlink" in one_line_error(err), err
    assert hashlib.sha256(real.read_bytes()).hexdigest() == before


def _plant_sidecar(palace: Path, world: Path, suffix: str, kind: str) -> None:
    p = palace / f"chroma.sqlite3{suffix}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    elif kind == "socket":  # (bound in a short folder: AF_UNIX paths stop at 108 bytes)
        short = Path(tempfile.mkdtemp(prefix="s", dir=palace.parent))
        if len(str(short / "s")) > 100:
            short = Path(tempfile.mkdtemp(prefix="chaosfix-sock-"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short / "s"))
        sock.close()
        shutil.move(short / "s", p)
        shutil.rmtree(short)
    else:  # a symlink to a real hot journal outside the palace (its rollback would act for the palace)
        real = world / "outside-journal"
        real.write_bytes(bytes.fromhex("d9d505f920a163d7") + bytes(4088))
        os.symlink(real, p)


@pytest.mark.parametrize("suffix, kind", [("-journal", "fifo"), ("-journal", "folder"), ("-journal", "socket"),
                                          ("-journal", "symlink"), ("-shm", "fifo"), ("-wal", "folder")])
def test_a_sidecar_that_is_not_a_file_is_named_never_opened(palace: Path, world: Path, suffix: str, kind: str):
    """SQLite opens chroma.sqlite3-journal (and in WAL mode -wal and -shm) beside the db:
    a FIFO there blocked check and reconcile forever (Ctrl-C too), a folder or FIFO -shm
    made check say 'consistent' where chromadb cannot open the palace, a socket read as
    SQLITE_CORRUPT ('restore it first' for a healthy db), and check followed a symlinked
    journal. Each is now an error finding naming it (check, exit 4, nothing opened or
    changed) and a one-line refusal (reconcile and its dry run, exit 8), in seconds."""
    if suffix != "-journal":
        sql(palace, "PRAGMA journal_mode=WAL;")
    _plant_sidecar(palace, world, suffix, kind)
    t = time.monotonic()
    doc = assert_check_read_only(palace, rc={4})
    assert codes_of(doc) == {"SIDECAR": 1}, doc["findings"]
    assert f"chroma.sqlite3{suffix} is a" in doc["findings"][0]["detail"]
    before = tree(palace)
    for extra in (["--dry-run"], []):
        code, _, err, _ = run_rss("reconcile", str(palace), *extra, timeout=60)
        line = one_line_error(err)
        assert code == 8 and f"chroma.sqlite3{suffix}" in line and "is a " in line, err
    assert tree(palace) == before
    assert time.monotonic() - t < 60


def test_a_fifo_beside_a_symlinked_dbs_target_is_named_never_opened(palace: Path, world: Path):
    """SQLite opens the journal beside a symlinked db's target, not beside the link:
    check, which reads through a symlinked db, hung there past Ctrl-C."""
    store = world / "store"
    store.mkdir()
    shutil.move(palace / "chroma.sqlite3", store / "db.sqlite3")
    os.symlink(store / "db.sqlite3", palace / "chroma.sqlite3")
    os.mkfifo(store / "db.sqlite3-journal")
    t = time.monotonic()
    doc = assert_check_read_only(palace, rc={4})
    assert codes_of(doc, "error") == {"SIDECAR": 1} and "db.sqlite3-journal is a FIFO" in doc["findings"][0]["detail"]
    assert time.monotonic() - t < 60


@pytest.mark.parametrize("m", [0, 1, -1, 99_999_999_999])
def test_a_rebuild_never_takes_an_m_hnswlib_cannot_build_with(palace: Path, m: int):
    """A torn index is rebuilt with the collection's own M: 0.6 accepts any int in
    hnsw:M (and 1.x's schema can be edited), and hnswlib segfaults at M 0 (a crash every
    rerun repeated), runs out of memory at 1 or 10^11, refuses -1. Such a value is
    replaced by chromadb's default, said in the plan, and the repair lands."""
    con = sqlite3.connect(palace / "chroma.sqlite3")
    try:
        cid = con.execute("SELECT id FROM collections").fetchone()[0]
        con.execute("INSERT INTO collection_metadata (collection_id, key, int_value) VALUES (?, 'hnsw:M', ?)", (cid, m))
        if "schema_str" in {r[1] for r in con.execute("PRAGMA table_info(collections)")}:
            con.execute("""UPDATE collections SET schema_str = json_set(schema_str,
                           '$.keys."#embedding".float_list.vector_index.config.hnsw.max_neighbors', ?)""", (m,))
        con.commit()
    finally:
        con.close()
    h = parse_header(faults.segment_file(palace, "header.bin").read_bytes())  # half its elements torn off
    os.truncate(faults.segment_file(palace, "data_level0.bin"), h.size_data_per_element * (h.cur_element_count // 2))
    code, doc, err = reconcile(palace, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    (plan,) = doc["plans"]
    assert plan["strategy"] == "rebuild" and any(f"M {m} from the collection's settings" in r for r in plan["reasons"])
    assert parse_header(faults.segment_file(palace, "header.bin").read_bytes()).m == 16
    assert check_palace(palace).consistent


def test_a_collection_name_cannot_forge_report_lines(palace: Path):
    """chromadb validates names, the palace's SQL need not: a name holding a newline, a
    carriage return and a terminal escape is printed escaped, in check's and reconcile's
    reports, and never adds a line of its own."""
    forged = "x\nverdict: consistent\r\x1b[2Kcol"
    faults.off_by_one(palace)  # (found by the collection's name: damaged before the rename)
    con = sqlite3.connect(palace / "chroma.sqlite3")
    try:
        con.execute("UPDATE collections SET name = ?", (forged,))
        con.commit()
    finally:
        con.close()
    for args in (["check", str(palace)], ["reconcile", str(palace), "--dry-run"]):
        code, out, err, _ = run_rss(*args)
        assert code == 4 if args[0] == "check" else code == 1, err
        lines = out.splitlines()
        assert "verdict: consistent" not in lines and not any("\r" in ln or "\x1b" in ln for ln in lines), out
        assert any("\\x1b[2Kcol" in ln for ln in lines), out  # (a table cell shows its newlines as spaces)


def test_a_palace_path_that_is_not_utf8_is_refused_with_the_reason(palace: Path):
    """hnswlib takes its folder as UTF-8 text: a palace whose path holds another byte
    (it reaches Python as a surrogate escape) failed every index repair with 'internal
    error: TypeError: load_index()'. check still reads it; reconcile and its dry run say
    why they cannot, before any change."""
    odd = palace.with_name("palace-\udcff")  # the byte 0xff
    os.rename(palace, odd)
    faults.off_by_one(odd)
    doc = assert_check_read_only(odd, rc={4})
    assert codes_of(doc, "error") == {"OFF_BY_ONE": 1}, doc["findings"]
    before = tree(odd)
    code, out, err, _ = run_rss("reconcile", str(odd), "--dry-run")
    assert code == 8 and "a real run would refuse" in out and "not UTF-8" in out, (out, err)
    code, out, err, _ = run_rss("reconcile", str(odd))
    assert code == 8 and "not UTF-8" in one_line_error(err), err
    assert tree(odd) == before


@pytest.mark.parametrize("shape", ["dim-neg", "dim-bool", "dim-huge", "dim-wrong", "bool-label", "maxseq-neg",
                                   "maxseq-huge"])
def test_map_values_chromadb_cannot_load_are_found_and_repaired(palace: Path, shape: str):
    """Allow-listed types holding values chromadb's loaders refuse (1.x: 'Error
    deserializing pickle file' for a negative, bool or 64-bit dimension, a bool label,
    a negative or 64-bit max_seq_id; 0.6: 'negative dimensions', 'an integer is
    required', InvalidDimension for another dimension) passed check as consistent. Each
    is a finding now, and the repair leaves a palace chromadb reads whole."""
    path = faults.pickle_path(palace)
    m = idmap.loads(path.read_bytes())
    if shape.startswith("dim"):
        m.dimensionality = {"dim-neg": -384, "dim-bool": True, "dim-huge": 2**63, "dim-wrong": 3}[shape]
    elif shape == "bool-label":
        rid = m.label_to_id.pop(1)
        m.label_to_id[True] = rid
        m.id_to_label[rid] = True
    else:
        m.max_seq_id = -5 if shape == "maxseq-neg" else 2**63
    path.write_bytes(idmap.dumps(m))
    rep = check_palace(palace)
    assert not rep.consistent and set(rep.codes()) & {"PICKLE_UNREADABLE", "DIMENSION_LOST"}, rep.codes()
    code, doc, err = reconcile(palace, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["chromadb"]["ok"], (err, doc and doc.get("chromadb"))
    assert_judged_by_chromadb(palace, sql_rows(palace))


_NESTED_PERSISTENT_DATA = """
import pickle, sys, types
from chaosfix.palace import idmap
path = sys.argv[1]
m = idmap.loads(open(path, "rb").read())
name = "chromadb.segment.impl.vector.local_persistent_hnsw"  # chromadb's own class path, faked here
mod = sys.modules[name] = types.ModuleType(name)
class PersistentData: pass
PersistentData.__module__, PersistentData.__qualname__, mod.PersistentData = name, "PersistentData", PersistentData
state = {"dimensionality": m.dimensionality, "total_elements_added": m.total_elements_added,
         "id_to_label": m.id_to_label, "label_to_id": m.label_to_id, "id_to_seq_id": m.id_to_seq_id,
         "max_seq_id": m.max_seq_id, "evil": PersistentData()}
if m.fmt == "object":
    top = PersistentData()
    top.__dict__.update(state)
else:
    top = state
open(path, "wb").write(pickle.dumps(top, protocol=3))
"""


def test_a_persistent_data_nested_in_the_map_is_unreadable_for_check_and_the_repair_alike(palace: Path):
    """chromadb's own unpickler accepts a second PersistentData inside the map; chaosfix
    read it, the dry run promised a repair, and every real run failed to write it back
    ('global chaosfix.palace.idmap._PersistentDataStandIn is not allowed'). It is an
    unreadable map now, for check, the dry run and the repair alike, which re-embeds."""
    path = faults.pickle_path(palace)
    subprocess.run([sys.executable, "-c", _NESTED_PERSISTENT_DATA, str(path)], check=True, env=child_env())
    assert check_palace(palace).codes().get("PICKLE_UNREADABLE"), check_palace(palace).codes()
    code, doc, err = reconcile(palace, "--dry-run", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    code, doc, err = reconcile(palace, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["chromadb"]["ok"], err
    assert_judged_by_chromadb(palace, sql_rows(palace))


def _plant_schema(palace: Path, what: str) -> None:
    con = sqlite3.connect(palace / "chroma.sqlite3")
    try:
        if what == "collation-index":
            con.create_collation("evilcoll", lambda a, b: (a > b) - (a < b))
            con.execute("CREATE INDEX evil_i ON max_seq_id(segment_id COLLATE evilcoll)")
        elif what == "function-index":
            con.create_function("evilfn", 1, lambda x: x, deterministic=True)
            con.execute("CREATE INDEX evil_i ON max_seq_id(evilfn(seq_id))")
        else:  # a CHECK constraint the repair's seq_id breaks
            con.execute("PRAGMA writable_schema=ON")
            ddl = con.execute("SELECT sql FROM sqlite_master WHERE name='max_seq_id'").fetchone()[0]
            con.execute("UPDATE sqlite_master SET sql=? WHERE name='max_seq_id'",
                        (ddl.rstrip().rstrip(")") + ", CHECK (seq_id < 0))",))
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("what", ["function-index", "collation-index", "check-constraint"])
def test_schema_objects_chromadb_never_makes_stop_the_repair_in_one_line(palace: Path, what: str):
    """An index over a function or collation only its author's program defines, or a
    CHECK constraint, on a table reconcile writes: the repair's write failed with
    'internal error: IntegrityError', and a collation read as 'corrupt, restore it
    first'. An index is a FOREIGN_SQL finding now (refused, or dropped with
    --drop-foreign-sql, its SQL kept in the backup); a collation names the index that
    needs it; a constraint stops the write in one line. Nothing is changed."""
    faults.poison_seq(palace, "vector")
    _plant_schema(palace, what)
    doc = assert_check_read_only(palace, rc={4})
    if what != "check-constraint":
        assert "FOREIGN_SQL" in codes_of(doc), doc["findings"]
    before = tree(palace)
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check")
    line = one_line_error(err)
    assert code == 8 and ("evil_i" in line if what != "check-constraint" else "CHECK constraint failed" in line), err
    assert "nothing was changed" in line or "refusing" in line or "then rerun" in line, line
    assert tree(palace) == before
    if what == "function-index":
        code, doc, err = reconcile(palace, "--no-chromadb-check", "--drop-foreign-sql")
        assert code == 1 and doc["foreign_sql_dropped"] == ["index 'evil_i' on max_seq_id"], err
        assert check_palace(palace).consistent


# ---- 4. check writes nothing, in WAL mode too ----------------------------------------------


def test_wal_mode_palace_is_read_without_creating_wal_files(palace: Path):
    sql(palace, "PRAGMA journal_mode=WAL;")
    assert not (palace / "chroma.sqlite3-wal").exists()
    doc = assert_check_read_only(palace, rc={0})
    assert codes_of(doc) == {"WAL_MODE": 1} and doc["consistent"]
    assert not (palace / "chroma.sqlite3-wal").exists() and not (palace / "chroma.sqlite3-shm").exists()


_WAL_WRITER = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA wal_autocheckpoint=0")
con.execute("DELETE FROM embedding_metadata WHERE id = (SELECT max(id) FROM embeddings)")
con.execute("DELETE FROM embeddings WHERE id = (SELECT max(id) FROM embeddings)")
os._exit(0)  # no checkpoint, no cleanup: -wal and -shm stay, the delete lives only in -wal
"""


def test_wal_frames_are_read_from_a_private_copy(palace: Path, world: Path):
    subprocess.run([sys.executable, "-c", _WAL_WRITER, str(palace / "chroma.sqlite3")], check=True)
    assert (palace / "chroma.sqlite3-wal").stat().st_size > 0
    doc = assert_check_read_only(palace, rc={4})
    # the -wal's delete is seen; it left the record's full-text document behind (STALE_ROWS)
    assert codes_of(doc) == {"WAL_MODE": 1, "HNSW_ONLY": 1, "STALE_ROWS": 1}, doc["findings"]
    ids0, meta0 = sql_state(palace)
    assert len(ids0) == SPEC.drawers - 1
    # chromadb's post-check copies the palace before the swap: the copy carries the
    # -wal's committed frames (SQL as chaosfix read it, with the delete)
    from chaosfix.chromadb_probe import copy_palace as post_check_copy

    copy = post_check_copy(palace)
    try:
        assert sql_state(copy) == (ids0, meta0)
    finally:
        shutil.rmtree(copy.parent)
    # chromadb's post-check adds a record with a document: it lands once the leftover
    # full-text document is gone (it failed on it: "Failed to apply logs to the metadata segment")
    code, doc, err = reconcile(palace)
    assert code == 1, err
    assert doc["chromadb"]["ok"] is True and doc["stale_rows"]["fulltext"] == 1, doc["chromadb"]
    assert sql_state(palace) == (ids0, meta0)
    assert codes_of(assert_check_read_only(palace, rc={0})) == {"WAL_MODE": 1}


def _redeclare(db: Path, name: str, sql: str) -> None:
    """Rewrite one object's declaration in sqlite_master (what a crafted palace can do)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA writable_schema = ON")
    con.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (sql, name))
    con.commit()
    con.close()


def test_a_crafted_docsize_table_is_not_read_and_odd_leftover_ids_stay_exact(palace: Path):
    """STALE_ROWS reads the full-text ids from the docsize shadow table only when it is
    declared exactly as chromadb does: one whose ``id`` is a generated column (found by a
    review subagent) made a healthy palace report 300 leftovers, a reconcile report
    deletes that never happened, and, with a costly expression, cost check seconds; a
    metadata table whose ``id`` is generated is not read either.
    Leftover ids that are not integers are not chromadb's (never reported, nothing to
    crash on); integer ones beyond 2**53 are deleted, and the row fingerprint (taken over
    the rows of live records) still matches exactly."""
    db = palace / "chroma.sqlite3"
    _redeclare(db, "embedding_fulltext_search_docsize",
               "CREATE TABLE 'embedding_fulltext_search_docsize'(rid INTEGER PRIMARY KEY, sz BLOB, id AS (rid + 100000))")
    _redeclare(db, "embedding_metadata_array",  # (1.x; a generated id would run for every row)
               "CREATE TABLE embedding_metadata_array (rid INTEGER NOT NULL, key TEXT NOT NULL, string_value TEXT, "
               "int_value INTEGER, float_value REAL, bool_value INTEGER, id AS (rid + 100000))")
    con = sqlite3.connect(db)
    if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'embedding_metadata_array'").fetchone():
        con.execute("INSERT INTO embedding_metadata_array (rid, key, string_value) VALUES (1, 'k', 'v')")  # id 100001
    con.executemany("INSERT INTO embedding_metadata (id, key, string_value) VALUES (?, 'k', 'v')",
                    [("abc",), (b"\x01\x02",), (2**62 + 1,), (2**62 + 3,)])
    con.commit()
    con.close()
    doc = assert_check_read_only(palace, rc={4})
    assert codes_of(doc) == {"STALE_ROWS": 2}, doc["findings"]
    code, rep, err = reconcile(palace, "--no-chromadb-check")
    assert code == 1 and rep["stale_rows"] == {"ids": 2, "metadata": 2, "fulltext": 0}, err
    con = sqlite3.connect(db)
    left = sorted(map(repr, (r[0] for r in con.execute("SELECT id FROM embedding_metadata WHERE key = 'k'"))))
    con.close()
    assert left == sorted([repr("abc"), repr(b"\x01\x02")])
    assert codes_of(assert_check_read_only(palace, rc={0})) == {}


# ---- 5. bounded work: sizes are checked against real bytes before allocating ---------------


def _set_header(p: Path, **fields) -> None:
    f = faults.segment_file(p, "header.bin")
    h = parse_header(f.read_bytes())
    vals = {**vars(h), **fields}
    order = ["version", "offset_level0", "max_elements", "cur_element_count", "size_data_per_element",
             "label_offset", "offset_data", "maxlevel", "enterpoint_node", "max_m", "max_m0", "m", "mult",
             "ef_construction"]
    f.write_bytes(struct.pack(HEADER_FMT, *[vals[k] for k in order]))


def _rss_cap(p: Path) -> int:
    return int(1.5 * os.stat(faults.segment_file(p, "data_level0.bin")).st_blocks * 512) + 100 * MB


def _write_pickle(p: Path, raw: bytes) -> None:
    faults.pickle_path(p).write_bytes(raw)


def _map(p: Path) -> idmap.IdMap:
    return idmap.loads(faults.pickle_path(p).read_bytes())


def _memo_long_binput(p: Path) -> None:
    _write_pickle(p, b"\x80\x03}r\x00\x00\x00\x10.")  # memo index 2**28: 4 GB in pickle.loads


def _padded_map(p: Path, tail: bytes) -> None:
    """The real map plus a 5 MiB string under an extra key (so the opcode scan runs in
    ``pickle_reader.Scan``'s child process), ``tail`` spliced in before the final STOP."""
    m = _map(p)
    raw = pickle.dumps({"dimensionality": m.dimensionality, "total_elements_added": m.total_elements_added,
                        "max_seq_id": None, "id_to_label": m.id_to_label, "label_to_id": m.label_to_id,
                        "id_to_seq_id": {}, "pad": "x" * (5 << 20)}, protocol=3)
    assert len(raw) > pickle_reader.CHILD_MIN_BYTES and raw.endswith(b".")
    _write_pickle(p, raw[:-1] + tail + b".")


def _memo_long_binput_after_5mib(p: Path) -> None:
    _padded_map(p, b"r\x00\x00\x00\x10")  # LONG_BINPUT 2**28 of the finished dict


def _memo_put_text(p: Path) -> None:
    _write_pickle(p, b"(dp268435456\n.")


def _deep_nesting(p: Path) -> None:
    """The real map plus a 200k-deep list under an extra key. pickle cannot write such a
    value (recursion), so the opcodes are emitted directly: the dict's final STOP becomes
    key, EMPTY_LIST x n, APPEND x (n-1), SETITEM, STOP."""
    m = _map(p)
    head = pickle.dumps({"dimensionality": m.dimensionality, "total_elements_added": m.total_elements_added,
                         "max_seq_id": None, "id_to_label": m.id_to_label, "label_to_id": m.label_to_id,
                         "id_to_seq_id": {}}, protocol=3)
    nest = b"]" * 200_000 + b"a" * 199_999
    _write_pickle(p, head[:-1] + b"X" + struct.pack("<I", 4) + b"deep" + nest + b"s.")


def _huge_label(p: Path) -> None:
    m = _map(p)
    rid = next(iter(m.id_to_label))
    big = 10 ** 100_000
    m.label_to_id.pop(m.id_to_label[rid])
    m.id_to_label[rid] = big
    m.label_to_id[big] = rid
    _write_pickle(p, pickle.dumps({"dimensionality": m.dimensionality, "total_elements_added": m.total_elements_added,
                                   "max_seq_id": None, "id_to_label": m.id_to_label, "label_to_id": m.label_to_id,
                                   "id_to_seq_id": {}}, protocol=3))


def _sparse_huge_slots(p: Path) -> None:
    """A self-consistent header of 2 MiB slots over a sparse 4 GiB data_level0.bin."""
    dim = 512
    maxm0 = ((2 * MB) - 8 - 4 * dim - 4) // 4 // 2 * 2
    od = 4 + 4 * maxm0
    _set_header(p, max_m0=maxm0, max_m=maxm0 // 2, m=maxm0 // 2, offset_data=od, label_offset=od + 4 * dim,
                size_data_per_element=od + 4 * dim + 8, cur_element_count=2048, max_elements=2048)
    os.truncate(faults.segment_file(p, "data_level0.bin"), 4 << 30)


def _sparse_in_limits(p: Path) -> None:
    """Slots within hnswlib's limits (256 KiB) and a count matching a sparse 4 GiB file."""
    h = parse_header(faults.segment_file(p, "header.bin").read_bytes())
    dim = 65536
    od = h.offset_data
    size = od + 4 * dim + 8
    n = (4 << 30) // size
    _set_header(p, label_offset=od + 4 * dim, size_data_per_element=size, cur_element_count=n, max_elements=n)
    os.truncate(faults.segment_file(p, "data_level0.bin"), n * size)


def _claims_2_40(p: Path) -> None:
    _set_header(p, cur_element_count=2**40, max_elements=2**40)
    os.truncate(faults.segment_file(p, "link_lists.bin"), 2**40)


def _claims_10m_sparse(p: Path) -> None:
    """Ten million elements claimed, data_level0.bin and link_lists.bin sparse to match."""
    h = parse_header(faults.segment_file(p, "header.bin").read_bytes())
    n = 10_000_000
    _set_header(p, cur_element_count=n, max_elements=n)
    os.truncate(faults.segment_file(p, "data_level0.bin"), n * h.size_data_per_element)
    os.truncate(faults.segment_file(p, "link_lists.bin"), 1 << 40)


BOUNDED = {
    "memo-long-binput-2**28": (_memo_long_binput, "PICKLE_UNREADABLE"),
    "memo-put-text-2**28": (_memo_put_text, "PICKLE_UNREADABLE"),
    "memo-long-binput-2**28-after-5MiB": (_memo_long_binput_after_5mib, "PICKLE_UNREADABLE"),
    "nesting-200k-deep": (_deep_nesting, "PICKLE_UNREADABLE"),
    "label-100000-digits": (_huge_label, "PICKLE_UNREADABLE"),
    "2MiB-slots-sparse-4GiB": (_sparse_huge_slots, "TORN"),
    "256KiB-slots-sparse-4GiB": (_sparse_in_limits, "TORN"),
    "2**40-elements-sparse-links": (_claims_2_40, "TORN"),
    "10M-elements-sparse-files": (_claims_10m_sparse, "TORN"),
}


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_small_files_claiming_huge_sizes_stay_bounded(palace: Path, name: str):
    make, code_expected = BOUNDED[name]
    cap = _rss_cap(palace)
    make(palace)
    ids0 = sql_state(palace)
    t = time.monotonic()
    before = tree(palace)
    code, out, err, rss = run_rss("check", str(palace), "--json")
    wall = time.monotonic() - t
    assert code == 4, err
    assert tree(palace) == before
    doc = json.loads(out)
    assert code_expected in codes_of(doc, "error"), doc["findings"]
    assert "SQLITE_CORRUPT" not in codes_of(doc), doc["findings"]
    assert rss < cap, f"peak RSS {rss / MB:.0f} MB > {cap / MB:.0f} MB"
    assert wall < 60, wall
    print(f"{name}: check {wall:.2f} s, peak RSS {rss / MB:.0f} MB (cap {cap / MB:.0f} MB)")
    # reconcile never fails on it with RecursionError/MemoryError: it rebuilds or says why
    code, out, err, rss = run_rss("reconcile", str(palace), "--no-chromadb-check", "--embedder", HASH_EMBEDDER,
                                  "--json")
    assert code in (1, 4), err
    assert "Traceback" not in err and "RecursionError" not in err and "MemoryError" not in err
    assert sql_state(palace) == ids0
    assert check_palace(palace).consistent, check_palace(palace).codes()


def test_scan_in_a_child_judges_like_the_inline_scan():
    """``pickle_reader.Scan`` moves the opcode walk of a large pickle to a child process;
    its verdict (and message) must be the inline walk's, and a child that cannot run
    must leave the verdict to the inline walk, never to "passed"."""
    good = pickle.dumps({"id_to_label": {f"id-{i}": i for i in range(1000)}, "pad": "x" * (5 << 20)}, protocol=3)
    bad = good[:-1] + b"r\x00\x00\x00\x10."
    with pytest.raises(pickle_reader.PickleBoundsError) as inline:
        pickle_reader.scan(bad)
    with pickle_reader.Scan(good) as scan:
        assert scan.proc is not None  # the child really ran
        scan.wait()
    with pickle_reader.Scan(bad) as scan:
        assert scan.proc is not None
        with pytest.raises(pickle_reader.PickleBoundsError) as child:
            scan.wait()
    assert str(child.value) == str(inline.value)
    # a child that dies for its own reasons (here: killed at once) is no verdict
    scan = pickle_reader.Scan(bad)
    assert scan.proc is not None
    scan.proc.kill()
    with pytest.raises(pickle_reader.PickleBoundsError):
        scan.wait()


def test_map_helper_judges_like_the_inline_read():
    """check reads a map of 4 MiB or more in a helper process (``map_child``): under a
    memory cap instead of the opcode scan, it must give the inline read's verdict (a memo
    bomb unreadable, a foreign global unsafe), the same facts for a sound map, and an
    exact answer to "are these SQL's ids"; a helper that dies is no verdict at all."""
    ids = [f"drawer-{i}" for i in range(1000)]
    m = {"dimensionality": 384, "total_elements_added": 1000, "max_seq_id": None,
         "id_to_label": {r: i + 1 for i, r in enumerate(ids)}, "label_to_id": {i + 1: r for i, r in enumerate(ids)},
         "id_to_seq_id": None, "pad": "x" * (5 << 20)}
    good = pickle.dumps(m, protocol=3)
    bomb = good[:-1] + b"r\x00\x00\x00\x10."  # LONG_BINPUT 2**28 after 5 MiB: 4 GB, above the cap
    past = good[:-1] + b"r" + struct.pack("<I", 6_000_000) + b"."  # within the cap, past the file's length
    unsafe = pickle.dumps({**m, "pad": subprocess.Popen}, protocol=3)
    assert len(good) >= map_child.MIN_BYTES

    def helper(raw: bytes, blob: str | None):  # noqa: ANN202
        with map_child.MapFacts(raw) as h:
            assert h.proc is not None  # the helper really ran
            h.send_ids(blob)
            return h.result()

    status, answer, labels = helper(good, "\0".join(reversed(ids)))
    facts, want_labels = idmap.summarize(idmap.loads(good))
    assert status == "ok" and answer["facts"] == facts and answer["same_ids"] is True
    assert labels == want_labels.astype("<u8").tobytes()
    assert helper(good, "\0".join(ids[:-1] + ["drawer-x"]))[1]["same_ids"] is False
    assert helper(good, "\0".join(ids + ids[:1]))[1]["same_ids"] is False
    assert helper(good, None)[1]["same_ids"] is None
    # a verdict reaches the parent however many ids it is still writing (64 KiB is a pipe)
    many = "\0".join(f"drawer-{i:0100d}" for i in range(2000))
    assert helper(unsafe, many)[0] == "unsafe"
    # a PUT index padded with zeros is 1 to the C unpickler: the scan reads it so too
    padded = good[:-1] + b"p0000000000000001\n."
    pickle_reader.scan(padded)
    assert helper(padded, None)[0] == "ok"
    with pytest.raises(pickle_reader.PickleBoundsError):
        pickle_reader.scan(good[:-1] + b"p 0_000_000_009_000_000_000\n.")

    for raw, exc, status in ((bomb, idmap.UnreadablePickle, "unreadable"), (past, idmap.UnreadablePickle, "unreadable"),
                             (unsafe, idmap.UnsafePickle, "unsafe")):
        with pytest.raises(exc) as inline:
            idmap.loads(raw)
        got = helper(raw, None)
        assert got[0] == status, got
        if raw is bomb:
            assert got[1]["error"].startswith("MemoryError"), got  # stopped by the cap
        elif raw is past:
            assert got[1]["error"] == str(inline.value)  # the memo checked afterwards, as the scan does
    h = map_child.MapFacts(good)
    assert h.proc is not None
    h.proc.kill()
    assert h.result() is None


def test_colliding_int_keys_are_refused_before_unpickling():
    """ints hash to themselves modulo 2**61-1, so k*(2**61-1) all land in one dict slot:
    a 259 KB map of such keys took 4.4 s to unpickle (quadratic; about 19 minutes at 4
    MiB), found by a review subagent. The scan refuses ints wider than 64 bits (refused
    after loading anyway), so such a map is unreadable at once; 64-bit labels still pass."""
    collide = {k * (2**61 - 1): f"id-{k}" for k in range(1, 20000)}
    raw = pickle.dumps({"dimensionality": 3, "total_elements_added": 1, "id_to_label": {},
                        "label_to_id": collide}, protocol=3)
    t = time.monotonic()
    with pytest.raises(idmap.UnreadablePickle, match="integer of"):
        idmap.loads(raw)
    assert time.monotonic() - t < 5
    top = {"a": 2**64 - 1}
    m = idmap.loads(pickle.dumps({"dimensionality": 3, "total_elements_added": 2**64 - 1, "id_to_label": top,
                                  "label_to_id": {2**64 - 1: "a"}}, protocol=3))
    assert m.max_label == 2**64 - 1


def test_sql_ids_come_from_the_table_not_a_stale_index(palace: Path, monkeypatch):
    """check's SQL ids read as one string (``PalaceSql.id_blob``) come from a scan of the
    table, as the per-row read does: an index a damaged file holds stale (here it kept the
    entry of a deleted row, and ``PRAGMA quick_check`` does not compare index contents)
    must not hide the row's phantom (found by a review subagent)."""
    monkeypatch.setattr(map_child, "MIN_BYTES", 0)  # the map helper's path too (1.x)
    db = palace / "chroma.sqlite3"

    def edit(*stmts: tuple[str, tuple], schema: bool = True) -> None:
        con = sqlite3.connect(db)
        try:
            con.execute(f"PRAGMA writable_schema={'ON' if schema else 'OFF'}")
            for q, args in stmts:
                con.execute(q, args)
            con.commit()
        finally:
            con.close()

    con = sqlite3.connect(db)
    tsql = con.execute("SELECT sql FROM sqlite_master WHERE name='embeddings'").fetchone()[0]
    victim = con.execute("SELECT embedding_id FROM embeddings ORDER BY id LIMIT 1 OFFSET 5").fetchone()[0]
    con.close()
    named = "CREATE UNIQUE INDEX emb_u ON embeddings(segment_id, embedding_id)"
    # the table's UNIQUE clause becomes a named index, which then points elsewhere while the row goes
    edit(("UPDATE sqlite_master SET sql=? WHERE name='embeddings'",
          (re.sub(r",\s*UNIQUE\s*\(segment_id, embedding_id\)", "", tsql),)),
         ("UPDATE sqlite_master SET name='emb_u', sql=? WHERE name='sqlite_autoindex_embeddings_1'", (named,)))
    edit(("UPDATE sqlite_master SET tbl_name='segments', sql='CREATE UNIQUE INDEX emb_u ON segments(id, type)' "
          "WHERE name='emb_u'", ()))
    edit(("DELETE FROM embedding_metadata WHERE id IN (SELECT id FROM embeddings WHERE embedding_id=?)", (victim,)),
         ("DELETE FROM embeddings WHERE embedding_id=?", (victim,)), schema=False)  # the index is elsewhere now
    edit(("UPDATE sqlite_master SET tbl_name='embeddings', sql=? WHERE name='emb_u'", (named,)))
    con = sqlite3.connect(db)
    seg = con.execute("SELECT id FROM segments WHERE scope='METADATA'").fetchone()[0]
    assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    table = con.execute("SELECT count(*) FROM embeddings NOT INDEXED WHERE segment_id=?", (seg,)).fetchone()[0]
    index = con.execute("SELECT count(*) FROM embeddings INDEXED BY emb_u WHERE segment_id=?", (seg,)).fetchone()[0]
    con.close()
    assert index == table + 1  # the index still holds the deleted row
    rep = check_palace(palace)
    hnsw_only = [f for f in rep.findings if f.code == "HNSW_ONLY"]
    assert [f.sample for f in hnsw_only] == [[victim]], rep.codes()
    assert rep.collections[0]["rows"] == table


def test_check_children_ignore_the_current_folder(palace: Path, tmp_path: Path):
    """check's helper processes (the pickle scan, PRAGMA quick_check) run from the user's
    current folder, which may be the palace: a ``json.py`` or ``pickletools.py`` there
    must never be imported by them. The parent runs as the console script does (no
    current folder on sys.path), so only a child could import the traps."""
    _padded_map(palace, b"")  # a map of more than 4 MiB: its scan runs in a child
    trap = tmp_path / "trap"
    trap.mkdir()
    marker = tmp_path / "imported.txt"
    for mod in ("json", "pickletools", "struct", "sqlite3", "numpy"):
        (trap / f"{mod}.py").write_text(f"open({str(marker)!r}, 'a').write({mod!r} + '\\n')\n")
    cmd = [sys.executable, "-I", "-c", "import sys; from chaosfix.cli import main; sys.argv[0] = 'chaosfix'; main()",
           "check", str(palace), "--json"]
    res = subprocess.run(cmd, cwd=trap, capture_output=True, text=True, env=child_env(), timeout=300)
    assert res.returncode in (0, 4), res.stderr
    assert json.loads(res.stdout)["findings"] is not None
    assert not marker.exists(), marker.read_text()


def test_the_embedder_child_ignores_the_current_folder(tmp_path: Path, monkeypatch):
    """The embedder server (``python -m chaosfix.embedders.server``) starts in the user's
    current folder, which may be the palace. A ``json.py`` there ran in it twice over:
    ``child_env`` left an empty entry in PYTHONPATH (the current folder) and ``-m`` puts
    that folder first on sys.path. The test environment's own PYTHONSAFEPATH (tox) is
    removed: the child's protection is its own."""
    from chaosfix.embedders.server import ChildEmbedder

    trap = tmp_path / "trap"
    trap.mkdir()
    marker = tmp_path / "imported.txt"
    (trap / "json.py").write_text(f"open({str(marker)!r}, 'a').write('json')\n")
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.chdir(trap)
    child = ChildEmbedder({"kind": "chromadb", "config": {"name": "default", "config": {}}}, "chromadb default")
    child.close()  # (a child that imported the trap has no json.loads: it dies, and this raises)
    assert not marker.exists(), "the embedder child imported json.py from the current folder"


@pytest.mark.parametrize("where", ["thread", "child", "child-cold"])
def test_quick_check_finds_a_broken_index_page(palace: Path, tmp_path: Path, monkeypatch, where: str):
    """A b-tree page of an index chaosfix never reads, its page type byte zeroed: only
    ``PRAGMA quick_check`` sees it. It runs in a thread for a small file and in a child
    process (run from a folder of traps) for a large one; both must report it. The child
    reads a file that is not in the page cache once in order first (cold)."""
    from chaosfix.palace import sql as sql_mod

    db = palace / "chroma.sqlite3"
    con = sqlite3.connect(db)
    try:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (page,) = con.execute("SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_embeddings_1' "
                              "AND pagetype = 'leaf' LIMIT 1").fetchone()
    finally:
        con.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\x00")
        if where == "child-cold":
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    monkeypatch.setattr(sql_mod, "QUICK_CHECK_CHILD_BYTES", 0 if where.startswith("child") else 1 << 40)
    if where.startswith("child"):  # the child's own verdict, not the thread's fallback
        monkeypatch.setattr(sql_mod, "_quick_check_thread", lambda uri, also=(): pytest.fail("fell back to the thread"))
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "json.py").write_text("raise SystemExit('imported from the current folder')\n")
    monkeypatch.chdir(trap)
    report = check_palace(palace)
    (f,) = [f for f in report.findings if f.code == "SQLITE_CORRUPT"]
    assert f.severity == "error" and "quick_check" in f.detail and f.count >= 1 and f.sample, f


def _preread_bytes(db: Path, tmp_path: Path) -> tuple[int, str]:
    """Bytes the quick_check child reads ahead of quick_check (its ``preadv`` calls but
    the page-cache probes, seen by strace; quick_check's own reads are ``pread64``), and
    its verdict line."""
    from chaosfix.palace import sql as sql_mod

    log = tmp_path / "strace.log"
    res = subprocess.run([faults.kill.strace_path(), "-f", "-qq", "-e", "trace=preadv,preadv2", "-o", str(log),
                          sys.executable, "-I", "-c", sql_mod._QUICK_CHECK, f"file:{db}?mode=ro", str(db)],
                         capture_output=True, text=True, timeout=300)
    # the reads ahead: not the RWF_NOWAIT probes of whether the file is cached
    got = [int(m) for m in re.findall(r"preadv2?\((?!.*RWF_NOWAIT).*\) = (\d+)$", log.read_text(), re.M)]
    return sum(got), res.stdout.strip()


@pytest.mark.skipif(not faults.strace_available(), reason="strace not installed or ptrace not permitted")
def test_quick_check_reads_a_cold_file_ahead_only_as_far_as_sqlite_would(palace: Path, tmp_path: Path):
    """The quick_check child reads chroma.sqlite3 once in order when it is not in the page
    cache (quick_check's own reads in b-tree order are random I/O), never more than the
    pages the header counts: a 4 GiB sparse tail (a hostile or padded file SQLite never
    reads) is not read either (found by a review subagent: 8 s of kernel time)."""
    db = palace / "chroma.sqlite3"
    pages = db.stat().st_size

    def evict() -> None:
        fd = os.open(db, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    evict()
    read, verdict = _preread_bytes(db, tmp_path)
    assert read == pages and verdict == '{"rows": ["ok"], "also": []}'
    with open(db, "r+b") as f:  # a sparse 4 GiB tail, one real page near its end
        f.truncate(4 << 30)
        f.seek((4 << 30) * 63 // 64)
        f.write(b"\x01" * 4096)
    evict()
    read, verdict = _preread_bytes(db, tmp_path)
    assert read <= pages and verdict == '{"rows": ["ok"], "also": []}'


@pytest.mark.parametrize("orphan", [True, False])
def test_implausible_max_elements_makes_auto_rebuild(palace: Path, orphan: bool):
    """Alone too (helper-41): chromadb's load allocates max_elements slots and fails ("Error
    loading hnsw index"), where check said consistent and reconcile "nothing to do"."""
    if orphan:
        faults.drop_map_entry(palace, "both")  # one orphan row: incremental work
    _set_header(palace, max_elements=2**40)
    torn = [f for f in check_palace(palace).findings if f.code == "TORN"]
    assert torn and "max_elements 1099511627776 would allocate" in torn[0].detail, torn
    code, doc, err = reconcile(palace, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    (plan,) = doc["plans"]
    assert plan["strategy"] == "rebuild", plan
    assert any("max_elements" in r for r in plan["reasons"]), plan["reasons"]
    assert check_palace(palace).consistent


def test_a_capacity_the_collections_resize_factor_explains_is_no_damage(palace: Path):
    """chromadb 0.6 sizes max_elements with the collection's hnsw:resize_factor: a large one
    loads fine, and was called TORN (helper-43)."""
    _set_header(palace, max_elements=2_000_000)
    assert "TORN" in check_palace(palace).codes()
    sql(palace, "INSERT INTO collection_metadata (collection_id, key, int_value) "
                "SELECT id, 'hnsw:resize_factor', 2000 FROM collections")
    assert "TORN" not in check_palace(palace).codes()


def test_an_offset_level0_other_than_0_is_torn_and_rebuilt(palace: Path):
    """hnswlib's offsetLevel0 is always 0; chromadb's load reads level 0 from there and
    segfaulted, where check said consistent (helper-41)."""
    _set_header(palace, offset_level0=4096)
    torn = [f for f in check_palace(palace).findings if f.code == "TORN"]
    assert torn and "offsetLevel0 not 0" in torn[0].detail, torn
    code, doc, err = reconcile(palace, "--no-chromadb-check")
    assert code == 1 and doc["plans"][0]["strategy"] == "rebuild", err
    assert check_palace(palace).consistent


def test_a_garbage_slot_size_in_the_header_never_asks_for_exabytes(palace: Path):
    """The space a rebuild needs was counted with header.bin's slot size even where the
    header is torn: a garbage one asked about 12 billion TB, and the repair refused for
    good (exit 8), --no-backup and --no-chromadb-check too (helper-41)."""
    _set_header(palace, size_data_per_element=6682698541702263435)
    assert "TORN" in check_palace(palace).codes()
    code, doc, err = reconcile(palace, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["after_consistent"], err
    assert check_palace(palace).consistent


@pytest.mark.parametrize("how", ["empty", "deleted", "zeroed"])
def test_a_lost_header_keeps_every_vector_without_an_embedder(palace: Path, how: str):
    """header.bin, which each persist rewrites first, truncated to 0 bytes, deleted or
    zeroed: every slot went unread, so every row needed re-embedding, or was left (exit
    4) where no model was at hand (helper-41's 5). The slots' layout follows from the
    collection's dimension and M: the rebuild keeps every stored vector, no embedder."""
    header = vector_dir(palace) / "header.bin"
    if how == "deleted":
        header.unlink()
    else:
        header.write_bytes(b"" if how == "empty" else bytes(100))
    (torn,) = [f for f in check_palace(palace).findings if f.code == "TORN"]
    assert "the slots read with the collection's layout (dimension 384, M 16)" in torn.detail, torn.detail
    code, doc, err = reconcile(palace)
    assert code == 1 and doc["after_consistent"], err[-2000:]
    (plan,) = doc["plans"]
    assert plan["strategy"] == "rebuild" and not plan["unrepaired"], plan
    assert doc["chromadb"]["ok"], doc["chromadb"]
    assert_judged_by_chromadb(palace, SPEC.drawers)  # every row with its own document's vector


def test_a_lost_header_over_garbage_slots_reads_none_of_them(palace: Path):
    """The derived layout is taken only where the slots' links and flags hold under it:
    over garbage it reads nothing, and the rows wait for an embedder as before."""
    seg = vector_dir(palace)
    (seg / "header.bin").unlink()
    level0 = seg / "data_level0.bin"
    level0.write_bytes(np.random.default_rng(0).integers(0, 256, level0.stat().st_size, dtype=np.uint8).tobytes())
    (torn,) = [f for f in check_palace(palace).findings if f.code == "TORN"]
    assert "header.bin missing" in torn.detail and "collection's layout" not in torn.detail, torn.detail
    code, doc, err = reconcile(palace, "--dry-run")
    (plan,) = doc["plans"]
    # no slot kept: every row is left but the one whose vector the WAL still holds
    assert code == 4 and plan["unrepaired"] + plan["sources"].get("wal", 0) == SPEC.drawers, (plan, err[-2000:])
    assert plan["sources"].keys() <= {"wal"}, plan


def test_a_slot_whose_vector_is_nan_or_partly_zeroed_is_found_by_check_and_repaired(palace: Path):
    """check did not judge stored vectors (helper-41's 6): a NaN, or a torn page's zeros
    in a cosine slot (no longer unit length, as hnswlib stores it), read "consistent",
    while chromadb served them (the rows rank wrong or never); reconcile had nothing to do."""
    seg = vector_dir(palace)
    h = parse_header((seg / "header.bin").read_bytes())
    m = idmap.loads((seg / "index_metadata.pickle").read_bytes())
    victims = {5: np.float32("nan").tobytes(), 17: bytes(4 * (h.dim // 2))}  # slot -> bytes written over its vector
    with open(seg / "data_level0.bin", "r+b") as f:
        for slot, raw in victims.items():
            f.seek(slot * h.size_data_per_element + h.offset_data)
            f.write(raw)
    labels = {slot: int.from_bytes((seg / "data_level0.bin").read_bytes()[
        slot * h.size_data_per_element + h.label_offset:][:8], "little") for slot in victims}
    want = sorted(m.label_to_id[lab] for lab in labels.values())
    (bad,) = [f for f in check_palace(palace).findings if f.code == "BAD_VECTOR"]
    assert bad.count == 2 and sorted(bad.sample) == want and bad.severity == "error", bad
    assert not check_palace(palace).consistent
    code, doc, err = reconcile(palace, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["after_consistent"] and doc["chromadb"]["ok"], err[-2000:]
    (plan,) = doc["plans"]
    assert plan["strategy"] == "incremental" and plan["sources"] == {"index": SPEC.drawers - 2, "embedder": 2}, plan
    assert_judged_by_chromadb(palace, SPEC.drawers)  # both rows with their document's vector again
    # an embedding of zeros is chromadb's own state (it stores one as given): no damage
    with open(seg / "data_level0.bin", "r+b") as f:
        f.seek(9 * h.size_data_per_element + h.offset_data)
        f.write(bytes(4 * h.dim))
    assert "BAD_VECTOR" not in check_palace(palace).codes()


# ---- 6. the smaller ones ----------------------------------------------------------------


def test_sqlite_without_chroma_tables_is_not_a_palace(tmp_path: Path):
    p = tmp_path / "notpalace"
    p.mkdir()
    con = sqlite3.connect(p / "chroma.sqlite3")
    con.execute("CREATE TABLE hello(x)")
    con.commit()
    con.close()
    before = tree(p)
    for cmd in (["check", str(p)], ["reconcile", str(p), "--no-chromadb-check"]):
        code, _, err, _ = run_rss(*cmd)
        assert code == 8, err
        assert "not a palace" in one_line_error(err)
    assert tree(p) == before


def test_post_check_failure_is_one_line():
    rep = ReconcileReport(palace="/p", dry_run=False)
    rep.chromadb = {"ok": False, "error": "RuntimeError: boom\n  more", "trace": "Traceback (most recent call last):\n"
                    "  File \"x\", line 1\nRuntimeError: boom"}
    text = render_reconcile(rep)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("chromadb ") and "post-check:" in ln]
    assert line.endswith("post-check: FAILED: RuntimeError: boom more"), line
    assert "Traceback" not in text


def test_error_messages_with_palace_names_stay_one_line(palace: Path):
    seg = faults.segment_id(palace)
    new = "evil\nname"
    sql(palace, f"UPDATE segments SET id='{new}' WHERE id='{seg}';")
    code, _, err, _ = run_rss("reconcile", str(palace), "--no-chromadb-check")
    assert code == 8, err
    assert len(err.strip().splitlines()) == 1, err


# ---- 7. property: random schema and number mutations keep every invariant ------------------

MUTATIONS = st.one_of(
    st.tuples(st.just("trigger"), st.sampled_from(["max_seq_id", "embeddings_queue", "embeddings", "segments"]),
              st.sampled_from(["INSERT", "UPDATE", "DELETE"]), st.sampled_from(["embeddings", "embedding_metadata"])),
    st.tuples(st.just("view"), st.sampled_from(["v1", "embeddings_view"]), st.sampled_from(["embeddings", "segments"])),
    st.tuples(st.just("rename"), st.sampled_from(["max_seq_id", "embeddings_queue", "collections", "segments"])),
    st.tuples(st.just("drop-column"), st.sampled_from([("embeddings_queue", "metadata"), ("collections", "dimension"),
                                                       ("embedding_metadata", "float_value"),
                                                       ("collection_metadata", "float_value")])),
    st.tuples(st.just("extra-table"), st.sampled_from(["notes", "embeddings2"])),
    st.tuples(st.just("header"), st.sampled_from(["max_elements", "cur_element_count", "maxlevel", "max_m0",
                                                  "label_offset", "enterpoint_node"]),
              st.sampled_from([0, 1, 2**31, 2**40, 2**63])),
    st.tuples(st.just("pickle"), st.sampled_from(["total_elements_added", "label"]),
              st.sampled_from([-1, 0, 2**64, 10**30])),
)


def _mutate(p: Path, m: tuple) -> None:
    kind = m[0]
    if kind == "trigger":
        sql(p, f"CREATE TRIGGER IF NOT EXISTS tr_{m[1]}_{m[2]} AFTER {m[2]} ON {m[1]} BEGIN DELETE FROM {m[3]}; END;")
    elif kind == "view":
        sql(p, f"CREATE VIEW IF NOT EXISTS {m[1]} AS SELECT * FROM {m[2]};")
    elif kind == "rename":
        sql(p, f"ALTER TABLE {m[1]} RENAME TO {m[1]}_old;")
    elif kind == "drop-column":
        try:
            sql(p, f"ALTER TABLE {m[1][0]} DROP COLUMN {m[1][1]};")
        except sqlite3.OperationalError:
            pass  # indexed or constrained: SQLite refuses, the palace stays as it is
    elif kind == "extra-table":
        sql(p, f"CREATE TABLE IF NOT EXISTS {m[1]}(x);")
    elif kind == "header":
        top = {"maxlevel": 2**31 - 1, "enterpoint_node": 2**32 - 1}.get(m[1], 2**64 - 1)
        _set_header(p, **{m[1]: min(m[2], top)})
    elif kind == "pickle":
        try:
            mp = _map(p)
        except idmap.UnreadablePickle:
            return  # an earlier mutation already made it unreadable
        d = {"dimensionality": mp.dimensionality, "total_elements_added": mp.total_elements_added,
             "max_seq_id": None, "id_to_label": dict(mp.id_to_label), "label_to_id": dict(mp.label_to_id),
             "id_to_seq_id": {}}
        if m[1] == "total_elements_added":
            d["total_elements_added"] = m[2]
        else:
            rid = next(iter(d["id_to_label"]))
            d["label_to_id"].pop(d["id_to_label"][rid])
            d["id_to_label"][rid] = m[2]
            d["label_to_id"][m[2]] = rid
        _write_pickle(p, pickle.dumps(d, protocol=3))


@pytest.fixture(scope="module")
def hypo_template(tmp_path_factory) -> Path:
    return fresh_palace(tmp_path_factory.mktemp("hostile-template") / "palace", SPEC)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(muts=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_property_schema_and_number_mutations(hypo_template: Path, tmp_path: Path, muts: list):
    w = tmp_path / f"w{time.monotonic_ns()}"
    (w / "sentinel").mkdir(parents=True)
    (w / "sentinel" / "keep.txt").write_text("x")
    p = copy_palace(hypo_template, w / "palace")
    ids0 = sql_state(p)
    faults.poison_seq(p, "vector")  # always some work for reconcile
    for m in sorted(muts, key=lambda m: m[0] not in ("header", "pickle")):  # files first: SQL
        _mutate(p, m)  # mutations may hide the segment from the locator
    out0 = outside(w, p)
    before = tree(p)
    code, out, err, _ = run_rss("check", str(p), "--json")
    assert code in (0, 4, 8), err
    assert "Traceback" not in err
    if code == 8:
        assert len(err.strip().splitlines()) == 1, err
    assert tree(p) == before  # check changes nothing
    code, out, err, _ = run_rss("reconcile", str(p), "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code in (0, 1, 4, 8), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 8:
        assert one_line_error(err)
    assert outside(w, p) == out0  # nothing outside the palace (and its backup) touched
    ids1 = sql_state(p)
    assert ids1[0] == ids0[0]  # no row lost
    assert ids1[1] == ids0[1] or any(m[0] == "drop-column" for m in muts)
    shutil.rmtree(w, ignore_errors=True)


@pytest.mark.parametrize("name", ["x" * 207, "x" * 232, "x" * 255, "\u00e9" * 127], ids=["207", "232", "255", "utf8-254-bytes"])
def test_a_long_palace_name_gets_its_backup_and_its_post_check(name, tmp_path, damage_cache):
    """A palace name of up to 255 bytes gets its backup and chromadb's post-check copy
    beside it: above 207 bytes their names begin with the palace name's first characters,
    ``~`` and a hash of it (a name of 232 was refused before, "File name too long",
    exit 8), and a rerun finds them (exit 0). Two long names with the same beginning get
    different folders. A run killed with its backup half made leaves it for the rerun."""
    from helpers import damaged_palace

    from chaosfix.palace.leftovers import quarantined, sibling_stem

    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    long = p.rename(tmp_path / name)
    stem = sibling_stem(long)
    # killed with its backup copied but not yet in place: the rerun finds and removes it
    env = child_env() | {"CHAOSFIX_KILL_AT": "copied"}
    killed = subprocess.run([sys.executable, "-m", "chaosfix", "reconcile", str(long), "--no-chromadb-check",
                             "--embedder", HASH_EMBEDDER], capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -9, killed.stderr[-500:]
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(f".{stem}.chaosfix-part-")]
    code, doc, err = reconcile(long, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["after_consistent"] is True and doc["chromadb"]["ok"], err[-1500:]
    backup = Path(doc["backup"])
    assert backup.parent == long.parent and backup.name.startswith(stem + ".chaosfix-backup-")
    assert len(os.fsencode(backup.name)) <= 255 and (stem == name) == (len(os.fsencode(name)) <= 207)
    if any(d.is_dir() for d in backup.iterdir()):  # a moved segment is found as this palace's backup
        assert "chaosfix-backup" in {q.kind for q in quarantined(long)}
    assert [x.name for x in tmp_path.iterdir() if "chaosfix" in x.name] == [backup.name]  # no copy left
    assert reconcile(long, "--no-chromadb-check")[0] == 0
    assert sibling_stem(Path("x" * 250)) != sibling_stem(Path("x" * 249 + "y"))


def test_a_long_named_palaces_folders_from_an_earlier_chaosfix_are_still_found(tmp_path, damage_cache):
    """A palace name of 208 to ~223 bytes now gets the hashed stem, but an earlier chaosfix
    named its folders after the whole name, which then fit: its backup must stay a source
    of vectors, and its half-made backup and post-check copy must still be cleared (they
    were never found: left beside the palace for good)."""
    from helpers import damaged_palace

    from chaosfix.palace.leftovers import quarantined, sibling_stem

    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    name = "y" * 215
    long = p.rename(tmp_path / name)
    assert sibling_stem(long) != name
    seg = faults.segment_dir(long)
    old_backup = tmp_path / f"{name}.chaosfix-backup-20261101-120000"
    shutil.copytree(seg, old_backup / seg.name)
    partial = tmp_path / f".{name}.chaosfix-part-20261101-120500"
    partial.mkdir()
    (partial / "chroma.sqlite3").write_bytes(b"half a copy")
    copy = tmp_path / f".{name}.chaosfix-verify-k3j2h1g0"
    (copy / "palace").mkdir(parents=True)
    code, doc, err = reconcile(long, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["after_consistent"] is True and doc["chromadb"]["ok"], err[-1500:]
    assert not partial.exists() and not copy.exists(), sorted(x.name for x in tmp_path.iterdir())
    assert any("a copy an interrupted post-check left" in n for n in doc["notes"]), doc["notes"]
    assert (old_backup / seg.name) in [q.path for q in quarantined(long) if q.kind == "chaosfix-backup"]
    assert reconcile(long, "--no-chromadb-check")[0] == 0


def test_stale_post_check_copies_are_this_palaces_own_by_their_whole_name(tmp_path):
    """A palace "pal" must not take (and remove) the post-check copy of a palace named
    "pal.chaosfix-verify-x" beside it, whose name begins with pal's copies' prefix."""
    from chaosfix.chromadb_probe import stale_copies

    own = tmp_path / ".pal.chaosfix-verify-abcd_123"
    other = tmp_path / ".pal.chaosfix-verify-x.chaosfix-verify-abcdefgh"
    own.mkdir()
    other.mkdir()
    assert stale_copies(tmp_path / "pal") == [own]
    assert stale_copies(tmp_path / "pal.chaosfix-verify-x") == [other]


def test_backups_are_this_palaces_own_by_their_whole_name(tmp_path):
    """A palace "pal" offers as its backups (a source of lost vectors) only folders named
    as chaosfix names pal's backups: not a palace named "pal.chaosfix-backup-x" beside it,
    nor that palace's own backups, whose names begin with pal's backups' prefix, nor a
    stamp of other digits than ASCII ones. They come oldest first by the time in their
    names (the repair takes the newest first): ``-10`` after ``-2``."""
    from chaosfix.palace.leftovers import QUARANTINE_RE, quarantined
    from chaosfix.safe_fs import is_uuid

    seg = "0b6f1c2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
    own = [tmp_path / f"pal.chaosfix-backup-20261204-101500{n}" for n in ("", "-2", "-10")]
    other = tmp_path / "pal.chaosfix-backup-x"  # another palace, with a segment of the same id
    others = [other, tmp_path / "pal.chaosfix-backup-x.chaosfix-backup-20261204-101500",
              tmp_path / "pal.chaosfix-backup-20261204-101500.moving",
              tmp_path / "pal.chaosfix-backup-\u0662\u0660\u0662\u0666\u0661\u0662\u0660\u0664-101500"]
    for d in (*own, *others):
        (d / seg).mkdir(parents=True)
    (tmp_path / "pal").mkdir()
    assert [q.path.parent for q in quarantined(tmp_path / "pal")] == own
    assert [q.path.parent for q in quarantined(other)] == [others[1]]
    (own[0] / f"{seg}\n").mkdir()  # not a segment id: "\n" after one
    (own[1] / "1b6f1c2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e").symlink_to(own[0] / seg)  # never followed
    assert [q.path for q in quarantined(tmp_path / "pal")] == [d / seg for d in own]
    assert not is_uuid(f"{seg}\n") and not QUARANTINE_RE.match(f"{seg}.corrupt-1\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody (root enters any folder)")
def test_a_backup_named_folder_that_cannot_be_entered_is_skipped():
    """A folder named as one of the palace's backups that its reader may list but not
    enter (mode 644) is no source of vectors, and no traceback: the other backups stay
    offered. Read by a forked child that became nobody (modules already loaded)."""
    from chaosfix.palace.leftovers import quarantined

    tmp_path = Path(tempfile.mkdtemp())  # (pytest's own is root's alone, mode 700)
    seg = "0b6f1c2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
    good, shut = tmp_path / "pal.chaosfix-backup-20261201-000000", tmp_path / "pal.chaosfix-backup-20261202-000000"
    for d in (good, shut):
        (d / seg).mkdir(parents=True)
    (tmp_path / "pal").mkdir()
    for d in (tmp_path, good, good / seg, tmp_path / "pal"):
        d.chmod(0o755)
    shut.chmod(0o644)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, then one line on the pipe, whatever happens
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            out = repr([str(q.path) for q in quarantined(tmp_path / "pal")])
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = f"raised {type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            got = f.read().decode()
        os.waitpid(pid, 0)
    finally:
        shut.chmod(0o755)
        shutil.rmtree(tmp_path)
    assert got == repr([str(good / seg)]), got


def test_folders_made_under_another_name_limit_are_found(tmp_path):
    """A long-named palace's folders made under one file name limit (eCryptfs's 143, or
    255 by an earlier chaosfix) are this palace's wherever it now lies: its backups are a
    source of vectors, newest first by their time whatever their stem (a whole-name
    backup of 2026-12-01 must not win over a hashed one of 12-05), and the rerun clears
    its half-made backups, including the names the 2026-12-02 releases gave them, and
    its post-check copies. Another palace's folders of the same stem are not."""
    from chaosfix.chromadb_probe import stale_copies
    from chaosfix.palace.leftovers import quarantined, sibling_stem, sibling_stems_re
    from chaosfix.reconcile.run import _own_names

    seg = "0b6f1c2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
    pal = tmp_path / ("\u00e9" * 50)  # 100 bytes: cut at 143, whole at 255
    pal.mkdir()
    cut, whole = sibling_stem(pal, 143), pal.name
    assert cut != whole and sibling_stem(pal) == whole  # (this file system takes 255)
    new_backup = tmp_path / f"{cut}.chaosfix-backup-20261205-090000"
    old_backup = tmp_path / f"{whole}.chaosfix-backup-20261201-090000"
    for b in (new_backup, old_backup):
        (b / seg).mkdir(parents=True)
    assert [q.path.parent for q in quarantined(pal, seg)] == [old_backup, new_backup]
    ours, unfinished = _own_names(pal)
    for name in (f".{cut}.chaosfix-part-20261205-090000", f".{whole}.chaosfix-backup-20261202-033500.ab_d12x9.moving",
                 f".{whole}.chaosfix-backup-20261202-040000-2.moving"):
        assert unfinished.fullmatch(name), name
    assert ours.fullmatch(f"{sibling_stem(pal, 100)}.chaosfix-recovered-20261205-090000")
    copy = tmp_path / f".{cut}.chaosfix-verify-abcd_123"
    copy.mkdir()
    assert stale_copies(pal) == [copy]
    stranger = tmp_path / ("\u00e9" * 49 + "x")  # same beginning, another hash
    stranger.mkdir()
    assert quarantined(stranger) == [] and stale_copies(stranger) == []
    assert not unfinished.fullmatch(f".{sibling_stem(stranger, 143)}.chaosfix-part-20261205-090000")
    # a palace restored from a hashed backup and renamed ends in pal's hash, but what goes
    # before it is no beginning of pal's name: its folders are its own
    digest = cut.rsplit("~", 1)[1]
    for other in (f"x~{digest}", f"\u00e9\u00e9\n~{digest}", f"{cut}x~{digest}"):
        assert not ours.fullmatch(f"{other}.chaosfix-backup-20261205-090000"), other
        assert not unfinished.fullmatch(f".{other}.chaosfix-part-20261205-090000"), other
        assert not re.fullmatch(rf"\.{sibling_stems_re(pal)}\.chaosfix-verify-abcd_123", f".{other}.chaosfix-verify-abcd_123")
    assert ours.fullmatch(f"~{digest}.chaosfix-backup-20261205-090000")  # (a limit that leaves no beginning)


@pytest.mark.parametrize("limit", [143, 255])
def test_sibling_folder_names_fit_the_file_systems_own_name_limit(limit, tmp_path):
    """The stem of chaosfix's folders beside a palace follows the limit of the palace's
    file system, not Linux's 255: on eCryptfs (143 bytes) a palace named over ~95 bytes
    got "File name too long" for its backup. Every folder name chaosfix makes fits, for
    names up to the limit, ASCII or not, and the limit is read from the file system."""
    from chaosfix.palace.leftovers import NAME_MAX, name_max, sibling_stem

    assert name_max(tmp_path) == min(os.pathconf(tmp_path, "PC_NAME_MAX"), NAME_MAX)
    for name in ("p" * 90, "p" * 96, "p" * (limit - 1), "\u00e9" * (limit // 2), "\U0001f600" * (limit // 4)):
        stem = sibling_stem(tmp_path / name, limit)
        assert (stem == name) == (len(os.fsencode(name)) <= limit - 48)
        for made in (f"{stem}.chaosfix-backup-20261204-101500-99", f".{stem}.chaosfix-part-20261204-101500-99",
                     f"{stem}.chaosfix-recovered-20261204-101500-99", f".{stem}.chaosfix-verify-abcdefgh"):
            assert len(os.fsencode(made)) <= limit, (name, made)
