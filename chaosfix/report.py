"""Human-readable rendering of library results (the CLI prints these)."""

from __future__ import annotations

import shutil

from chaosfix.check import CheckReport
from chaosfix.progress import printable

ELLIPSIS = "\u2026"


def width() -> int:
    """Columns of the terminal (``$COLUMNS`` when set, 100 when stdout is not a terminal)."""
    return shutil.get_terminal_size((100, 24)).columns


def cut(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters, cut with an ellipsis (at a word
    boundary when one is near the end)."""
    text = printable(" ".join(str(text).split()))
    if len(text) <= limit:
        return text
    head = text[: max(0, limit - 1)]
    space = head.rfind(" ")
    if space >= len(head) * 2 // 3:
        head = head[:space]
    return head.rstrip(" ,;:") + ELLIPSIS


def table(headers: list[str], rows: list[list[object]], max_width: int | None = None) -> str:
    """Aligned columns; when the table is wider than the terminal, the last column (the
    free-text detail) is cut with an ellipsis to fit. ``--json`` carries the full text."""
    cells = [[str(h) for h in headers]] + [["" if c is None else printable(" ".join(str(c).split())) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    room = (max_width or width()) - sum(widths[:-1]) - 2 * (len(widths) - 1)
    widths[-1] = max(len(headers[-1]), min(widths[-1], max(room, 20)))
    cells = [r[:-1] + [cut(r[-1], widths[-1])] for r in cells]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_check(rep: CheckReport) -> str:
    out = [printable(f"palace {rep.palace}")]
    if rep.generation is not None:
        g = rep.generation
        out.append(f"written by chromadb {g.name} (seq_ids {g.seq_encoding}, pickle {g.pickle_format}; "
                   f"{g.evidence[0]})")
    for c in rep.collections:
        out.append("")
        out.append(printable(f"collection {c['name']}  ({c['space']}, dim {c['dimension']}, pickle {c['pickle']})"))
        out.append(table(["rows in SQL", "ids in map", "live labels", "pending WAL"],
                         [[c["rows"], c["mapped"], c["live_labels"], c["pending"]]]))
    if rep.findings:
        out.append("")
        out.append(table(["code", "severity", "collection", "count", "sample / detail"],
                         [[f.code, f.severity, f.collection or "-", f.count,
                           ", ".join(f.sample[:3]) + ("; " if f.sample else "") + f.detail]
                          for f in rep.findings]))
    out.append("")
    bad = [f for f in rep.findings if f.severity != "info"]
    if not bad:
        out.append("verdict: consistent")
    else:
        out.append(f"verdict: {len(bad)} finding(s): " + ", ".join(sorted({f.code for f in bad})))
    return "\n".join(out)


def render_reconcile(rep) -> str:  # noqa: ANN001 - ReconcileReport, imported lazily
    out = [printable(f"palace {rep.palace}") + ("  (dry run: nothing changed)" if rep.dry_run else "")]
    rows = []
    for p in rep.plans:
        found = ", ".join(f"{k} {v}" for k, v in sorted(p.codes.items()) if k != "PENDING") or "-"
        done = f"+{len(p.add)} ~{len(p.replace)} -{len(p.remove_labels)} labels" if p.index_changes else "-"
        rows.append([p.collection, p.strategy, done, len(p.unrepaired), found])
    out.append(table(["collection", "strategy", "done", "unrepaired", "found"], rows))
    for p in rep.plans:
        name = printable(p.collection)
        if p.embedder is not None:
            out.append(f"{name}: {printable(p.embedder.line())}")  # uncut: the chosen embedder or the refusal, whole
        v = rep.verifications.get(p.collection)
        if v is not None:
            out.append(cut(f"{name}: {_verified(v)}", width()))
        if p.seq_writes:
            out.append(f"{name}: max_seq_id -> " + ", ".join(f"{w.segment[:8]}={w.value}" for w in p.seq_writes))
        if p.unrepaired:
            refused = p.embedder is not None and p.embedder.refused and p.embedder.guard is not None
            hint = "the embedder above was refused" if refused else "pass --embedder to re-embed them"
            out.append(f"{name}: {len(p.unrepaired)} rows left unrepaired: no index slot, no WAL row; {hint}")
            out.append("  " + cut(f"ids: {', '.join(p.unrepaired[:20])}", width() - 2))
    if rep.queue_floor is not None:
        out.append(f"WAL floor row at seq_id {rep.queue_floor}: new writes get seq_ids above every max_seq_id")
    if rep.stale:
        out.append(f"{'would delete' if rep.dry_run else 'deleted'} the leftovers of {len(rep.stale.ids)} record(s) "
                   f"whose embeddings row is gone: the metadata of {len(rep.stale.metadata)}, "
                   f"{len(rep.stale.fulltext)} full-text document(s); chromadb's next add would have met them")
    out += [printable(f"note: {n}") for n in rep.notes] + [printable(f"left: {n}") for n in rep.left]
    if rep.refusal:
        out.append(printable(f"a real run would refuse: {rep.refusal}"))
    if rep.backup:
        out.append(printable(f"backup: {rep.backup}"))
    if rep.chromadb is not None:
        out += render_chromadb_check(rep.chromadb)
    out.append("verdict: " + _reconcile_verdict(rep))
    return "\n".join(out)


def _verified(v) -> str:  # noqa: ANN001 - Verification
    if not v.ok:
        return "verification FAILED: " + "; ".join(v.problems)
    what = "zero-diff, self-query ok" if v.zero_diff else f"no zero-diff ({v.unrepaired} rows left out); self-query ok"
    return f"{what} ({v.queried} queried, {v.unreachable} unreachable)"


def _reconcile_verdict(rep) -> str:  # noqa: ANN001
    would = "would " if rep.dry_run else ""
    if rep.refusal:
        return "would refuse (see above)"
    if rep.exit_code == 0:
        return "nothing to do"
    if rep.exit_code == 1:
        return f"{would}repair" if rep.dry_run else "repaired"
    left = []
    if rep.unrepaired:
        left.append(f"{len(rep.unrepaired)} rows with no vector source")
    left += [n.split(":", 1)[0] for n in rep.left]
    if rep.chromadb is not None and not rep.chromadb.get("ok", False):
        left.append("chromadb's post-check failed")
    done = ("partly repaired" if rep.has_work else "nothing repaired") if not rep.dry_run else \
        ("would partly repair" if rep.has_work else "would repair nothing")
    return f"{done}; left: {', '.join(left)} (see above)"


def render_chromadb_check(res: dict) -> list[str]:
    """chromadb's post-repair judgement (``chaosfix.chromadb_probe``, on a copy) as readable lines."""
    if res.get("skipped"):
        return [f"chromadb post-check: skipped ({res['skipped']})"]
    head = f"chromadb {res.get('version') or '?'} post-check: " + ("ok" if res.get("ok") else "FAILED")
    out = [head + (f": {cut(res['error'], 200)}" if res.get("error") else "")  # never the child's traceback
           + (" (on a copy)" if res.get("on") else "")]
    from chaosfix.chromadb_probe import KS  # (imported here: check's report never needs it)

    for name, c in (res.get("collections") or {}).items():
        parts = [f"count {c['count']}" if "count" in c else "not opened"]
        if "repaired" in c:
            parts.append(f"{c['repaired'] - c.get('wrong_vector_count', 0) - c.get('missing_count', 0)} of "
                         f"{c['repaired']} repaired rows with their planned vector")
        if "queried" in c:
            parts.append(f"{c['queried']} self-queried, "
                         f"{c.get('misses_at_k10', 0)} missed at k=10, {len(c.get('unreachable', []))} at k<={KS[-1]}")
        if c.get("filtered_queried"):
            parts.append(f"{len(c.get('filtered_misses', []))} of {c['filtered_queried']} filtered queries missed")
        if "probe_found" in c:
            parts.append("probe write found" if c["probe_found"] else "probe write NOT found")
        out.append("  " + cut(f"{name}: {', '.join(parts)}", width() - 2))
    out += ["    " + cut(f"error: {e}", width() - 4) for e in res.get("errors", [])]
    return out


def render_simulation(res) -> str:  # noqa: ANN001 - SimulationResult
    out = [f"scenario {res.scenario}  (chromadb {res.chromadb}, seed {res.seed})"]
    out.append(table(["stage", "ok", "seconds", "detail"],
                     [[s.name, "yes" if s.ok else "NO", f"{s.seconds:.1f}", s.detail] for s in res.stages]))
    for what, path in (res.kept or {}).items():
        out.append(f"kept {what} palace: {path}")
    if res.repair_command:
        out.append(f"repair the kept broken palace with: {res.repair_command}")
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
                out.append(cut(f"  {r.scenario}/{s.name}: {s.detail}", width()))
        for what, path in (r.kept or {}).items():
            out.append(f"  {r.scenario}: kept {what} palace: {path}")
        if r.repair_command:
            out.append(f"  {r.scenario}: repair the kept broken palace with: {r.repair_command}")
    return "\n".join(out)
