"""Benchmark ``chaosfix reconcile`` on a large palace with SQL-only orphans, WAL purged,
side by side with the field's full rebuild, in the same run.

    python benchmarks/bench_reconcile.py [--drawers 100000] [--orphans 5000] [--runs 1]
                                         [--strategy rebuild] [--profile]

Uses the cached benchmark palace of ``bench_check.py`` (same spec and cache: ``--drawers``
MemPalace-shaped drawers, 384-d cosine, chromadb's default sync_threshold 1000 and
batch_size 100). From it, built once and cached beside it, a broken palace the way power
loss breaks one: snapshot the vector segment folder, add ``--orphans`` more drawers with
the installed chromadb (a child process; the add persists the index and purges the WAL),
then put the snapshot back. SQLite keeps the new rows, the index never heard of them and
no WAL row holds their vectors: ``--orphans`` SQL-only rows whose only source is their
document (re-embedded by the deterministic ``chaosfix.embedder:HashEmbedder``).

Each run works on private copies, each in a fresh process:

- the field's approach (``benchmarks/_field.py``: MemPalace PR #1276 reduced to its core,
  read every vector from data_level0.bin, full single-threaded chroma-hnswlib rebuild
  with the palace's M/ef_construction, persist);
- the default command, nothing switched off:
  ``chaosfix reconcile PALACE --embedder chaosfix.embedder:HashEmbedder --json``
  (incremental repair, verification, the read-only check afterwards and chromadb's
  post-check in its child process);
- the same with ``--no-chromadb-check`` (chromadb's post-check copies the palace to be
  beside the verification, then judges it, so what it adds is measured by a run
  without it);
- with ``--strategy S``, also the same command with ``--strategy S``.

It prints wall times, the speedup over the field's approach (with and without the
chromadb post-check), the JSON's stage timings, and the peak RSS of every process: the
reconcile process itself and the chromadb child it starts (taken apart with
``getrusage`` at exit), each against the size of data_level0.bin. Figures are printed,
never asserted. ``--profile`` adds a cProfile of one in-process default reconcile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under PYTHONSAFEPATH=1
from _common import (
    BAR,
    MB,
    cached_template,
    chaosfix_command,
    dir_size,
    index_files,
    measured_command,
    print_rows,
    run_rusage,
    run_timed,
    spec_for,
)

from chaosfix.workload import PalaceSpec, apply_ops, cache_dir, chromadb_version, copy_palace

EMBEDDER = "chaosfix.embedder:HashEmbedder"
NO_POST = "--no-chromadb-check"
RECIPE = "sqlonly-v1"  # bump when the way the broken palace is made changes
FACTS = "bench-facts.json"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the broken palace ------------------------------------------------------------------


def _wal_rows(palace: Path) -> int:
    conn = sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0]
    finally:
        conn.close()


def _check_codes(palace: Path) -> dict[str, int]:
    r = run_timed(chaosfix_command("check", "--json", palace))
    rep = json.loads(r.out)
    out: dict[str, int] = {}
    for f in rep["findings"]:
        out[f["code"]] = out.get(f["code"], 0) + f["count"]
    return out


def make_orphans(palace: Path, spec: PalaceSpec, orphans: int) -> dict:
    """Power loss after ``orphans`` adds: the SQL rows stay, the index files go back to
    the snapshot taken before the add, and the add's own persist purged their WAL rows."""
    from chaosfix.faults import restore_segment, snapshot_segment

    snap = snapshot_segment(palace, dst=palace.parent / "snapshot")
    t0 = time.perf_counter()
    res = apply_ops(palace, spec, [{"op": "add", "start": spec.drawers, "count": orphans}], progress=BAR)
    if not res.ok:
        raise SystemExit(f"adding {orphans} drawers failed: {res.result.get('error') or res.stderr[-500:]}")
    added = time.perf_counter() - t0
    wal_after_add = _wal_rows(palace)
    restore_segment(palace, snap)
    shutil.rmtree(snap)
    codes = _check_codes(palace)
    facts = {"recipe": RECIPE, "drawers": spec.drawers, "orphans": orphans, "add_seconds": round(added, 1),
             "wal_rows": wal_after_add, "findings": codes, "chromadb": chromadb_version()}
    if codes.get("SQL_ONLY") != orphans or wal_after_add > 1:
        log(f"warning: the broken palace is not what was asked for: {facts}")
    return facts


