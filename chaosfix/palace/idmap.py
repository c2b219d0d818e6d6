"""``index_metadata.pickle``: the id <-> label map, read safely and written in kind.

Reading: a restricted unpickler. The only global it resolves is chromadb 0.6's
``PersistentData`` class path, and it resolves it to a local stand-in, never to chromadb,
so a hostile pickle cannot reach code (``pickle.load`` in chromadb 0.6.3 would run it).

Writing: the 1.x format is a plain dict at protocol 3; the 0.6 format is an object of
``PersistentData`` at protocol 5. The object form is written by the pure-Python pickler
with the class reference emitted by name, so chromadb never has to be imported.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import sys
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from chaosfix.palace import pickle_reader

LABEL_LIMIT = 2**64
SEQ_LIMIT = 2**63  # seq_ids are i64 in 1.x's loader
MAX_DIM = 65536  # (chromadb's own embedding functions stop near 4096)
PERSISTENT_DATA = ("chromadb.segment.impl.vector.local_persistent_hnsw", "PersistentData")
FILENAME = "index_metadata.pickle"


def _hash_key_is_secret() -> bool:
    """str hashes are keyed by a per-process random key unless PYTHONHASHSEED fixed it at
    start (``-I``, as map_child runs, ignores the variable): only a secret key makes
    comparing hashes sound. The start's own environment is read where Linux keeps it
    (/proc/self/environ), so a variable removed from ``os.environ`` later still counts."""
    if sys.flags.ignore_environment:
        return True
    seeds = [os.environ.get("PYTHONHASHSEED", "")]
    try:
        with open("/proc/self/environ", "rb") as f:
            seeds += [v.split(b"=", 1)[1].decode("ascii", "replace") for v in f.read().split(b"\0")
                      if v.startswith(b"PYTHONHASHSEED=")]
    except OSError:
        pass
    return all(v in ("", "random") for v in seeds)


SECRET_HASH_KEY = _hash_key_is_secret()


class UnsafePickle(Exception):
    """The pickle references a global outside the allow-list."""


class UnreadablePickle(Exception):
    """The pickle is truncated, zero-filled or not the expected structure."""


class _PersistentDataStandIn:
    """Receives the attributes of a 0.6 ``PersistentData`` without being it."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) == PERSISTENT_DATA:
            return _PersistentDataStandIn
        raise UnsafePickle(f"global {module}.{name} is not allowed")


MAX_TOTAL = 2**32  # no chromadb index issues 4 billion labels; a count above came from garbage
_DEFERRED = ("id_to_label", "label_to_id", "id_to_seq_id", "extra")  # what a deferred map reads late


