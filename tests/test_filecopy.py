"""Copies that keep a palace file's holes (``chaosfix.filecopy``), in this process and
in the child process the build copies data_level0.bin with. Real files on the test's
own file system; where it cannot report holes (no SEEK_HOLE) the zero-chunk fallback
is what runs, and the same assertions hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaosfix import filecopy

MB = 1 << 20


def _blocks(p: Path) -> int:
    return p.stat().st_blocks * 512


def _holey(p: Path, apparent: int, data: dict[int, bytes]) -> Path:
    """A file of ``apparent`` bytes holding ``data`` at its offsets, holes elsewhere."""
    with open(p, "wb") as f:
        for off, buf in data.items():
            f.seek(off)
            f.write(buf)
        f.truncate(apparent)
    return p


def _bytes_read() -> int | None:
    """This process's bytes read by read-like calls (Linux ``/proc/self/io`` rchar)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return None


def _same_content(a: Path, b: Path, at: dict[int, bytes]) -> None:
    assert a.stat().st_size == b.stat().st_size
    with open(b, "rb") as f:
        for off, buf in at.items():
            f.seek(off)
            assert f.read(len(buf)) == buf
        f.seek(0)
        assert f.read(4096) == (at.get(0, b"") + bytes(4096))[:4096]


def test_a_sparse_file_is_copied_by_its_data_not_its_apparent_size(tmp_path: Path):
    """64 GiB apparent, 2 MiB of data: the copy writes (and reads) only the data, so it
    takes milliseconds and no disk, where reading every chunk would read 64 GiB."""
    data = {0: os.urandom(MB), 40 << 30: os.urandom(MB), (64 << 30) - 4096: b"\x01" * 4096}
    src = _holey(tmp_path / "link_lists.bin", 64 << 30, data)
    if _blocks(src) >= src.stat().st_size:
        pytest.skip("this file system does not keep holes")
    dst = tmp_path / "copy.bin"
    read_before = _bytes_read()
    filecopy.sparse_copy(src, dst)
    _same_content(src, dst, data)
    assert _blocks(dst) < 16 * MB
    if read_before is not None:  # bytes this process read through read(2): the data, not the holes
        assert _bytes_read() - read_before < 256 * MB
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns


def test_the_source_is_flushed_before_its_holes_are_trusted(tmp_path: Path):
    """OpenZFS 2.2.0/2.2.1 named a file's dirty data a hole (openzfs/zfs#15526): the copy
    fsyncs its source before the first SEEK_HOLE/SEEK_DATA, seen by strace on a real
    copy of a sparse file written just before (its pages still dirty)."""
    from chaosfix.faults import strace_available
    from chaosfix.faults.kill import strace_path

    if not strace_available():
        pytest.skip("strace not installed or ptrace not permitted")
    data = {0: os.urandom(MB), 8 * MB: os.urandom(MB)}
    src = _holey(tmp_path / "link_lists.bin", 64 * MB, data)
    if _blocks(src) >= src.stat().st_size:
        pytest.skip("this file system does not keep holes")
    if filecopy.reflink(src, tmp_path / "clone.bin"):
        pytest.skip("this file system clones files: a copy never asks where the holes are")
    dst, log = tmp_path / "copy.bin", tmp_path / "trace"
    code = "import sys; from chaosfix import filecopy; filecopy.sparse_copy(*map(__import__('pathlib').Path, sys.argv[1:]))"
    subprocess.run([strace_path(), "-f", "-e", "trace=openat,fsync,lseek", "-o", str(log), sys.executable, "-c", code,
                    str(src), str(dst)], check=True, timeout=60)
    calls = log.read_text().splitlines()
    # the first hole probe, the last open of the source before it on that descriptor, and
    # a flush of that descriptor between the two
    probe = next(i for i, ln in enumerate(calls) if "lseek(" in ln and ("SEEK_HOLE" in ln or "SEEK_DATA" in ln))
    fd = calls[probe].split("lseek(", 1)[1].split(",", 1)[0]
    opened = max(i for i, ln in enumerate(calls[:probe]) if "openat(" in ln and str(src) in ln
                 and ln.rstrip().endswith(f"= {fd}"))
    assert any(f"fsync({fd})" in ln for ln in calls[opened:probe]), "\n".join(calls[opened:probe + 1])
    _same_content(src, dst, data)


def test_an_almost_dense_file_copies_whole(tmp_path: Path):
    """One 4 KiB hole in a 24 MiB file (a palace's chroma.sqlite3 after a copy that
    skipped a zero page) takes the sparse path: every byte still arrives."""
    body = os.urandom(24 * MB)
    src = tmp_path / "chroma.sqlite3"
    src.write_bytes(body)
    with open(src, "r+b") as f:  # punch one page: rewrite the file around a hole
        f.truncate(8 * MB)
        f.seek(8 * MB + 4096)
        f.write(body[8 * MB + 4096 :])
    want = body[: 8 * MB] + bytes(4096) + body[8 * MB + 4096 :]
    dst = tmp_path / "copy.sqlite3"
    filecopy.sparse_copy(src, dst)
    assert dst.read_bytes() == want


