"""Raw file damage: truncation, zeroed ranges, garbage sectors, bit flips, sparse bloat.

Each function damages one file in place, deterministically (seeded where random), and
returns what it did so a test can assert on it. None of them ever extends a file except
``sparse_extend``, whose whole point is a larger apparent size with no blocks behind it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

SECTOR = 4096


def truncate(path: str | Path, size: int | None = None, fraction: float | None = None) -> int:
    """Cut ``path`` to ``size`` bytes, or to ``fraction`` (0..1) of its current size.

    Exactly one of ``size`` / ``fraction`` must be given. Never extends the file.
    Returns the new size.
    """
    if (size is None) == (fraction is None):
        raise ValueError("truncate: give exactly one of size= or fraction=")
    cur = os.path.getsize(path)
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"truncate: fraction {fraction} outside [0, 1]")
        size = int(cur * fraction)
    assert size is not None
    if size < 0:
        raise ValueError(f"truncate: negative size {size}")
    new = min(size, cur)
    os.truncate(path, new)
    return new


def zero_fill(path: str | Path, offset: int, length: int) -> int:
    """Overwrite ``length`` bytes at ``offset`` with zeros (clamped to the file's end).

    Returns the number of bytes zeroed.
    """
    if offset < 0 or length < 0:
        raise ValueError("zero_fill: offset and length must be >= 0")
    cur = os.path.getsize(path)
    n = max(0, min(length, cur - offset))
    if n:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes(n))
    return n


def garbage_sectors(path: str | Path, seed: int, n: int, sector: int = SECTOR) -> list[int]:
    """Overwrite ``n`` distinct ``sector``-sized blocks with seeded random bytes.

    Models a disk returning garbage for whole sectors. The last, partial sector is
    overwritten only up to the file's end. Returns the sector indexes, sorted.
    """
    size = os.path.getsize(path)
    total = (size + sector - 1) // sector
    rng = random.Random(f"garbage:{seed}")
    picked = sorted(rng.sample(range(total), min(n, total)))
    with open(path, "r+b") as f:
        for s in picked:
            off = s * sector
            f.seek(off)
            f.write(rng.randbytes(min(sector, size - off)))
    return picked


def bit_flips(path: str | Path, seed: int, n: int) -> list[tuple[int, int]]:
    """Flip ``n`` distinct seeded bits. Returns ``(byte offset, bit)`` pairs, sorted."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    rng = random.Random(f"flips:{seed}")
    bits = sorted(rng.sample(range(size * 8), min(n, size * 8)))
    flips = [(b // 8, b % 8) for b in bits]
    with open(path, "r+b") as f:
        for off, bit in flips:
            f.seek(off)
            (byte,) = f.read(1)
            f.seek(off)
            f.write(bytes([byte ^ (1 << bit)]))
    return flips


def sparse_extend(path: str | Path, factor: int) -> int:
    """Grow ``path`` (e.g. ``link_lists.bin``) to ``factor`` x its size as a sparse file.

    Uses truncate-up, so the new tail is a hole: the apparent size grows, the allocated
    blocks do not (the resize drift seen in the field). Returns the new apparent size.
    """
    if factor < 1:
        raise ValueError(f"sparse_extend: factor {factor} < 1")
    cur = os.path.getsize(path)
    new = max(cur, 1) * factor
    os.truncate(path, new)
    return new


def allocated_bytes(path: str | Path) -> int:
    """Bytes actually allocated on disk for ``path`` (st_blocks * 512)."""
    return os.stat(path).st_blocks * 512
