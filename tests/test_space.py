"""Reconcile on a file system without room for the repair, for real: a small tmpfs
mounted in a mount namespace of the test's own (``unshare``), and ENOSPC returned by the
kernel's own write path (strace's syscall injection) into the build's files. Either way
the palace is left exactly as it was, the error is one line that says why, and a rerun
with room repairs it."""

from __future__ import annotations

import json
import re
import resource
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HASH_EMBEDDER, assert_consistent, damaged_palace, fingerprint, reconcile

from chaosfix import faults
from chaosfix.faults.kill import strace_path
from chaosfix.workload import PalaceSpec, child_env, fresh_palace

CLI = [sys.executable, "-c", "from chaosfix.cli import main; main()"]


def _size(p: Path) -> int:
    """Bytes of ``p``'s files (or of the file ``p``) as ``_in_small_fs`` copies them:
    whole (``--sparse=never``)."""
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _in_namespace(script: list[str]) -> subprocess.CompletedProcess:
    """``script`` (shell lines, stopping at the first failure) in a user and mount
    namespace of its own, where it may mount; a skip where this machine allows none
    (asked first, with an empty tmpfs: the script's own failures are failures)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    probe = subprocess.run([unshare, "-rm", "sh", "-ec", "mount -t tmpfs -o size=1m probe /mnt"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.strip()[-200:]}")
    return subprocess.run([unshare, "-rm", "sh", "-ec", "; ".join(script)], capture_output=True, text=True,
                          timeout=300, env=child_env())


def _in_small_fs(palace: Path, mnt: Path, size: int, *args: str, prep: tuple[str, ...] = ()) -> list[dict]:
    """``chaosfix reconcile --json ARGS`` (each args tuple in turn) on a dense copy of
    ``palace`` (every zero written, as a copy that kept no holes; then the shell lines
    ``prep``) on a tmpfs of ``size`` bytes mounted at ``mnt`` in a mount namespace of its own; the
    JSON answers, or a skip where this machine lets no test mount one."""
    mnt.mkdir()
    cmd = [f"mount -t tmpfs -o size={size} chaosfix-test {shlex.quote(str(mnt))}",
           f"cp -a --sparse=never {shlex.quote(str(palace))} {shlex.quote(str(mnt / 'p'))}", *prep]
    for a in args:
        run = shlex.join([*CLI, "reconcile", str(mnt / "p"), "--json", *a.split()])
        cmd.append(f"{run} || true")
    cmd.append(f"ls -a {shlex.quote(str(mnt))} {shlex.quote(str(mnt / 'p'))} >&2")
    r = _in_namespace(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    dec, out, pos = json.JSONDecoder(), [], 0
    text = r.stdout
    while (start := text.find("{", pos)) >= 0:
        obj, pos = dec.raw_decode(text, start)
        out.append(obj)
    assert len(out) == len(args), (r.stdout[-2000:], r.stderr[-2000:])
    return out + [{"listing": r.stderr}]


def test_no_room_for_the_repair_is_refused_before_anything_is_written(tmp_path: Path, damage_cache: Path) -> None:
    """A tmpfs that holds the palace and 64 KiB more: the dry run and the real run both
    refuse with the figures (exit 8), nothing is left beside the palace; on a tmpfs with
    room the same palace is repaired (the estimate does not refuse what fits)."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    size = _size(p) + (1 << 20)
    dry, real, listing = _in_small_fs(p, tmp_path / "small", size, f"--dry-run --embedder {HASH_EMBEDDER}",
                                      f"--embedder {HASH_EMBEDDER}")
    assert dry["exit_code"] == 8 and "not enough free space" in (dry["refusal"] or ""), dry
    assert real["exit_code"] == 8 and "not enough free space for the repair" in real["error"], real
    assert "nothing was changed" in real["error"] and "MB on the palace's file system" in real["error"]
    left = listing["listing"]
    assert "chaosfix-backup" not in left and "chaosfix-build" not in left and "chaosfix-verify" not in left, left
    ok, _ = _in_small_fs(p, tmp_path / "roomy", _size(p) * 4 + (16 << 20), f"--embedder {HASH_EMBEDDER}")[:2]
    assert ok["exit_code"] == 1 and ok["after_consistent"] is True, ok