@dataclass
class IdMap:
    """The id map in one typed structure, whichever format it came from.

    A *deferred* map (``deferred``) holds the pickle's bytes and the facts a helper
    process found in them (``summarize``), and unpickles only when a caller first reads
    one of its dicts: a healthy check of 500k ids needs the facts, not a million Python
    strings. Every fact method answers from those facts while the dicts are unread.
    """

    fmt: str  # "object" (0.6) or "dict" (1.x)
    dimensionality: int | None
    total_elements_added: int
    id_to_label: dict[str, int] = field(default_factory=dict)
    label_to_id: dict[int, str] = field(default_factory=dict)
    id_to_seq_id: dict[str, int] = field(default_factory=dict)
    max_seq_id: int | None = None
    extra: dict = field(default_factory=dict)  # attributes we do not interpret, kept on write

    def __setattr__(self, name: str, value: object) -> None:
        # a dict replaced: what was remembered of the old one goes (its address may be the
        # new one's, so ``id`` alone could not tell them apart)
        if name in ("id_to_label", "label_to_id"):
            self.__dict__.pop("_inverse", None)
            self.__dict__.pop("_key_fp", None)
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> object:
        # reached only for a dict a deferred map has not read yet: unpickle it now (the
        # helper already bounded these bytes, so no second scan)
        raw = self.__dict__.get("_raw")
        if name not in _DEFERRED or raw is None:
            raise AttributeError(name)
        full = loads(raw, bounded=True)
        for f in _DEFERRED:
            setattr(self, f, getattr(full, f))
        del self.__dict__["_raw"], self.__dict__["_facts"], self.__dict__["_labels"]
        return getattr(self, name)

    @property
    def _known(self) -> dict | None:
        return self.__dict__.get("_facts")

    @property
    def is_deferred(self) -> bool:
        """Its dicts are still unread pickle bytes (reading one unpickles them all)."""
        return self._known is not None

    @property
    def count(self) -> int:
        f = self._known
        return f["count"] if f else len(self.id_to_label)

    @property
    def max_label(self) -> int:
        f = self._known
        return f["max_label"] if f else int(max(self.label_to_id, default=0))  # (a bool label: an int)

    @property
    def has_seq_map(self) -> bool:
        f = self._known
        return f["has_seq_map"] if f else bool(self.id_to_seq_id)

    def labels_unique(self) -> bool:
        """No label is held by two ids."""
        f = self._known
        if f:
            return f["labels_unique"]
        values = self.id_to_label.values()
        return len(set(values)) == len(values)

    def sorted_labels(self) -> np.ndarray:
        """id_to_label's labels, sorted (uint64: loads range-checked them)."""
        if self._known:
            return self.__dict__["_labels"]
        return sort_labels(np.fromiter(self.id_to_label.values(), dtype=np.uint64, count=len(self.id_to_label)))

    def key_fingerprints(self) -> np.ndarray:
        """``_fingerprints`` of id_to_label's keys, in its order, remembered as
        ``inverse_problems`` is, until the dict is replaced or its size changes (the map
        helper compares them twice: with label_to_id's ids, then with SQL's: 40 ms each
        at 500k ids)."""
        a = self.id_to_label
        key = (id(a), len(a))
        seen = self.__dict__.get("_key_fp")
        if seen is None or seen[0] != key:
            self.__dict__["_key_fp"] = seen = (key, _fingerprints(a))
        return seen[1]

    def sane_total(self) -> int:
        """total_elements_added, unless it is beyond anything hnswlib could have counted
        (MAX_TOTAL): then the map's own highest label."""
        return self.total_elements_added if 0 <= self.total_elements_added < MAX_TOTAL else self.max_label

    def inverse_problems(self) -> int:
        """How many entries break id_to_label <-> label_to_id being inverse maps.

        Remembered (check, plan and their callers ask it up to four times: 0.3 s each at
        500k ids) for as long as the two dicts are the same objects of the same sizes; a
        caller that edits a loaded map in place does so before asking."""
        f = self._known
        if f:
            return f["inverse_problems"]
        a, b = self.id_to_label, self.label_to_id
        key = (id(a), id(b), len(a), len(b))
        seen = self.__dict__.get("_inverse")
        if seen is not None and seen[0] == key:
            return seen[1]
        self.__dict__["_inverse"] = (key, n := self._inverse_problems(a, b))
        return n

    def _inverse_problems(self, a: dict[str, int], b: dict[int, str]) -> int:
        # every id's label maps back to that id, and no label is left over: inverse maps
        if len(a) == len(b) and _same_pairs(a, b, self.key_fingerprints() if SECRET_HASH_KEY else None):
            return 0
        bad = sum(1 for i, lab in a.items() if b.get(lab) != i)
        bad += sum(1 for lab, i in b.items() if a.get(i) != lab)
        return bad


def _same_pairs(a: dict[str, int], b: dict[int, str], fa: np.ndarray | None = None) -> bool:
    """``a`` and ``b`` (of equal sizes) hold the same (id, label) pairs, compared in
    numpy: each side's labels with its ids' fingerprints (``_fingerprints``; ``fa``:
    ``a``'s keys' already found), both put in label order. 0.1 s at 500k ids, against
    0.45 s for ``b.get`` on every label, whose probes wander the heap (chromadb 1.x
    writes the two dicts in different orders, with two copies of each id)."""
    n = len(a)
    la = np.fromiter(a.values(), dtype=np.uint64, count=n)  # (loads range-checked them: u64)
    lb = np.fromiter(b, dtype=np.uint64, count=n)
    if n and max(int(la.max()), int(lb.max())) < _TABLE_MOST * n:
        # labels as the positions of a table instead of two sorts (chromadb issues them
        # 1, 2, 3...): where each of b's labels is in b, looked up for each of a's
        where = np.full(max(int(la.max()), int(lb.max())) + 1, -1, dtype=np.int64)
        where[lb.astype(np.intp)] = np.arange(n)
        pos = where[la.astype(np.intp)]
        if (pos < 0).any():  # a label of a's that b lacks
            return False
        hit = np.zeros(n, dtype=bool)
        hit[pos] = True
        if not hit.all():  # two of a's ids share a label (then one of b's is left over)
            return False
    else:
        oa, ob = np.argsort(la), np.argsort(lb)
        if not np.array_equal(la[oa], lb[ob]):  # b's keys are distinct, so then are a's labels
            return False
        pos = np.empty(n, dtype=np.int64)
        pos[oa] = ob  # a's i-th label is b's pos[i]-th key
    if not SECRET_HASH_KEY:  # a known key: compare the strings themselves
        return list(map(b.__getitem__, a.values())) == list(a)
    fa = _fingerprints(a) if fa is None else fa
    return np.array_equal(fa, _fingerprints(b.values())[pos])


