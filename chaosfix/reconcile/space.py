"""Free space a repair needs, judged before anything is written.

A repair writes beside the palace, on its file system: each rebuilt segment folder (a
copy of the old one plus the new vectors), chromadb's post-check copy of the palace to
be (its SQLite file, the built folders and the folders left alone), and the backup of
``chroma.sqlite3`` when SQL changes. Out of space halfway, the repair still changes
nothing (chroma-hnswlib does not even report a failed write: the verification finds the
short file), but it fails late and says so obscurely. So reconcile refuses up front with
the figures. Where the file system clones files (reflinks: btrfs, XFS, bcachefs) the
copies share their blocks and only the new data costs space.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chaosfix.filecopy import reflink
from chaosfix.palace import SQLITE_NAME, UUID_RE
from chaosfix.reconcile.plan import CollectionPlan
from chaosfix.safe_fs import is_link

MB = 1 << 20
MARGIN = 1 * MB  # SQLite's journal, the post-check's spec, rounding


@dataclass
class SpaceNeed:
    """Bytes a repair writes, by what writes them."""

    build: int = 0  # the rebuilt segment folders
    post_check: int = 0  # chromadb's copy of the palace to be
    backup: int = 0  # chroma.sqlite3 (and -wal) copied into the backup
    clones: bool = False  # the file system clones files: copies cost only their new data

    @property
    def total(self) -> int:
        return self.build + self.post_check + self.backup + MARGIN


def _usage(path: Path) -> int:
    """Bytes a copy of ``path`` (a file, or a folder's files) takes: allocated blocks, as
    the sparse copy keeps holes."""
    try:
        if path.is_file() and not is_link(path):
            return path.stat().st_blocks * 512
        if path.is_dir() and not is_link(path):
            return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file() and not is_link(f))
    except OSError:
        pass
    return 0


def _new_vectors(p: CollectionPlan) -> int:
    """Bytes the plan's new and replaced vectors add to data_level0.bin (and length.bin)."""
    st = p.state
    h = st.files.header if st is not None and st.files is not None else None
    per = h.size_data_per_element if h is not None and h.size_data_per_element > 0 else p.dim * 4 + 300
    n = len(p.add) if p.strategy == "incremental" else len(p.keep) + len(p.add) + len(p.replace)
    return n * (per + 4)


def clones_files(root: Path) -> bool:
    """The palace's file system clones a file (FICLONE), tried on a scratch file beside
    the palace, where the post-check's copy goes; False where it cannot even be tried."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{root.name}.chaosfix-space-", dir=root.parent)
    except OSError:
        return False
    src = Path(name)
    dst = src.with_name(src.name + ".clone")
    try:
        os.write(fd, b"\0" * 4096)
        os.close(fd)
        return reflink(src, dst)
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def space_needed(root: Path, plans: list[CollectionPlan], post_check: bool, sql_backup: bool,
                 prune: list[str]) -> SpaceNeed:
    """What a repair of ``root`` with these plans writes (see the module docstring)."""
    need = SpaceNeed(clones=clones_files(root))
    rebuilt = {p.segment for p in plans if p.index_changes and p.segment}
    for p in plans:
        if not p.index_changes or not p.segment:
            continue
        old = 0 if need.clones else _usage(root / p.segment)
        built = old + _new_vectors(p)
        need.build += built
        if post_check:
            need.post_check += built if not need.clones else _new_vectors(p)
            need.post_check += (len(p.add) + len(p.replace)) * p.dim * 4  # the planned vectors it compares
    sql = sum(_usage(root / n) for n in (SQLITE_NAME, SQLITE_NAME + "-wal"))
    if post_check and not need.clones:
        need.post_check += sql + sum(_usage(d) for d in root.iterdir()
                                     if UUID_RE.match(d.name) and d.name not in rebuilt and d.name not in prune)
    if sql_backup and not need.clones:
        need.backup = sql
    return need


def free_bytes(root: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the palace's file system."""
    try:
        st = os.statvfs(root)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def shortage(root: Path, need: SpaceNeed) -> str | None:
    """The refusal's text when the file system lacks room for ``need``, else None."""
    free = free_bytes(root)
    if free is None or free >= need.total:
        return None
    parts = [f"the rebuilt index {need.build / MB:,.0f} MB"]
    if need.post_check:
        parts.append(f"chromadb's post-check copy {need.post_check / MB:,.0f} MB")
    if need.backup:
        parts.append(f"the backup of chroma.sqlite3 {need.backup / MB:,.0f} MB")
    hint = (f", or pass --no-chromadb-check (it then needs {(need.total - need.post_check) / MB:,.0f} MB)"
            if need.post_check and free >= need.total - need.post_check else "")
    return (f"{root}: not enough free space for the repair: it writes about {need.total / MB:,.0f} MB beside "
            f"the palace ({', '.join(parts)}) and the file system has {free / MB:,.0f} MB; nothing was changed. "
            f"Free some space{hint}")
