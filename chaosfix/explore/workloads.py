"""Workloads for ``chaosfix explore``: a base palace plus batches of chromadb writes, and
the model of what an application may expect after a crash at any point.

A batch is one chromadb call (``add``/``upsert``/``update``/``delete`` of drawer indexes,
``version`` naming the text an update writes). Batches are small (10-30 rows) and the
collection flushes its index every ``sync_threshold`` (50) rows, so a few hundred rows
cross several persists.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from chaosfix.drawers import drawer
from chaosfix.errors import UsageProblem
from chaosfix.workload import PalaceSpec

BUILTIN = ("add", "delete", "upsert", "update", "mixed")
BASE_SPEC = PalaceSpec(drawers=0, dim=16, sync_threshold=50, batch_size=10)


@dataclass
class Workload:
    name: str
    spec: PalaceSpec  # the base palace (built once per chromadb version, then copied)
    batches: list[dict] = field(default_factory=list)

    def expected(self, acked: int) -> tuple[dict[int, int | None], dict[int, set[int | None]]]:
        """After ``acked`` acknowledged batches: (index -> version or None when absent,
        index -> every state the batch in flight may have left it in)."""
        state: dict[int, int | None] = dict.fromkeys(range(self.spec.drawers), 0)
        for b in self.batches[:acked]:
            _apply(state, b)
        allowed: dict[int, set[int | None]] = {i: {v} for i, v in state.items()}
        if acked < len(self.batches):
            after = dict(state)
            _apply(after, self.batches[acked])
            for i, v in after.items():
                allowed.setdefault(i, {None}).add(v)
        return state, allowed

    def doc_index(self) -> dict[str, int]:
        """drawer id -> index, for every index the workload touches."""
        idx = set(range(self.spec.drawers)) | {i for b in self.batches for i in b["idx"]}
        return {drawer(i, self.spec.seed)[0]: i for i in idx}

    def version_of(self, index: int, doc: str | None) -> int | None:
        """Which version's text ``doc`` is (None: no version this workload wrote)."""
        versions = {0} | {int(b.get("version", 0)) for b in self.batches}
        for v in versions:
            if drawer(index, self.spec.seed, v)[1] == doc:
                return v
        return None


def _apply(state: dict[int, int | None], b: dict) -> None:
    v = int(b.get("version", 0))
    for i in b["idx"]:
        have = state.get(i)
        if b["op"] == "delete":
            state[i] = None
        elif b["op"] == "add":
            if have is None:
                state[i] = v  # add of an existing id is ignored by chromadb
        elif b["op"] == "update":
            if have is not None:
                state[i] = v
        else:
            state[i] = v


def _batches(rng: random.Random, op: str, idx: list[int], version: int = 0) -> list[dict]:
    out, i = [], 0
    while i < len(idx):
        n = rng.randint(10, 30)
        out.append({"op": op, "idx": idx[i:i + n], "version": version})
        i += n
    return out


def builtin(name: str, seed: int = 0) -> Workload:
    """One of BUILTIN: a few hundred rows, sync_threshold 50, batches of 10-30."""
    rng = random.Random(f"explore:{name}:{seed}")
    if name == "add":
        return Workload(name, BASE_SPEC.with_(drawers=60, seed=seed), _batches(rng, "add", list(range(60, 220))))
    if name == "delete":
        idx = list(range(200))
        rng.shuffle(idx)
        return Workload(name, BASE_SPEC.with_(drawers=200, seed=seed), _batches(rng, "delete", idx[:120]))
    if name == "upsert":  # half existing ids (new vectors), half new ids
        return Workload(name, BASE_SPEC.with_(drawers=150, seed=seed),
                        _batches(rng, "upsert", list(range(75, 225)), version=1))
    if name == "update":
        idx = list(range(200))
        rng.shuffle(idx)
        return Workload(name, BASE_SPEC.with_(drawers=200, seed=seed), _batches(rng, "update", idx[:150], version=1))
    if name == "mixed":
        batches: list[dict] = []
        nxt, live = 100, list(range(100))
        for _ in range(10):
            op = rng.choice(["add", "upsert", "update", "delete"])
            n = rng.randint(10, 30)
            if op == "add":
                idx = list(range(nxt, nxt + n))
                nxt += n
                live += idx
            elif op == "delete":
                idx = rng.sample(live, min(n, len(live)))
                live = [i for i in live if i not in set(idx)]
            else:
                idx = rng.sample(live, min(n, len(live))) + ([] if op == "update" else list(range(nxt, nxt + 3)))
                if op == "upsert":
                    live += list(range(nxt, nxt + 3))
                    nxt += 3
            batches.append({"op": op, "idx": idx, "version": len(batches) + 1})
        return Workload(name, BASE_SPEC.with_(drawers=100, seed=seed), batches)
    raise UsageProblem(f"unknown workload {name!r}: one of {', '.join(BUILTIN)} or a .toml file")


def load(ref: str, seed: int = 0) -> Workload:
    """A built-in name, or a TOML file in the scenarios' style:

        [palace]                  # PalaceSpec fields of the base palace
        drawers = 100
        sync_threshold = 50
        [[ops]]                   # op, start, count, version; split into batches of `batch`
        op = "upsert"
        start = 50
        count = 100
        version = 1
        batch = 20
    """
    if ref in BUILTIN:
        return builtin(ref, seed)
    path = Path(ref)
    if not path.is_file():
        raise UsageProblem(f"unknown workload {ref!r}: one of {', '.join(BUILTIN)} or a .toml file")
    try:
        doc = tomllib.loads(path.read_text())
        spec = BASE_SPEC.with_(**{"seed": seed, **doc.get("palace", {})})
        batches = []
        for op in doc["ops"]:
            idx = list(range(int(op["start"]), int(op["start"]) + int(op["count"])))
            step = int(op.get("batch", 20))
            batches += [{"op": op["op"], "idx": idx[i:i + step], "version": int(op.get("version", 0))}
                        for i in range(0, len(idx), step)]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UsageProblem(f"{path}: not a workload file: {exc}") from None
    return Workload(path.stem, spec, batches)
