"""Fault primitives: break a throwaway palace the way palaces break in the field.

No chromadb import anywhere here: kills hit the chromadb child process that
``chaosfix.workload`` runs; everything else edits files directly.

=====================  ======================================================
module                 primitives
=====================  ======================================================
``files``              truncate, zero_fill, garbage_sectors, bit_flips, sparse_extend
``pickle_edits``       off_by_one, drop_map_entry, dimensionality_none, hostile_payload
``sqlite_edits``       empty_queue, poison_seq, delete_seq, leave_hot_journal,
                       copy_sqlite, restore_older_sqlite
``powerloss``          snapshot_segment, restore_segment, torn_mix
``kill``               kill_point, strace_kill_prefix, seeded_delay
``locate``             segment_id, segment_dir, segment_file, pickle_path
=====================  ======================================================

``REGISTRY`` maps each primitive's name to its function, for scenario files.
"""

from __future__ import annotations

from collections.abc import Callable

from chaosfix.faults.files import allocated_bytes, bit_flips, garbage_sectors, sparse_extend, truncate, zero_fill
from chaosfix.faults.kill import (
    kill_point,
    seeded_delay,
    strace_available,
    strace_kill_prefix,
)
from chaosfix.faults.locate import pickle_path, segment_dir, segment_file, segment_id
from chaosfix.faults.pickle_edits import dimensionality_none, drop_map_entry, hostile_payload, off_by_one
from chaosfix.faults.powerloss import restore_segment, snapshot_segment, torn_mix
from chaosfix.faults.sqlite_edits import (
    copy_sqlite,
    delete_seq,
    empty_queue,
    leave_hot_journal,
    poison_seq,
    restore_older_sqlite,
)

REGISTRY: dict[str, Callable[..., object]] = {
    f.__name__: f
    for f in (
        truncate, zero_fill, garbage_sectors, bit_flips, sparse_extend,
        off_by_one, drop_map_entry, dimensionality_none, hostile_payload,
        empty_queue, poison_seq, delete_seq, leave_hot_journal, copy_sqlite, restore_older_sqlite,
        snapshot_segment, restore_segment, torn_mix,
        kill_point, strace_kill_prefix, seeded_delay,
    )
}

__all__ = [
    "REGISTRY",
    "allocated_bytes", "bit_flips", "garbage_sectors", "sparse_extend", "truncate", "zero_fill",
    "kill_point", "seeded_delay", "strace_available", "strace_kill_prefix",
    "pickle_path", "segment_dir", "segment_file", "segment_id",
    "dimensionality_none", "drop_map_entry", "hostile_payload", "off_by_one",
    "restore_segment", "snapshot_segment", "torn_mix",
    "copy_sqlite", "delete_seq", "empty_queue", "leave_hot_journal", "poison_seq", "restore_older_sqlite",
]
