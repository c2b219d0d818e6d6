"""File-system safety for repairs: exclusive access, fsync, background work, and an
atomic directory swap (copies that keep holes: ``chaosfix.filecopy``)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chaosfix.errors import OperationalError
from chaosfix.safe_fs import open_nofollow

LOCK_NAME = ".chaosfix.lock"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is held and raised as KeyboardInterrupt when it
    ends, so a step of two parts (a rename and the record of it) is never cut between
    them. Python runs signal handlers in the main thread only: elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler not installed from Python, which could not be put back)
        return
    held: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt


def killpoint(name: str) -> None:
    """SIGKILL this process at step ``name`` when CHAOSFIX_KILL_AT names it (crash tests);
    SIGSTOP it there when CHAOSFIX_STOP_AT does (a test looks at the palace, then SIGCONT)."""
    if os.environ.get("CHAOSFIX_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("CHAOSFIX_STOP_AT") == name:
        os.kill(os.getpid(), signal.SIGSTOP)


class PalaceLock:
    """Advisory lock (flock) on ``<palace>/.chaosfix.lock``; refuses at once when a live
    process holds it. The holder writes its PID into the file: a lock whose named holder
    has died is waited for, up to ``DYING_WAIT`` seconds, because a killed chaosfix's open
    file can outlive it for a moment (a child between fork and exec, or a /proc reader,
    still has it) and a rerun right after the kill must not be refused for that."""

    DYING_WAIT = 2.0

    def __init__(self, palace: Path) -> None:
        self.path = palace / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> PalaceLock:
        for _ in range(10):
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)  # a planted symlink is refused
            try:
                _flock_unless_held_by_the_living(fd, time.monotonic() + self.DYING_WAIT)
            except OSError:
                os.close(fd)
                raise OperationalError(f"{self.path.parent}: another chaosfix holds the palace lock") from None
            # the holder we waited on unlinks the file on exit: a lock on an unlinked inode
            # excludes nobody, so it only counts if the path still names our file
            try:
                st = os.stat(self.path)
                ours = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                ours = False
            if ours:
                self.fd = fd
                _name_holder(fd)
                return self
            os.close(fd)
        raise OperationalError(f"{self.path.parent}: the palace lock file keeps changing; is another chaosfix running?")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _name_holder(fd: int) -> None:
    """Write this process's PID into the lock file (a hint for the next contender only),
    unless the file has another name too: a hard link planted in the palace must not let
    the lock write through it into a file elsewhere."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _flock_unless_held_by_the_living(fd: int, deadline: float) -> None:
    """``flock`` LOCK_EX, retried until ``deadline`` while the PID the file names is gone
    or a zombie; raises OSError when held by anyone else (or a holder that named no PID)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                raise
            try:
                named = os.pread(fd, 16, 0).strip()
            except OSError:
                raise exc from None
            if not (named.isdigit() and _gone(int(named))):
                raise
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    """True when no process ``pid`` runs (none, or a zombie waiting to be reaped)."""
    if not 0 < pid < 1 << 22:  # (Linux's PID_MAX_LIMIT; a planted number must not overflow kill)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (another user's: alive)
        return False
    try:
        line = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return line[line.rfind(b")") + 2:][:1] in (b"Z", b"X")  # (the state follows the name)


def other_holders(palace: Path) -> list[int]:
    """PIDs of other processes with a file under ``palace`` open (Linux /proc scan)."""
    me, root = os.getpid(), str(palace.resolve())
    holders = []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for p in proc.iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            for fd in (p / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target == root or target.startswith(root + os.sep):
                    if not target.endswith(LOCK_NAME):
                        holders.append(int(p.name))
                        break
        except OSError:
            continue
    return holders


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in ``folder`` and the folder itself."""
    for f in folder.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(folder)


class Background:
    """``fn(*args)`` in a daemon thread; ``wait`` joins it, then returns its result or
    re-raises its error in the caller's thread."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc

    def wait(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _fsync_folders(folders: list[Path]) -> None:
    for d in folders:
        fsync_tree(d)
    for parent in dict.fromkeys(d.parent for d in folders):
        fsync_path(parent)


class Syncing(Background):
    """fsync of folders in a background thread (``fsync_tree`` each, then their parents):
    a built segment must be on disk before the swap, not before it is verified, so the
    verification reads it while the kernel writes it out. ``wait`` re-raises its error."""

    def __init__(self, folders: list[Path]) -> None:
        super().__init__(_fsync_folders, folders)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2 with ``flags``; False where the kernel or libc cannot."""
    # the process's own symbols, libc's among them (ctypes.util.find_library would run
    # ``ldconfig -p`` in a subprocess at the swap)
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (RENAME_EXCHANGE).

    Returns False where the kernel or libc cannot, so the caller falls back to two renames.
    """
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` only while no ``dst`` exists (RENAME_NOREPLACE: a plain
    rename would replace an empty folder there); raises FileExistsError when one does.
    False where the kernel or libc cannot."""
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def move_out(src: Path, dst: Path) -> None:
    """Move ``src`` (a file or folder of the palace) to the new name ``dst`` beside the
    palace: a rename, or, where ``dst`` is on another file system (a palace that is a
    mount point, e.g. a container volume, has its backup in the parent), mv's way: a
    copy (sparse; a symlink copied as a link, never followed) under a temporary name,
    fsynced and renamed into place, then ``src`` removed. Killed midway, ``src`` is still
    whole (a rerun moves it again). Errors are the system's own, with their errno."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    import shutil

    tmp = partial_name(dst)
    try:
        _copy_as_is(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_path(dst.parent)
    if src.is_dir() and not src.is_symlink():
        shutil.rmtree(src)
    else:
        src.unlink()


def partial_name(dst: Path) -> Path:
    """The name a copy into ``dst`` has until it is whole (``move_out``, ``back_up``): a
    copy killed midway is never taken for a backup, and a rerun removes it."""
    return dst.with_name(f".{dst.name}.moving")


def back_up(src: Path, dst: Path) -> None:
    """Copy the palace file ``src`` into an existing backup as ``dst``: sparse, fsynced
    under its partial name, then renamed (a backup file that exists is whole)."""
    from chaosfix.filecopy import copy_locked

    tmp = partial_name(dst)
    try:
        copy_locked(src, tmp)  # (the db under our SQLite lock: never opened here)
        fsync_path(tmp)
        os.rename(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(dst.parent)


def _copy_as_is(src: Path, dst: Path) -> None:
    """``src`` copied to the new ``dst``, every file fsynced: links as links, folders
    walked, files by ``sparse_copy``."""
    from chaosfix.filecopy import sparse_copy

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for entry in src.iterdir():
            _copy_as_is(entry, dst / entry.name)
        fsync_path(dst)
    else:
        sparse_copy(src, dst)
        fsync_path(dst)