def test_enospc_in_the_build_leaves_the_palace_as_it_was(tmp_path: Path, damage_cache: Path) -> None:
    """Every write to the rebuilt id map fails with ENOSPC (the kernel's answer on a full
    disk): one line naming the cause, exit 8, the palace byte for byte as it was, no
    build folder left; then a rerun with room repairs it."""
    if not faults.strace_available():
        pytest.skip("strace not installed or ptrace not permitted")
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    before = fingerprint(p)
    pickle = p / f".chaosfix-build-{faults.segment_dir(p).name}" / "index_metadata.pickle"
    r = subprocess.run([strace_path(), "-f", "-qq", "-o", "/dev/null", "-P", str(pickle), "-e", "trace=write,pwrite64",
                        "-e", "inject=write,pwrite64:error=ENOSPC:when=1+", *CLI, "reconcile", str(p),
                        "--embedder", HASH_EMBEDDER, "--no-chromadb-check"],
                       capture_output=True, text=True, timeout=300, env=child_env())
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("chaosfix: building", "chaosfix: verifying", "chaosfix: backing up"))]
    assert r.returncode == 8, r.stderr[-2000:]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "nothing was changed" in lines[0], lines
    assert "internal error" not in lines[0] and "Traceback" not in r.stderr
    assert fingerprint(p) == before
    assert not [d for d in p.parent.iterdir() if "chaosfix" in d.name] and not pickle.parent.exists()
    code, _, err = reconcile(p, "--embedder", HASH_EMBEDDER, "--no-chromadb-check")
    assert code == 1, err
    assert_consistent(p)


def test_a_densely_bloated_link_lists_is_not_counted_against_its_rebuild(tmp_path: Path, damage_cache: Path) -> None:
    """LINK_BLOAT with its zeros written out (a copy or restore that did not keep the
    holes): the rebuild never copies the old folder, so 24 MiB of zeros must not be
    counted twice against a file system with 16 MiB to spare, where the repair fits."""
    p = damaged_palace("link-bloat-300x", tmp_path / "palace", damage_cache)
    links = faults.segment_file(p, "link_lists.bin")
    with open(links, "r+b") as f:  # 24 MiB of bloat (written whole by the dense copy)
        f.truncate(24 << 20)
    ok = _in_small_fs(p, tmp_path / "tight", _size(p) + (16 << 20), f"--embedder {HASH_EMBEDDER}")[0]
    assert ok["exit_code"] == 1 and ok["after_consistent"] is True, ok
    assert ok["plans"][0]["strategy"] == "rebuild", ok["plans"]


@pytest.mark.parametrize("parent", ["64m", "2m"])
def test_a_palace_that_is_a_mount_point_is_repaired_with_its_backup_beside_it(tmp_path: Path, damage_cache: Path,
                                                                              parent: str) -> None:
    """A palace on a file system of its own (a container volume): the old segment goes to
    the backup in the parent, another file system, by copy and removal instead of a
    rename (which fails with EXDEV there); a rerun has nothing to do. With a parent too
    small for that copy, the repair is refused before anything is written."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    mnt = tmp_path / "vol"
    mnt.mkdir()
    q = shlex.quote
    run = shlex.join([*CLI, "reconcile", str(mnt / "p"), "--json", "--embedder", HASH_EMBEDDER])
    r = _in_namespace([f"mount -t tmpfs -o size={parent} parent {q(str(mnt))}", f"mkdir {q(str(mnt / 'p'))}",
                       f"mount -t tmpfs -o size=64m palace {q(str(mnt / 'p'))}",
                       f"cp -a {q(str(p))}/. {q(str(mnt / 'p'))}/", f"{run} || true", "echo ==", f"{run} || true",
                       f"ls -a {q(str(mnt))}/*chaosfix-backup-*/ >&2 || true"])
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads(part) for part in r.stdout.split("==\n"))
    if parent == "2m":
        for refused in (first, second):
            assert refused["exit_code"] == 8, refused
            assert "not enough free space" in refused["error"] and "the folders moved into the backup" in refused["error"]
        assert "cannot access" in r.stderr and "chaosfix-recovered" not in r.stderr, r.stderr  # no backup made
        return
    assert first["exit_code"] == 1 and first["after_consistent"] is True, (first, r.stderr[-1500:])
    assert second["exit_code"] == 0, second
    listing = r.stderr.splitlines()
    assert faults.segment_dir(p).name in listing, r.stderr[-1500:]  # the old segment, whole, in the backup
    assert not [n for n in listing if n.endswith(".moving")], listing


def test_a_palace_named_dot_gets_its_backup_beside_it(tmp_path: Path, damage_cache: Path) -> None:
    """``chaosfix reconcile .`` from inside the palace (how many run it): the backup and
    the post-check's copy go beside the palace, as for any other spelling, not inside it."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    r = subprocess.run([*CLI, "reconcile", ".", "--json", "--embedder", HASH_EMBEDDER], cwd=p,
                       capture_output=True, text=True, timeout=300, env=child_env())
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and doc["after_consistent"] is True, (doc, r.stderr[-1500:])
    assert Path(doc["backup"]).parent == p.parent and Path(doc["palace"]) == p, doc
    assert not [d.name for d in p.iterdir() if "chaosfix" in d.name], list(p.iterdir())


