"""Free space a repair needs, judged before anything is written.

A repair writes in two places. Inside the palace, each rebuilt segment folder: chroma-
hnswlib's persist rewrites the whole data_level0.bin, so a build costs its full size
even where the file system clones files. Beside the palace (its parent folder, which
may be another file system when the palace is a mount point), chromadb's post-check
copy of the palace to be (its SQLite file, the built folders and the folders left
alone, plus the planned vectors it compares) and the backup of ``chroma.sqlite3`` when
SQL changes; where that file system clones files (reflinks: btrfs, XFS, bcachefs) these
copies share their blocks. Out of space halfway, a repair still changes nothing
(chroma-hnswlib does not even report a failed write: the verification finds the short
file), but it fails late and obscurely, so reconcile refuses up front with the figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chaosfix.filecopy import reflink
from chaosfix.palace import SQLITE_NAME, UUID_RE
from chaosfix.palace.leftovers import folder_size
from chaosfix.reconcile.plan import CollectionPlan
from chaosfix.safe_fs import is_link

MB = 1 << 20
MARGIN = 1 * MB  # SQLite's journal, the post-check's spec, rounding


@dataclass
class SpaceNeed:
    """Bytes a repair writes, by what writes them and where."""

    build: int = 0  # the rebuilt segment folders, inside the palace
    post_check: int = 0  # chromadb's copy of the palace to be, beside it
    backup: int = 0  # chroma.sqlite3 (and -wal) copied into the backup, beside it
    moved: int = 0  # folders moved into the backup: copied when the palace is a mount point
    journal: int = 0  # SQLite's journal of the leftover rows' deletes, inside (and in the post-check's copy)
    restored: int = 0  # a hot journal's rollback: pages that grow chroma.sqlite3 back, inside
    journal_backup: int = 0  # chroma.sqlite3 and its hot journal copied before the rollback, beside
    clones: bool = False  # the folder beside the palace clones files: its copies cost only new data
    apart: bool = False  # the palace is a mount point: what goes beside it goes to another file system


def _usage(path: Path) -> int:
    """Bytes a copy of ``path`` (a file, or a folder's files) takes: allocated blocks, as
    the sparse copy keeps holes."""
    try:
        if is_link(path):
            return 0
        if path.is_dir():
            return folder_size(path)[1]
        return path.stat().st_blocks * 512 if path.is_file() else 0
    except OSError:
        return 0


def _built(root: Path, p: CollectionPlan) -> int:
    """Bytes of the plan's built segment folder: incremental copies the old folder (its
    data_level0.bin rewritten whole) and adds the new vectors; rebuild writes every
    element anew (a bloated old link_lists.bin is not copied)."""
    st = p.state
    h = st.files.header if st is not None and st.files is not None else None
    # (a torn header's slot size is garbage: helper-41's asked exabytes and refused for good)
    sound = h is not None and not (st is not None and st.torn) and h.size_data_per_element > 0
    per = (h.size_data_per_element if sound else p.dim * 4 + 300) + 4  # type: ignore[union-attr]
    if p.strategy == "incremental":
        return _usage(root / p.segment) + len(p.add) * per  # type: ignore[operator]
    return (len(p.keep) + len(p.add) + len(p.replace)) * per + MARGIN


PAGES_PER_STALE_ID = 16  # pages a deleted record's leftovers touch at worst: measured 3.5
# (2,000 scattered ids of 40,000: metadata rows, their value indexes, full-text tables)


def delete_journal(root: Path, stale_ids: int) -> int:
    """Bytes of SQLite's rollback journal (or WAL) while ``stale_ids`` records' leftover
    rows are deleted: each page the deletes touch is saved there whole, and scattered ids
    touch a few pages each, so it is bounded by the ids and by the db itself."""
    if not stale_ids:
        return 0
    db = root / SQLITE_NAME
    try:
        with open(db, "rb") as f:
            head = f.read(18)
        size = db.stat().st_size
    except OSError:
        return 0
    page = int.from_bytes(head[16:18], "big") if len(head) == 18 else 4096
    page = 65536 if page == 1 else page or 4096
    return min(size + size // 64, stale_ids * PAGES_PER_STALE_ID * page)  # (each page's record adds 8 bytes)


def clones_files(folder: Path, prefix: str) -> bool:
    """``folder``'s file system clones a file (FICLONE), tried inside a private scratch
    folder named ``prefix``XXXX there (removed again; a killed probe's is found as a
    stale post-check copy); False where it cannot even be tried."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    except OSError:
        return False
    try:
        src = scratch / "probe"
        src.write_bytes(b"\0" * 4096)
        return reflink(src, scratch / "clone")
    except OSError:
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def space_needed(root: Path, plans: list[CollectionPlan], post_check: bool, sql_backup: bool,
                 prune: list[str], clones: bool, backup: bool, stale_ids: int = 0) -> SpaceNeed:
    """What a repair of ``root`` with these plans writes (see the module docstring);
    ``clones``: the folder beside the palace clones files (only counted where the copies
    stay on one file system); ``backup``: the replaced segment folders go to the backup;
    ``stale_ids``: records whose leftover rows the repair deletes (the post-check's copy
    deletes them too)."""
    apart = _apart(root)
    clones = clones and not apart
    need = SpaceNeed(clones=clones, apart=apart, journal=delete_journal(root, stale_ids))
    if post_check:
        need.post_check += need.journal
    if apart:  # renames into the backup become copies
        old = [p.segment for p in plans if p.index_changes and p.segment] if backup else []
        need.moved = sum(_usage(root / d) for d in [*old, *prune] if d)
    rebuilt = {p.segment for p in plans if p.index_changes and p.segment}
    for p in plans:
        if not p.index_changes or not p.segment:
            continue
        built = _built(root, p)
        need.build += built
        if post_check:
            need.post_check += (0 if clones else built) + (len(p.add) + len(p.replace)) * p.dim * 4
    sql = sum(_usage(root / n) for n in (SQLITE_NAME, SQLITE_NAME + "-wal"))
    if post_check and not clones:
        need.post_check += sql + sum(_usage(d) for d in root.iterdir()
                                     if UUID_RE.match(d.name) and d.name not in rebuilt and d.name not in prune)
    if sql_backup and not clones:
        need.backup = sql
    return need


