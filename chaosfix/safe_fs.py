"""Creating and naming files inside an untrusted palace.

Every entry chaosfix creates (lock, transaction marker, build and backup folders) is
created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` or ``mkdir`` (both fail on any existing
entry, a symlink included, and never follow one): a planted symlink named like one of
our files is a refusal, never a write somewhere else. Every name that comes from the
palace (segment and collection ids) must be chromadb's UUID form before it becomes a
path, and every path chaosfix touches must resolve inside the palace or the backup
folders beside it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from chaosfix.errors import OperationalError

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")  # (\Z: no "\n" after)


def is_uuid(name: object) -> bool:
    """chromadb's id form (``uuid.uuid4()`` as text): the only names used as paths."""
    return isinstance(name, str) and UUID_RE.match(name) is not None


def shown(name: object, limit: int = 80) -> str:
    """A palace-supplied name for a one-line message: repr-escaped and shortened."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def create_new(path: Path, data: bytes = b"", mode: int = 0o644) -> None:
    """Create ``path`` with ``data``; refuse when any entry (a symlink too) is there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise OperationalError(f"{path}: already exists; chaosfix never writes through an existing entry") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses (exit 8) a symlink in the last component (ELOOP)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == 40 or os.path.islink(path):  # ELOOP
            raise OperationalError(f"{path}: is a symlink; chaosfix never follows symlinks in a palace") from None
        raise


def mkdir_new(path: Path) -> None:
    """``mkdir`` that fails on any existing entry (mkdir never follows a symlink)."""
    os.mkdir(path, 0o755)


def is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def is_regular(path: Path) -> bool:
    """A regular file, not through a symlink (lstat only: nothing is opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, unbuffered: never through a symlink, never a FIFO or
    device swapped in after it was listed (which could block or never end); OSError
    otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    return open(fd, "rb", buffering=0)


def links_in(folder: Path) -> list[str]:
    """Names of the symlinks directly in ``folder`` (no recursion, nothing followed)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_symlink())
    except OSError:
        return []


def ensure_inside(path: Path, *roots: Path) -> Path:
    """``path`` itself (unresolved) when it resolves under one of ``roots``; else exit 8.
    The last component is resolved too: a symlinked entry pointing out is refused."""
    real = os.path.realpath(path)
    for r in roots:
        base = os.path.realpath(r)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return path
    raise OperationalError(f"{path}: resolves to {real}, outside the palace; refused")
