"""chroma-hnswlib's persisted index files (format version 1), read without hnswlib.

The slot table (labels, flags, neighbour lists) is read from ``data_level0.bin`` in
blocks of ``BLOCK_SLOTS`` slots with plain sequential reads into one reused buffer, so
checking a 500k-element index touches each slot once and holds only labels, flags and
a block in memory. (A memmap over the whole file would leave every page it touched in
the process's RSS: for 100k 384-d elements, 160 MB on top of the rest.) Vectors are
read (never memory-mapped) only when asked for.
"""

from __future__ import annotations

import math
import os
import struct
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from chaosfix.safe_fs import open_regular

HEADER_FMT = "<iQQQQQQiIQQQdQ"
HEADER_SIZE = struct.calcsize(HEADER_FMT)  # 100
FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin")
DELETE_MARK = 0x01
BLOCK_SLOTS = 8192  # 8192 * 1676 bytes (384-d) = 13.7 MB per block
BLOCK_BYTES = 16 << 20  # and never more than this per block, whatever the slot size
DENSE = 8  # vectors(): slots wanted at least one in this many apart are read in blocks
# bounds no healthy index exceeds, checked before any allocation sized by the header:
# hnswlib's internal ids are u32, chromadb's M is small, embeddings stay below 64k dims
MAX_ELEMENTS = 2**32
MAX_M = 4096
MAX_DIM = 65536
CAPACITY_FLOOR = 1000  # chromadb's smallest max_elements
DEFAULT_M, DEFAULT_EFC = 16, 100  # chromadb's defaults
LINK_WINDOW = 4 << 20  # link_lists.bin bytes looked at per window of the walk


@dataclass(frozen=True)
class Header:
    version: int
    offset_level0: int
    max_elements: int
    cur_element_count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint_node: int
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int

    @property
    def dim(self) -> int:
        return (self.label_offset - self.offset_data) // 4

    def loader_problems(self, resize_factor: float = 1.2) -> list[str]:
        """Fields chromadb's load trusts and the slots' layout does not use: the slots stay
        readable (a repair keeps their vectors), the index does not load."""
        out = []
        if self.offset_level0 != 0:  # (always 0 in hnswlib; chromadb's load reads level 0 from there: a segfault)
            out.append("offsetLevel0 not 0")
        if self.cur_element_count <= self.max_elements and self.capacity_implausible(resize_factor):
            out.append(f"max_elements {self.max_elements} would allocate {self.max_elements * self.size_data_per_element >> 20}"
                       f" MiB for {self.cur_element_count} elements (chromadb fails to load it)")
        return out

    def capacity_implausible(self, resize_factor: float = 1.2) -> bool:
        """max_elements far beyond what chromadb's resize policy (x``resize_factor``, at least
        1,000) ever makes for this element count: loading the index would allocate that many."""
        sane = max(CAPACITY_FLOOR, math.ceil(self.cur_element_count * resize_factor)) * 4
        return self.max_elements > sane and self.max_elements * self.size_data_per_element > (256 << 20)

    def problems(self) -> list[str]:
        """Internal inconsistencies that no healthy writer produces."""
        out = []
        if self.version != 1:
            out.append(f"header version {self.version}")
        if self.offset_data != 4 + 4 * self.max_m0:
            out.append("offset_data does not match maxM0")
        if self.label_offset <= self.offset_data or (self.label_offset - self.offset_data) % 4:
            out.append("label_offset/offset_data inconsistent")
        if self.size_data_per_element != self.label_offset + 8:
            out.append("size_data_per_element inconsistent")
        if self.cur_element_count > self.max_elements:
            out.append("cur_element_count above max_elements")
        if self.cur_element_count > MAX_ELEMENTS or self.max_m0 > 2 * MAX_M or self.dim > MAX_DIM:
            out.append("header sizes beyond hnswlib's limits")
        # an empty index (folder created, nothing persisted yet) has maxlevel -1 and no
        # entry point; any other has both (hnswlib searches from the entry point on load
        # and add: one outside the elements crashes it)
        if self.cur_element_count == 0:
            level_ok = self.maxlevel == -1
        else:
            level_ok = 0 <= self.maxlevel < 64 and self.enterpoint_node < self.cur_element_count
        if not level_ok or self.max_m0 != 2 * self.max_m or self.m != self.max_m:
            out.append("graph parameters out of range")
        return out


