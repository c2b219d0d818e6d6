"""The embedder guard: does a candidate reproduce the vectors the palace still holds?

Verification after a repair compares the index with itself, so a wrong embedder would
pass it (vectors unrelated to the real model's, search recall unchanged). Before any row
is re-embedded, the guard re-embeds a seeded sample of rows whose vectors are intact
(WAL rows carry their document and vector together; mapped live index slots pair with
their SQL document) and compares by cosine. When the id map is gone, a sampled
document's best cosine over all readable slot vectors stands in: the right model finds
its own vector (~1.0), a wrong one finds nothing close.

Threshold, measured by benchmarks/guard_figures.py: chromadb's all-MiniLM-L6-v2 run
twice scores 1.0000; its int8 ONNX export against the fp32 weights scores 0.9990-0.9994
(same model, another export: still "the same embedder"); a wrong model scores -0.14..0.12
(median 0.00), and 0.16 at best when matched against a whole palace; the same model on
a *different* drawer of similar prose scores up to 0.85. 0.98 sits between.

Verdict: a wrong model reproduces no row at all, while the right one reproduces every
row whose stored vector is current; stale vectors (a lost upsert flush) look like a
wrong model row by row, and may be most of a damaged palace. So the guard passes when
at least ``MIN_REPRODUCED`` sampled rows (all of them, when fewer were sampled) reach the
threshold, and reports the median and the reproduced count beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chaosfix.errors import OperationalError
from chaosfix.palace.hnsw import vectors_usable
from chaosfix.palace.sql import PalaceSql
from chaosfix.palace.state import CollectionState

THRESHOLD = 0.98
# l2 and ip indexes keep vectors as the model gave them, and rank by their length too: a
# model that normalizes where the palace's did not (or scales otherwise) reproduces every
# direction yet not the vectors, so there a row reproduces only within 2% of its length
NORM_TOLERANCE = 0.02
MIN_REPRODUCED = 3
SAMPLE = 32
SLOT_BLOCK = 8192  # slots compared at once: 8192 x 384 float64 = 25 MB


@dataclass
class GuardResult:
    similarity: float | None  # median cosine over the sample; None when nothing was comparable
    minimum: float | None
    sampled: int
    reproduced: int = 0  # sampled rows at or above the threshold
    sources: dict[str, int] = field(default_factory=dict)  # wal / index / unmapped-index
    threshold: float = THRESHOLD
    norm_ratio: float | None = None  # l2/ip: median length of the candidate's vectors over the stored ones

    @property
    def passed(self) -> bool | None:
        return None if self.similarity is None else self.reproduced >= min(MIN_REPRODUCED, self.sampled)

    def to_json(self) -> dict:
        return {"similarity": self.similarity, "min": self.minimum, "sampled": self.sampled,
                "reproduced": self.reproduced,
                "sources": self.sources, "threshold": self.threshold, "passed": self.passed,
                "norm_ratio": self.norm_ratio}

    def length_note(self) -> str:
        """Said beside the cosine when the candidate's vectors are not the stored length."""
        if self.norm_ratio is None or abs(np.log(self.norm_ratio)) <= np.log1p(NORM_TOLERANCE):
            return ""
        return f", {self.norm_ratio:.2f}x the stored vectors' length"