_TABLE_MOST = 4  # labels below 4x their count index a table (of 8 bytes each) instead of a sort


def sort_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` (uint64, sorted in place or replaced) sorted, repeats kept: counted into
    a table when they are dense as chromadb issues them (a bincount is under half a
    sort's time), else sorted. Labels in slot order are often sorted already."""
    if len(labels) < 2 or bool((labels[1:] >= labels[:-1]).all()):
        return labels
    if int(labels.max()) < _TABLE_MOST * len(labels):
        counts = np.bincount(labels.astype(np.intp))
        return np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    labels.sort()
    return labels


_LEN_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: len -> len * _LEN_MIX is one-to-one


def _fingerprints(strings: Collection[str]) -> np.ndarray:
    """Each string's hash mixed with its length, in order (a dict's keys have their
    hashes cached). The hash is the interpreter's SipHash under a random per-process key
    (``SECRET_HASH_KEY``), over the string's buffer: length x character width bytes, so
    "ab" and "\u6261" share one, and the length tells such twins apart. Two strings
    with different buffers then pass only by a 2^-64 coincidence nobody can aim for."""
    h = np.fromiter(map(hash, strings), dtype=np.int64, count=len(strings)).view(np.uint64)
    with np.errstate(over="ignore"):
        return h ^ (np.fromiter(map(len, strings), dtype=np.uint64, count=len(strings)) * _LEN_MIX)


def same_id_set(m: dict[str, int], ids: list[str], keys_fp: np.ndarray | None = None) -> bool:
    """``ids`` (a list) holds exactly ``m``'s keys, each once, compared by fingerprint
    as in ``_same_pairs`` (``keys_fp``: ``m``'s keys' already found): a sort of 500k
    integers instead of a set of 500k strings."""
    if len(ids) != len(m):
        return False
    if not SECRET_HASH_KEY:
        return not m.keys() - ids  # (equal sizes, no key missing: the same ids, each once)
    return np.array_equal(np.sort(_fingerprints(m) if keys_fp is None else keys_fp), np.sort(_fingerprints(ids)))


def id_diff(m: dict[str, int], ids: list[str], most: int,
            keys_fp: np.ndarray | None = None) -> tuple[list[int], list[str]] | None:
    """(the positions in ``ids`` of the ids the map lacks, the map's ids not among
    ``ids``), or None when these are more than ``most`` in all: what a palace between two
    flushes has (1.x's SQL holds the pending adds, its index not yet), so its check need
    not unpickle the map to find them. Valid only for ``ids`` that are each once, which
    the caller checks. Compared by fingerprint as ``same_id_set`` is: 500k lookups of
    fresh strings in the map took 0.38 s."""
    if not SECRET_HASH_KEY:  # a known key: the strings themselves
        at = [i for i, rid in enumerate(ids) if rid not in m]
    else:
        keys_fp = _fingerprints(m) if keys_fp is None else keys_fp
        ids_fp = _fingerprints(ids)
        missing = ~in_sorted(ids_fp, np.sort(keys_fp))
        if int(missing.sum()) > most:
            return None
        at = np.flatnonzero(missing).tolist()
    if len(at) > most:
        return None
    # each id once and every other one mapped: the map holds no id beyond them when the
    # counts agree (the usual case: nothing more to compare)
    if len(ids) - len(at) == len(m):
        only_map: list[str] = []
    elif not SECRET_HASH_KEY:
        only_map = list(m.keys() - set(ids))
    else:
        only_map = list(itertools.compress(m, (~in_sorted(keys_fp, np.sort(ids_fp))).tolist()))
    return (at, only_map) if len(at) + len(only_map) <= most else None


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which ``values`` occur in ``sorted_set`` (ascending): a binary search each, no sort."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def summarize(m: IdMap) -> tuple[dict, np.ndarray]:
    """The facts a deferred map answers from, and its sorted labels."""
    labels = m.sorted_labels()
    inverse = m.inverse_problems()
    facts = {"fmt": m.fmt, "dimensionality": m.dimensionality, "total_elements_added": m.total_elements_added,
             "max_seq_id": m.max_seq_id, "count": m.count, "has_seq_map": m.has_seq_map,
             # from the sorted labels (inverse maps: label_to_id's keys are these labels)
             "max_label": int(labels[-1]) if len(labels) and not inverse else m.max_label,
             "labels_unique": not bool((labels[1:] == labels[:-1]).any()),
             "inverse_problems": inverse}
    return facts, labels


def deferred(raw: bytes, facts: dict, labels: np.ndarray) -> IdMap:
    """A map that unpickles ``raw`` on first use of a dict (``raw`` must be the bytes
    ``facts`` were found in, already bounded by the scan)."""
    m = object.__new__(IdMap)
    m.__dict__.update(fmt=facts["fmt"], dimensionality=facts["dimensionality"],
                      total_elements_added=facts["total_elements_added"], max_seq_id=facts["max_seq_id"],
                      _raw=raw, _facts=facts, _labels=labels)
    return m


def loads(raw: bytes, scanned: pickle_reader.Scan | None = None, bounded: bool = False,
          memo_after: bool = False) -> IdMap:
    """Parse pickle bytes; raises UnsafePickle or UnreadablePickle, nothing else.
    The opcode scan runs first so the unpickler's memory stays O(len(raw)); ``scanned``
    is that scan, already started on these very bytes (``pickle_reader.Scan``);
    ``bounded``: these bytes passed the scan already, or the caller's memory is capped
    (``map_child``); ``memo_after`` then applies the scan's memo-index bound to the
    unpickler's memo afterwards, so both ways give the same verdict."""
    try:
        if scanned is not None and scanned.raw is raw:
            scanned.wait()
        elif not bounded:
            pickle_reader.scan(raw)
    except pickle_reader.PickleBoundsError as exc:
        raise UnreadablePickle(str(exc)) from None
    try:
        # through a buffered reader: the C unpickler then takes the bytes in large chunks
        # (peek) instead of a read() call per opcode (0.2-0.4 s at 500k ids)
        unpickler = _Unpickler(io.BufferedReader(io.BytesIO(raw), 1 << 20))
        obj = unpickler.load()
        top = max(unpickler.memo.copy(), default=0) if memo_after else 0
    except UnsafePickle:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is "unreadable"
        raise UnreadablePickle(f"{type(exc).__name__}: {exc}") from None
    if top > len(raw):
        raise UnreadablePickle(f"memo index {top} in a {len(raw)}-byte pickle")
    if isinstance(obj, _PersistentDataStandIn):
        fmt, attrs = "object", dict(vars(obj))
    elif isinstance(obj, dict):
        fmt, attrs = "dict", dict(obj)
    else:
        raise UnreadablePickle(f"top-level object is {type(obj).__name__}")
    try:
        id_to_label = attrs.pop("id_to_label")
        label_to_id = attrs.pop("label_to_id")
        total = attrs.pop("total_elements_added")
        dim = attrs.pop("dimensionality", None)
        id_to_seq = attrs.pop("id_to_seq_id", None) or {}
        max_seq = attrs.pop("max_seq_id", None)
    except KeyError as exc:
        raise UnreadablePickle(f"missing field {exc}") from None
    ok = (
        isinstance(id_to_label, dict)
        and isinstance(label_to_id, dict)
        and type(total) is int
        # types compared in C (a restricted unpickle yields no subclasses). Never a bool
        # where chromadb writes an int: 1.x's loader refuses one ("expected u32")
        and set(map(type, id_to_label)) <= {str} and set(map(type, id_to_label.values())) <= {int}
        and set(map(type, label_to_id)) <= {int} and set(map(type, label_to_id.values())) <= {str}
        and (dim is None or type(dim) is int)
        and isinstance(id_to_seq, dict)
        and (max_seq is None or type(max_seq) is int)
    )
    if not ok:
        raise UnreadablePickle("fields have unexpected types")
    # values chromadb's loaders refuse (1.x: a dimension or seq_id beyond its integer
    # types; 0.6: a dimension hnswlib cannot allocate)
    if dim is not None and not 0 <= dim <= MAX_DIM:
        raise UnreadablePickle(f"dimensionality {dim} out of range")
    if max_seq is not None and not 0 <= max_seq < SEQ_LIMIT:
        raise UnreadablePickle(f"max_seq_id out of range ({max_seq.bit_length()}-bit value)")
    if _nests_persistent_data(attrs):  # (chaosfix could not write it back under chromadb's name)
        raise UnreadablePickle("a PersistentData object nested inside the id map")
    if fmt == "dict" and id_to_seq and not set(map(type, id_to_seq.values())) <= {int}:
        raise UnreadablePickle("id_to_seq_id holds values that are not seq_ids")  # (1.x's loader refuses them)
    bad = _out_of_range(id_to_label, label_to_id, total)
    if bad:
        raise UnreadablePickle(bad)
    try:
        # 0.6's id_to_seq_id is a flat dict of str -> int (100k entries): its types are
        # compared in C and only its widest int is weighed; the generic walk is 0.15 s
        if _flat_seq_ids(id_to_seq):
            pickle_reader.check_nesting([dim, max_seq, attrs])
        else:
            pickle_reader.check_nesting([dim, max_seq, id_to_seq, attrs])
    except pickle_reader.PickleBoundsError as exc:
        raise UnreadablePickle(str(exc)) from None
    return IdMap(fmt, dim, total, id_to_label, label_to_id, dict(id_to_seq), max_seq, attrs)


def _nests_persistent_data(obj: object) -> bool:
    """A ``PersistentData`` anywhere in ``obj`` (the map's unknown fields: check_nesting
    has bounded their depth). Only the top-level object may be one."""
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, _PersistentDataStandIn):
            return True
        if isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo += list(x)
    return False


def _flat_seq_ids(id_to_seq: dict) -> bool:
    """True for a dict of str -> int whose ints are all within check_nesting's width."""
    if not set(map(type, id_to_seq)) <= {str} or not set(map(type, id_to_seq.values())) <= {int}:
        return False
    if not id_to_seq:
        return True
    bound = 1 << pickle_reader.MAX_INT_BITS
    return -bound < min(id_to_seq.values()) and max(id_to_seq.values()) < bound


def _out_of_range(id_to_label: dict, label_to_id: dict, total: int) -> str | None:
    """Labels and counts are hnswlib's u64: anything else (a 100,000-digit int) is damage."""
    for what, vals in (("label", id_to_label.values()), ("label", label_to_id.keys()), ("total", (total,))):
        if vals and (min(vals) < 0 or max(vals) >= LABEL_LIMIT):
            top = max(vals)
            return f"{what} out of range ({top.bit_length()}-bit value)"
    return None


def dumps(m: IdMap) -> bytes:
    """Serialize in the map's own format, the way the chromadb that wrote it does."""
    if m.fmt == "dict":
        d = {
            "dimensionality": m.dimensionality,
            "total_elements_added": m.total_elements_added,
            "max_seq_id": m.max_seq_id,
            "id_to_label": m.id_to_label,
            "label_to_id": m.label_to_id,
            "id_to_seq_id": m.id_to_seq_id,
            **m.extra,
        }
        return pickle.dumps(d, protocol=3)
    # the state dict by the C pickler (the pure-Python one, which could write the class
    # by name without importing chromadb, took 1.3 s at 100k ids), behind the opcodes
    # that make a PersistentData of it: the class by name, NEWOBJ, then BUILD. The
    # prefix memoizes nothing, so the state's own memo indices stay right.
    state = {
        "dimensionality": m.dimensionality,
        "total_elements_added": m.total_elements_added,
        "id_to_label": m.id_to_label,
        "label_to_id": m.label_to_id,
        "id_to_seq_id": m.id_to_seq_id,
        **({"max_seq_id": m.max_seq_id} if m.max_seq_id is not None else {}),
        **m.extra,
    }
    body = pickle.dumps(state, protocol=5)
    assert body[:2] == b"\x80\x05" and body[-1:] == pickle.STOP
    # the state's last frame keeps its length: its STOP becomes BUILD, STOP follows it
    return b"".join((body[:2], _OBJECT_PREFIX, body[2:-1], pickle.BUILD, pickle.STOP))


def _short_str(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


_OBJECT_PREFIX = (_short_str(PERSISTENT_DATA[0]) + _short_str(PERSISTENT_DATA[1]) + pickle.STACK_GLOBAL
                  + pickle.EMPTY_TUPLE + pickle.NEWOBJ)
