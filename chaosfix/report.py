"""Human-readable rendering of library results (the CLI prints these)."""

from __future__ import annotations

from chaosfix.check import CheckReport


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_check(rep: CheckReport) -> str:
    out = [f"palace {rep.palace}"]
    for c in rep.collections:
        out.append("")
        out.append(f"collection {c['name']}  ({c['space']}, dim {c['dimension']}, pickle {c['pickle']})")
        out.append(table(["rows in SQL", "ids in map", "live labels", "pending WAL"],
                         [[c["rows"], c["mapped"], c["live_labels"], c["pending"]]]))
    if rep.findings:
        out.append("")
        out.append(table(["code", "severity", "collection", "count", "sample / detail"],
                         [[f.code, f.severity, f.collection or "-", f.count,
                           (", ".join(f.sample[:3]) + ("; " if f.sample else "") + f.detail)[:100]]
                          for f in rep.findings]))
    out.append("")
    bad = [f for f in rep.findings if f.severity != "info"]
    if not bad:
        out.append("verdict: consistent")
    else:
        out.append(f"verdict: {len(bad)} finding(s): " + ", ".join(sorted({f.code for f in bad})))
    return "\n".join(out)


class Progress:
    """Progress on stderr: a bar with counts and ETA on a terminal, quiet otherwise."""

    def __init__(self) -> None:
        import sys
        import time

        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self._time = time.monotonic
        self._stage = ""

    def say(self, msg: str) -> None:
        import click

        click.echo(f"chaosfix: {msg}", err=True)

    def update(self, stage: str, done: int, total: int) -> None:
        if not self.tty or total <= 0:
            return
        import click

        if stage != self._stage:
            self._stage, self.start = stage, self._time()
        el = self._time() - self.start
        eta = el / done * (total - done) if done else 0.0
        bar = "#" * int(30 * done / total)
        click.echo(f"\r{stage:<8} [{bar:<30}] {done}/{total} eta {eta:5.1f}s", err=True, nl=done >= total)

    def done(self) -> None:
        pass


def render_reconcile(rep) -> str:  # noqa: ANN001 - ReconcileReport, imported lazily
    out = [f"palace {rep.palace}" + ("  (dry run: nothing changed)" if rep.dry_run else "")]
    rows = []
    for p in rep.plans:
        found = ", ".join(f"{k} {v}" for k, v in sorted(p.codes.items()) if k != "PENDING") or "-"
        done = f"+{len(p.add)} ~{len(p.replace)} -{len(p.remove_labels)} labels" if p.index_changes else "-"
        v = rep.verifications.get(p.collection)
        ver = "-" if v is None else ("zero-diff, self-query ok" if v.ok else "FAILED")
        if v is not None and v.ok:
            ver += f" ({v.queried} queried, {v.unreachable} unreachable)"
        rows.append([p.collection, found, p.strategy, done, len(p.unrepaired), ver])
    out.append(table(["collection", "found", "strategy", "done", "unrepaired", "verified"], rows))
    for p in rep.plans:
        if p.seq_writes:
            out.append(f"{p.collection}: max_seq_id -> " + ", ".join(f"{w.segment[:8]}={w.value}" for w in p.seq_writes))
        if p.unrepaired:
            out.append(f"{p.collection}: {len(p.unrepaired)} rows have no vector source "
                       f"(no index slot, no WAL row; pass --embedder): {', '.join(p.unrepaired[:5])}")
    if rep.queue_floor is not None:
        out.append(f"WAL floor row at seq_id {rep.queue_floor}: new writes get seq_ids above every max_seq_id")
    for n in rep.notes:
        out.append(f"note: {n}")
    for n in rep.left:
        out.append(f"left: {n}")
    if rep.backup:
        out.append(f"backup: {rep.backup}")
    if rep.chromadb is not None:
        out.append("chromadb reopen: " + ("ok" if rep.chromadb.get("ok") else f"FAILED {rep.chromadb}"))
    code = rep.exit_code
    verdict = {0: "nothing to do", 1: "repaired" if not rep.dry_run else "would repair",
               4: "left unrepaired (see above)" if not rep.dry_run else "would leave some unrepaired (see above)"}[code]
    out.append(f"verdict: {verdict}")
    return "\n".join(out)


def render_simulation(res) -> str:  # noqa: ANN001 - SimulationResult
    out = [f"scenario {res.scenario}  (chromadb {res.chromadb}, seed {res.seed})"]
    out.append(table(["stage", "ok", "seconds", "detail"],
                     [[s.name, "yes" if s.ok else "NO", f"{s.seconds:.1f}", s.detail[:110]] for s in res.stages]))
    if res.kept:
        out.append(f"kept: {res.kept}")
    out.append("verdict: " + ("every expectation held" if res.ok else
                              "FAILED at " + ", ".join(s.name for s in res.stages if not s.ok)))
    return "\n".join(out)


def render_matrix(results: list) -> str:
    stages = ["build", "break", "observe", "check", "reconcile", "verify"]
    rows = []
    for r in results:
        by = {s.name: s for s in r.stages}
        rows.append([r.scenario] + [("ok" if by[n].ok else "FAIL") if n in by else "-" for n in stages]
                    + [f"{sum(s.seconds for s in r.stages):.1f}"])
    chroma = results[0].chromadb if results else "?"
    out = [f"chromadb {chroma}: {len(results)} scenarios", table(["scenario", *stages, "seconds"], rows)]
    failed = [r.scenario for r in results if not r.ok]
    out.append("verdict: " + ("every expectation held" if not failed else f"{len(failed)} failed: {', '.join(failed)}"))
    for r in results:
        for s in r.stages:
            if not s.ok:
                out.append(f"  {r.scenario}/{s.name}: {s.detail[:150]}")
    return "\n".join(out)
