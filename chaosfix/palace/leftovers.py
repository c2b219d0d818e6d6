"""Folders beside the live segments that no segment owns: what chromadb leaves after
replacing a segment (or deleting a collection), and segments quarantined by repair
tools (MemPalace's ``<uuid>.corrupt-<time>``, ``<uuid>.drift-<time>``,
``<uuid>.hnsw-backup-<time>``) or by chaosfix (``<palace>.chaosfix-backup-<time>/<uuid>``).

chromadb never reads any of them; they cost disk, and a quarantined one may still hold
the vectors its live segment lost. Sizes count allocated blocks (a sparse, bloated
link_lists.bin costs little) and only regular files directly inside the folder
(symlinks are never followed).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from chaosfix.palace import UUID_RE

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
QUARANTINE_RE = re.compile(rf"^({UUID})\.(corrupt|drift|hnsw-backup)-[0-9A-Za-z_.:+-]{{1,64}}$")
BACKUP_GLOB = ".chaosfix-backup-"
NAME_MAX = 255  # bytes in one file name (Linux, macOS)
# the most chaosfix adds to a palace's name beside it: "." + ".chaosfix-recovered-" + a
# time + "-NN" (39 bytes), mkdtemp's "." + ".chaosfix-verify-" + 8 (26), with room to spare
SIBLING_EXTRA = 48


def sibling_stem(root: Path) -> str:
    """How the names of chaosfix's folders beside the palace ``root`` begin (its backups,
    a backup being made, recovered folders, the post-check's copy): the palace's own name
    or, when that name and the longest of those suffixes would not fit in one file name,
    its first characters, ``~`` and a hash of the whole name. A palace named near the
    limit then still gets its backup (it was refused, "File name too long"), and two long
    names with the same beginning do not share folders."""
    name = root.name
    if len(os.fsencode(name)) <= NAME_MAX - SIBLING_EXTRA:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    budget, used, keep = NAME_MAX - SIBLING_EXTRA - 1 - len(digest), 0, []
    for ch in name:  # whole characters (a UTF-8 name is never cut inside one)
        used += len(os.fsencode(ch))
        if used > budget:
            break
        keep.append(ch)
    return "".join(keep) + "~" + digest


def sibling_stems(root: Path) -> tuple[str, ...]:
    """The stems to look for when finding chaosfix's folders beside ``root`` (makers use
    ``sibling_stem``): that stem and, for a name it hashes, the name itself, which an
    earlier chaosfix gave these folders whenever the whole folder name fit (palace names
    of 208 to about 223 bytes). Their backups stay a source of vectors and their
    leftovers (half-made backups, post-check copies) are still cleared."""
    stem = sibling_stem(root)
    return (stem,) if stem == root.name else (stem, root.name)


def sibling_stems_re(root: Path) -> str:
    """``sibling_stems`` as one regular-expression group, each stem matched literally."""
    return "(?:" + "|".join(map(re.escape, sibling_stems(root))) + ")"


@dataclass
class Leftover:
    path: Path
    segment: str  # the segment id the folder was (or still is) for
    kind: str  # orphan | corrupt | drift | hnsw-backup | chaosfix-backup
    apparent: int
    allocated: int


def folder_size(d: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the regular files directly in ``d``."""
    apparent = allocated = 0
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    apparent += st.st_size
                    allocated += st.st_blocks * 512
    except OSError:
        pass
    return apparent, allocated


def _entry(d: Path, seg: str, kind: str) -> Leftover:
    return Leftover(d, seg, kind, *folder_size(d))


def orphan_dirs(root: Path, known: set[str]) -> list[Leftover]:
    """UUID-named folders in the palace that no segment owns."""
    return [_entry(d, d.name, "orphan") for d in sorted(root.iterdir())
            if UUID_RE.match(d.name) and d.name not in known and d.is_dir() and not d.is_symlink()]


def quarantined(root: Path, segment: str | None = None, backups: bool = True) -> list[Leftover]:
    """Quarantined copies of segments (of ``segment`` only, when given), in name order;
    ``backups``: also chaosfix's own backups beside the palace."""
    out = []
    for d in sorted(root.iterdir()):
        m = QUARANTINE_RE.match(d.name)
        if m and (segment is None or m.group(1) == segment) and d.is_dir() and not d.is_symlink():
            out.append(_entry(d, m.group(1), m.group(2)))
    if not backups:
        return out
    parent = root.parent
    prefixes = tuple(stem + BACKUP_GLOB for stem in sibling_stems(root))
    try:
        backups = sorted(p for p in parent.iterdir()
                         if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink())
    except OSError:
        backups = []
    for b in backups:
        for d in sorted(b.iterdir()):
            if UUID_RE.match(d.name) and (segment is None or d.name == segment) and d.is_dir() and not d.is_symlink():
                out.append(_entry(d, d.name, "chaosfix-backup"))
    return out


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
