"""A deterministic, offline embedding function.

chaosfix must never let chromadb download its default model, and the reconciler must be
able to re-embed a row to exactly the vector it had. So the shipped embedder derives each
vector from the document's bytes alone (SHAKE-256), which is stable across platforms,
numpy versions and both chromadb versions. It follows chromadb's embedding-function
shape (a callable taking ``input: list[str]``) without importing chromadb.
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_DIM = 384


def embed_text(text: str, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Return the unit-norm float32 vector for one document."""
    raw = hashlib.shake_256(text.encode("utf-8")).digest(dim * 4)
    ints = np.frombuffer(raw, dtype="<u4").astype(np.float64)
    vec = ints / 2.0**31 - 1.0  # uniform in [-1, 1)
    vec /= np.linalg.norm(vec)
    return vec.astype(np.float32)


class HashEmbedder:
    """chromadb-style embedding function: ``HashEmbedder(dim)(["doc", ...])``."""

    def __init__(self, dim: int = DEFAULT_DIM) -> None:
        self.dim = dim

    def __call__(self, input: list[str]) -> list[np.ndarray]:  # noqa: A002 (chromadb's name)
        return [embed_text(t, self.dim) for t in input]

    @staticmethod
    def name() -> str:
        return "chaosfix-hash"


def embed_many(texts: list[str], dim: int = DEFAULT_DIM) -> np.ndarray:
    """Embed a batch into one (n, dim) float32 array."""
    out = np.empty((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i] = embed_text(t, dim)
    return out
