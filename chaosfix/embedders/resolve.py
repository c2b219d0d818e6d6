"""Embedder candidates for one collection, in the order the palace's own records rank
them, each with why it is a candidate and, when it cannot run offline, what is missing.

Order: ``--embedder``; the application's own record (MemPalace's
``mempalace_embedder.json`` in the palace, then ``embedding_model`` in its
``config.json``); the collection's configured embedding function (chromadb 1.x
``config_json_str``); chromadb's default embedding function when its model is already
on disk. Nothing here imports chromadb or runs a model: it only reads small JSON files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from chaosfix.palace.sql import CollectionInfo, PalaceSql

MEMPALACE_SIDECAR = "mempalace_embedder.json"
ONNX_FILES = ("config.json", "model.onnx", "special_tokens_map.json", "tokenizer_config.json",
              "tokenizer.json", "vocab.txt")
# chromadb's registry names whose function runs locally; every other registered one
# (openai, cohere, ...) calls a remote service, which chaosfix never does on its own
LOCAL_CHROMADB = {"default", "onnx_mini_lm_l6_v2", "sentence_transformer", "instructor", "text2vec", "open_clip"}
ONNX_NAMES = {"default", "onnx_mini_lm_l6_v2"}
# MemPalace model names -> what embeds them (its "minilm" is chromadb's ONNX all-MiniLM-L6-v2)
MEMPALACE_MINILM = {"minilm", "default", "all-minilm-l6-v2"}
MEMPALACE_REMOTE = {"openai-compat"}
SIDECAR_MAX = 1 << 20  # a record is a few hundred bytes: never read a hostile giant


@dataclass
class Candidate:
    """One embedder a collection may have been built with."""

    label: str  # what it is, e.g. "chromadb default (all-MiniLM-L6-v2 ONNX)"
    reason: str  # why it is a candidate, e.g. "mempalace_embedder.json records 'minilm'"
    ref: str | None = None  # MODULE:ATTR, run in-process (the user's own code)
    spec: dict | None = None  # run by chaosfix.embedders.server in a child process
    missing: str | None = None  # why it cannot run offline (one line, with the option that helps)
    explicit: bool = False
    obj: object = field(default=None, repr=False)  # an embedding function given as an object (library use)

    def to_json(self) -> dict:
        return {"label": self.label, "reason": self.reason, "missing": self.missing}


def onnx_model_dir() -> Path:
    """Where chromadb's ONNX all-MiniLM-L6-v2 looks for its model (it downloads it there
    on first use; chaosfix never lets it)."""
    return Path.home() / ".cache" / "chroma" / "onnx_models" / "all-MiniLM-L6-v2" / "onnx"


def onnx_missing() -> str | None:
    d = onnx_model_dir()
    gone = [f for f in ONNX_FILES if not (d / f).is_file()]
    if not gone:
        return None
    return (f"chromadb's default model all-MiniLM-L6-v2 is not on disk ({d}/ lacks {', '.join(gone)}); "
            "chaosfix never downloads it: put the model files there, or pass --embedder MODULE:ATTR")


def chromadb_default(reason: str) -> Candidate:
    return Candidate("chromadb default (all-MiniLM-L6-v2 ONNX)", reason,
                     spec={"kind": "chromadb", "config": {"name": "default", "config": {}}},
                     missing=onnx_missing())


def _read_json(path: Path) -> dict | None:
    """A small JSON object, or None (missing, a symlink, oversized, malformed)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > SIDECAR_MAX:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def mempalace_config_dirs() -> list[Path]:
    """MemPalace's config folder, in its own order of precedence."""
    out = []
    env = os.environ.get("MEMPALACE_CONFIG_DIR", "").strip()
    if env:
        out.append(Path(env).expanduser())
    out.append(Path.home() / ".mempalace")
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        out.append(Path(xdg) / "mempalace")
    out.append(Path.home() / ".config" / "mempalace")
    return out


