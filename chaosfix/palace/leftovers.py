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
import stat
from dataclasses import dataclass
from pathlib import Path

from chaosfix.palace import UUID_RE

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
QUARANTINE_RE = re.compile(rf"^({UUID})\.(corrupt|drift|hnsw-backup)-[0-9A-Za-z_.:+-]{{1,64}}\Z")
BACKUP_GLOB = ".chaosfix-backup-"
NAME_MAX = 255  # bytes in one file name (Linux, macOS), the most used even where more fit
# the most chaosfix adds to a palace's name beside it: "." + ".chaosfix-recovered-" + a
# time + "-NN" (39 bytes), mkdtemp's "." + ".chaosfix-verify-" + 8 (26), with room to spare
SIBLING_EXTRA = 48


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes, up to
    ``NAME_MAX``: 143 on eCryptfs (an encrypted home), whose stored names are longer
    than the ones given; ``NAME_MAX`` where the system does not say."""
    try:
        n = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX
    return min(n, NAME_MAX) if n > 0 else NAME_MAX


def _digest(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def sibling_stem(root: Path, limit: int | None = None) -> str:
    """How the names of chaosfix's folders beside the palace ``root`` begin (its backups,
    a backup being made, recovered folders, the post-check's copy): the palace's own name
    or, when that name and the longest of those suffixes would not fit in one file name,
    its first characters, ``~`` and a hash of the whole name. A palace named near the
    limit then still gets its backup (it was refused, "File name too long"), and two long
    names with the same beginning do not share folders. ``limit``: the file name limit
    (``name_max`` of the palace's parent)."""
    name = root.name
    limit = name_max(root.parent) if limit is None else limit
    if len(os.fsencode(name)) <= limit - SIBLING_EXTRA:
        return name
    digest = _digest(name)
    budget, used, keep = limit - SIBLING_EXTRA - 1 - len(digest), 0, []
    for ch in name:  # whole characters (a UTF-8 name is never cut inside one)
        used += len(os.fsencode(ch))
        if used > budget:
            break
        keep.append(ch)
    return "".join(keep) + "~" + digest


def sibling_stems_re(root: Path) -> str:
    """A regular-expression group for every stem ``sibling_stem`` gives ``root`` or ever
    gave it: the whole name, or any beginning of it, ``~`` and its hash (the hash names
    the palace; the beginning depends on the file name limit where the folder was made,
    and a palace and its folders may since have been copied to a file system with
    another). An earlier chaosfix named them after the whole name whenever that fit, and
    a long name was cut only above 207 bytes. Their backups stay a source of vectors and
    their leftovers (half-made backups, post-check copies) are still cleared. Only a
    beginning of the name goes before the hash: a palace restored from a hashed backup
    and renamed (``x~<hash>``) is not this one's."""
    beginning = ""  # (?:a(?:b(?:c)?)?)? for "abc": "", "a", "ab" or "abc", in linear size
    for ch in reversed(root.name):
        beginning = f"(?:{re.escape(ch)}{beginning})?"
    return f"(?:{re.escape(root.name)}|{beginning}~{_digest(root.name)})"


STAMP = r"[0-9]{8}-[0-9]{6}(?:-[0-9]+)?"  # time.strftime("%Y%m%d-%H%M%S"), then -2, -3... when taken


def own_folders_re(root: Path, *kinds: str) -> re.Pattern[str]:
    """The whole names chaosfix gives its ``kinds`` of folders beside ``root``
    (``backup``: ``<stem>.chaosfix-backup-<time>``; ``recovered``), to be matched with
    ``fullmatch``: a prefix would also take another palace named like them, or that
    palace's own backups (``pal.chaosfix-backup-x.chaosfix-backup-<time>`` is not pal's).
    Group ``stamp``: the time and its counter."""
    return re.compile(rf"{sibling_stems_re(root)}\.chaosfix-(?:{'|'.join(map(re.escape, kinds))})-(?P<stamp>{STAMP})")


def _made_when(stamp: str) -> tuple[str, int]:
    """A backup's time, then its counter: ``-10`` was made after ``-2``."""
    day, clock, *n = stamp.split("-")
    return day + clock, int(n[0]) if n else 1


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
    ``backups``: then chaosfix's own backups beside the palace, oldest first."""
    out = []
    for d in sorted(root.iterdir()):
        m = QUARANTINE_RE.match(d.name)
        if m and (segment is None or m.group(1) == segment) and d.is_dir() and not d.is_symlink():
            out.append(_entry(d, m.group(1), m.group(2)))
    if not backups:
        return out
    ours = own_folders_re(root, "backup")
    try:
        found = [(m, p) for p in root.parent.iterdir() if (m := ours.fullmatch(p.name))]
    except OSError:
        found = []
    # oldest first by the time in the name, not by the name: a palace's folders may have
    # two stems (``sibling_stems_re``), and ``-10`` sorts before ``-2``
    for _, b in sorted(found, key=lambda mp: (_made_when(mp[0]["stamp"]), mp[1].name)):
        try:
            if not b.is_dir() or b.is_symlink():
                continue
            names = sorted(n for n in os.listdir(b) if UUID_RE.match(n) and (segment is None or n == segment))
            # (lstat: a symlink is never a segment, and a backup one may list but not enter fails here)
            inside = [n for n in names if stat.S_ISDIR(os.lstat(b / n).st_mode)]
        except OSError:  # (a folder named as a backup that cannot be read: no source, no refusal)
            continue
        out += [_entry(b / name, name, "chaosfix-backup") for name in inside]
    return out


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
