"""Throwaway palaces built by the real chromadb, in child processes that may be killed.

The parent never imports chromadb: every chromadb call runs in ``chaosfix._child`` in a
subprocess, so a SIGKILL (a kill point, strace fault injection or a timer) hits only
the writer, exactly like a crash in the field. Templates are built once per
(chromadb version, spec) and copied per use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

from chaosfix.drawers import COLLECTION
from chaosfix.errors import UsageProblem, whole_number_problem
from chaosfix.filecopy import PARENT_ENV
from chaosfix.progress import ProgressFn, parse_child_line

SPACES = ("cosine", "l2", "ip")  # chromadb's hnsw:space values


@dataclass(frozen=True)
class PalaceSpec:
    """What a throwaway palace looks like. Defaults are small so tests stay fast."""

    drawers: int = 300
    dim: int = 384
    space: str = "cosine"
    sync_threshold: int = 100
    batch_size: int = 50
    seed: int = 0
    collection: str = COLLECTION

    def with_(self, **kw: object) -> PalaceSpec:
        return replace(self, **kw)  # type: ignore[arg-type]

    def problem(self) -> str | None:
        """Why no palace can be built for this spec (None: chromadb is asked), said before
        a chromadb child fails on it with its own parse error."""
        if self.space not in SPACES:
            return f"space must be one of {', '.join(SPACES)}, not {self.space!r}"
        for what, least in (("drawers", 0), ("dim", 1), ("sync_threshold", 1), ("batch_size", 1), ("seed", 0)):
            if why := whole_number_problem(what, getattr(self, what), least):
                return why
        if not isinstance(self.collection, str) or not self.collection:
            return f"collection must be a name, not {self.collection!r}"
        return None

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + chromadb_version()
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class ChildResult:
    returncode: int
    result: dict = field(default_factory=dict)
    stderr: str = ""

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.result.get("ok"))


def chromadb_version() -> str:
    try:
        return metadata.version("chromadb")
    except metadata.PackageNotFoundError:
        return "none"


def chroma_major() -> str:
    """'0.6' or '1.x' for the installed chromadb."""
    v = chromadb_version()
    return "0.6" if v.startswith("0.") else "1.x"


def child_env() -> dict[str, str]:
    """Environment for a chromadb child: offline, no telemetry, chaosfix importable."""
    env = dict(os.environ)
    env.update(ANONYMIZED_TELEMETRY="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CHROMA_TELEMETRY="False")
    # onnxruntime 1.29+, which chromadb imports, uploads telemetry from Linux too, keeps a
    # device id and a database under ~/.cache/Microsoft and leaves a .ses file in $TMPDIR
    # (measured with 1.32: one per chromadb child) unless this is set before it loads
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # the child dies with this process (filecopy.die_with_starter); only when started by
    # the main thread: the kernel's parent-death signal follows the thread that forks, and
    # a pytest user's worker thread may end while the child it started runs on
    if threading.current_thread() is threading.main_thread():
        env[PARENT_ENV] = str(os.getpid())
    else:
        env.pop(PARENT_ENV, None)
    root = str(Path(__file__).resolve().parent.parent)
    # never an empty entry ("root:" when PYTHONPATH was unset): Python reads it as the
    # current folder, which may be the palace, and a json.py there would run in the child
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, *env.get("PYTHONPATH", "").split(os.pathsep)) if p)
    # and `python -m` puts the current folder first on sys.path too (3.11+ honours this)
    env["PYTHONSAFEPATH"] = "1"
    return env


def child_command(spec: dict, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "chaosfix._child", json.dumps(spec)]


def start_child(cmd: list[str], stdin: bool = False) -> subprocess.Popen:
    """A child in its own session (killable as a group), output piped, text mode."""
    return subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), text=True, start_new_session=True)


def run_child(spec: dict, timeout: float = 900, prefix: list[str] | None = None,
              kill_after: float | None = None, progress: ProgressFn | None = None,
              command: list[str] | None = None, started: subprocess.Popen | None = None,
              stdin_line: str | None = None) -> ChildResult:
    """Run one child; ``prefix`` wraps it (e.g. strace), ``kill_after`` SIGKILLs it on a timer.
    With ``progress``, the child reports its progress on stderr and it is passed on as it comes.
    ``command`` runs another child script instead (it gets its spec its own way);
    ``started`` is one already running (``start_child(stdin=True)``), sent ``stdin_line``."""
    held = None
    if started is not None:
        proc = started
        assert proc.stdin is not None
        try:
            proc.stdin.write((stdin_line or "") + "\n")
            proc.stdin.close()
        except (OSError, ValueError):  # it died while waiting: its stderr says why
            pass
    else:
        cmd = (prefix or []) + (command or child_command(spec | {"progress": True} if progress else spec))
        # a Ctrl-C held while the child is made: one between its fork and ``proc`` would
        # leave it unknown here, writing on into a folder the caller then removes
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc = start_child(cmd)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            raise
    try:
        if held is not None:  # (a Ctrl-C held meanwhile is raised here, with the child known)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return _collect(proc, timeout, kill_after, progress, prefix)
    except BaseException:  # Ctrl-C: the child has a session of its own and never saw it
        _kill_group(proc)  # dead before the caller removes the folder it writes
        raise


def _collect(proc: subprocess.Popen, timeout: float, kill_after: float | None, progress: ProgressFn | None,
             prefix: list[str] | None) -> ChildResult:
    """``run_child``'s wait for a running child: its output, its progress, its result."""
    out: list[str] = []
    err: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            step = parse_child_line(line)
            if step is None:
                err.append(line)
            elif progress is not None:
                progress(*step)

    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
               threading.Thread(target=read_stderr, daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        if kill_after is None:
            raise RuntimeError(f"chromadb child timed out after {timeout}s") from None
    for t in readers:
        t.join()
    rc, stderr = proc.returncode, "".join(err)
    if prefix and rc != 0 and (rc == 128 + signal.SIGKILL or "+++ killed by SIGKILL" in stderr):
        rc = -signal.SIGKILL  # strace reports the tracee's death as its own exit 137
    return ChildResult(rc, parse_result("".join(out)), stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group and reap it (it may have ended meanwhile:
    Popen.wait gives a child a quarter second to exit after a Ctrl-C)."""
    if proc.poll() is None:  # (never a reaped pid: it may be another process's by now)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def parse_result(stdout: str | None) -> dict:
    """The child's one JSON result line (the last line that parses), or {} if it died first."""
    for line in (stdout or "").splitlines()[::-1]:
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return {}


def _base(spec: PalaceSpec, path: Path) -> dict:
    d = asdict(spec)
    d["path"] = str(path)
    return d


def apply_ops(path: str | Path, spec: PalaceSpec, ops: list[dict], kill: dict | None = None,
              prefix: list[str] | None = None, kill_after: float | None = None,
              progress: ProgressFn | None = None) -> ChildResult:
    """Run chromadb writes (``{"op": "add"|"upsert"|"update"|"delete", "start", "count"}``)."""
    if kill and chroma_major() != "0.6":
        # the points hook 0.6's Python persist; 1.x persists in Rust, where the child would
        # write everything and a crash test would pass without a crash
        raise UsageProblem(f"kill point {kill.get('point')!r} needs chromadb 0.6 (its Python persist); "
                           f"chromadb {chromadb_version()} persists in Rust: kill with strace or kill_after")
    req = _base(spec, Path(path)) | {"mode": "build", "ops": ops, "kill": kill}
    return run_child(req, prefix=prefix, kill_after=kill_after, progress=progress)


def build_palace(path: str | Path, spec: PalaceSpec, progress: ProgressFn | None = None) -> dict:
    """Build a fresh palace with ``spec.drawers`` drawers; raises if chromadb fails."""
    res = apply_ops(path, spec, [{"op": "add", "start": 0, "count": spec.drawers}] if spec.drawers else [],
                    progress=progress)
    if not res.ok:
        raise RuntimeError(f"palace build failed: {res.result.get('error') or res.stderr[-500:]}")
    return res.result


def observe(path: str | Path, spec: PalaceSpec, write_probe: bool = False, sample: int = 50,
            check_vectors: bool = True, query_by: str = "document") -> dict:
    """Reopen with chromadb in a child and record what it does (never raises).
    ``check_vectors``: compare every row's embedding with the HashEmbedder vector of its
    document (what a palace chaosfix built holds); ``query_by``: self-query the sample by
    that vector ("document") or by the embedding chromadb returns for the row
    ("embedding": a palace of any application, whose embedder chaosfix does not know)."""
    if query_by not in ("document", "embedding"):
        raise ValueError(f"query_by must be 'document' or 'embedding', not {query_by!r}")
    req = _base(spec, Path(path)) | {"mode": "observe", "write_probe": write_probe, "sample": sample,
                                     "check_vectors": check_vectors, "query_by": query_by}
    res = run_child(req)
    if not res.result:
        return {"errors": [("child", f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")]}
    return res.result


def cache_dir() -> Path:
    return Path(os.environ.get("CHAOSFIX_CACHE", Path.home() / ".cache" / "chaosfix")) / "palaces"


def template(spec: PalaceSpec, progress: ProgressFn | None = None) -> Path:
    """The cached palace for ``spec`` (built once per chromadb version, atomically)."""
    if why := spec.problem():
        raise ValueError(f"palace spec: {why}")
    dest = cache_dir() / spec.key()
    if (dest / "chroma.sqlite3").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_builds(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        build_palace(tmp / "p", spec, progress)
        try:
            os.rename(tmp / "p", dest)  # another worker may have won the race: fine
        except OSError:
            pass
    finally:  # (a failed or interrupted build too)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


STALE_BUILD = 6 * 3600  # seconds: a build this old was killed (a 500k-drawer one takes minutes)


def _drop_stale_builds(cache: Path) -> None:
    """Remove the half-built palaces a killed run left in the cache (a young one may be
    another process's build in progress: left alone)."""
    now = time.time()
    for d in cache.glob(".build-*"):
        try:
            if d.is_dir() and not d.is_symlink() and now - d.stat().st_mtime > STALE_BUILD:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def copy_palace(src: str | Path, dst: str | Path) -> Path:
    """Copy a palace folder (content and mtimes)."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return Path(dst)


def fresh_palace(dst: str | Path, spec: PalaceSpec, progress: ProgressFn | None = None) -> Path:
    """A private copy of the template palace for ``spec`` (``progress``: while it is built)."""
    return copy_palace(template(spec, progress), dst)