def mempalace_record(root: Path, collection: str) -> tuple[str, str] | None:
    """(model name, where it was read) from MemPalace's own records, or None.

    The palace's sidecar names what each collection was built with; the user's config
    names what MemPalace embeds with now (read only for MemPalace-shaped collections)."""
    side = _read_json(root / MEMPALACE_SIDECAR)
    entry = side.get(collection) if side else None
    if isinstance(entry, dict) and isinstance(entry.get("model_name"), str) and entry["model_name"].strip():
        return entry["model_name"].strip().lower(), f"{MEMPALACE_SIDECAR} records {entry['model_name']!r}"
    if side is None and not collection.startswith("mempalace_"):
        return None
    env = os.environ.get("MEMPALACE_EMBEDDING_MODEL", "").strip()
    if env:
        return env.lower(), f"MEMPALACE_EMBEDDING_MODEL is {env!r}"
    for d in mempalace_config_dirs():
        cfg = _read_json(d / "config.json")
        if cfg is not None:
            model = cfg.get("embedding_model", "minilm")
            return str(model).strip().lower(), f"{d / 'config.json'} sets embedding_model {model!r}"
    return None


def mempalace_candidate(model: str, reason: str) -> Candidate:
    if model in MEMPALACE_MINILM or not model:
        return chromadb_default(f"{reason} (MemPalace's minilm is chromadb's default all-MiniLM-L6-v2)")
    if model in MEMPALACE_REMOTE or model.startswith("openai"):
        return Candidate(f"MemPalace {model}", reason,
                         missing=f"MemPalace embeds with {model!r}, a network service chaosfix never calls; "
                                 "pass --embedder MODULE:ATTR")
    return Candidate(f"MemPalace {model}", reason, spec={"kind": "mempalace", "model": model})


def configured_function(info: CollectionInfo) -> dict | None:
    """The embedding function chromadb 1.x recorded for the collection: ``schema_str``'s
    vector index config (1.3+), else ``config_json_str`` (1.0-1.2). Read, never built."""
    found = info.index_config.get("embedding_function")
    if not isinstance(found, dict):
        found = info.config.get("embedding_function") if isinstance(info.config, dict) else None
    return found if isinstance(found, dict) else None


def chromadb_config_candidate(info: CollectionInfo) -> Candidate | None:
    """The collection's configured embedding function, built with chromadb's registry."""
    ef = configured_function(info)
    if not isinstance(ef, dict) or ef.get("type") != "known" or not isinstance(ef.get("name"), str):
        return None
    name, conf = ef["name"], ef.get("config") if isinstance(ef.get("config"), dict) else {}
    reason = f"chromadb's collection config names embedding function {name!r}"
    if name in ONNX_NAMES:
        return chromadb_default(reason)
    if name not in LOCAL_CHROMADB:
        return Candidate(f"chromadb {name}", reason,
                         missing=f"the collection's embedding function {name!r} calls a remote service, "
                                 "which chaosfix never does; pass --embedder MODULE:ATTR")
    return Candidate(f"chromadb {name}", reason, spec={"kind": "chromadb", "config": {"name": name, "config": conf}})


def candidates(root: Path, sql: PalaceSql | None, info: CollectionInfo | None,
               explicit: str | None = None) -> list[Candidate]:
    """Every candidate for ``info``, best first, without duplicates (by what runs);
    with ``explicit`` (``--embedder``), that one only."""
    if explicit is not None:
        if explicit.strip().lower() in MEMPALACE_MINILM:
            c = chromadb_default("--embedder")
        else:
            c = Candidate(explicit, "--embedder", ref=explicit)
        c.explicit = True
        return [c]
    assert sql is not None and info is not None
    found: list[Candidate] = []
    rec = mempalace_record(root, info.name)
    if rec is not None:
        found.append(mempalace_candidate(*rec))
    cfg = chromadb_config_candidate(info)
    if cfg is not None:
        found.append(cfg)
    if onnx_missing() is None:
        found.append(chromadb_default("chromadb's default embedding function, its model is on disk"))
    out: dict[str, Candidate] = {}
    for c in found:
        key = json.dumps(c.spec, sort_keys=True) if c.spec is not None else c.label
        if key in out:
            out[key].reason += f"; {c.reason}"  # agreeing records: one candidate, every reason
        else:
            out[key] = c
    return list(out.values())
