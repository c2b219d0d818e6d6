"""Plain assertion helpers for crash tests, usable with or without pytest.

Each raises ``AssertionError`` with a message that says what differs, with counts and
sample ids, and returns what it measured when everything holds:

- ``assert_zero_diff(palace)``: chaosfix's read-only check finds nothing, and for every
  persisted segment SQL ids == id-map ids == live index labels (strict zero-diff).
- ``assert_self_query(palace, k=10, ef=200)``: every mapped vector finds itself in its
  own top-k (a miss is confirmed by brute force; hnswlib's known ~1/2,500 unreachable
  vectors are tolerated, as the reconciler's verification does).
- ``assert_chromadb_consistent(palace, spec)``: the installed chromadb, in a child
  process, reopens the palace, counts every SQL row, reads every row with its embedding,
  finds sampled rows by self-query and by a filtered query, and a probe write lands.

The first two never import chromadb and never change the palace. The third runs chromadb
in a child process; with ``write_probe=True`` (the default) it adds one probe drawer.
"""

from __future__ import annotations

import re
from pathlib import Path

from chaosfix.check import INFO, CheckReport, check_palace
from chaosfix.palace.state import CollectionState
from chaosfix.reconcile.verify import EF, K, Verification, verify_segment, zero_diff
from chaosfix.workload import PalaceSpec, chromadb_version, observe

SAMPLE = 5


def _ids(ids, n: int = SAMPLE) -> str:  # noqa: ANN001
    ids = sorted(str(i) for i in ids)
    if not ids:
        return ""
    more = f", ... (+{len(ids) - n})" if len(ids) > n else ""
    return "; e.g. " + ", ".join(ids[:n]) + more


def _fail(title: str, problems: list[str]) -> None:
    if problems:
        raise AssertionError(title + "\n" + "\n".join(f"  - {p}" for p in problems))


def _findings(rep: CheckReport) -> list[str]:
    out = []
    for f in rep.findings:
        if f.severity == INFO:
            continue
        where = f.collection or "palace"
        out.append(f"{f.code} x{f.count} in {where}: {f.detail}{_ids(f.sample)}")
    return out


def assert_zero_diff(palace: str | Path, collection: str | None = None, pending_ok: bool = True) -> CheckReport:
    """Check finds nothing and SQL ids == map ids == live labels in every persisted segment.

    Rows still pending in chromadb's WAL are healthy (chromadb replays them on open); a
    segment with pending rows is judged by the check alone unless ``pending_ok=False``,
    which fails on any pending row. Returns the check report.
    """
    rep = check_palace(palace, collection)
    problems = _findings(rep)
    for st in rep.states:
        name = st.info.name
        pend = st.pending_ids
        if pend and not pending_ok:
            problems.append(f"{name}: {len(st.pending)} WAL rows pending (not yet in the index){_ids(pend)}")
        reported = any(f.collection == name and f.severity != INFO for f in rep.findings)
        if pend or reported or st.idmap is None or st.seg_dir is None or st.torn:
            continue  # nothing persisted yet, or already reported by the check
        sql_ids = set(st.sql_rows)
        v = Verification()
        zero_diff(st.seg_dir, sql_ids, v)
        if not v.ok:
            map_ids = set(st.idmap.id_to_label)
            extra, missing = map_ids - sql_ids, sql_ids - map_ids
            for p in v.problems:
                problems.append(f"{name}: {p}")
            if extra:
                problems.append(f"{name}: {len(extra)} ids in the index but not in SQL{_ids(extra)}")
            if missing:
                problems.append(f"{name}: {len(missing)} SQL rows not in the index{_ids(missing)}")
    _fail(f"zero-diff failed for {rep.palace}:", problems)
    return rep


_BRUTE = re.compile(r"self-query of (.+) fails even by brute force")


def _self_query_one(st: CollectionState, k: int, ef: int, sample: int | None, seed: int) -> tuple[Verification, str]:
    assert st.seg_dir is not None and st.idmap is not None
    ids = set(st.idmap.id_to_label)
    v = verify_segment(st.seg_dir, st.info.space, ids, {}, sample=sample or 0, seed=seed, full=sample is None,
                       k=k, ef=ef)
    lost = [m.group(1) for p in v.problems if (m := _BRUTE.match(p))]
    other = [p for p in v.problems if not _BRUTE.match(p)]
    parts = []
    if lost:
        parts.append(f"{len(lost)} of {v.queried} vectors not in their own top-{k} at ef={ef}, "
                     f"not even by brute force{_ids(lost)}")
    parts += other
    if v.unreachable:
        parts.append(f"{v.unreachable} unreachable from themselves but nearest by brute force "
                     f"(hnswlib's quirk; tolerated up to max(2, 0.5%))")
    return v, "; ".join(parts)


