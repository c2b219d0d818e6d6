"""Pick the embedder for each collection that needs rows re-embedded, lazily, once.

Candidates come from ``resolve`` in the palace's own order; each runnable one is
measured by the ``guard`` against the vectors the palace still holds, and the first
that reproduces them is used. When none does, nothing is re-embedded and the choice
records one line with the measured similarity (``--trust-embedder`` takes the first
runnable candidate anyway, and says so). With nothing intact to compare against, the
first runnable candidate is used and reported as unverified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chaosfix.embedders import guard as guard_mod
from chaosfix.embedders.resolve import Candidate, candidates, onnx_missing
from chaosfix.embedders.server import ChildEmbedder
from chaosfix.errors import OperationalError
from chaosfix.palace.sql import PalaceSql
from chaosfix.palace.state import CollectionState
from chaosfix.reconcile.sources import Embedder, load_embedder, memoized


@dataclass
class Choice:
    """What was chosen for one collection, and why (for the plan, --dry-run and --json)."""

    embedder: Embedder | None = None
    label: str | None = None
    reason: str | None = None
    guard: guard_mod.GuardResult | None = None
    trusted: bool = False  # --trust-embedder overrode a failed or skipped guard
    refused: str | None = None  # one line: why no embedder is used
    tried: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"chosen": self.label, "reason": self.reason, "guard": self.guard.to_json() if self.guard else None,
                "trusted": self.trusted, "refused": self.refused, "candidates": self.tried}

    def line(self) -> str:
        """One line for the human report."""
        if self.refused:
            return self.refused
        g = self.guard
        if g is None or g.similarity is None:
            check = "not verified: no intact vectors to compare"
        else:
            check = (f"reproduces the palace: cosine {g.similarity:.4f} (median of {g.sampled} rows, "
                     f"{g.reproduced} >= {g.threshold})")
            if not g.passed:
                check = (f"cosine {g.similarity:.4f}{g.length_note()} on {g.sampled} rows, "
                         f"{g.reproduced} >= {g.threshold}")
        trust = "; --trust-embedder" if self.trusted else ""
        return f"embedder {self.label} ({self.reason}); {check}{trust}"


class EmbedderSelector:
    """Per collection: resolve, guard, choose; children are closed by ``close()``."""

    def __init__(self, root: Path, explicit: str | Embedder | list | tuple | None = None, trust: bool = False,
                 seed: int = 0, sample: int = guard_mod.SAMPLE, threshold: float = guard_mod.THRESHOLD) -> None:
        self.root, self.explicit, self.trust = root, explicit, trust
        self.seed, self.sample, self.threshold = seed, sample, threshold
        self.choices: dict[str, Choice] = {}
        self._children: list[ChildEmbedder] = []
        self._built: dict[str, Embedder] = {}
        for ref in explicit if isinstance(explicit, (list, tuple)) else [explicit]:
            if isinstance(ref, str) and ":" in ref:
                self._build(Candidate(ref, "--embedder", ref=ref))  # a bad reference fails up front

    def for_collection(self, sql: PalaceSql, st: CollectionState) -> Choice:
        # by the collection's id: two databases may each hold a collection of that name,
        # written by different models
        if st.info.id not in self.choices:
            self.choices[st.info.id] = self._choose(sql, st)
        return self.choices[st.info.id]

    def _given(self) -> list[Candidate]:
        """The caller's embedder(s): a MODULE:ATTR or alias, an object, or a list of them
        (the guard then picks the one that reproduces the palace)."""
        given = self.explicit if isinstance(self.explicit, (list, tuple)) else [self.explicit]
        out = []
        for g in given:
            if isinstance(g, str):
                out += candidates(self.root, None, None, g)  # type: ignore[arg-type]
            else:
                label = getattr(g, "__name__", type(g).__name__)
                out.append(Candidate(label, "given by the caller", obj=g, explicit=True))
        if len(out) > 1:
            for c in out:
                c.explicit = False  # one of several that fails is skipped, not fatal
        return out

    def _build(self, c: Candidate) -> Embedder:
        key = c.ref or (f"obj:{id(c.obj)}" if c.obj is not None else repr(sorted((c.spec or {}).items())))
        if key not in self._built:
            if c.obj is not None:
                emb: Embedder = c.obj
            elif c.ref is not None:
                emb = load_embedder(c.ref)
            else:
                assert c.spec is not None
                child = ChildEmbedder(c.spec, c.label)
                self._children.append(child)
                emb = child
            self._built[key] = memoized(emb)
        return self._built[key]

    def _choose(self, sql: PalaceSql, st: CollectionState) -> Choice:
        cands = self._given() if self.explicit is not None else candidates(self.root, sql, st.info)
        if not cands:
            return Choice(refused="the palace records no embedder and " + (onnx_missing() or "none is on disk"))
        sample = guard_mod.collect(sql, st, self.sample, self.seed)
        choice = Choice()
        first_runnable: tuple[Candidate, Embedder, guard_mod.GuardResult] | None = None
        for c in cands:
            entry = c.to_json()
            choice.tried.append(entry)
            if c.missing:
                if c.explicit:
                    raise OperationalError(c.missing)
                entry["missing"] = f"{c.label} ({c.reason}): {c.missing}"
                continue
            try:
                emb = self._build(c)
                g = guard_mod.measure(emb, sample, st, self.threshold)
            except OperationalError as exc:
                if c.explicit:
                    raise  # the user named it: exit 8 with its one line
                entry["missing"] = str(exc)
                continue
            entry["guard"] = g.to_json()
            if first_runnable is None:
                first_runnable = (c, emb, g)
            if g.passed is not False:
                choice.embedder, choice.label, choice.reason, choice.guard = emb, c.label, c.reason, g
                return choice
        if first_runnable is None:
            choice.refused = next((t["missing"] for t in choice.tried if t.get("missing")), "no embedder could run")
            return choice
        c, emb, g = first_runnable
        if self.trust:
            choice.embedder, choice.label, choice.reason, choice.guard, choice.trusted = emb, c.label, c.reason, g, True
            return choice
        choice.guard = g
        choice.refused = (f"embedder {c.label} ({c.reason}) does not reproduce the palace: cosine {g.similarity:.4f}"
                          f"{g.length_note()} (median of {g.sampled} intact rows, {g.reproduced} reach "
                          f"{g.threshold}); pass the right "
                          "--embedder, or --trust-embedder to use it anyway")
        return choice

    def close(self) -> None:
        for c in self._children:
            c.close()
        self._children.clear()