@dataclass
class Sample:
    """(document, stored vector) pairs, plus documents to match against unmapped slots."""

    docs: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    unmapped_docs: list[str] = field(default_factory=list)
    unmapped_slots: np.ndarray | None = None  # slot indices whose vectors are plausible


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def collect(sql: PalaceSql, st: CollectionState, n: int = SAMPLE, seed: int = 0) -> Sample:
    """A seeded sample of intact (document, vector) pairs, WAL rows first."""
    rng = np.random.default_rng(seed)
    out = Sample()
    latest: dict[str, tuple[str, np.ndarray]] = {}
    for w in sql.wal(st.info.id, above=0, with_vectors=True):
        if w.op == 3:
            latest.pop(w.id, None)
        elif w.vector is not None and w.document:
            latest[w.id] = (w.document, w.vector)
    wal_ids = sorted(latest)
    for i in rng.permutation(len(wal_ids))[:n]:
        doc, vec = latest[wal_ids[i]]
        out.docs.append(doc)
        out.vectors.append(vec)
        out.sources.append("wal")
    want = n - len(out.docs)
    m, files = st.idmap, st.files
    # a torn index too: the slots a repair keeps as vector sources (live, sound, usable
    # vectors) are the evidence; skipping them left a wrong model "not verified" and used
    if want > 0 and m is not None and files is not None and st.slots is not None:
        live = st.live_label_slots
        bad = set(st.slots.labels[st.slots.bad].tolist())
        pend = st.pending_ids
        items = list(m.id_to_label.items())
        picked: list[tuple[str, int]] = []
        for i in rng.permutation(len(items))[: want * 4]:
            rid, lab = items[i]
            if rid in st.sql_rows and rid not in pend and rid not in latest and lab in live and lab not in bad:
                picked.append((rid, live[lab]))
        docs = sql.documents(st.info.metadata_segment, [r for r, _ in picked]) if st.info.metadata_segment else {}
        picked = [(r, s) for r, s in picked if docs.get(r)]
        if picked:
            vecs = files.vectors(np.array([s for _, s in picked], dtype=np.int64))
            usable = vectors_usable(vecs, st.info.space)
            for (rid, _s), v, ok in zip(picked, vecs, usable):
                if ok and np.linalg.norm(v) > 0 and len(out.docs) < n:
                    out.docs.append(docs[rid])  # type: ignore[arg-type]
                    out.vectors.append(v)
                    out.sources.append("index")
    want = n - len(out.docs)
    if want > 0 and m is None and files is not None and files.header is not None:
        count = min(files.readable_slots, files.header.cur_element_count)
        if count:
            out.unmapped_slots = np.arange(count, dtype=np.int64)
            ids = sorted(st.sql_rows)
            chosen = [ids[i] for i in rng.permutation(len(ids))[: want * 2]]
            docs = sql.documents(st.info.metadata_segment, chosen) if st.info.metadata_segment else {}
            out.unmapped_docs = [docs[r] for r in chosen if docs.get(r)][:want]  # type: ignore[misc]
    return out


def _embed(embed, docs: list[str], dim: int) -> np.ndarray:  # noqa: ANN001
    try:
        got = np.asarray(embed(docs), dtype=np.float32)
    except OperationalError:
        raise
    except Exception as exc:  # noqa: BLE001 - the embedder's own code: one line
        raise OperationalError(f"embedder failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if got.ndim != 2 or got.shape != (len(docs), dim):
        raise OperationalError(f"embedder returned shape {got.shape}, the palace holds (*, {dim}) vectors")
    return got


def measure(embed, sample: Sample, st: CollectionState, threshold: float = THRESHOLD) -> GuardResult:  # noqa: ANN001
    """Cosine between ``embed``'s vectors and the stored ones (``embed``: docs -> vectors);
    in an l2/ip index a row reproduces only at the stored length too (``NORM_TOLERANCE``)."""
    sims: list[float] = []
    sized: list[bool] = []  # the row's length is reproduced (or says nothing: cosine, unmapped)
    sources: dict[str, int] = {}
    ratio = None
    if sample.docs:
        raw_ref = np.stack(sample.vectors).astype(np.float64)
        raw_got = _embed(embed, sample.docs, raw_ref.shape[1]).astype(np.float64)
        sims.extend(np.einsum("ij,ij->i", _unit(raw_got), _unit(raw_ref)).tolist())
        if st.info.space in ("l2", "ip"):  # (a cosine index stores unit vectors)
            with np.errstate(all="ignore"):
                ratios = np.linalg.norm(raw_got, axis=1) / np.linalg.norm(raw_ref, axis=1)
                sized.extend((np.abs(np.log(ratios)) <= np.log1p(NORM_TOLERANCE)).tolist())  # (NaN: not)
            finite = ratios[np.isfinite(ratios)]  # (a zero stored vector: no ratio, and no JSON Infinity)
            ratio = round(float(np.median(finite)), 4) if finite.size else None
        else:
            sized.extend([True] * len(sample.docs))
        for s in sample.sources:
            sources[s] = sources.get(s, 0) + 1
    if sample.unmapped_docs and sample.unmapped_slots is not None and st.files is not None:
        dim = st.files.header.dim if st.files.header else 0
        got = _unit(_embed(embed, sample.unmapped_docs, dim))
        best = np.full(len(got), -1.0)
        if dim:
            slots = sample.unmapped_slots
            for s in range(0, len(slots), SLOT_BLOCK):
                v = st.files.vectors(slots[s : s + SLOT_BLOCK]).astype(np.float64)
                v = np.where(np.isfinite(v), v, 0.0)
                best = np.maximum(best, (got @ _unit(v).T).max(axis=1))
        sims.extend(np.maximum(best, 0.0).tolist())
        sized.extend([True] * len(got))
        sources["unmapped-index"] = len(got)
    if not sims:
        return GuardResult(None, None, 0, sources=sources, threshold=threshold)
    arr = np.asarray(sims)
    return GuardResult(round(float(np.median(arr)), 4), round(float(arr.min()), 4), len(arr),
                       int(((arr >= threshold) & np.asarray(sized)).sum()), sources, threshold, ratio)