def assert_self_query(palace: str | Path, k: int = K, ef: int = EF, collection: str | None = None,
                      sample: int | None = None, seed: int = 0) -> dict[str, Verification]:
    """Every mapped vector (or a seeded ``sample`` of them) is in its own top-``k`` at ``ef``.

    Collections whose index was never persisted (rows only in the WAL) have nothing to
    query and pass. An index too damaged to query fails with the check's finding.
    Returns collection name -> Verification (queried, misses, unreachable).
    """
    rep = check_palace(palace, collection)
    out: dict[str, Verification] = {}
    problems = []
    for st in rep.states:
        name = st.info.name
        if st.idmap is None or st.torn:
            if st.torn or st.rows_not_pending():
                why = "; ".join(st.torn) or st.pickle_error or (
                    "segment folder missing" if st.seg_dir is None or not st.seg_dir.is_dir()
                    else f"id map {st.pickle_status}")
                problems.append(f"{name}: cannot self-query: {why}")
            continue  # otherwise never persisted: every row is still in the WAL
        if not st.idmap.id_to_label:
            continue
        v, detail = _self_query_one(st, k, ef, sample, seed)
        out[name] = v
        if not v.ok:
            problems.append(f"{name}: {detail}")
    _fail(f"self-query (top-{k}, ef={ef}) failed for {rep.palace}:", problems)
    return out


def spec_for(palace: str | Path, collection: str | None = None) -> PalaceSpec:
    """A PalaceSpec describing an existing palace (collection, dimension, space), for
    ``observe`` when the palace was not built from a known spec."""
    rep = check_palace(palace, collection)
    cols = rep.collections
    if not cols:
        raise AssertionError(f"{palace}: no collection to open")
    names = [c["name"] for c in cols]
    default = PalaceSpec().collection
    col = next((c for c in cols if c["name"] == (collection or default)), cols[0])
    if collection is None and len(cols) > 1 and col["name"] != default:
        raise AssertionError(f"{palace}: several collections ({', '.join(names)}): pass spec= or collection=")
    return PalaceSpec(collection=col["name"], dim=col["dimension"] or PalaceSpec().dim, space=col["space"])


def assert_chromadb_consistent(palace: str | Path, spec: PalaceSpec | None = None, write_probe: bool = True,
                               sample: int = 50, check_vectors: bool = True, query_by: str = "document") -> dict:
    """The installed chromadb (in a child process) reads the palace exactly as SQL says.

    Reopen; count == the SQL rows; get() returns every row with its embedding (with
    ``check_vectors``, equal to chaosfix's HashEmbedder vector of its document, which is
    what palaces built by ``chaosfix.workload`` hold); a sample of rows finds itself in
    its top 10 by self-query (by that vector, or with ``query_by="embedding"`` by the
    embedding chromadb returns for it: for a palace of another application pass that and
    ``check_vectors=False``; in an ip collection that self-query is skipped: rows of
    larger norms outrank a row for its own vector) and by a query filtered on its wing
    (or another metadata value of the row; none when it has no metadata) (a row only a deeper
    search returns, no farther than the top 10's last, is search depth: up to 5% of the
    sample are excused, as chromadb's own ``ann_accuracy`` invariant allows recall
    0.95); with ``write_probe`` a new drawer is added and found (this changes the
    palace). Returns chromadb's observations.
    """
    spec = spec or spec_for(palace)
    rep = check_palace(palace, spec.collection)
    rows = next((c["rows"] for c in rep.collections if c["name"] == spec.collection), None)
    obs = observe(palace, spec, write_probe=write_probe, sample=sample, check_vectors=check_vectors,
                  query_by=query_by)
    problems = [f"chromadb {where}: {msg}" for where, msg in obs.get("errors", [])]
    count = obs.get("count")
    if count is not None and rows is not None and count != rows:
        problems.append(f"chromadb counts {count} rows, chroma.sqlite3 holds {rows}")
    if count is not None and obs.get("ids") is not None and obs["ids"] != count and not obs.get("errors"):
        problems.append(f"get() returned {obs['ids']} ids for count() {count}")
    if check_vectors and obs.get("bad_embedding_count"):
        problems.append(f"{obs['bad_embedding_count']} of {obs.get('ids')} rows read back with a wrong embedding"
                        f"{_ids(obs.get('bad_embeddings', []))}")
    misses, fmisses = obs.get("query_misses") or [], obs.get("filtered_misses") or []
    if misses:
        problems.append(f"{len(misses)} of {obs.get('sampled')} sampled rows not in their own top-10{_ids(misses)}")
    if fmisses:
        problems.append(f"{len(fmisses)} of {obs.get('sampled')} sampled rows not found by a query filtered on "
                        f"their metadata{_ids(fmisses)}")
    if write_probe and not obs.get("probe_found") and not any(w == "probe" for w, _ in obs.get("errors", [])):
        problems.append("a probe write did not land (added, then not found by query and get)")
    _fail(f"chromadb {obs.get('version') or chromadb_version()} does not read {palace} consistently "
          f"(collection {spec.collection}):", problems)
    return obs


__all__ = ["assert_chromadb_consistent", "assert_self_query", "assert_zero_diff", "spec_for"]
