"""Where the floors of the speed and memory targets are, measured on this machine.

    python benchmarks/bench_floors.py [--drawers 100000] [--orphans 5000] [--runs 3]

On the cached healthy benchmark palace (the one ``bench_reconcile.py`` damages), each in
a fresh interpreter:

- **hnswlib's own cost** with the installed chroma-hnswlib, one thread: an insert into
  the palace's graph (at its M and ef_construction) and a top-10 self-query at ef 10
  and at ef 40, what a repair of ``--orphans`` rows cannot skip. Their sum over the
  repair's work (every orphan inserted; every orphan and a 1,000-row sample
  self-queried once: up to 1,000 orphans and the sample at ef 40, the other orphans at
  ef 10) on every CPU is a floor under reconcile's wall time that no code around hnswlib
  moves.
- **reconcile's own memory floor**: an interpreter with numpy, sqlite3, hnswlib and
  chaosfix's reconcile modules that holds the loaded index, which the inserts need,
  and nothing else; plus the orphans' slots the inserts fill (room reserved for them
  costs nothing until written, so their size is added: 1.6 KB a slot at 384-d).
- **the verification's own memory**: ``verify_segment`` alone in a fresh interpreter with
  reconcile's modules (zero-diff against the map's ids, ``--orphans`` + 1,000 rows
  self-queried), on a copy: what a verification in a process of its own would cost.
- **chromadb's own memory floor**: the installed chromadb opens a private copy of the
  palace (an open writes to ``chroma.sqlite3``), counts, reads 100 rows and self-queries
  one (what its post-check must do at least).
- **fresh memory**: a process that fills 1 GB of new memory, once after the machine has
  sat idle for a few seconds and once right after another process freed as much. On a
  virtual machine whose host takes a guest's freed pages back (virtio-balloon free page
  reporting), the first is several times the second: every index a run loads, every
  page-cache copy it writes, pays it, so ``bench_reconcile.py``'s "memory first touched"
  times this rate bounds what the machine, not the code, adds to a run.
- **a cold read**: ``chroma.sqlite3`` and ``data_level0.bin``, which a cold ``check``
  reads whole (``PRAGMA quick_check``, the slot pass), evicted from the page cache and
  read once in order: the disk's part of a cold check.

Peak RSS is the process's ``ru_maxrss``, given as a multiple of ``data_level0.bin``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under PYTHONSAFEPATH=1
from _common import MB, cached_template, evict, index_files, print_rows, spec_for

from chaosfix.reconcile.build import THREADS
from chaosfix.reconcile.verify import GATE_REPAIRED
from chaosfix.workload import copy_palace

GB = 1 << 30
SAMPLE = 1000  # untouched rows reconcile self-queries beside the repaired ones

HNSWLIB = r"""
import json, sys, time, numpy as np, hnswlib
seg, n_ins, n_q = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
idx = hnswlib.Index(space="cosine", dim=int(sys.argv[4]))
idx.load_index(seg, is_persistent_index=True, max_elements=0)
n = idx.get_current_count()
ids = idx.get_ids_list()[:: max(1, n // n_q)][:n_q]
v = np.asarray(idx.get_items(ids), dtype=np.float32)
q = {}
for ef in (10, 40):
    idx.set_ef(ef)
    t = time.perf_counter(); idx.knn_query(v, k=10, num_threads=1); q[ef] = (time.perf_counter() - t) / len(v)
idx.resize_index(idx.get_max_elements() + n_ins)
w = np.random.default_rng(0).standard_normal((n_ins, v.shape[1])).astype(np.float32)
t = time.perf_counter(); idx.add_items(w, np.arange(2**40, 2**40 + n_ins, dtype=np.uint64), num_threads=1)
print(json.dumps({"insert": (time.perf_counter() - t) / n_ins, "q10": q[10], "q40": q[40], "M": idx.M,
                  "ef_construction": idx.ef_construction, "count": n}))
"""

RECONCILE_RSS = r"""
import json, resource, sys, numpy, sqlite3, hnswlib
import chaosfix.cli, chaosfix.reconcile.run  # what reconcile imports
mods = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx = hnswlib.Index(space="cosine", dim=int(sys.argv[3]))
idx.load_index(sys.argv[1], is_persistent_index=True, max_elements=int(sys.argv[2]))
print(json.dumps({"modules": mods * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

VERIFY_RSS = r"""
import json, resource, sys
from pathlib import Path
import chaosfix.cli, chaosfix.reconcile.run  # what reconcile imports
from chaosfix.palace import idmap
from chaosfix.reconcile.verify import EF_FIRST, EF_GATE, EF_MAX, verify_segment
mods = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seg = Path(sys.argv[1])
ids = set(idmap.loads((seg / idmap.FILENAME).read_bytes()).id_to_label)  # a healthy palace: its SQL ids
v = verify_segment(seg, "cosine", ids, {}, sample=int(sys.argv[2]), ef=EF_FIRST, ef_max=EF_MAX, graph=True,
                   gate_ef=EF_GATE)
print(json.dumps({"modules": mods * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "ok": v.ok}))
"""

CHROMADB_RSS = r"""
import json, resource, sys, chromadb
from chromadb.config import Settings
mods = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
col = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False)).get_collection(
    sys.argv[2], embedding_function=None)
n = col.count()
got = col.get(limit=100, include=["embeddings"])
col.query(query_embeddings=[[float(x) for x in got["embeddings"][0]]], n_results=10)
print(json.dumps({"modules": mods * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "count": n, "version": chromadb.__version__}))
"""


TOUCH = """
import json, sys, time
import numpy as np
t = time.perf_counter()
a = np.ones(int(sys.argv[1]), dtype=np.uint8)  # every page written once
print(json.dumps({"seconds": time.perf_counter() - t}))
"""
IDLE = 5.0  # seconds: free page reporting hands freed memory back to the host after 2 s


def _child(code: str, *args: object) -> dict:
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False", HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_read(files: list[Path]) -> tuple[int, float]:
    """Bytes and seconds to read ``files`` once in order, 8 MB at a time, from cold."""
    for folder in {f.parent for f in files}:
        evict(folder)
    n, t = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(8 * MB):
                n += len(chunk)
    return n, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drawers", type=int, default=100_000)
    ap.add_argument("--orphans", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--runs", type=int, default=3, help="hnswlib timings: the median of this many")
    ap.add_argument("--inserts", type=int, default=1000, help="inserts timed per run")
    args = ap.parse_args(argv)
    spec = spec_for(args.drawers, args.dim)
    palace = cached_template(spec, lambda m: print(m, file=sys.stderr))
    level0 = next(f for f in index_files(palace) if f.name == "data_level0.bin")
    seg, size = level0.parent, level0.stat().st_size
    runs = [_child(HNSWLIB, seg, args.inserts, SAMPLE, args.dim) for _ in range(args.runs)]
    ins = statistics.median(r["insert"] for r in runs)
    q10, q40 = (statistics.median(r[f"q{ef}"] for r in runs) for ef in (10, 40))
    # reconcile asks each row once: up to GATE_REPAIRED orphans and the sample at ef 40, the other orphans at ef 10
    gated = min(GATE_REPAIRED, args.orphans) + SAMPLE
    queried = args.orphans + SAMPLE - gated
    inserts, queries = args.orphans * ins / THREADS, (queried * q10 + gated * q40) / THREADS
    ours = _child(RECONCILE_RSS, seg, args.drawers + args.orphans, args.dim)
    slots = args.orphans * size // max(1, args.drawers)  # data_level0.bin holds one slot a drawer
    floor = ours["peak"] + slots
    rows = [
        ("palace", f"{args.drawers:,} drawers, {args.dim}-d cosine, M {runs[0]['M']}, "
                   f"ef_construction {runs[0]['ef_construction']}: {Path(palace).name}"),
        ("data_level0.bin", f"{size / MB:.1f} MB"),
        ("hnswlib insert, one thread", f"{ins * 1e3:.3f} ms (median of {args.runs} x {args.inserts})"),
        ("hnswlib self-query, ef 10 / ef 40", f"{q10 * 1e3:.3f} / {q40 * 1e3:.3f} ms (median of {args.runs} x {SAMPLE})"),
        (f"hnswlib work of the repair on {THREADS} CPU(s)",
         f"{inserts + queries:.2f} s = {args.orphans:,} inserts {inserts:.2f} s + self-queries {queries:.2f} s "
         f"({queried:,} at ef 10, {gated:,} at ef 40)"),
        ("reconcile's floor RSS", f"{floor / MB:.1f} MB = {floor / size:.2f}x data_level0.bin (interpreter and "
                                  f"modules {ours['modules'] / MB:.1f} MB, the loaded index, the orphans' slots "
                                  f"{slots / MB:.1f} MB)"),
    ]
    try:
        with tempfile.TemporaryDirectory(dir=Path(palace).parent, prefix=".floors-") as tmp:
            copy = copy_palace(palace, Path(tmp) / "palace")
            ver = _child(VERIFY_RSS, Path(copy) / seg.name, args.orphans + SAMPLE)
            rows.append(("the verification alone",
                         f"{ver['peak'] / MB:.1f} MB = {ver['peak'] / size:.2f}x data_level0.bin (after imports "
                         f"{ver['modules'] / MB:.1f} MB; zero-diff and {args.orphans + SAMPLE:,} self-queries in a "
                         f"fresh interpreter, ok {ver['ok']})"))
            ch = _child(CHROMADB_RSS, copy, spec.collection)
        rows.append((f"chromadb {ch['version']}'s own RSS",
                     f"{ch['peak'] / MB:.1f} MB = {ch['peak'] / size:.2f}x data_level0.bin "
                     f"(after import {ch['modules'] / MB:.1f} MB; open, count {ch['count']:,}, get 100, one query)"))
    except subprocess.CalledProcessError as exc:
        rows.append(("chromadb's own RSS", f"not measured: {exc.stderr.strip().splitlines()[-1:]}"))
    time.sleep(IDLE)
    cold = _child(TOUCH, GB)["seconds"]
    warm = _child(TOUCH, GB)["seconds"]
    rows.append(("fresh memory, 1 GB written", f"{cold:.2f} s after {IDLE:.0f} s idle, {warm:.2f} s right after "
                                               "another process freed as much"))
    if hasattr(os, "posix_fadvise"):
        n, secs = cold_read([Path(palace) / "chroma.sqlite3", level0])
        rows.append(("cold read, chroma.sqlite3 + data_level0.bin", f"{n / MB:.0f} MB in {secs:.2f} s "
                                                                  f"({n / MB / secs:.0f} MB/s)"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