def rollback_need(root: Path, backup: bool) -> SpaceNeed:
    """What rolling back a hot ``chroma.sqlite3-journal`` writes: the copies of the db and
    the journal (``backup``), and the pages SQLite writes back beyond the db's end (the
    journal's header says how long the db was; never more than the journal holds)."""
    db, journal = root / SQLITE_NAME, root / (SQLITE_NAME + "-journal")
    need = SpaceNeed(apart=_apart(root))
    try:
        with open(journal, "rb") as f:
            head = f.read(28)
        pages, page_size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[24:28], "big")
        # (bounded by the journal's blocks: a sparse journal's holes hold no page SQLite restores)
        need.restored = max(0, min(pages * page_size - db.stat().st_size, _usage(journal)))
    except OSError:
        pass  # (gone or unreadable: SQLite's own rollback reports it)
    if backup:
        need.journal_backup = _usage(db) + _usage(journal)
    return need


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``folder``'s file system; None where
    the file system does not say (no size at all, as some FUSE file systems answer)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if st.f_blocks == 0:
        return None
    # (not f_bfree for root: root in a user namespace, rootless containers, is not
    # granted the blocks reserved for root)
    return st.f_bavail * st.f_frsize


def _apart(root: Path) -> bool:
    """The palace is a mount point: what goes beside it goes to another file system."""
    return _device(root) != _device(root.parent)


def _device(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_dev
    except OSError:
        return None


def shortage(root: Path, need: SpaceNeed) -> str | None:
    """The refusal's text when the palace's file system, or the one beside it, lacks room
    for ``need``, else None."""
    index = [("the rebuilt index", need.build), ("SQLite's journal of the row deletes", need.journal),
             ("the journal's rollback", need.restored)]
    copies = [("chromadb's post-check copy", need.post_check), ("the backup of chroma.sqlite3", need.backup),
              ("the folders moved into the backup", need.moved),
              ("the backup of chroma.sqlite3 and its journal", need.journal_backup)]
    if not need.apart:
        places = [(root, "the palace's file system", index + copies)]
    else:  # a palace that is a mount point: its copies go to another file system
        places = [(root, "the palace's file system", index), (root.parent, f"the file system of {root.parent}", copies)]
    for folder, what, items in places:
        items = [(name, n) for name, n in items if n]
        if not items:
            continue
        want, free = sum(n for _, n in items) + MARGIN, free_bytes(folder)
        if free is None or free >= want:
            continue
        hint = ""
        for flag, name, n in (("--no-chromadb-check", "chromadb's post-check copy", need.post_check),
                              ("--no-backup", "the folders moved into the backup", need.moved),
                              ("--no-backup", "the backup of chroma.sqlite3 and its journal", need.journal_backup)):
            if n and (name, n) in items and free >= want - n:
                hint = f", or pass {flag} (it then needs {(want - n) / MB:,.0f} MB there)"
                break
        return (f"{root}: not enough free space for the repair: it writes about {want / MB:,.0f} MB on {what} "
                f"({', '.join(f'{name} {n / MB:,.0f} MB' for name, n in items)}) and it has {free / MB:,.0f} MB; "
                f"nothing was changed. Free some space{hint}")
    return None
