"""Hypothesis strategies for crash tests: palace specs, workloads and fault specs.

Everything drawn is plain data (a ``PalaceSpec``, lists of op dicts, fault dicts), so a
failing example prints readably and can be saved and replayed.

- ``palace_specs()``: small palaces. Every distinct spec costs one chromadb build (cached
  per chromadb version in ``$CHAOSFIX_CACHE``), so the defaults draw from a small grid.
- ``op_counts(t)`` / ``workloads(spec)``: add/upsert/update/delete sequences whose sizes
  sit around ``sync_threshold`` (t-1, t, t+1, 2t...): the boundaries where chromadb
  persists. Ops use ``chaosfix.workload.apply_ops``'s format:
  ``{"op": "add"|"upsert"|"update"|"delete", "start": i, "count": n[, "version": v]}``
  over drawer indexes (ids are ``chaosfix.drawers.drawer(i, seed)``).
- ``fault_specs(major)``: how a write is interrupted: a 0.6 persist-path kill point, an
  strace kill on the Nth write of an index file, a lost persist (power cut: the segment
  as last synced comes back) or a torn page subset. ``fault_steps(fault, ops)`` turns one
  into scenario steps (``crash(...)`` and ``chaosfix.scenario.apply_step`` run them).
"""

from __future__ import annotations

from hypothesis import strategies as st

from chaosfix.workload import SPACES, PalaceSpec, chroma_major

OPS = ("add", "upsert", "update", "delete")
KILL_POINTS = ("start", "after-hnsw", "after-pickle", "before-commit")
INDEX_FILES = ("data_level0.bin", "header.bin", "link_lists.bin", "length.bin")
FAULT_KINDS = ("kill_point", "strace", "lost_persist", "torn")
MAX_ADD = 5000  # chromadb 1.x refuses adds over 5461 records