def cached_broken(spec: PalaceSpec, base: Path, orphans: int) -> tuple[Path, dict]:
    """The palace with ``orphans`` SQL-only rows, built once per spec and cached."""
    dest = cache_dir() / f"{spec.key()}-{RECIPE}-{orphans}"
    if (dest / "chroma.sqlite3").is_file() and (dest / FACTS).is_file():
        log(f"broken palace (cached): {dest}")
        return dest, json.loads((dest / FACTS).read_text())
    log(f"making {orphans:,} SQL-only orphans (snapshot, chromadb add, restore; once)...")
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        p = copy_palace(base, tmp / "p")
        facts = make_orphans(p, spec, orphans)
        (p / FACTS).write_text(json.dumps(facts, indent=1))
        try:
            os.rename(p, dest)
        except OSError:
            pass  # another run won the race: fine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"broken palace ready: {dest} {facts}")
    return dest, facts


# ---- runs ---------------------------------------------------------------------------------


def fresh_copy(broken: Path, work: Path, name: str) -> Path:
    """A private copy of the broken palace, on disk before the run starts: a copy left
    dirty in the page cache (1.3 GB at 500k drawers) is written back during the run, and
    every fsync of the repair then waits behind it (stage times varied by 20%)."""
    dst = work / name
    copy_palace(broken, dst)
    (dst / FACTS).unlink(missing_ok=True)
    os.sync()
    return dst


def reconcile_args(palace: Path, strategy: str | None, *extra: str) -> list[str | Path]:
    """The default command, or the same with ``--strategy`` or other options."""
    return ["reconcile", palace, "--embedder", EMBEDDER, "--json", *(["--strategy", strategy] if strategy else []),
            *extra]


def _cleanup(work: Path, name: str) -> None:
    shutil.rmtree(work / name, ignore_errors=True)
    for d in work.glob(f"{name}*"):
        shutil.rmtree(d, ignore_errors=True)


def run_chaosfix(broken: Path, work: Path, name: str, strategy: str | None = None, *extra: str) -> dict:
    palace = fresh_copy(broken, work, name)
    try:
        r, usage = run_rusage(measured_command(*reconcile_args(palace, strategy, *extra)), ok=(0, 1))
        try:
            rep = json.loads(r.out)
        except ValueError:
            rep = {}
        if not rep:
            log(f"  {name}: exit {r.rc}, no JSON; stderr: {r.err.strip()[-500:]}")
        plan = next((p for p in rep.get("plans", []) if p.get("strategy") != "none"), {})
        ver = rep.get("verification", {}).get(plan.get("collection"), {})
        return {"name": name, "wall": r.wall, "cpu": r.cpu, "rss": usage.get("self", r.rss),
                "child_rss": usage.get("children", 0),
                "touched": (usage.get("self_faults", 0) * PAGE, usage.get("children_faults", 0) * PAGE),
                "rc": r.rc, "json": rep, "timings": rep.get("timings", {}), "plan": plan, "ver": ver}
    finally:
        _cleanup(work, name)