def test_no_room_to_back_up_a_hot_journal_is_refused_before_its_rollback(tmp_path: Path, damage_cache: Path) -> None:
    """A hot journal is rolled back first, after copying the db and the journal into the
    backup. On a tmpfs without room for those copies the dry run and the real run refuse
    (exit 8) before that copy (no backup folder is begun), and the refusal names
    ``--no-backup``, which then rolls it back; with room, one run repairs all."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    journal = faults.leave_hot_journal(p, spill=True)
    copies = _size(p / "chroma.sqlite3") + _size(journal)
    size = _size(p) + (1 << 20) + copies // 8  # room for the 1 MiB margin, not for the copies
    dry, real, bare, listing = _in_small_fs(p, tmp_path / "small", size, f"--dry-run --embedder {HASH_EMBEDDER}",
                                            f"--embedder {HASH_EMBEDDER}", f"--no-backup --embedder {HASH_EMBEDDER}")
    for refused in (dry["refusal"], real["error"]):
        assert refused and "the backup of chroma.sqlite3 and its journal" in refused, (dry, real)
        assert "nothing was changed" in refused and "--no-backup" in refused, refused
    assert dry["exit_code"] == 8 and dry["journal_rollback"] is True and real["exit_code"] == 8, (dry, real)
    # as the hint says, --no-backup rolls the journal back there (the repair itself may then be short)
    assert bare["exit_code"] == 1 or "only the leftover journal was rolled back" in bare["error"], bare
    left = listing["listing"]
    assert "chroma.sqlite3-journal" not in left and "chaosfix-backup" not in left, left
    ok = _in_small_fs(p, tmp_path / "roomy", _size(p) * 4 + (16 << 20), f"--embedder {HASH_EMBEDDER}")[0]
    assert ok["exit_code"] == 1 and ok["journal_rollback"] is True and ok["after_consistent"] is True, ok


def test_a_failed_copy_into_the_rollbacks_backup_leaves_the_palace_as_it_was(tmp_path: Path,
                                                                             damage_cache: Path) -> None:
    """A write the space check could not foresee fails while the db is copied into the
    rollback's backup (a file size limit: EFBIG, for real): one line, exit 8, the hot
    journal and the palace byte for byte as they were, no partial backup left beside."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.leave_hot_journal(p, spill=True)
    before = fingerprint(p)
    limit = _size(p / "chroma.sqlite3") // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)

    r = subprocess.run([*CLI, "reconcile", str(p), "--embedder", HASH_EMBEDDER], capture_output=True, text=True,
                       timeout=300, env=child_env(), preexec_fn=small_files)
    assert r.returncode == 8, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "nothing was changed" in lines[0], lines
    assert fingerprint(p) == before
    assert not [d for d in p.parent.iterdir() if "chaosfix" in d.name], list(p.parent.iterdir())


def test_the_journal_of_a_large_leftover_delete_is_counted(tmp_path: Path) -> None:
    """STALE_ROWS: 400 records' embeddings rows deleted behind chromadb's back, every
    tenth (scattered ids touch a page or more each: SQLite's journal of their leftovers'
    delete grows to about a third of the db, well past the 1 MiB margin). The refusal
    counts it, and a file system with the room the refusal names repairs the palace."""
    p = fresh_palace(tmp_path / "palace", PalaceSpec(drawers=4000, dim=32))
    con = sqlite3.connect(p / "chroma.sqlite3")
    con.execute("DELETE FROM embeddings WHERE id % 10 = 3")
    con.commit()
    con.close()
    args = f"--embedder {HASH_EMBEDDER} --no-chromadb-check"
    dry, real, _ = _in_small_fs(p, tmp_path / "small", _size(p) + (1 << 20), f"--dry-run {args}", args)
    assert dry["exit_code"] == 8 and real["exit_code"] == 8, (dry, real)
    assert "SQLite's journal of the row deletes" in real["error"] and "nothing was changed" in real["error"], real
    want = int(re.search(r"writes about ([\d,]+) MB", real["error"]).group(1).replace(",", ""))
    ok = _in_small_fs(p, tmp_path / "enough", _size(p) + (want + 1 << 20), args)[0]
    assert ok["exit_code"] == 1 and ok["after_consistent"] is True and ok["stale_rows"]["ids"] == 400, ok


