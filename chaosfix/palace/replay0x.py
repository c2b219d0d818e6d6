"""chromadb 0.4-0.6's replay of pending WAL rows, record by record.

0.x's vector segment (``PersistentLocalHnswSegment._write_records``) does not apply a
write when it reads it: it gathers ``hnsw:batch_size`` records in a ``Batch`` and asks
its persisted id map, not the batch, whether an id exists. Within one batch that gives
outcomes neither SQL nor chromadb 1.x give (measured on 0.6.3):

- ``delete X; update X``: the update is applied (X is still in the map), so the index
  holds a vector for a row SQL deleted: a phantom;
- ``delete X; add X; delete X``: the second delete only cancels the add, the first is
  forgotten, and X's persisted vector stays: a phantom again;
- ``delete X; update X (v1); add X (v2)``: SQL's row holds v2, the index v1 (0.5+).

``outcome`` runs that logic over the pending rows (0.4 differs in two rules: an add of an
id the map holds is skipped even after a delete, and a batch counts changes, not
records), and ``divergent`` names the ids where it differs from ``state.replayed``, the
replay SQL's rows reflect (and 1.x makes). A replay is deterministic: chromadb starts it
at the vector segment's max_seq_id with an empty batch on every open, until a persist.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from chaosfix.palace.sql import WalRow

ADD, UPDATE, UPSERT, DELETE = 0, 1, 2, 3
OLD = -1  # the index keeps the vector it persisted (else: the seq_id of the WAL row whose vector, or None)


class _Batch:
    """0.x's ``Batch``: the writes and deletes gathered, as ``Batch.apply`` keeps them."""

    def __init__(self) -> None:
        self.written: dict[str, tuple[int, int]] = {}  # id -> (op, seq_id)
        self.deleted: set[str] = set()
        self.upsert_adds: set[str] = set()

    def __len__(self) -> int:
        return len(self.written) + len(self.deleted)

    def delete(self, rid: str) -> None:
        if rid in self.written:  # cancels the write; only an update's or upsert's delete stays
            op = self.written.pop(rid)[0]
            if op == UPDATE or (op == UPSERT and rid not in self.upsert_adds):
                self.deleted.add(rid)
            self.upsert_adds.discard(rid)
        else:
            self.deleted.add(rid)

    def write(self, rid: str, op: int, seq: int, exists: bool) -> None:
        self.written[rid] = (op, seq)
        self.deleted.discard(rid)
        if op == UPSERT and not exists:
            self.upsert_adds.add(rid)


def outcome(pending: Iterable[WalRow], persisted: Container[str], batch_size: int, release: str,
            carries: Callable[[WalRow], bool], loaded: bool = True) -> dict[str, int | None]:
    """id -> what 0.x's index holds for each id a pending row names once the replay's
    batches are all applied (the last one is, at the next write): the seq_id of the WAL
    row whose vector, ``OLD``, or None. ``persisted``: the id map's ids; ``loaded``: it
    holds any (0.x loads no index for an empty map, and until a row with a vector makes
    one, skips each record before its batch is counted full)."""
    now: dict[str, int | None] = {}  # ids an applied batch changed

    def mapped(rid: str) -> bool:
        return now[rid] is not None if rid in now else rid in persisted

    def apply(b: _Batch) -> None:
        for rid in b.deleted:
            if mapped(rid):
                now[rid] = None
        for rid, (_, seq) in b.written.items():
            now[rid] = seq

    new_rules = release != "0.4"
    batch, bf, since = _Batch(), set(), 0
    touched: list[str] = []
    for w in pending:
        touched.append(w.id)
        since += 1
        loaded = loaded or carries(w)
        if not loaded:
            continue
        exists = w.id in bf or mapped(w.id)
        if w.op == DELETE:
            if exists:
                batch.delete(w.id)
                bf.discard(w.id)
        elif carries(w) and w.op in (ADD, UPDATE, UPSERT):
            # an update of an id nobody holds and an add of one held (0.5+: unless the batch
            # deleted it) are skipped with a warning
            skipped = (w.op == UPDATE and not exists) or (
                w.op == ADD and exists and not (new_rules and w.id in batch.deleted))
            if not skipped:
                batch.write(w.id, w.op, w.seq_id, exists)
                bf.add(w.id)
        if (since if new_rules else len(batch)) >= max(1, batch_size):
            apply(batch)
            batch, since = _Batch(), 0
            bf.clear()
    apply(batch)
    return {rid: now[rid] if rid in now else (OLD if rid in persisted else None) for rid in touched}


def divergent(pending: list[WalRow], persisted: Container[str], batch_size: int, release: str,
              carries: Callable[[WalRow], bool], loaded: bool = True) -> list[str]:
    """Ids whose index entry 0.x's replay leaves otherwise than SQL's rows say it should
    be (``state.replayed``): a phantom, a vector SQL's row never had, or none. None when
    a row's op is none of 0.x's four (its replay fails on it: KeyError)."""
    from chaosfix.palace.state import replayed

    if not pending or any(w.op not in (ADD, UPDATE, UPSERT, DELETE) for w in pending):
        return []
    got = outcome(pending, persisted, batch_size, release, carries, loaded)
    out, reset = replayed(pending, persisted, carries)

    def meant(rid: str) -> int | None:
        if rid in out:
            return out[rid].seq_id
        return None if rid in reset or rid not in persisted else OLD

    return sorted((rid for rid, held in got.items() if held != meant(rid)), key=str)