def derive_header(files: HnswFiles, dim: int, m: int, ef_construction: int) -> Header | None:
    """The fields a read of the slots needs, rebuilt from the collection's dimension and M
    when header.bin is gone, empty or garbage (each persist rewrites it first: a crash
    right after truncating it leaves 0 bytes). chromadb lays every slot out from those
    two alone; data_level0.bin must hold a whole number of such slots. The element count
    is the slots up to the last one written: chromadb's labels start at 1, so a slot of
    0.6's preallocated tail reads label 0. None when the file does not fit. The caller
    still judges the slots' links and flags, which garbage under a wrong layout fails."""
    size = files.present.get("data_level0.bin", 0)
    if not (0 < dim <= MAX_DIM and 0 < m <= MAX_M and size):
        return None
    offset_data = 4 + 8 * m
    label_offset = offset_data + 4 * dim
    slot = label_offset + 8
    if size % slot:
        return None
    n = min(size, files.level0_real()) // slot

    def header(count: int) -> Header:
        return Header(1, 0, size // slot, count, slot, label_offset, offset_data, 0 if count else -1, 0, m, 2 * m,
                      m, 1 / math.log(m) if m > 1 else 1.0, ef_construction)

    files.header = header(n)
    try:
        last = -1
        for s, rows in files.blocks():
            written = np.flatnonzero(rows[:, label_offset:slot].any(axis=1))
            if len(written):
                last = s + int(written[-1])
    finally:
        files.header = None
    return header(last + 1)


def parse_header(raw: bytes) -> Header:
    if len(raw) != HEADER_SIZE:
        raise ValueError(f"header.bin is {len(raw)} bytes, expected {HEADER_SIZE}")
    return Header(*struct.unpack(HEADER_FMT, raw))


@dataclass
class SlotTable:
    """Per-slot facts for slots [0, n): label, deleted mark, structural validity."""

    labels: np.ndarray  # uint64
    deleted: np.ndarray  # bool
    bad: np.ndarray  # bool: neighbour count or neighbour ids out of range
    vector_ok: np.ndarray | None = None  # bool: finite (and unit-norm for cosine); when asked for
    # uint32 (slots, maxM0): level-0 neighbours, unused entries (and ids out of range) set
    # to the slot count; when asked for
    links: np.ndarray | None = None

    @property
    def live(self) -> np.ndarray:
        return ~self.deleted


def vectors_usable(v: np.ndarray, space: str) -> np.ndarray:
    """Rows of ``v`` that are finite, and unit-norm for cosine (hnswlib stores them
    normalized), or all zero there: chromadb stores an embedding of zeros as it is given."""
    with np.errstate(all="ignore"):
        # squared norms in float32 (a NaN or inf in a row makes its sum one): 8x faster than
        # float64 sums, which check pays on every slot (0.02 s against 0.19 s per 500k)
        sq = np.einsum("ij,ij->i", v, v)
    ok = np.isfinite(sq)
    over = np.flatnonzero(~ok)
    if len(over):  # finite values whose squares overflow float32 (an l2/ip norm above 1.8e19)
        ok[over] = np.isfinite(v[over]).all(axis=1)
    if space == "cosine":  # |norm - 1| < 1e-3, or all zero
        ok &= ((sq > (1 - 1e-3) ** 2) & (sq < (1 + 1e-3) ** 2)) | (sq == 0)
    return ok