def test_the_dry_run_counts_the_rollback_and_the_repair_together(tmp_path: Path, damage_cache: Path) -> None:
    """Room for a hot journal's rollback (its backup) and little more: the real run rolls
    back, then refuses the repair (exit 8, "only the leftover journal was rolled back").
    The dry run rolls nothing back, so it must count both together and refuse too,
    instead of saying it would repair."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    journal = faults.leave_hot_journal(p, spill=True)
    size = _size(p) + _size(p / "chroma.sqlite3") + _size(journal) + (2 << 20)
    args = f"--embedder {HASH_EMBEDDER}"
    dry, real, _ = _in_small_fs(p, tmp_path / "small", size, f"--dry-run {args}", args)
    assert real["exit_code"] == 8 and "only the leftover journal was rolled back" in real["error"], real
    assert dry["exit_code"] == 8 and "the backup of chroma.sqlite3 and its journal" in (dry["refusal"] or ""), dry


def test_a_sparse_hostile_journal_costs_only_its_data(tmp_path: Path, damage_cache: Path) -> None:
    """A hot journal whose header claims 2^32 pages of 64 KiB, stretched to 1 GiB of
    holes on a 64 MiB file system: the rollback's estimate is bounded by the blocks the
    journal really holds (no refusal asking for a gigabyte), and check's private copy of
    the db and journal keeps the holes."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    faults.leave_hot_journal(p)  # (not spilled: the db itself holds only committed pages)
    j = shlex.quote(str(tmp_path / "small" / "p" / "chroma.sqlite3-journal"))
    magic = f"printf '\\331\\325\\005\\371\\040\\241\\143\\327' | dd of={j} bs=1 conv=notrunc status=none"
    header = f"printf '\\377\\377\\377\\377' | dd of={j} bs=1 seek=16 conv=notrunc status=none"
    size = f"printf '\\000\\001\\000\\000' | dd of={j} bs=1 seek=24 conv=notrunc status=none"
    dry, listing = _in_small_fs(p, tmp_path / "small", 64 << 20, f"--dry-run --embedder {HASH_EMBEDDER}",
                                prep=(magic, header, size, f"truncate -s 1G {j}", f"ls -ls {j} >&2"))
    assert "not enough free space" not in (dry.get("refusal") or "") + (dry.get("error") or ""), dry
    assert " 1073741824 " in listing["listing"], listing["listing"]  # (the journal was as described)
    assert dry["journal_rollback"] is True, dry


def test_a_read_only_palace_or_backup_folder_is_refused_by_the_dry_run_too(tmp_path: Path,
                                                                          damage_cache: Path) -> None:
    """The dry run answers what the real run meets at its lock file, its backup folder
    and the post-check's copy: a palace on a read-only file system is refused by both
    (exit 8, saying so); a writable palace whose parent (where the backup and the
    post-check's copy go) is read-only is refused too, unless --no-backup and
    --no-chromadb-check ask for neither: then the repair lands."""
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    mnt = tmp_path / "vol"
    mnt.mkdir()
    q = shlex.quote

    def run(*extra: str) -> str:
        return shlex.join([*CLI, "reconcile", str(mnt / "p"), "--json", "--embedder", HASH_EMBEDDER, *extra]) + " || true"

    r = _in_namespace([f"mount -t tmpfs -o size=64m parent {q(str(mnt))}", f"mkdir {q(str(mnt / 'p'))}",
                       f"mount -t tmpfs -o size=64m palace {q(str(mnt / 'p'))}",
                       f"cp -a {q(str(p))}/. {q(str(mnt / 'p'))}/",
                       f"mount -o remount,ro {q(str(mnt / 'p'))}", run("--dry-run"), "echo ==", run(), "echo ==",
                       f"mount -o remount,rw {q(str(mnt / 'p'))}", f"mount -o remount,ro {q(str(mnt))}",
                       run("--dry-run"), "echo ==", run("--dry-run", "--no-backup"), "echo ==",
                       run("--dry-run", "--no-backup", "--no-chromadb-check"), "echo ==",
                       run("--no-backup", "--no-chromadb-check")])
    assert r.returncode == 0, r.stderr[-2000:]
    ro_dry, ro_real, parent_dry, copy_dry, neither_dry, neither = (json.loads(part) for part in r.stdout.split("==\n"))
    assert ro_dry["exit_code"] == 8 and "the palace is on a read-only file system" in ro_dry["refusal"], ro_dry
    assert ro_real["exit_code"] == 8 and "read-only file system" in ro_real["error"], ro_real
    for refused in (parent_dry, copy_dry):  # (the post-check's copy goes beside the palace too)
        assert refused["exit_code"] == 8 and "the folder the backup and the post-check's copy go in" in \
            refused["refusal"], refused
    assert neither_dry["exit_code"] == 1 and neither_dry["refusal"] is None, neither_dry
    assert neither["exit_code"] == 1 and neither["after_consistent"] is True, neither
