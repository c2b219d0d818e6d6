"""Benchmark ``chaosfix reconcile`` on a large palace with SQL-only orphans, WAL purged.

    python benchmarks/bench_reconcile.py [--drawers 100000] [--orphans 5000]

Uses the cached benchmark palace of ``bench_check.py`` (same spec and cache: ``--drawers``
MemPalace-shaped drawers, 384-d cosine, chromadb's default sync_threshold 1000 and
batch_size 100). From it, built once and cached beside it, a broken palace the way power
loss breaks one: snapshot the vector segment folder, add ``--orphans`` more drawers with
the installed chromadb (a child process; the add persists the index and purges the WAL),
then put the snapshot back. SQLite keeps the new rows, the index never heard of them and
no WAL row holds their vectors: ``--orphans`` SQL_ONLY rows whose only source is their
document (re-embedded by the deterministic ``chaosfix.embedder:HashEmbedder``).

Each run reconciles a private copy in a fresh process:

    chaosfix reconcile PALACE --embedder chaosfix.embedder:HashEmbedder \\
        --strategy incremental|rebuild --json --no-chromadb-check

and the two strategies are printed side by side: wall time, the JSON's timings (plan,
build, verify, total), the child's peak RSS (``os.wait4``), verification figures, and the
incremental speedup (target, issue 4 section 7: incremental at least 5x faster than
rebuild). One more incremental run without ``--no-chromadb-check`` times chromadb's
read-only reopen of the repaired palace on its own. Figures are printed, never asserted.

``--profile incremental|rebuild`` adds a cProfile of one in-process reconcile.
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

from _common import BAR, MB, cached_template, chaosfix_command, dir_size, index_files, print_rows, run_timed, spec_for

from chaosfix.workload import PalaceSpec, apply_ops, cache_dir, chromadb_version, copy_palace

EMBEDDER = "chaosfix.embedder:HashEmbedder"
STRATEGIES = ("incremental", "rebuild")
SPEEDUP_TARGET = 5.0
RECIPE = "sqlonly-v1"  # bump when the way the broken palace is made changes
FACTS = "bench-facts.json"


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
    dst = work / name
    copy_palace(broken, dst)
    (dst / FACTS).unlink(missing_ok=True)
    return dst


def reconcile_cmd(palace: Path, strategy: str, chromadb_check: bool) -> list[str]:
    args = ["reconcile", palace, "--embedder", EMBEDDER, "--strategy", strategy, "--json"]
    return chaosfix_command(*args, *([] if chromadb_check else ["--no-chromadb-check"]))


def run_one(broken: Path, work: Path, name: str, strategy: str, chromadb_check: bool = False) -> dict:
    palace = fresh_copy(broken, work, name)
    try:
        r = run_timed(reconcile_cmd(palace, strategy, chromadb_check), ok=(0, 1))
        try:
            rep = json.loads(r.out)
        except ValueError:
            rep = {}
        if not rep:
            log(f"  {name}: exit {r.rc}, no JSON; stderr: {r.err.strip()[-500:]}")
        plan = next((p for p in rep.get("plans", []) if p.get("strategy") != "none"), {})
        ver = rep.get("verification", {}).get(plan.get("collection"), {})
        return {"strategy": strategy, "wall": r.wall, "rss": r.rss, "rc": r.rc, "json": rep,
                "timings": rep.get("timings", {}), "plan": plan, "ver": ver}
    finally:
        shutil.rmtree(palace, ignore_errors=True)
        for d in work.glob(f"{name}.chaosfix-*"):
            shutil.rmtree(d, ignore_errors=True)


def run_line(r: dict) -> str:
    t = r["timings"]
    v = r["ver"]
    return (f"wall {r['wall']:7.2f} s  plan {t.get('plan', 0):6.2f}  build {t.get('build', 0):6.2f}  "
            f"verify {t.get('verify', 0):6.2f}  total {t.get('total_repair', 0):7.2f}  "
            f"RSS {r['rss'] / MB:7.1f} MB  exit {r['rc']}  queried {v.get('queried')}  "
            f"unreachable {v.get('unreachable')}  ok {v.get('ok')}")


def profile(broken: Path, work: Path, strategy: str, top: int) -> None:
    import cProfile
    import pstats

    from chaosfix.reconcile import ReconcileOptions, reconcile_palace
    from chaosfix.reconcile.sources import load_embedder

    palace = fresh_copy(broken, work, f"profile-{strategy}")
    opts = ReconcileOptions(embedder=load_embedder(EMBEDDER), strategy=strategy, chromadb_check=False)
    prof = cProfile.Profile()
    prof.enable()
    reconcile_palace(palace, opts)
    prof.disable()
    print(f"\ncProfile of one in-process reconcile --strategy {strategy} (top {top} by cumulative time):")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(top)


# ---- report -------------------------------------------------------------------------------


def _med(runs: list[dict], key: str, sub: str | None = None) -> float:
    vals = [(r[key].get(sub) if sub else r[key]) for r in runs]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else float("nan")


def report(args: argparse.Namespace, version: str, broken: Path, facts: dict,
           runs: dict[str, list[dict]], chroma: dict | None) -> None:
    level0 = sum(p.stat().st_size for p in index_files(broken))
    inc, reb = runs["incremental"], runs["rebuild"]

    def col(rs: list[dict], what: str) -> str:
        if not rs:
            return "-"
        r = rs[0]
        v, p = r["ver"], r["plan"]
        if what == "wall":
            return f"{_med(rs, 'wall'):.2f} s" + (f" (min {min(x['wall'] for x in rs):.2f})" if len(rs) > 1 else "")
        if what in ("plan", "build", "verify"):
            return f"{_med(rs, 'timings', what):.2f} s"
        if what == "total":
            return f"{_med(rs, 'timings', 'total_repair'):.2f} s"
        if what == "other":
            rest = [x["timings"].get("total_repair", 0) - sum(x["timings"].get(k, 0) for k in ("plan", "build", "verify"))
                    for x in rs]
            return f"{statistics.median(rest):.2f} s"
        if what == "after":
            return f"{_med(rs, 'timings', 'post_verify'):.2f} s"
        if what == "rss":
            return f"{max(x['rss'] for x in rs) / MB:.1f} MB"
        if what == "exit":
            return f"{r['rc']} ({p.get('strategy')}, after_consistent={r['json'].get('after_consistent')})"
        if what == "added":
            return f"{p.get('add')} ({', '.join(f'{k} {n}' for k, n in sorted(p.get('sources', {}).items()))})"
        if what == "queried":
            return f"{v.get('queried')} (misses {v.get('misses')}, unreachable {v.get('unreachable')})"
        if what == "zero":
            return f"{v.get('zero_diff')} / ok {v.get('ok')} / ids {v.get('ids')}"
        return "?"

    rows = [("", "incremental", "rebuild")]
    for label, what in [("wall (process)", "wall"), ("timings.plan", "plan"), ("timings.build", "build"),
                        ("timings.verify", "verify"), ("  re-plan under lock, backup, swap", "other"),
                        ("timings.total_repair", "total"),
                        ("timings.post_verify (check)", "after"), ("peak RSS", "rss"), ("exit (strategy)", "exit"),
                        ("added (sources, all rows)", "added"), ("self-queried", "queried"), ("zero-diff / ok / ids", "zero")]:
        rows.append((label, col(inc, what), col(reb, what)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]}")

    sp_wall = _med(reb, "wall") / _med(inc, "wall") if inc and reb else float("nan")
    sp_total = (_med(reb, "timings", "total_repair") / _med(inc, "timings", "total_repair")
                if inc and reb else float("nan"))
    print()
    summary = [
        ("chromadb / python", f"{version} / {sys.version.split()[0]}"),
        ("palace", f"{args.drawers:,} drawers + {args.orphans:,} SQL-only orphans, {args.dim}-d cosine"),
        ("broken palace facts", f"findings {facts.get('findings')}, WAL rows left {facts.get('wal_rows')}"),
        ("data_level0.bin / on disk", f"{level0 / MB:.1f} MB / {dir_size(broken) / MB:.1f} MB"),
        ("runs per strategy", str(args.runs)),
        ("speedup (wall)", f"{sp_wall:.1f}x"),
        ("speedup (total_repair)", f"{sp_total:.1f}x"),
        ("target incremental >= 5x", "met" if sp_wall >= SPEEDUP_TARGET else "MISSED"),
    ]
    if chroma is not None:
        t = chroma["timings"]
        cr = chroma["json"].get("chromadb") or {}
        cols = cr.get("collections", {})
        detail = "; ".join(f"{k}: count {c.get('count')}, {c.get('queried')} self-queried ({c.get('repaired')} repaired), "
                           f"{c.get('misses_at_k10')} missed at k=10 then {len(c.get('unreachable') or [])} at k<=1600, "
                           f"probe {c.get('probe_found')}, errors {c.get('errors')}" for k, c in cols.items())
        detail += f"; seconds {cr.get('seconds')}; {cr.get('skipped') or ''}{'; '.join(cr.get('errors') or [])}"
        no_cr = _med(inc, "timings", "post_verify")
        summary += [
            ("chromadb post-check run", f"wall {chroma['wall']:.2f} s, exit {chroma['rc']}, "
                                        f"RSS {chroma['rss'] / MB:.1f} MB (max of reconcile and its chromadb child)"),
            ("  post_verify with chromadb", f"{t.get('post_verify', float('nan')):.2f} s "
                                            f"(without: {no_cr:.2f} s, so chromadb reopen ~"
                                            f"{t.get('post_verify', float('nan')) - no_cr:.2f} s)"),
            ("  chromadb verdict", f"ok {cr.get('ok')}; {detail or cr.get('error')}"),
        ]
    print_rows(summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drawers", type=int, default=100_000)
    ap.add_argument("--orphans", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--runs", type=int, default=1, help="runs per strategy (median reported)")
    ap.add_argument("--no-chromadb-run", action="store_true",
                    help="skip the extra run that times chromadb's post-check")
    ap.add_argument("--profile", choices=STRATEGIES, help="also cProfile one in-process reconcile")
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
        runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
        for i in range(args.runs):
            for s in STRATEGIES:
                r = run_one(broken, work, f"{s}-{i}", s)
                runs[s].append(r)
                log(f"  {s:11s} run {i + 1}: {run_line(r)}")
        chroma = None
        if not args.no_chromadb_run:
            chroma = run_one(broken, work, "chromadb-check", "incremental", chromadb_check=True)
            log(f"  incremental + chromadb post-check: {run_line(chroma)}  "
                f"post_verify {chroma['timings'].get('post_verify', float('nan')):.2f} s")
        report(args, version, broken, facts, runs, chroma)
        if args.profile:
            profile(broken, work, args.profile, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
