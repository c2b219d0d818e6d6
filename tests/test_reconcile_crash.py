"""Crash-safety of ``chaosfix reconcile``: SIGKILL it at each of its own steps (the kill
points of chaosfix/reconcile/run.py, advanced one by one as SQLite's crash tests do) and
at seeded random moments; each time nothing is lost and the next reconcile completes,
leaving a palace that check calls consistent and chromadb reads in full.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    HASH_EMBEDDER,
    assert_consistent,
    assert_judged_by_chromadb,
    damaged_palace,
    hashes,
    header,
    reconcile,
    sql_rows,
)

from chaosfix import faults
from chaosfix.reconcile import run as run_mod
from chaosfix.reconcile.plan import chroma_capacity
from chaosfix.workload import PalaceSpec, child_env, copy_palace, fresh_palace

RECONCILE_SRC = Path(run_mod.__file__).parent
BIG = PalaceSpec(drawers=3000, sync_threshold=1000, batch_size=100)


def documented_kill_points() -> list[str]:
    """The steps listed in run.py's docstring ("Order of work")."""
    doc = run_mod.__doc__ or ""
    section = doc.split("Order of work", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^  ([a-z-]+)\s{2,}", section, flags=re.M)


KILL_POINTS = documented_kill_points()


def test_every_kill_point_is_documented_and_tested():
    in_code = set()
    for f in RECONCILE_SRC.glob("*.py"):
        in_code |= set(re.findall(r"""killpoint\(["']([a-z-]+)["']\)""", f.read_text()))
    assert len(KILL_POINTS) >= 8 and set(KILL_POINTS) == in_code


def spawn_reconcile(palace: Path, *args: str, kill_at: str | None = None) -> subprocess.Popen:
    env = child_env()
    env.pop("CHAOSFIX_KILL_AT", None)
    if kill_at:
        env["CHAOSFIX_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "chaosfix", "reconcile", str(palace), "--json",
                             "--no-chromadb-check", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def old_segment_kept(beside: Path, old: dict[str, str]) -> bool:
    """Some folder beside the palace (a backup, or leftovers a rerun recovered) holds the
    old segment, byte for byte."""
    return any(hashes(seg) == old for d in beside.iterdir() if d.name != "palace" and d.is_dir()
               for seg in d.iterdir() if seg.is_dir())


def rerun_and_judge(p: Path, rows: int, old_seg: dict[str, str], spec: PalaceSpec,
                    *args: str) -> None:
    code, doc, err = reconcile(p, "--no-chromadb-check", *args)
    assert code in (0, 1), err
    assert sql_rows(p) == rows
    assert_consistent(p)
    leftovers = [n for n in (x.name for x in p.iterdir()) if n.startswith(".chaosfix") or n.endswith("-journal")]
    assert leftovers == [], leftovers
    assert old_segment_kept(p.parent, old_seg), "the old segment went missing"
    partial = [x for d in p.parent.iterdir() if d.name.startswith("palace.chaosfix-") and d.is_dir()
               for x in d.iterdir() if x.name.endswith(".moving") and x.name != ".notes.moving"]
    assert partial == [], partial  # a copy killed midway is never left looking like a backup
    empty = [d.name for d in p.parent.iterdir() if d.name.startswith("palace.chaosfix-") and not any(d.iterdir())]
    assert empty == [], empty
    assert reconcile(p, "--no-chromadb-check")[0] == 0
    assert_judged_by_chromadb(p, rows, spec)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_each_step_then_rerun(point, tmp_path, damage_cache):
    """Partial flush (SQL-only orphans, WAL purged) plus a poisoned vector max_seq_id, so
    the repair rebuilds the index and writes SQL in both chromadb versions."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    rows = sql_rows(p)
    old_seg = hashes(faults.segment_dir(p))
    proc = spawn_reconcile(p, "--embedder", HASH_EMBEDDER, kill_at=point)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err[-500:])
    assert sql_rows(p) == rows, "a committed row was lost"
    rerun_and_judge(p, rows, old_seg, PalaceSpec(), "--embedder", HASH_EMBEDDER)


def test_random_time_kills_then_rerun(tmp_path):
    """A chain of SIGKILLs at seeded random moments during ``--strategy rebuild`` of a
    3000-drawer palace (off-by-one pickle, poisoned vector max_seq_id): each run first
    clears what the previous one left; after the last, a rerun completes."""
    src = fresh_palace(tmp_path / "work" / "src", BIG)
    faults.off_by_one(src)
    faults.poison_seq(src, "vector")
    # how long an uninterrupted run takes, from process start
    ctl = copy_palace(src, tmp_path / "work" / "control")
    t = time.perf_counter()
    proc = spawn_reconcile(ctl, "--strategy", "rebuild")
    _out, err = proc.communicate(timeout=120)
    took = time.perf_counter() - t
    assert proc.returncode == 1, err

    p = copy_palace(src, tmp_path / "run" / "palace")
    rows = sql_rows(p)
    old_seg = hashes(faults.segment_dir(p))
    outcomes = []
    for seed in range(4):
        delay = random.Random(f"reconcile-kill:{seed}").uniform(0.2, 0.9) * took
        proc = spawn_reconcile(p, "--strategy", "rebuild")
        try:
            _out, err = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            _out, err = proc.communicate()
        outcomes.append(proc.returncode)
        assert proc.returncode in (-signal.SIGKILL, 1), (seed, proc.returncode, err[-300:])
        assert sql_rows(p) == rows, "a committed row was lost"
    assert -signal.SIGKILL in outcomes, f"no kill landed inside a reconcile ({outcomes}, run takes {took:.2f}s)"
    rerun_and_judge(p, rows, old_seg, BIG, "--strategy", "rebuild")
    assert rows <= header(p).max_elements <= chroma_capacity(rows), "max_elements sized beyond what chromadb would"


def _verify_children(marker: str) -> list[int]:
    """Post-check children carrying ``marker`` in their environment (tests run in
    parallel: other reconciles start their own)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and b"_verify_child.py" in (d / "cmdline").read_bytes()
                    and marker.encode() in (d / "environ").read_bytes()):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def test_post_check_child_started_ahead_exits_with_a_killed_reconcile(tmp_path, damage_cache):
    """reconcile starts chromadb's post-check child before the repair (its import overlaps
    the build); SIGKILLed after the commit, before the post-check, the child must not
    outlive it: it reads EOF on its stdin and exits."""
    marker = f"CHAOSFIX_TEST_MARK={tmp_path.name}"
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    rows, old_seg = sql_rows(p), hashes(faults.segment_dir(p))
    env = child_env() | {"CHAOSFIX_KILL_AT": "committed", "CHAOSFIX_TEST_MARK": tmp_path.name}
    proc = subprocess.Popen([sys.executable, "-m", "chaosfix", "reconcile", str(p), "--json",
                             "--embedder", HASH_EMBEDDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    deadline = time.monotonic() + 60
    while _verify_children(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _verify_children(marker) == []
    rerun_and_judge(p, rows, old_seg, PalaceSpec(), "--embedder", HASH_EMBEDDER)


@pytest.mark.parametrize("point", ["backed-up", "built"])
def test_a_kill_beside_the_post_checks_early_copy_leaves_a_copy_the_rerun_removes(point, tmp_path, damage_cache):
    """With the post-check on, its copy of the palace (SQLite and the folders the repair
    leaves alone) is begun under the lock, before the build; SIGKILLed while it exists,
    the reconcile leaves the copy beside the palace, and the rerun removes it (never the
    palace's own files) and repairs."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    rows, old_seg = sql_rows(p), hashes(faults.segment_dir(p))
    env = child_env() | {"CHAOSFIX_KILL_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "chaosfix", "reconcile", str(p), "--json",
                             "--embedder", HASH_EMBEDDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    copies = [d for d in tmp_path.iterdir() if d.name.startswith(".palace.chaosfix-verify-")]
    assert len(copies) == 1, sorted(x.name for x in tmp_path.iterdir())
    code, doc, err = reconcile(p, "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["chromadb"]["ok"], err
    assert any("a copy an interrupted post-check left" in n for n in doc["notes"]), doc["notes"]
    assert not copies[0].exists() and sql_rows(p) == rows
    assert old_segment_kept(tmp_path, old_seg)
    assert_consistent(p)


def test_a_kill_while_the_build_holds_a_hard_link_leaves_one_name_of_the_palaces_file(tmp_path, damage_cache):
    """An incremental build loads data_level0.bin through a hard link to the palace's own
    file while a copy replaces it. SIGKILLed at that moment, the build folder holds a
    second name of the live file; the rerun drops it before moving the leftover aside,
    so afterwards exactly one name remains (the old segment in the backup): nothing can
    write the palace's bytes through a leftover."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    seg = faults.segment_dir(p)
    ino = (seg / "data_level0.bin").stat().st_ino
    proc = spawn_reconcile(p, "--embedder", HASH_EMBEDDER, kill_at="linked")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    assert (p / f".chaosfix-build-{seg.name}" / "data_level0.bin").stat().st_ino == ino  # the link, left
    code, doc, err = reconcile(p, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1, err
    names = [f for f in tmp_path.rglob("data_level0.bin") if f.stat().st_ino == ino]
    assert len(names) == 1 and ".chaosfix-backup-" in str(names[0]), names
    assert_consistent(p)


def test_a_partial_cross_device_move_left_in_the_backup_is_removed_by_the_rerun(tmp_path, damage_cache):
    """Killed after the swap, while the old segment was being copied into the backup on
    another file system (``move_out``'s way across devices): the backup holds a partial
    ``.<segment>.moving`` beside the old segment still whole in the palace. The rerun
    drops the partial copy, keeps the old segment and completes."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    rows = sql_rows(p)
    seg = faults.segment_dir(p).name
    old_seg = hashes(faults.segment_dir(p))
    proc = spawn_reconcile(p, "--embedder", HASH_EMBEDDER, kill_at="swapped")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    backup = next(d for d in p.parent.iterdir() if d.name.startswith("palace.chaosfix-backup-"))
    partial = backup / f".{seg}.moving"
    partial.mkdir()
    (partial / "data_level0.bin").write_bytes((p / f".chaosfix-old-{seg}" / "data_level0.bin").read_bytes()[:4096])
    mine = backup / ".notes.moving"  # a name move_out never gives: not chaosfix's to remove
    mine.write_text("kept")
    rerun_and_judge(p, rows, old_seg, PalaceSpec(), "--embedder", HASH_EMBEDDER)
    assert not partial.exists()
    assert mine.read_text() == "kept"


def test_a_kill_while_the_journals_rollback_is_backed_up_leaves_no_lone_db(tmp_path, damage_cache):
    """A hot journal's rollback first backs up the db and the journal, a pair: the db
    alone (its spilled, uncommitted pages without the journal that undoes them) is a
    malformed file that must never sit in a folder that looks like a backup. SIGKILLed
    with the copies made, before the backup folder is renamed into place: only the
    partial (dot-named) folder is there; the rerun removes it, rolls back and repairs,
    and its backup holds the pair, which SQLite opens as the committed state."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    rows = sql_rows(p)
    faults.leave_hot_journal(p, spill=True)
    proc = spawn_reconcile(p, "--embedder", HASH_EMBEDDER, kill_at="copied")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    beside = sorted(d.name for d in tmp_path.iterdir() if "chaosfix" in d.name)
    assert len(beside) == 1 and beside[0].startswith(".palace.chaosfix-part-"), beside
    (p / ".chaosfix.lock").unlink()  # as a power cut may take it (never fsynced): the sweep must not need it
    code, doc, err = reconcile(p, "--no-chromadb-check", "--embedder", HASH_EMBEDDER)
    assert code == 1 and doc["journal_rollback"] is True and doc["after_consistent"] is True, err
    assert any("a backup an interrupted run left unfinished" in n for n in doc["notes"]), doc["notes"]
    assert not (tmp_path / beside[0]).exists() and sql_rows(p) == rows
    backup = Path(doc["backup"])
    assert {"chroma.sqlite3", "chroma.sqlite3-journal"} <= {f.name for f in backup.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o755 & ~mask  # (readable as any folder the user makes)
    assert sql_rows(backup) == rows  # (read from a copy of the pair: SQLite rolls the journal back)


def test_a_journal_rolled_back_by_another_program_while_it_is_backed_up_stops_the_repair(tmp_path, damage_cache):
    """chaosfix's lock is advisory: another program's SQLite (chromadb starting) may open
    the palace while the rollback's backup copies the db, roll the hot journal back and
    delete it. The backup would then hold the pre-rollback db without its journal, a
    malformed file, so the repair stops (one line, exit 8) and leaves no backup; the
    rerun finds a clean palace. The db's copy is slowed by strace (a 3 s delay on its
    sendfile) and the other program opens the palace meanwhile, for real."""
    if not faults.strace_available():
        pytest.skip("strace not installed or ptrace not permitted")
    from chaosfix.faults.kill import strace_path

    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    rows = sql_rows(p)
    journal = faults.leave_hot_journal(p, spill=True)
    env = child_env()
    env.pop("CHAOSFIX_KILL_AT", None)
    proc = subprocess.Popen([strace_path(), "-f", "-qq", "-o", "/dev/null", "-P", str(p / "chroma.sqlite3"),
                             "-e", "trace=sendfile,copy_file_range", "-e",
                             "inject=sendfile,copy_file_range:delay_enter=3000000:when=1",
                             sys.executable, "-m", "chaosfix", "reconcile", str(p), "--json", "--no-chromadb-check",
                             "--embedder", HASH_EMBEDDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 60
    while not [d for d in tmp_path.iterdir() if d.name.startswith(".palace.chaosfix-part-")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    con = sqlite3.connect(p / "chroma.sqlite3")  # what chromadb's start does: SQLite rolls the journal back
    con.execute("SELECT count(*) FROM embeddings").fetchone()
    con.close()
    assert not journal.exists()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 8, err[-1500:]
    assert "chroma.sqlite3-journal" in err and "nothing was changed" in err, err[-1500:]
    assert [d.name for d in tmp_path.iterdir() if "chaosfix" in d.name] == []
    rerun_and_judge(p, rows, hashes(faults.segment_dir(p)), PalaceSpec(), "--embedder", HASH_EMBEDDER)


def test_a_dead_mount_beside_the_palace_does_not_stop_the_sweep(tmp_path, damage_cache):
    """The rerun's sweep of unfinished backups looks only at chaosfix's own names: a
    sibling whose stat fails (a FUSE mount whose daemon is gone: ENOTCONN, as a dead
    sshfs mount answers) must not keep it from removing the partial backup a kill left."""
    import shlex
    import shutil

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    proc = spawn_reconcile(p, "--embedder", HASH_EMBEDDER, kill_at="copied")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-500:]
    partial = [d for d in tmp_path.iterdir() if d.name.startswith(".palace.chaosfix-part-")]
    assert len(partial) == 1, sorted(x.name for x in tmp_path.iterdir())
    dead = tmp_path / ".cache"
    dead.mkdir()
    q = shlex.quote
    mount = (f"exec 3<>/dev/fuse; mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 dead {q(str(dead))}; "
             "exec 3>&-")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"{mount} && stat {q(str(dead))}"], capture_output=True,
                           text=True, timeout=60)
    if "Transport endpoint is not connected" not in probe.stderr:
        pytest.skip(f"no dead FUSE mount here: {probe.stderr.strip()[-200:]}")
    run = shlex.join([sys.executable, "-m", "chaosfix", "reconcile", str(p), "--json", "--no-chromadb-check",
                      "--embedder", HASH_EMBEDDER])
    r = subprocess.run([unshare, "-rm", "sh", "-c", f"{mount} && {run}"], capture_output=True, text=True,
                       timeout=300, env=child_env())
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1, r.stderr[-1500:]
    assert any("a backup an interrupted run left unfinished" in n for n in doc["notes"]), doc["notes"]
    assert not partial[0].exists() and not any("left a partial copy" in n for n in doc["notes"]), doc["notes"]


def test_ctrl_c_right_after_the_backup_is_placed_leaves_no_backup(tmp_path, damage_cache):
    """Ctrl-C the moment the backup folder is renamed into place (strace holds the next
    fsync of the parent folder for 3 s; SIGINT then): the repair stops before any change
    (exit 130), and the backup, a copy of an unchanged db, is dropped with it instead of
    staying beside the palace unknown to the run."""
    if not faults.strace_available():
        pytest.skip("strace not installed or ptrace not permitted")
    from chaosfix.faults.kill import strace_path

    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.poison_seq(p, "vector")
    before = hashes(p)
    env = child_env()
    env.pop("CHAOSFIX_KILL_AT", None)
    proc = subprocess.Popen([strace_path(), "-f", "-qq", "-o", "/dev/null", "-P", str(tmp_path), "-e", "trace=fsync",
                             "-e", "inject=fsync:delay_enter=3000000:when=2", sys.executable, "-m", "chaosfix",
                             "reconcile", str(p), "--json", "--no-chromadb-check", "--embedder", HASH_EMBEDDER],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # (SIGINT as a terminal delivers it: a run started in the background
                            # or an xdist worker may have it ignored, and a child inherits that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not [d for d in tmp_path.iterdir() if d.name.startswith("palace.chaosfix-backup-")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    child = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(child[0]), signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert hashes(p) == before
    assert [d.name for d in tmp_path.iterdir() if "chaosfix" in d.name] == [], list(tmp_path.iterdir())


def test_a_ctrl_c_inside_a_deferred_step_comes_after_it():
    """``interrupts_deferred`` holds a real SIGINT (Ctrl-C) sent in the middle of a step
    of two parts (the backup's rename and its record) and raises it once the step is
    whole; outside such a step Ctrl-C interrupts at once, as before."""
    from chaosfix.reconcile.safety import interrupts_deferred

    # (Python's own handler, as a terminal's python has it: a run started in the
    # background, or an xdist worker, may have inherited SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _deferred_then_at_once(interrupts_deferred)
    finally:
        signal.signal(signal.SIGINT, previous)


def _deferred_then_at_once(interrupts_deferred) -> None:  # noqa: ANN001
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (Python runs the handler here: the held one, not the default)
            done.append("both parts")
    assert done == ["both parts"]
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("never")
    assert done == ["both parts"]


@pytest.mark.parametrize("point", ["built", "verified"])
def test_reconcile_holds_sqlites_write_lock_from_its_transaction_to_the_swap(point, tmp_path, damage_cache):
    """Stopped (SIGSTOP) after its build, and after its verification and chromadb's post-check,
    reconcile still holds SQLite's lock: another writer is refused. Its backup and the
    post-check's copy read chroma.sqlite3 through a descriptor of this process, and POSIX
    drops every lock a process holds on a file when any descriptor of it closes: a chromadb
    writer started meanwhile wrote under the repair, and corrupted the file (helper-41)."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    env = dict(child_env(), CHAOSFIX_STOP_AT=point)
    proc = subprocess.Popen([sys.executable, "-c", "from chaosfix.cli import main; main()", "reconcile", str(p),
                             "--embedder", HASH_EMBEDDER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-1500:]
            time.sleep(0.02)
        other = sqlite3.connect(p / "chroma.sqlite3", timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-1500:]


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_the_plan_is_made_again_under_the_lock_only_when_the_palace_changed(journal_mode, tmp_path, damage_cache):
    """Stopped between its first look and the lock, reconcile plans again under the lock
    only if a palace file changed meanwhile. In WAL mode the repair's own connection
    creates -shm and an empty -wal, which every run took for a change (helper-43's F4):
    "the palace changed since the first look", and a second plan."""
    note = "the palace changed since the first look"
    for change in (False, True):
        p = damaged_palace("lost-hnsw-writes", tmp_path / f"palace-{change}", damage_cache)
        con = sqlite3.connect(p / "chroma.sqlite3", isolation_level=None)
        assert con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
        con.close()
        env = dict(child_env(), CHAOSFIX_STOP_AT="planned")
        proc = subprocess.Popen([sys.executable, "-c", "from chaosfix.cli import main; main()", "reconcile",
                                 str(p), "--embedder", HASH_EMBEDDER, "--json"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-1500:]
                time.sleep(0.02)
            if change:  # another tool commits meanwhile
                con = sqlite3.connect(p / "chroma.sqlite3", isolation_level=None)
                con.execute("PRAGMA user_version = 7")
                con.close()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-1500:]
        doc = json.loads(out)
        assert any(note in n for n in doc["notes"]) is change, (change, doc["notes"])
        assert doc["after_consistent"], doc
