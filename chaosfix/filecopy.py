"""Copies of palace files that keep their holes, and the same copy in a child process.

A palace's files may be sparse (a link_lists.bin bloated 10^6x by chromadb 1.x, or a
copy that left holes for zero pages): a copy must neither write nor read the holes, or a
300 GB apparent size costs 300 GB. Where the file system can clone (btrfs, xfs), a
reflink costs nothing at all.

``CopyProcess`` runs ``sparse_copy`` in a child: chroma-hnswlib's ``load_index`` holds
the GIL for the whole load (2.4 s at 500k drawers), so a copy thread meant to overlap it
stalled at its first Python step until the load was over. Run by path
(``python -I filecopy.py PARENT_PID SRC DST``), this module imports nothing but the
standard library.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

CHUNK = 1 << 20


FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, xfs)


def _reflink(src: Path, dst: Path) -> bool:
    """Clone ``src`` into ``dst`` where the file system can: instant and costs no disk."""
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        return True
    except OSError:
        return False


def reflink(src: Path, dst: Path) -> bool:
    """``src`` cloned into a new ``dst`` with its times, or False and no ``dst``."""
    if _reflink(src, dst):
        st = src.stat()
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    dst.unlink(missing_ok=True)
    return False


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a file keeping its holes, so a 10^6x sparse-bloated link_lists.bin costs no
    disk (nor reads) in the copy either (a reflink where possible)."""
    st = src.stat()
    size = st.st_size
    if reflink(src, dst):
        return
    if getattr(st, "st_blocks", 0) * 512 >= size:  # not sparse: let the kernel copy it
        shutil.copyfile(src, dst)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        if not _copy_extents(fi.fileno(), fo.fileno(), size):
            _copy_nonzero_chunks(fi, fo)
        fo.truncate(size)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_extents(fi: int, fo: int, size: int) -> bool:
    """Copy the first ``size`` bytes' data extents (``SEEK_DATA``/``SEEK_HOLE``), each by
    the kernel, leaving the holes unwritten (zeros written as data stay data: only the
    holes cost nothing to keep). False, with nothing written, where the file
    system shows no hole in a file whose blocks say it has some (no ``SEEK_HOLE``: it
    then reports one extent). A palace's 438 MB chroma.sqlite3 with one 4 KiB hole went
    through the zero-chunk loop below in 3.4 s of a thread, beside the build's inserts.
    The source is flushed first: OpenZFS 2.2.0 and 2.2.1 reported a file's dirty data as
    a hole (openzfs/zfs#15526), and a copy that trusted it held zeros there; a clean
    file's flush costs nothing."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return False
    try:
        os.fsync(fi)
    except OSError:  # a file system that refuses it on a read-only descriptor: trust it as it is
        pass
    try:
        if os.lseek(fi, 0, seek_hole) >= size:
            return False
    except OSError:
        return False
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fi, pos, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos: the rest is a hole
                break
            raise
        if start >= size:
            break
        try:
            end = min(os.lseek(fi, start, seek_hole), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break  # the file shrank below start since SEEK_DATA
        if end <= start:  # a file system that contradicts itself: copy the rest as data
            end = size
        _copy_range(fi, fo, start, end - start)
        pos = end
    return True


def _copy_range(fi: int, fo: int, off: int, n: int) -> None:
    """``n`` bytes at ``off`` to the same offset: ``copy_file_range`` (in the kernel), else
    pread/pwrite. Stops early where the source ends (it shrank meanwhile): only an empty
    pread says so, since a kernel copy may also answer 0 for "not here"."""
    kernel = hasattr(os, "copy_file_range")
    while n > 0:
        if kernel:
            try:
                k = os.copy_file_range(fi, fo, min(n, 1 << 30), off, off)
            except OSError:  # e.g. across file systems on an old kernel: copy it here
                k = 0
            if k == 0:
                kernel = False
                continue
        else:
            buf = os.pread(fi, min(n, CHUNK), off)
            if not buf:
                return
            k = os.pwrite(fo, buf, off)
        off, n = off + k, n - k


def _copy_nonzero_chunks(fi, fo) -> None:  # noqa: ANN001 - binary files
    """The copy where the file system cannot name the holes: every chunk read, all-zero
    ones skipped."""
    fi.seek(0)  # (the SEEK_HOLE probe moved the descriptor's offset)
    fo.seek(0)
    zero = bytes(CHUNK)
    while True:
        buf = fi.read(CHUNK)
        if not buf:
            break
        if buf == zero[: len(buf)]:
            fo.seek(len(buf), os.SEEK_CUR)
        else:
            fo.write(buf)


def copy_tree_sparse(src: Path, dst: Path, skip: Collection[str] = ()) -> None:
    """A new folder ``dst`` with ``src``'s files (not its subfolders), but ``skip``."""
    dst.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            sparse_copy(f, dst / f.name)


