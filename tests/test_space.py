"""Reconcile on a file system without room for the repair, for real: a small tmpfs
mounted in a mount namespace of the test's own (``unshare``), and ENOSPC returned by the
kernel's own write path (strace's syscall injection) into the build's files. Either way
the palace is left exactly as it was, the error is one line that says why, and a rerun
with room repairs it."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HASH_EMBEDDER, assert_consistent, damaged_palace, fingerprint, reconcile

from chaosfix import faults
from chaosfix.faults.kill import strace_path
from chaosfix.workload import child_env

CLI = [sys.executable, "-c", "from chaosfix.cli import main; main()"]


def _usage(p: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in p.rglob("*") if f.is_file())


def _in_small_fs(palace: Path, mnt: Path, size: int, *args: str) -> list[dict]:
    """``chaosfix reconcile --json ARGS`` (each args tuple in turn) on a copy of ``palace``
    on a tmpfs of ``size`` bytes mounted at ``mnt`` in a mount namespace of its own; the
    JSON answers, or a skip where this machine lets no test mount one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    mnt.mkdir()
    cmd = [f"mount -t tmpfs -o size={size} chaosfix-test {shlex.quote(str(mnt))}",
           f"cp -a {shlex.quote(str(palace))} {shlex.quote(str(mnt / 'p'))}"]
    for a in args:
        run = shlex.join([*CLI, "reconcile", str(mnt / "p"), "--json", *a.split()])
        cmd.append(f"{run} || true")
    cmd.append(f"ls -a {shlex.quote(str(mnt))} {shlex.quote(str(mnt / 'p'))} >&2")
    r = subprocess.run([unshare, "-rm", "sh", "-ec", "; ".join(cmd)], capture_output=True, text=True, timeout=300,
                       env=child_env())
    if r.returncode != 0 and ("Operation not permitted" in r.stderr or "unshare failed" in r.stderr):
        pytest.skip(f"no mount namespace here: {r.stderr.strip()[-200:]}")
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
    size = _usage(p) + (1 << 20)
    dry, real, listing = _in_small_fs(p, tmp_path / "small", size, f"--dry-run --embedder {HASH_EMBEDDER}",
                                      f"--embedder {HASH_EMBEDDER}")
    assert dry["exit_code"] == 8 and "not enough free space" in (dry["refusal"] or ""), dry
    assert real["exit_code"] == 8 and "not enough free space for the repair" in real["error"], real
    assert "nothing was changed" in real["error"] and "MB beside the palace" in real["error"]
    left = listing["listing"]
    assert "chaosfix-backup" not in left and "chaosfix-build" not in left and "chaosfix-verify" not in left, left
    ok, _ = _in_small_fs(p, tmp_path / "roomy", _usage(p) * 4 + (16 << 20), f"--embedder {HASH_EMBEDDER}")[:2]
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