def palace_specs(drawers=(0, 40, 120), dims=(16, 384), spaces=SPACES,  # noqa: ANN001
                 sync_thresholds=(20, 50, 100), seeds=(0,)) -> st.SearchStrategy[PalaceSpec]:
    """Palace specs from a small grid; ``batch_size`` is drawn at or below ``sync_threshold``
    (chromadb requires it). Pass your own tuples (or strategies) to widen the grid."""

    def pick(x):  # noqa: ANN001, ANN202
        return x if isinstance(x, st.SearchStrategy) else st.sampled_from(list(x))

    @st.composite
    def build(draw) -> PalaceSpec:  # noqa: ANN001
        t = draw(pick(sync_thresholds))
        return PalaceSpec(drawers=draw(pick(drawers)), dim=draw(pick(dims)), space=draw(pick(spaces)),
                          sync_threshold=t, batch_size=draw(st.sampled_from(sorted({max(1, t // 2), t}))),
                          seed=draw(pick(seeds)))

    return build()


def op_counts(sync_threshold: int, most: int | None = None) -> st.SearchStrategy[int]:
    """Record counts around the persist boundary: 1, t-1, t, t+1, 2t, or anything up to 2t+1."""
    t = max(1, int(sync_threshold))
    hi = min(most or 2 * t + 1, MAX_ADD)
    edges = sorted({c for c in (1, t - 1, t, t + 1, 2 * t) if 1 <= c <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(1, hi))


@st.composite
def workloads(draw, spec: PalaceSpec | None = None, min_ops: int = 1, max_ops: int = 6,  # noqa: ANN001
              kinds: tuple[str, ...] = OPS) -> list[dict]:
    """A sequence of ops on ``spec``'s palace: adds take fresh drawer indexes (after the
    palace's ``drawers`` and earlier adds), upserts may straddle existing and new ones,
    updates and deletes hit existing indexes (deleted ones too: chromadb ignores those)."""
    spec = spec or PalaceSpec()
    nxt = spec.drawers
    out: list[dict] = []
    for _ in range(draw(st.integers(min_ops, max_ops))):
        kind = draw(st.sampled_from([k for k in kinds if k in ("add", "upsert") or nxt > 0] or ["add"]))
        count = draw(op_counts(spec.sync_threshold))
        if kind == "add":
            op = {"op": "add", "start": nxt, "count": count}
        elif kind == "upsert":
            op = {"op": "upsert", "start": draw(st.integers(0, nxt)), "count": count,
                  "version": draw(st.integers(1, 3))}
        else:
            start = draw(st.integers(0, nxt - 1))
            op = {"op": kind, "start": start, "count": min(count, nxt - start)}
            if kind == "update":
                op["version"] = draw(st.integers(1, 3))
        nxt = max(nxt, op["start"] + op["count"])
        out.append(op)
    return out


def _strace_ok() -> bool:
    from chaosfix.faults import strace_available

    return strace_available()


def fault_specs(major: str | None = None, kinds: tuple[str, ...] | None = None,
                timed: bool = False) -> st.SearchStrategy[dict]:
    """Fault specs for the installed chromadb (``major`` '0.6' or '1.x'):

    - ``{"kind": "kill_point", "point": P, "hit": n}``: 0.6 only, SIGKILL at the n-th
      time the persist path reaches P (start, after-hnsw, after-pickle, before-commit)
    - ``{"kind": "strace", "file": F, "syscall": "write", "nth": n}``: SIGKILL on the n-th
      write of an index file (needs strace; omitted when it is missing)
    - ``{"kind": "lost_persist"}``: power cut: the write commits to SQLite, its HNSW
      flush is lost (the segment as it was before comes back)
    - ``{"kind": "torn", "seed": s, "fraction": f}``: power cut mid-flush: a seeded
      subset of 4 KiB pages new, the rest old
    - ``{"kind": "timed_kill", "after": [lo, hi], "seed": s}`` with ``timed=True``: a
      seeded SIGKILL delay (depends on machine speed: not exactly reproducible)
    """
    major = major or chroma_major()
    want = set(kinds or FAULT_KINDS) | ({"timed_kill"} if timed else set())
    if major != "0.6":
        want.discard("kill_point")
    if "strace" in want and not _strace_ok():
        want.discard("strace")
    options = []
    if "kill_point" in want:
        options.append(st.builds(lambda p, h: {"kind": "kill_point", "point": p, "hit": h},
                                 st.sampled_from(KILL_POINTS), st.integers(1, 2)))
    if "strace" in want:
        options.append(st.builds(lambda f, n: {"kind": "strace", "file": f, "syscall": "write", "nth": n},
                                 st.sampled_from(INDEX_FILES), st.integers(1, 3)))
    if "lost_persist" in want:
        options.append(st.just({"kind": "lost_persist"}))
    if "torn" in want:
        options.append(st.builds(lambda s, f: {"kind": "torn", "seed": s, "fraction": f},
                                 st.integers(0, 2**16), st.sampled_from([0.25, 0.5, 0.75])))
    if "timed_kill" in want:
        options.append(st.builds(lambda s, lo: {"kind": "timed_kill", "after": [lo, lo + 2.0], "seed": s},
                                 st.integers(0, 2**16), st.sampled_from([0.5, 1.5, 3.0])))
    if not options:
        raise ValueError(f"no fault kind applies to chromadb {major} from {sorted(want)}")
    return st.one_of(options)


def fault_steps(fault: dict, ops: list[dict]) -> list[dict]:
    """Scenario steps that run ``ops`` as one chromadb write interrupted by ``fault``."""
    kind = fault["kind"]
    write: dict = {"do": "write", "ops": ops}
    if kind == "kill_point":
        return [write | {"kill_point": fault["point"], "hit": int(fault.get("hit", 1))}]
    if kind == "strace":
        return [write | {"strace": {"file": fault["file"], "nth": int(fault.get("nth", 1)),
                                    "syscall": fault.get("syscall", "write")}}]
    if kind == "timed_kill":
        lo, hi = fault["after"]
        return [write | {"kill_after": [lo, hi]}]
    if kind == "lost_persist":
        return [{"do": "snapshot_segment"}, write, {"do": "restore_segment"}]
    if kind == "torn":
        return [{"do": "snapshot_segment"}, write,
                {"do": "torn_mix", "seed": int(fault["seed"]), "fraction": float(fault.get("fraction", 0.5))}]
    raise ValueError(f"unknown fault kind {kind!r}")


__all__ = ["fault_specs", "fault_steps", "op_counts", "palace_specs", "workloads"]
