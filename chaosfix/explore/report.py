"""Text rendering of an explore report: the matrix, then one line per bad state."""

from __future__ import annotations

from chaosfix.explore.run import BAD, CATEGORIES, ExploreReport

SHORT = {"healthy": "healthy", "healed by chromadb": "healed", "repaired": "repaired", "known gap": "gap",
         "missed": "MISSED", "false alarm": "FALSE", "repair failed": "FAILED", "data lost": "LOST"}


def render(rep: ExploreReport) -> str:
    out = [f"chromadb {rep.chromadb}, seed {rep.seed}"]
    for wl, counts in rep.points.items():
        out.append(f"{wl}: points per class " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    head = f"{'workload':<10} {'class':<10} {'N':>4} " + " ".join(f"{SHORT[c]:>8}" for c in CATEGORIES)
    out += ["", head, "-" * len(head)]
    total = {c: 0 for c in CATEGORIES}
    for (wl, cls), n in sorted(rep.matrix().items()):
        out.append(f"{wl:<10} {cls:<10} {sum(n.values()):>4} " + " ".join(f"{n[c]:>8}" for c in CATEGORIES))
        for c in CATEGORIES:
            total[c] += n[c]
    out.append(f"{'total':<10} {'':<10} {sum(total.values()):>4} " + " ".join(f"{total[c]:>8}" for c in CATEGORIES))
    bad = rep.bad
    if bad:
        out += ["", f"{len(bad)} bad state(s); each line reproduces one:"]
        out += [f"  {s.category}: {s.repro}  # {'; '.join(s.reasons)[:300]}" for s in bad]
    gaps = [s for s in rep.states if s.category == "known gap"]
    if gaps:
        out += ["", f"{len(gaps)} known gap(s) (stale vectors only re-embedding can find):"]
        out += [f"  {s.repro}" for s in gaps[:10]]
    if not bad:
        out += ["", "no missed state, no false alarm, no failed repair, no data lost"]
    assert set(BAD) <= set(CATEGORIES)
    return "\n".join(out)
