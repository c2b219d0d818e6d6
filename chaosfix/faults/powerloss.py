"""Power loss: what survives when the machine dies instead of the process.

chromadb never fsyncs the HNSW files or the pickle; SQLite fsyncs its commits. After a
power cut the committed SQLite state survives while the index files are whatever reached
the disk: the state before the persist (``snapshot_segment`` then ``restore_segment``), or
a torn mix of old and new 4 KiB pages (``torn_mix``).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from chaosfix.faults.locate import segment_dir

ABSENT = ".absent"  # marks a snapshot of a folder that did not exist yet
PAGE = 4096


def _seg(palace: str | Path, seg_id: str | None) -> Path:
    return Path(palace) / seg_id if seg_id else segment_dir(palace)


def snapshot_segment(palace: str | Path, seg_id: str | None = None, dst: str | Path | None = None) -> Path:
    """Copy the vector segment folder aside (what is on disk now, i.e. the last synced state).

    ``seg_id`` defaults to the only collection's vector segment; ``dst`` to a new temporary
    folder. Returns the snapshot folder.
    """
    src = _seg(palace, seg_id)
    out = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="chaosfix-snap-")) / src.name
    if src.is_dir():
        shutil.copytree(src, out, copy_function=shutil.copy2, dirs_exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / ABSENT).touch()
    return out


def restore_segment(palace: str | Path, snapshot: str | Path, seg_id: str | None = None) -> Path:
    """Put the snapshot back: every HNSW/pickle write since it is lost, SQLite stays as is.

    Files created after the snapshot disappear too (a new file never fsynced, nor its
    directory entry). Returns the segment folder.
    """
    snap = Path(snapshot)
    seg = _seg(palace, seg_id)
    if seg.is_dir():
        shutil.rmtree(seg)
    if not (snap / ABSENT).exists():
        shutil.copytree(snap, seg, copy_function=shutil.copy2)
    return seg


def _pages(n: int, page: int) -> int:
    return (n + page - 1) // page


def torn_mix(old_dir: str | Path, new_dir: str | Path, seed: int, page: int = PAGE,
             fraction: float = 0.5) -> dict[str, list[int]]:
    """Rewrite each file of ``new_dir`` as a seeded mix of its old and new ``page``-sized pages.

    ``old_dir`` is a snapshot taken before the write, ``new_dir`` the live folder after it.
    Each page index is new with probability ``fraction`` (seeded per file name), else
    old; a page that only exists in the new file and was not chosen comes back as zeros
    (the size reached the disk, the data did not). The file keeps its new size. Files
    missing from ``new_dir`` stay missing. Returns ``{file name: sorted new page indexes}``.
    """
    old, new = Path(old_dir), Path(new_dir)
    out: dict[str, list[int]] = {}
    for f in sorted(p for p in new.iterdir() if p.is_file()):
        old_bytes = (old / f.name).read_bytes() if (old / f.name).is_file() else b""
        new_bytes = f.read_bytes()
        rng = random.Random(f"torn:{seed}:{f.name}")
        n = _pages(len(new_bytes), page)
        chosen = [i for i in range(n) if rng.random() < fraction]
        keep = set(chosen)
        buf = bytearray(len(new_bytes))
        for i in range(n):
            lo, hi = i * page, min((i + 1) * page, len(new_bytes))
            src = new_bytes if i in keep else old_bytes
            chunk = src[lo:hi]
            buf[lo : lo + len(chunk)] = chunk
        with open(f, "r+b") as fh:
            fh.write(buf)
            fh.truncate(len(new_bytes))
            fh.flush()
            os.fsync(fh.fileno())
        out[f.name] = chosen
    return out