@dataclass
class HnswFiles:
    """One VECTOR segment folder, parsed as far as its bytes allow."""

    dir: Path
    present: dict[str, int] = field(default_factory=dict)  # name -> size
    header: Header | None = None
    header_error: str | None = None
    level0_data: int | None = None  # bytes of data_level0.bin before its first hole

    @classmethod
    def open(cls, seg_dir: Path) -> HnswFiles:
        """Stat the files (symlinks are not followed: the caller refuses them earlier)."""
        self = cls(seg_dir)
        for name in FILES:
            p = seg_dir / name
            if p.is_file() and not p.is_symlink():
                self.present[name] = p.stat().st_size
        if "header.bin" in self.present:
            try:
                self.header = parse_header((seg_dir / "header.bin").read_bytes())
            except (ValueError, struct.error, OSError) as exc:
                self.header_error = str(exc)
        return self

    @property
    def slots_in_file(self) -> int:
        """Whole slots of real data: a sparse data_level0.bin counts only up to its first
        hole (hnswlib writes every slot below cur_element_count, so a hole is lost data),
        which keeps every read O(real bytes) whatever the apparent size claims."""
        if self.header is None or self.header.size_data_per_element <= 0:
            return 0
        size = self.present.get("data_level0.bin", 0)
        return min(size, self.level0_real()) // self.header.size_data_per_element

    def level0_real(self) -> int:
        """Offset of data_level0.bin's first hole (its size when it has none)."""
        if self.level0_data is None:
            size = self.present.get("data_level0.bin", 0)
            self.level0_data = size
            if size:
                try:
                    with self._level0() as f:
                        self.level0_data = min(size, os.lseek(f.fileno(), 0, os.SEEK_HOLE))
                except OSError:
                    pass
        return self.level0_data

    @property
    def readable_slots(self) -> int:
        return 0 if self.header is None else min(self.header.cur_element_count, self.slots_in_file)

    def _level0(self) -> BinaryIO:
        """data_level0.bin opened for reading: never through a symlink, never a FIFO or
        device swapped in after the folder was listed (which could block or never end)."""
        return open_regular(self.dir / "data_level0.bin")

    def blocks(self, step: int = BLOCK_SLOTS, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first slot, uint8 rows of shape (k, size_data_per_element)) over the
        readable slots (those in [start, stop)). The rows are a view of one reused buffer
        (at most BLOCK_BYTES plus one slot): copy what you keep."""
        h, n = self.header, self.readable_slots
        if stop is not None:
            n = min(n, stop)
        if h is None or n <= start:
            return
        size = h.size_data_per_element
        step = max(1, min(step, BLOCK_BYTES // size))
        buf = np.empty(min(step, n - start) * size, dtype=np.uint8)
        with self._level0() as f:
            f.seek(start * size)
            for s in range(start, n, step):
                want = min(step, n - s) * size
                view, got = memoryview(buf)[:want], 0
                while got < want:
                    r = f.readinto(view[got:])
                    if not r:
                        break
                    got += r
                k = got // size
                if k:
                    yield s, buf[: k * size].reshape(k, size)
                if got < want:
                    return  # the file shrank since it was opened

    def slots(self, vectors_of: str | None = None, links: bool = False) -> SlotTable:
        """One pass over the slot table. With ``vectors_of`` (the space), also whether each
        stored vector is usable (``SlotTable.vector_ok``), from the same block reads: the
        reconciler needs it for every live slot and must not read the file twice. With
        ``links``, also the level-0 neighbour lists (``SlotTable.links``: 128 bytes a slot
        at M=16, for the verification's reachability pass)."""
        h, n = self.header, self.readable_slots
        if h is None or n == 0:
            empty = np.zeros(0, dtype=bool)
            return SlotTable(np.zeros(0, dtype=np.uint64), empty, empty, empty if vectors_of else None,
                             np.zeros((0, h.max_m0 if h is not None else 0), dtype=np.uint32) if links else None)
        labels = np.empty(n, dtype=np.uint64)
        flags = np.empty(n, dtype=np.uint8)
        bad = np.empty(n, dtype=bool)
        vec_ok = np.empty(n, dtype=bool) if vectors_of else None
        nbr_out = np.empty((n, h.max_m0), dtype=np.uint32) if links else None
        cols = np.arange(h.max_m0)[None, :]
        done = 0
        for s, rows in self.blocks():
            k = len(rows)
            labels[s : s + k] = rows[:, h.label_offset : h.label_offset + 8].copy().view("<u8").ravel()
            fl = rows[:, 2].copy()
            counts = rows[:, 0:2].copy().view("<u2").ravel()
            # neighbour ids in range (only a block naming one beyond the count needs the
            # per-slot pass: one max instead of three passes over 16M words at 500k)
            nbrs = rows[:, 4 : 4 + 4 * h.max_m0].view("<u4")
            bad_k = (counts > h.max_m0) | ((fl & ~np.uint8(DELETE_MARK)) != 0)
            if nbrs.size and int(nbrs.max()) >= h.cur_element_count:
                bad_k |= ((nbrs >= h.cur_element_count) & (cols < counts[:, None])).any(axis=1)
            bad[s : s + k] = bad_k
            flags[s : s + k] = fl
            if vec_ok is not None:
                vec_ok[s : s + k] = vectors_usable(rows[:, h.offset_data : h.label_offset].view("<f4"), vectors_of)
            if nbr_out is not None:
                out = nbr_out[s : s + k]
                out[:] = nbrs
                out[(cols >= counts[:, None]) | (out >= n)] = n
            done = s + k
        return SlotTable(labels[:done], (flags[:done] & DELETE_MARK).astype(bool), bad[:done],
                         vec_ok[:done] if vec_ok is not None else None,
                         _sentinel(nbr_out[:done], done) if nbr_out is not None else None)

    def vectors(self, slot_idx: np.ndarray) -> np.ndarray:
        """float32 vectors of the given slots (as stored: normalized for cosine), in their
        order. Read, never memory-mapped: a page fault on a mapped file maps its cached
        neighbours too (fault-around, 64 KB), so 6,000 slots scattered over a 160 MB file
        put nearly all of it in the process's RSS (the verification's peak at 100k drawers,
        above the index it then loads). Scattered slots are read one by one; a run where at
        least one slot in ``DENSE`` is wanted is read in blocks, in file order."""
        h, n = self.header, self.readable_slots
        if h is None or n == 0:
            return np.zeros((0, 0), dtype=np.float32)
        slot_idx = np.asarray(slot_idx).reshape(-1)
        if slot_idx.dtype.kind not in "iu" and len(slot_idx):  # a mask or floats: a caller's bug
            raise IndexError(f"slot numbers must be integers, not {slot_idx.dtype}")
        slot_idx = slot_idx.astype(np.int64)
        lo, hi, size = h.offset_data, h.label_offset, h.size_data_per_element
        if not 0 <= lo < hi <= size or hi - lo != 4 * h.dim:
            raise ValueError(f"{self.dir / 'header.bin'}: vectors at bytes {lo}..{hi} of a {size}-byte slot")
        out = np.empty((len(slot_idx), h.dim), dtype=np.float32)
        if not len(slot_idx):
            return out
        order = np.argsort(slot_idx, kind="stable")
        wanted = slot_idx[order]
        first, last = int(wanted[0]), int(wanted[-1])
        if first < 0 or last >= n:
            raise IndexError(f"slot {first if first < 0 else last} outside the {n} readable slots")
        if (last - first + 1) > DENSE * len(wanted):
            with self._level0() as f:
                fd = f.fileno()
                for j, slot in zip(order.tolist(), wanted.tolist()):
                    raw = os.pread(fd, hi - lo, slot * size + lo)
                    if len(raw) != hi - lo:
                        raise OSError(f"{self.dir / 'data_level0.bin'} shrank while it was read")
                    out[j] = np.frombuffer(raw, dtype="<f4")
            return out
        at = 0
        for s, rows in self.blocks(start=first, stop=last + 1):
            end = int(np.searchsorted(wanted, s + len(rows), side="left"))
            if end > at:
                out[order[at:end]] = rows[wanted[at:end] - s, lo:hi].view("<f4")
                at = end
        if at < len(wanted):
            raise OSError(f"{self.dir / 'data_level0.bin'} shrank while it was read")
        return out

    def link_walk(self) -> tuple[int, str | None]:
        """Walk link_lists.bin: (bytes consumed, problem or None).

        Each element has a u32 byte count then that many bytes of upper-level links, a
        multiple of (maxM + 1) * 4 and at most maxlevel levels. The walk reads only what
        the elements use, so a sparse 10^6x bloated file costs nothing. Most elements
        have no upper level (a zero count), so it runs in windows of u32 words and jumps
        from one non-zero count to the next: Python steps only per upper-level element
        (about 1 in M), not per element.
        """
        h = self.header
        size = self.present.get("link_lists.bin")
        if h is None or size is None:
            return 0, None
        unit = h.max_m * 4 + 4
        # walk only the elements data_level0.bin really holds (a header may claim 2**40)
        n = min(h.cur_element_count, self.slots_in_file)
        if n == 0:
            return 0, None
        if size == 0:
            return 0, f"link_lists.bin is empty for {n} elements"
        # look at no more than n elements can use: a sparse terabyte file costs nothing
        size = min(size, n * (4 + max(h.maxlevel, 0) * unit))
        off, i = 0, 0  # byte offset of element i's count
        with open(self.dir / "link_lists.bin", "rb", buffering=0) as f:
            fd = f.fileno()
            while i < n:
                raw = os.pread(fd, min(size - off, LINK_WINDOW), off)
                words = len(raw) // 4
                if words == 0:
                    return off, f"link_lists.bin ends at element {i} of {n}"
                w = np.frombuffer(raw, dtype="<u4", count=words)
                nz = np.flatnonzero(w).tolist()
                # upper-level elements of this window, their links checked together below
                found: list[tuple[int, int, int, int]] = []  # (element, byte offset, first word, levels)
                p = 0  # word index of element i's count in this window
                while i < n and p < words:
                    k = bisect_left(nz, p)
                    q = nz[k] if k < len(nz) else words
                    run = min(q - p, n - i)  # elements with no upper level
                    if i <= h.enterpoint_node < i + run and h.maxlevel != 0:
                        return _first_bad(w, found, h) or (off + 4 * (p + h.enterpoint_node - i), (
                            f"entry point {h.enterpoint_node} has 0 levels, header says {h.maxlevel}"))
                    i, p = i + run, p + run
                    if i >= n or p >= words:
                        break
                    ln = int(w[p])
                    at = off + 4 * p
                    problem = None
                    if ln % unit or ln // unit > h.maxlevel:
                        problem = f"link list of element {i} has invalid size {ln}"
                    elif i == h.enterpoint_node and ln // unit != h.maxlevel:
                        problem = f"entry point {i} has {ln // unit} levels, header says {h.maxlevel}"
                    elif at + 4 + ln > size:
                        return _first_bad(w, found, h) or (at + 4 + ln, f"link_lists.bin ends inside element {i} of {n}")
                    elif p + 1 + ln // 4 > words:  # the element spans the window's end: alone
                        raw_one = os.pread(fd, 4 + ln, at)
                        if len(raw_one) < 4 + ln:  # the file shrank since its size was read
                            return _first_bad(w, found, h) or (at + len(raw_one),
                                                               f"link_lists.bin ends inside element {i} of {n}")
                        alone = np.frombuffer(raw_one, dtype="<u4")
                        bad = _first_bad(w, found, h) or _first_bad(alone, [(i, at, 1, ln // unit)], h)
                        if bad is not None:
                            return bad
                        found.clear()  # judged: the window's end need not judge them again
                    else:
                        found.append((i, at, p + 1, ln // unit))
                    if problem is not None:
                        return _first_bad(w, found, h) or (at, problem)
                    i, p = i + 1, p + 1 + ln // 4
                bad = _first_bad(w, found, h)
                if bad is not None:
                    return bad
                off += 4 * p
        return off, None


def _sentinel(links: np.ndarray, n: int) -> np.ndarray:
    """``links`` with every id >= ``n`` set to ``n`` (the file may have shrunk under the pass)."""
    if len(links) and int(links.max()) > n:
        links[links > n] = n
    return links


def _first_bad(w: np.ndarray, found: list[tuple[int, int, int, int]], h: Header) -> tuple[int, str] | None:
    """The first of ``found``'s elements (element, byte offset, first link word in ``w``,
    levels) whose upper-level links are malformed: each level is a u16 neighbour count
    <= maxM, then maxM u32 ids of which the first count must name existing elements
    (hnswlib follows them without checks). One numpy pass over all of them: Python steps
    per element, not per link."""
    if not found:
        return None
    first = np.array([f[2] for f in found], dtype=np.int64)
    levels = np.array([f[3] for f in found], dtype=np.int64)
    width = h.max_m + 1
    # the first word of every level block of every element
    within = np.arange(int(levels.sum())) - np.repeat(np.cumsum(levels) - levels, levels)
    rows = np.repeat(first, levels) + within * width
    blocks = w[rows[:, None] + np.arange(width)[None, :]]
    counts = blocks[:, 0] & 0xFFFF
    used = np.arange(h.max_m)[None, :] < counts[:, None]
    bad_level = (counts > h.max_m) | (used & (blocks[:, 1:] >= h.cur_element_count)).any(axis=1)
    if not bad_level.any():
        return None
    owner = np.repeat(np.arange(len(found)), levels)
    e, at, _, _ = found[int(owner[np.flatnonzero(bad_level)[0]])]
    return at, f"upper-level links of element {e} out of range"