@pytest.mark.parametrize("way", ["extents", "zero-chunks"])
def test_both_ways_of_copying_give_the_same_bytes(tmp_path: Path, way: str):
    """The extent copy and the fallback (every chunk read, all-zero ones skipped) agree,
    a tail hole included; the fallback also starts from byte 0 after a hole probe."""
    data = {0: os.urandom(3 * MB + 17), 9 * MB: os.urandom(MB)}
    src = _holey(tmp_path / "src.bin", 16 * MB, data)
    dst = tmp_path / "dst.bin"
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        if way == "extents":
            if not filecopy._copy_extents(fi.fileno(), fo.fileno(), src.stat().st_size):
                pytest.skip("this file system does not report holes")
        else:
            os.lseek(fi.fileno(), 5 * MB, os.SEEK_SET)  # where a SEEK_HOLE probe may leave it
            filecopy._copy_nonzero_chunks(fi, fo)
        fo.truncate(src.stat().st_size)
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("answer", ["zero", "exdev"])
def test_a_kernel_copy_that_stops_short_is_finished_by_hand(tmp_path: Path, monkeypatch, answer: str):
    """copy_file_range may answer 0 before the end (not only at EOF) or refuse mid-file
    (EXDEV, EINVAL): the rest is copied with pread/pwrite, not left as zeros."""
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    data = {0: os.urandom(MB), 4 * MB: os.urandom(MB)}
    src = _holey(tmp_path / "src.bin", 8 * MB, data)
    real, calls = os.copy_file_range, []

    def flaky(*args):  # the kernel's answer, wrong from the second call on
        calls.append(args)
        if len(calls) == 1:
            return real(args[0], args[1], min(args[2], 64 << 10), *args[3:])  # a short first copy
        if answer == "zero":
            return 0
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", flaky)
    dst = tmp_path / "dst.bin"
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        if not filecopy._copy_extents(fi.fileno(), fo.fileno(), src.stat().st_size):
            pytest.skip("this file system does not report holes")
        fo.truncate(src.stat().st_size)
    assert len(calls) >= 2 and dst.read_bytes() == src.read_bytes()


def test_the_copy_process_copies_and_reports_a_failure_in_one_line(tmp_path: Path):
    src = tmp_path / "data_level0.bin"
    src.write_bytes(os.urandom(3 * MB))
    dst = tmp_path / "copy.bin"
    c = filecopy.CopyProcess(src, dst)
    assert c.proc is not None  # a child, not a thread: the GIL cannot stall it
    c.wait()
    assert dst.read_bytes() == src.read_bytes()
    c.wait()  # (again: the outcome is kept)
    bad = filecopy.CopyProcess(tmp_path / "missing\nname.bin", tmp_path / "nowhere.bin")
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            bad.wait()
        assert "missing" in str(exc.value) and "\n" not in str(exc.value)
    slow = filecopy.CopyProcess(_fifo(tmp_path / "never-ends"), tmp_path / "out.bin")
    slow.cancel()  # a copy that would never end is stopped and reaped
    assert slow.proc is not None and slow.proc.returncode is not None


def test_ctrl_c_that_stops_the_copy_child_stops_its_caller(tmp_path: Path):
    """Ctrl-C reaches the whole process group: a copy child it stopped raises
    KeyboardInterrupt in the caller, which makes no copy in-process instead. (In a
    caller of its own: pytest-xdist's workers ignore SIGINT, and so would the child.)"""
    fifo = _fifo(tmp_path / "never-ends")
    code = ("import signal, sys; from pathlib import Path; signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
            "from chaosfix.filecopy import CopyProcess\n"
            "c = CopyProcess(Path(sys.argv[1]), Path(sys.argv[2])); print(c.proc.pid, flush=True)\n"
            "try:\n    c.wait()\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    caller = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(tmp_path / "out.bin")],
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)  # (the installed chaosfix)
    assert caller.stdout is not None
    child = int(caller.stdout.readline())
    time.sleep(0.5)
    os.kill(child, signal.SIGINT)
    try:
        out, _ = caller.communicate(timeout=30)
    finally:
        caller.kill()
    assert out.strip() == "interrupted"
    assert not (tmp_path / "out.bin").exists()


def _fifo(p: Path) -> Path:
    os.mkfifo(p)  # a reader blocks on it forever
    return p


@pytest.mark.parametrize("when", ["while-copying", "at-once"])
def test_the_copy_process_dies_with_its_parent(tmp_path: Path, when: str):
    """A repair SIGKILLed mid-build must leave no copy still writing into the build
    folder its rerun makes again: the child gets SIGKILL with its parent (Linux), and a
    child whose parent died before it could ask for that exits by itself."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    fifo = _fifo(tmp_path / "never-ends")  # the child blocks reading it, forever
    then = "os.kill(os.getpid(), 9)" if when == "at-once" else "time.sleep(60)"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from pathlib import Path; from chaosfix.filecopy import CopyProcess;"
         f"c = CopyProcess(Path(sys.argv[1]), Path(sys.argv[2])); print(c.proc.pid, flush=True); {then}",
         str(fifo), str(tmp_path / "out.bin")], stdout=subprocess.PIPE, text=True, cwd=tmp_path)  # (the installed chaosfix)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    if when == "while-copying":
        time.sleep(0.5)  # (its prctl is the first thing it does)
        os.kill(child, 0)  # running, blocked on the fifo
        parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init, or a zombie of the dead parent: either way not running
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    pytest.fail("the copy process outlived its parent")
