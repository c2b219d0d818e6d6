"""Judge a palace with chromadb's own API, in a child process (chromadb may crash)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chaosfix.progress import ProgressFn
from chaosfix.workload import run_child


def verify_with_chromadb(palace: Path, collections: list[str], sample: int = 20,
                         progress: ProgressFn | None = None) -> dict:
    """Reopen with the installed chromadb: count, every row's embedding, self-query and a
    filtered query on a sample. ``{"ok": bool, ...}``; skipped when chromadb is absent."""
    if importlib.util.find_spec("chromadb") is None:
        return {"ok": True, "skipped": "chromadb not installed"}
    res = run_child({"mode": "verify", "path": str(palace), "collections": collections, "sample": sample},
                    progress=progress)
    if not res.result:
        tail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return {"ok": False, "error": tail[0]}
    return res.result