COPY_FAILED = 3  # the child's exit code when sparse_copy itself failed (its error on stderr)


class CopyProcess:
    """``sparse_copy(src, dst)`` in a child process started now. ``wait`` joins it (again
    and again: the outcome is kept) and raises OSError, one line, if the copy failed; a
    child that could not run at all (no ctypes, an interpreter that is not Python) has
    the copy made here instead, as where no child can start (``inline`` False: an error,
    ``copy_locked``). The child dies with the
    thread that started it (Linux), so a killed repair leaves no copy writing into a
    build folder its rerun makes again; ``cancel`` stops it."""

    def __init__(self, src: Path, dst: Path, inline: bool = True) -> None:
        self.src, self.dst, self.inline = src, dst, inline
        self._error: OSError | None = None
        self._done = False
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), str(src), str(dst)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError:
            self.proc = None

    def wait(self) -> None:
        if not self._done:
            err, code = b"", None
            if self.proc is not None:
                _, err = self.proc.communicate()
                code = self.proc.returncode
            self._done = True
            if code == -signal.SIGINT:  # Ctrl-C reached the child too: stop
                raise KeyboardInterrupt
            if code == COPY_FAILED:
                lines = err.decode("utf-8", "replace").strip().splitlines()
                self._error = OSError(f"copy of {str(self.src)!r} failed: {lines[-1] if lines else 'no reason given'}")
            elif code != 0 and not self.inline:
                self._error = OSError(f"copy of {str(self.src)!r} failed: its process "
                                      + ("could not start" if code is None else f"ended with {code}"))
            elif code != 0:
                try:
                    sparse_copy(self.src, self.dst)
                except OSError as exc:
                    self._error = exc
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop the copy (the caller removes what it wrote)."""
        if self.proc is not None and not self._done:
            self._done = True
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()


def copy_locked(src: Path, dst: Path) -> None:
    """``sparse_copy`` of a SQLite file this process holds locks on, made by a child: POSIX
    drops every fcntl lock a process holds on a file when it closes any descriptor of it,
    so an open and close here would end the repair's EXCLUSIVE transaction's lock, and a
    chromadb writer could then write (and corrupt the file) under it. Never inline."""
    CopyProcess(src, dst, inline=False).wait()


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends (a killed
    check or repair leaves no helper reading the palace or writing a build folder).
    ``parent``: the starter's pid as it passed it; a child started by a process that
    has died meanwhile exits at once (else it is told of the death of init). Elsewhere
    a no-op. Standard library only: the helpers run by path call it first."""
    parent = os.getppid() if parent is None else parent
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError, ImportError):
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


PARENT_ENV = "CHAOSFIX_PARENT"  # the pid of the chaosfix that started a chromadb child


def die_with_starter() -> None:
    """``die_with_parent`` for a chromadb child started with ``PARENT_ENV`` set (chaosfix's
    ``workload.child_env``): those run in sessions of their own, so a SIGKILLed simulate
    or explore left them writing into a scratch folder its next run then removes. Under
    wrappers the starter started (strace, timeout) the starter is a further ancestor: a
    thread watches it (a pidfd). A starter no ancestor is any more died before this
    child got here: it exits with one line. The variable is not passed on. Without it
    (a user's own run), or without /proc: a no-op."""
    raw = os.environ.pop(PARENT_ENV, "")
    if not raw.isdigit():
        return
    starter, parent = int(raw), os.getppid()
    if parent == starter:
        die_with_parent(starter)
        return
    if _ancestors(parent) is None:
        return
    try:
        fd = os.pidfd_open(starter)
    except (AttributeError, OSError):  # (before Linux 5.3; or the starter is gone)
        fd = None
    chain = _ancestors(os.getppid())  # asked again after the open: the pid was the starter's then
    if chain is not None and starter not in chain:
        sys.stderr.write(f"chaosfix: the process that started this child ({PARENT_ENV}={starter}) is gone\n")
        os._exit(1)
    if fd is not None:
        import threading

        threading.Thread(target=_die_when_readable, args=(fd,), name="chaosfix-starter", daemon=True).start()


def _ancestors(pid: int, most: int = 64) -> list[int] | None:
    """``pid`` and its ancestors up to init, from /proc/PID/stat (field 4, after the ")"
    that ends the name); None without /proc."""
    out: list[int] = []
    while pid > 1 and len(out) < most:
        out.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return out or None
    return out


def _die_when_readable(fd: int) -> None:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # run by path by ``CopyProcess``: PARENT_PID SRC DST
    die_with_parent(int(sys.argv[1]))
    try:
        sparse_copy(Path(sys.argv[2]), Path(sys.argv[3]))
    except OSError as exc:
        sys.stderr.write(f"{exc}\n")
        os._exit(COPY_FAILED)