def run_field(broken: Path, work: Path, name: str) -> dict:
    palace = fresh_copy(broken, work, name)
    try:
        r = run_timed([sys.executable, str(Path(__file__).with_name("_field.py")), str(palace),
                       str(work / f"{name}-out")], ok=(0,))
        try:
            out = json.loads(r.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {}
            log(f"  field: exit {r.rc}; stderr: {r.err.strip()[-500:]}")
        return {"name": name, "wall": r.wall, "cpu": r.cpu, "rss": r.rss, "rc": r.rc, "stages": out}
    finally:
        _cleanup(work, name)


def run_line(r: dict) -> str:
    t, v = r["timings"], r["ver"]
    return (f"wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s  plan {t.get('plan', 0):5.2f}  build {t.get('build', 0):5.2f}  "
            f"verify {t.get('verify', 0):5.2f}  total_repair {t.get('total_repair', 0):5.2f}  "
            f"after_check {t.get('after_check', 0):5.2f}  chromadb {t.get('chromadb_check', 0):5.2f}  "
            f"RSS {r['rss'] / MB:6.1f} MB, child {r['child_rss'] / MB:6.1f} MB  exit {r['rc']}  "
            f"queried {v.get('queried')} unreachable {v.get('unreachable')} ok {v.get('ok')}")


def post_check_line(r: dict) -> str:
    """Where chromadb's post-check spent its time: the copy, the child's import and open,
    then each step per collection, with the child's peak RSS after it."""
    pc = r["json"].get("chromadb") or {}
    sec = pc.get("seconds", {})
    steps = "; ".join(f"{name}: " + ", ".join(f"{k} {v:.2f} s ({c.get('peak_rss_mb', {}).get(k, 0):.0f} MB)"
                                              for k, v in c.get("seconds", {}).items())
                      for name, c in pc.get("collections", {}).items())
    return (f"copy {sec.get('copy', 0):.2f} s, chromadb child {sec.get('chromadb', 0):.2f} s "
            f"(import + open {sec.get('chromadb_start') or 0:.2f} s; {steps})")


def field_line(r: dict) -> str:
    st = r["stages"]
    return (f"wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s  read {st.get('read', 0):5.2f}  embed {st.get('embed', 0):5.2f}  "
            f"build {st.get('build', 0):6.2f}  persist+pickle {st.get('persist_pickle', 0):5.2f}  "
            f"RSS {r['rss'] / MB:6.1f} MB  exit {r['rc']}  elements {st.get('elements')} "
            f"(M {st.get('M')}, ef_construction {st.get('ef_construction')})")


def profile(broken: Path, work: Path, top: int) -> None:
    import cProfile
    import pstats

    from chaosfix.reconcile import ReconcileOptions, reconcile_palace

    palace = fresh_copy(broken, work, "profile")
    opts = ReconcileOptions(embedder=EMBEDDER)
    prof = cProfile.Profile()
    prof.enable()
    rep = reconcile_palace(palace, opts)
    prof.disable()
    print(f"\ncProfile of one in-process default reconcile (timings {rep.timings}), top {top} by cumulative time:")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(top)


# ---- report -------------------------------------------------------------------------------


def _med(vals: list[float]) -> float:
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else float("nan")


def report(args: argparse.Namespace, version: str, broken: Path, facts: dict, field: list[dict],
           runs: dict[str, list[dict]]) -> None:
    level0 = sum(p.stat().st_size for p in index_files(broken))
    f_wall = _med([r["wall"] for r in field])
    f_rss = max((r["rss"] for r in field), default=float("nan"))
    f_cpu = _med([r["cpu"] for r in field])
    print()
    rows = [
        ("chromadb / python", f"{version} / {sys.version.split()[0]}"),
        ("machine load (uptime)", os.getloadavg().__repr__() + f" on {os.cpu_count()} CPUs"),
        ("palace", f"{args.drawers:,} drawers + {args.orphans:,} SQL-only orphans, {args.dim}-d cosine"),
        ("broken palace facts", f"findings {facts.get('findings')}, WAL rows left {facts.get('wal_rows')}"),
        ("data_level0.bin / on disk", f"{level0 / MB:.1f} MB / {dir_size(broken) / MB:.1f} MB"),
        ("runs", str(args.runs)),
        ("field rebuild (PR #1276 core)", f"{f_wall:.2f} s wall, {f_cpu:.2f} s cpu, peak RSS {f_rss / MB:.1f} MB "
                                          f"({f_rss / level0:.2f}x data_level0.bin)" if field else "not run (--no-field)"),
    ]
    for label, rs in runs.items():
        if not rs:
            continue
        t = {k: _med([r["timings"].get(k) for r in rs]) for k in
             ("plan", "build", "verify", "total_repair", "after_check", "chromadb_check", "post_verify")}
        wall = _med([r["wall"] for r in rs])
        cpu = _med([r["cpu"] for r in rs])
        # the post-check's copy is made beside the verification: the run without it is measured
        no_cr = _med([r["wall"] for r in runs.get(NO_POST, [])]) if label == "default" and runs.get(NO_POST) else wall
        rss, crss = max(r["rss"] for r in rs), max(r["child_rss"] for r in rs)
        r0 = rs[0]
        v, p = r0["ver"], r0["plan"]
        post = t["chromadb_check"] == t["chromadb_check"]  # (NaN: no post-check)
        other = t["total_repair"] - t["plan"] - t["build"] - (t["chromadb_check"] if post else t["verify"])
        ran = f_wall == f_wall  # (NaN: --no-field)
        rows += [
            (f"[{label}] wall", f"{wall:.2f} s" + (f" -> {f_wall / wall:.1f}x the field" if ran else "") + (
                f" (without the chromadb post-check: {no_cr:.2f} s" + (f", {f_wall / no_cr:.1f}x" if ran else "") + ")"
                if label == "default" else "")),
            ("  cpu (user+sys)", f"{cpu:.2f} s with the chromadb child"
                                 + (f" -> {f_cpu / cpu:.1f}x less than the field" if ran else "")),
            ("  stages", f"plan {t['plan']:.2f} s (check + plan), build {t['build']:.2f} s, "
                         f"verify {t['verify']:.2f} s"
                         + (f" (then chromadb's post-check: both done in {t['chromadb_check']:.2f} s)" if post else "")
                         + f", lock/backup/swap/commit {other:.2f} s, after-check {t['after_check']:.2f} s, "
                         f"interpreter + imports + JSON ~{wall - t['total_repair'] - t['post_verify']:.2f} s"),
            ("  peak RSS reconcile", f"{rss / MB:.1f} MB = {rss / level0:.2f}x data_level0.bin"),
            ("  peak RSS chromadb child", f"{crss / MB:.1f} MB = {crss / level0:.2f}x data_level0.bin"
                                          if label != NO_POST else "none (no post-check)"),
            ("  memory first touched", "reconcile {:.0f} MB, its children {:.0f} MB (minor page faults; "
                                       "bench_floors.py times a GB of it)".format(
                                           *(_med([r["touched"][i] for r in rs]) / MB for i in (0, 1)))),
            ("  exit / strategy", f"{r0['rc']} / {p.get('strategy')} (after_consistent "
                                  f"{r0['json'].get('after_consistent')}); added {p.get('add')} {p.get('sources')}"),
            ("  verification", f"zero_diff {v.get('zero_diff')}, queried {v.get('queried')} at ef {v.get('ef')} "
                               f"(misses {v.get('misses')}, recovered {v.get('recovered')}, unreachable "
                               f"{v.get('unreachable')}), compared at ef {v.get('gate_ef')}: {v.get('gate_queried')} "
                               f"repaired + the sample, ok {v.get('ok')}"),
        ]
        cr = r0["json"].get("chromadb")
        if cr is not None:
            detail = "; ".join(f"{k}: " + ", ".join(f"{a} {b}" for a, b in c.items() if not isinstance(b, (list, dict)))
                               for k, c in (cr.get("collections") or {}).items())
            rows.append(("  chromadb verdict", f"ok {cr.get('ok')}; {detail or cr.get('error')}"))
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drawers", type=int, default=100_000)
    ap.add_argument("--orphans", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--runs", type=int, default=1, help="runs of each (median reported)")
    ap.add_argument("--strategy", choices=("incremental", "rebuild"),
                    help="also run the default command with --strategy S")
    ap.add_argument("--no-field", action="store_true", help="skip the field's rebuild (no ratio)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one in-process default reconcile")
    ap.add_argument("--top", type=int, default=30, help="rows of the --profile listing")
    args = ap.parse_args(argv)

    spec = spec_for(args.drawers, args.dim)
    version = chromadb_version()
    log(f"chromadb {version}, python {sys.version.split()[0]}, spec {spec}")
    base = cached_template(spec, log)
    broken, facts = cached_broken(spec, base, args.orphans)

    # private copies on the palace's filesystem (the reconciler renames within it)
    work = Path(tempfile.mkdtemp(prefix=".bench-", dir=cache_dir()))
    try:
        field: list[dict] = []
        runs: dict[str, list[dict]] = {"default": [], NO_POST: [],
                                       **({f"--strategy {args.strategy}": []} if args.strategy else {})}
        for i in range(args.runs):
            log(f"run {i + 1} (load {os.getloadavg()[0]:.1f})")
            r = run_chaosfix(broken, work, f"default-{i}")
            runs["default"].append(r)
            log(f"  default command    {run_line(r)}")
            log(f"    post-check       {post_check_line(r)}")
            # the post-check overlaps the verification, so what it costs is measured, not derived
            r = run_chaosfix(broken, work, f"no-post-{i}", None, NO_POST)
            runs[NO_POST].append(r)
            log(f"  {NO_POST} {run_line(r)}")
            if args.strategy:
                r = run_chaosfix(broken, work, f"strategy-{i}", args.strategy)
                runs[f"--strategy {args.strategy}"].append(r)
                log(f"  --strategy {args.strategy:7s} {run_line(r)}")
            if not args.no_field:
                f = run_field(broken, work, f"field-{i}")
                field.append(f)
                log(f"  field rebuild      {field_line(f)}")
        report(args, version, broken, facts, field, runs)
        if args.profile:
            profile(broken, work, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
