"""Benchmark ``chaosfix check`` on a large palace built by the installed chromadb.

    python benchmarks/bench_check.py [--drawers 100000] [--dim 384] [--runs 5]

Builds once (cached by ``chaosfix.workload.template``, per chromadb version and spec, in
``$CHAOSFIX_CACHE`` or ``~/.cache/chaosfix/palaces``) a MemPalace-shaped palace: cosine
space, chromadb's default ``hnsw:sync_threshold`` 1000 and ``hnsw:batch_size`` 100, drawers
added 5000 per call, so the index is persisted every 1000 records as in the field. Then it
runs ``chaosfix check --json PALACE`` in a fresh subprocess several times, first with the
palace's files evicted from the page cache (``posix_fadvise(DONTNEED)``, best effort:
"cold-ish"), then warm, and prints wall time and peak RSS per run (``os.wait4`` rusage of
that one child) and a summary table.

Targets (issue 11, at 500k drawers): warm wall time at most 1.5 s, cold at most 3 s,
peak RSS under 0.5x the size of ``data_level0.bin``. The figures are printed, never
asserted, with the machine's load average (the machine may be shared).

``--profile`` adds a cProfile of one in-process ``check_palace`` call (top functions by
cumulative time), to find a hotspot when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under PYTHONSAFEPATH=1
from _common import MB, cached_template, chaosfix_command, dir_size, evict, index_files, print_rows, run_timed, spec_for

from chaosfix.workload import chromadb_version

WARM_TARGET_S = 1.5
COLD_TARGET_S = 3.0
RSS_TARGET_RATIO = 0.5


def check_command(palace: Path) -> list[str]:
    """``chaosfix check --json PALACE`` with this interpreter's console script."""
    return chaosfix_command("check", "--json", palace)


def baseline() -> tuple[float, int]:
    """(wall, peak RSS) of the interpreter with chaosfix check imported, nothing checked."""
    code = "import chaosfix.cli, chaosfix.check, chaosfix.report, numpy"
    runs = [run_timed([sys.executable, "-c", code]) for _ in range(3)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def profile(palace: Path, top: int) -> None:
    import cProfile
    import pstats

    from chaosfix.check import check_palace

    prof = cProfile.Profile()
    prof.enable()
    check_palace(palace)
    prof.disable()
    print(f"\ncProfile of one in-process check_palace (top {top} by cumulative time):")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drawers", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--runs", type=int, default=5, help="warm runs (after --cold cold-ish runs)")
    ap.add_argument("--cold", type=int, default=2, help="runs with the palace evicted from the page cache first")
    ap.add_argument("--profile", action="store_true", help="also cProfile one in-process check")
    ap.add_argument("--top", type=int, default=25, help="rows of the --profile listing")
    ap.add_argument("--keep-copy", action="store_true",
                    help="check the cached template itself instead of a private copy")
    args = ap.parse_args(argv)

    spec = spec_for(args.drawers, args.dim)
    version = chromadb_version()
    print(f"chromadb {version}, python {sys.version.split()[0]}, spec {spec}", file=sys.stderr)
    palace = cached_template(spec, lambda m: print(m, file=sys.stderr))

    work = None
    target = palace
    if not args.keep_copy:
        # a private copy on the same filesystem, so the cached template is never touched
        work = Path(tempfile.mkdtemp(prefix=".bench-", dir=palace.parent))
        target = work / "p"
        shutil.copytree(palace, target, copy_function=shutil.copy2)
    try:
        return _bench(args, version, target)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, version: str, palace: Path) -> int:
    level0 = index_files(palace)
    level0_size = sum(p.stat().st_size for p in level0)
    cmd = check_command(palace)
    print(f"command: {' '.join(cmd)}", file=sys.stderr)
    base_wall, base = baseline()

    runs: list[tuple[str, float, int, int]] = []
    cpus: list[float] = []
    consistent = None
    for i in range(args.cold + args.runs):
        kind = "cold" if i < args.cold else "warm"
        if kind == "cold" and not evict(palace):
            kind = "cold?"  # no fadvise: the page cache was not dropped
        wall, rss, rc, out, _, cpu = run_timed(cmd)
        try:
            consistent = json.loads(out).get("consistent")
        except ValueError:
            consistent = None
        runs.append((kind, wall, rss, rc))
        cpus.append(cpu)
        print(f"  run {i + 1:2d} {kind:5s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak RSS {rss / MB:7.1f} MB  exit {rc}",
              file=sys.stderr)

    cold = [w for k, w, _, _ in runs if k.startswith("cold")]
    warm = [w for k, w, _, _ in runs if k == "warm"]
    peak = max(r for _, _, r, _ in runs)
    ratio = peak / level0_size if level0_size else float("nan")
    med_warm = statistics.median(warm) if warm else float("nan")

    def fmt_times(ws: list[float]) -> str:
        return f"{min(ws):.2f} / {statistics.median(ws):.2f}" if ws else "-"

    rows = [
        ("chromadb", version),
        ("drawers", f"{args.drawers:,}"),
        ("dim / space", f"{args.dim} / cosine"),
        ("data_level0.bin", f"{level0_size / MB:.1f} MB ({len(level0)} file(s))"),
        ("palace on disk", f"{dir_size(palace) / MB:.1f} MB"),
        ("check exit / consistent", f"{runs[-1][3]} / {consistent}"),
        ("wall cold min/median", fmt_times(cold) + " s"),
        ("wall warm min/median", fmt_times(warm) + " s"),
        ("cpu (user+sys) median", f"{statistics.median(cpus):.2f} s (on a shared machine the steadier figure)"),
        ("peak RSS (max of runs)", f"{peak / MB:.1f} MB"),
        ("RSS / data_level0.bin", f"{ratio:.2f}x"),
        ("interpreter alone", f"{base_wall:.2f} s, {base / MB:.1f} MB (python + chaosfix + numpy imported)"),
        ("(RSS - interp) / level0", f"{(peak - base) / level0_size:.2f}x" if level0_size else "-"),
        ("machine load (1/5/15 min)", f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"),
        ("target warm <= 1.5 s", f"{'met' if med_warm <= WARM_TARGET_S else 'MISSED'} (warm median)"),
        ("target cold <= 3 s", "not measured (--cold 0)" if not cold else
                               f"{'met' if statistics.median(cold) <= COLD_TARGET_S else 'MISSED'} (cold median)"),
        ("target RSS < 0.5x", "met" if ratio < RSS_TARGET_RATIO else "MISSED"),
    ]
    print()
    print_rows(rows)
    if args.profile:
        profile(palace, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
