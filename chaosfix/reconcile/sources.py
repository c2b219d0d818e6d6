"""Where a row's vector can come from, in the order the reconciler trusts them:
live mapped index slots, WAL rows still present, quarantined copies of the segment,
then re-embedding its document."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Container

import numpy as np

from chaosfix.errors import OperationalError, UsageProblem
from chaosfix.palace.sql import WalRow
from chaosfix.palace.state import replayed

Embedder = Callable[[list[str]], list]
SLOT, WAL, QUARANTINE, EMBED = "index", "wal", "quarantine", "embedder"


def load_embedder(ref: str) -> Embedder:
    """``MODULE:ATTR`` -> a callable taking a list of documents (a class is instantiated).

    Only the named module is imported: a palace's own data never chooses code to run.
    """
    if ":" not in ref:
        raise UsageProblem(f"--embedder {ref!r}: expected MODULE:ATTR")
    mod_name, attr = ref.split(":", 1)
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:  # names nothing this interpreter has: a bad argument
        raise UsageProblem(f"--embedder {ref!r}: {exc}") from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            raise OperationalError(f"--embedder {ref!r}: cannot instantiate: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise UsageProblem(f"--embedder {ref!r} is not callable")
    return obj


def memoized(embedder: Embedder) -> Embedder:
    """The reconciler plans twice (a first look, then again under the lock): embed each
    document once."""
    cache: dict[str, object] = {}

    def call(docs: list[str]) -> list:
        todo = [d for d in dict.fromkeys(docs) if d not in cache]
        if todo:
            cache.update(zip(todo, embedder(todo), strict=True))
        return [cache[d] for d in docs]

    call.__wrapped__ = embedder  # type: ignore[attr-defined]  # check --deep embeds every row: no cache
    return call


def latest_wal_vectors(rows: list[WalRow]) -> dict[str, np.ndarray]:
    """id -> vector of its latest vector-carrying WAL row that no later delete cancelled."""
    out: dict[str, np.ndarray] = {}
    for w in rows:
        if w.op == 3:
            out.pop(w.id, None)
        elif w.vector is not None:
            out[w.id] = w.vector
    return out


def pending_effects(pending: list[WalRow], existing: Container[str]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Replay pending WAL rows the way chromadb's vector segment would (``replayed``).

    Returns (id -> vector the index must end up holding, ids whose current index vector
    is void because a pending delete removed it).
    """
    rows, reset = replayed(pending, existing, lambda w: w.vector is not None)
    return {rid: w.vector for rid, w in rows.items()}, reset


def embed(embedder: Embedder, docs: list[str], dim: int, batch: int = 256) -> np.ndarray:
    out = np.empty((len(docs), dim), dtype=np.float32)
    for s in range(0, len(docs), batch):
        try:
            vecs = np.asarray(embedder(docs[s : s + batch]), dtype=np.float32)
        except OperationalError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            raise OperationalError(f"embedder failed: {type(exc).__name__}: {exc}") from None
        if vecs.shape != (len(docs[s : s + batch]), dim):
            raise OperationalError(f"embedder returned shape {vecs.shape}, expected (*, {dim})")
        out[s : s + len(vecs)] = vecs
    return out
