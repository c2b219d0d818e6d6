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
