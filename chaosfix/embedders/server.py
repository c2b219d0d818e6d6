"""Run a chromadb (or MemPalace) embedding function in a child process.

Reconcile must not import chromadb (it has to work on a palace whose chromadb crashes),
so the function lives in a child started once per candidate and fed batches over a
pipe: one JSON line of documents in, one JSON line with the float32 vectors (base64)
out. The child never downloads: chromadb's ONNX function is pinned to the files already
on disk and Hugging Face runs offline (``HF_HUB_OFFLINE``).

Child: ``python -m chaosfix.embedders.server SPEC_JSON``; first line out is
``{"ok": true, "name": ...}`` or ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from chaosfix.errors import OperationalError

START_TIMEOUT = 300.0


def _build(spec: dict):
    """The embedding function named by ``spec`` (in the child)."""
    if spec["kind"] == "mempalace":
        from mempalace.embedding import get_embedding_function

        return get_embedding_function(model=spec["model"])
    cfg = spec["config"]
    if cfg["name"] in ("default", "onnx_mini_lm_l6_v2"):
        # the model itself (1.x's DefaultEmbeddingFunction reloads it on every call)
        from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

        ef = ONNXMiniLM_L6_V2()
    else:
        import chromadb.utils.embedding_functions as efs

        if not hasattr(efs, "config_to_embedding_function"):
            raise RuntimeError(f"this chromadb has no registry to build {cfg['name']!r}")
        ef = efs.config_to_embedding_function(cfg)  # chromadb's own registry (1.x)
    _no_download(ef)
    return ef


def _no_download(ef: object) -> None:
    """chromadb's ONNX function downloads its model on first call when files are missing:
    make that an error instead."""
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    for t in (ef, getattr(ef, "_model", None)):  # 0.6's DefaultEmbeddingFunction wraps one
        if isinstance(t, ONNXMiniLM_L6_V2):
            folder = os.path.join(t.DOWNLOAD_PATH, t.EXTRACTED_FOLDER_NAME)

            def refuse(folder: str = folder) -> None:
                if not os.path.isfile(os.path.join(folder, "model.onnx")):
                    raise RuntimeError(f"model not on disk in {folder} (chaosfix never downloads)")

            t._download_model_if_not_exists = refuse  # type: ignore[method-assign]


def serve() -> None:
    spec = json.loads(sys.argv[1])
    # the protocol owns the real stdout; whatever a library prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        ef = _build(spec)
        name = ef.name() if hasattr(ef, "name") else type(ef).__name__
        out.write(json.dumps({"ok": True, "name": str(name)}) + "\n")
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        out.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        try:
            docs = json.loads(line)
            vecs = np.asarray(ef(docs), dtype="<f4")
            reply = {"ok": True, "shape": list(vecs.shape), "data": base64.b64encode(vecs.tobytes()).decode()}
        except Exception as exc:  # noqa: BLE001
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class ChildEmbedder:
    """chromadb-style callable backed by a child process; ``close()`` ends it."""

    def __init__(self, spec: dict, label: str) -> None:
        from chaosfix.workload import child_env

        self.label = label
        # stderr to a file, not a pipe: a chatty library must never block the child
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "chaosfix.embedders.server", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=child_env(), text=True, start_new_session=True)
        first = self._reply()
        if not first.get("ok"):
            self.close()
            raise OperationalError(f"{label}: {first.get('error', 'the embedder child failed to start')}")
        self.name = first.get("name")

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            err = self.err.read()
            tail = [x for x in err.strip().splitlines() if x.strip()][-1:] or [f"exit {self.proc.poll()}"]
            return {"ok": False, "error": f"embedder child died: {tail[0][:300]}"}
        try:
            return json.loads(line)
        except ValueError:
            return {"ok": False, "error": f"embedder child said: {line.strip()[:200]}"}

    def __call__(self, input: list[str]) -> np.ndarray:  # noqa: A002 (chromadb's name)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(list(input)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        rep = self._reply()
        if not rep.get("ok"):
            raise OperationalError(f"{self.label}: {rep.get('error')}")
        return np.frombuffer(base64.b64decode(rep["data"]), dtype="<f4").reshape(rep["shape"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()


if __name__ == "__main__":
    serve()
