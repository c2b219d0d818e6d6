"""chromadb's judgement of a repaired palace: on a throwaway copy, never the palace.

chromadb applies its schema migrations when it opens a palace, so opening the user's
palace with the chromadb installed beside chaosfix would upgrade it (a 1.0/1.1 palace
then panics in its own chromadb). So the post-check:

- runs only with a chromadb of the palace's own generation (the installed one, or the
  application's interpreter given as ``--chromadb-python``); with another generation it
  is skipped with a note saying why;
- runs on a copy made beside the palace (reflink where the file system can, else a
  sparse copy; never hard links: chromadb writes the SQLite file and the index files),
  deleted afterwards;
- runs ``_verify_child.py`` by path with ``python -I``: the child imports only chromadb,
  numpy and the standard library, so any interpreter that has chromadb can run it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np

from chaosfix.errors import OperationalError
from chaosfix.filecopy import copy_locked, copy_tree_sparse
from chaosfix.palace import SQLITE_NAME, UUID_RE
from chaosfix.palace.generation import Generation, of_version, rank_of
from chaosfix.palace.leftovers import folder_size, sibling_stem, sibling_stems_re
from chaosfix.progress import ProgressFn
from chaosfix.reconcile.safety import Background
from chaosfix.reconcile.verify import UNREACHABLE_RATE

CHILD = Path(__file__).with_name("_verify_child.py")
COPY_PREFIX = ".chaosfix-verify-"  # <palace parent>/.<palace's sibling_stem>.chaosfix-verify-XXXX
MAX_REPAIRED = 20000  # repaired rows whose embedding chromadb returns (a seeded sample above this)
QUERY_REPAIRED = 100  # of those, self-queried through chromadb (chaosfix's verify asks every one)
KS = [10, 100, 400, 1600, 6400]
# chromadb's child loads the index beside the verification only if the machine can give
# this many times the bytes of the folders the two load (each process holds ~1.15x of
# them at 500k, plus the copy's page cache), and this much more for everything else
BESIDE_FACTOR = 3
BESIDE_MARGIN = 256 << 20


@dataclass
class Target:
    """What the post-check proves for one collection."""

    name: str  # the plan's (``CollectionInfo.label``: qualified outside the default database)
    space: str
    repaired: dict[str, np.ndarray] = field(default_factory=dict)  # id -> planned vector
    sample: list[str] = field(default_factory=list)
    expect_count: int | None = None
    # sampled rows the repair re-inserted (a rebuild) -> the vector chromadb returned for
    # them before: a rebuild in the wrong space or without length.bin changes them all
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    # the share of self-queries chaosfix's own verification found unreachable in the same
    # index files (hnswlib's quirk on this graph, each confirmed by brute force)
    quirk_rate: float = 0.0
    # when the verification settled its misses by the graph, this measures (once, when
    # chromadb misses more than the rate above allows) the share of its untouched sample
    # no search up to ef 1600 finds: how deep this graph's own rows sit
    depth: Callable[[], float] | None = None
    # where chromadb finds it: its own name in its tenant's database (None: the defaults)
    collection: str | None = None
    tenant: str | None = None
    database: str | None = None


def unreachable_allowed(n: int, quirk_rate: float) -> int:
    """How many of ``n`` self-queries may miss at the largest k: hnswlib's known rate, or
    three times the rate measured on this very graph (a large random-vector graph misses
    more: 0.4% of 11,000 at 1M drawers), whichever is larger. A repair that left its rows
    unlinked misses most of them."""
    return max(2, int(UNREACHABLE_RATE * n), math.ceil(3 * quirk_rate * n))


def chromadb_version(python: str | None = None) -> str | None:
    """chromadb's version in ``python`` (None: this interpreter), without importing it."""
    if python is None:
        try:
            return metadata.version("chromadb")
        except metadata.PackageNotFoundError:
            return None
    code = "import importlib.metadata as m\ntry: print(m.version('chromadb'))\nexcept Exception: print('')"
    try:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationalError(f"--chromadb-python {python}: cannot run it ({exc})") from None
    if out.returncode != 0:
        raise OperationalError(f"--chromadb-python {python}: exits {out.returncode}")
    return out.stdout.strip() or None


def plan_post_check(palace_gen: Generation, python: str | None) -> tuple[str | None, str | None]:
    """(chromadb version, reason to skip or None). Raises OperationalError (exit 8) when
    an explicit ``--chromadb-python`` has no chromadb: said before anything changes."""
    version = chromadb_version(python)
    if version is None:
        if python is not None:
            raise OperationalError(f"--chromadb-python {python}: no chromadb installed in that interpreter")
        return None, "chromadb is not installed beside chaosfix"
    gen = of_version(version)
    if rank_of(gen) > palace_gen.rank:
        return version, (f"chromadb {version} (generation {gen}) would migrate this {palace_gen.name} palace; "
                         "pass --chromadb-python with the application's own interpreter")
    if rank_of(gen) < palace_gen.rank:
        return version, f"chromadb {version} (generation {gen}) is older than this {palace_gen.name} palace"
    return version, None


def copy_palace(root: Path, built: Mapping[str, Path] | None = None, skip: Collection[str] = ()) -> Path:
    """A throwaway copy of the palace's SQLite file and segment folders, beside it (the
    same file system, so a reflink or a kernel copy). ``built``: segment -> the folder
    built aside that takes its place in the copy, which is then the palace the swap
    will make; ``skip``: folders the repair moves out of the palace."""
    built = built or {}
    return _add_built(_copy_unbuilt(root, set(built) | set(skip)), built)


def _copy_folder(root: Path) -> Path:
    """A new, empty folder for the copy beside the palace (found by ``stale_copies``)."""
    return Path(tempfile.mkdtemp(prefix=f".{sibling_stem(root)}{COPY_PREFIX}", dir=root.parent))


def _unless_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise InterruptedError("copy abandoned")


def _copy_unbuilt(root: Path, leave: Collection[str], stop: threading.Event | None = None,
                  tmp: Path | None = None) -> Path:
    """The copy's SQLite file and every segment folder not in ``leave``, in ``tmp`` (a new
    ``_copy_folder`` when None; removed again if the copy fails, or when ``stop`` is set
    between two files)."""
    tmp = tmp if tmp is not None else _copy_folder(root)
    dst = tmp / "palace"
    try:
        dst.mkdir()
        for name in (SQLITE_NAME, SQLITE_NAME + "-wal"):  # committed pages of a palace in WAL mode
            if name == SQLITE_NAME or (root / name).is_file():
                copy_locked(root / name, dst / name)  # (under the repair's SQLite lock: never opened here)
        for d in root.iterdir():
            _unless_stopped(stop)
            if d.is_dir() and not d.is_symlink() and UUID_RE.match(d.name) and d.name not in leave:
                copy_tree_sparse(d, dst / d.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _add_built(dst: Path, built: Mapping[str, Path], stop: threading.Event | None = None) -> Path:
    for seg, src in built.items():  # (also a segment whose folder was missing)
        _unless_stopped(stop)
        copy_tree_sparse(src, dst / seg)
    _unless_stopped(stop)
    return dst


class EarlyCopy:
    """The post-check's copy, begun in a thread before the build: the SQLite file and the
    folders the repair leaves alone are copied while the build works on one CPU (the
    backup, the map, the segment copy and hnswlib's load are single-threaded), so after
    the build only the built folders are left to copy. Start it under the repair's lock:
    nothing writes the palace until the swap. ``take`` hands the copy over (the caller
    removes it); ``discard`` removes a copy never taken."""

    def __init__(self, root: Path, rebuilt: Collection[str], skip: Collection[str]) -> None:
        self._stop = threading.Event()
        # the folder is made here, under the lock, not in the thread: a kill at any later
        # point finds it there, for the rerun to remove
        self._copy = Background(_copy_unbuilt, root, set(rebuilt) | set(skip), self._stop, _copy_folder(root))
        self._taken = False

    def abandon(self) -> None:
        """Stop the copy between two files (a verification failed: nothing will read it);
        ``take`` then raises InterruptedError and removes what was copied."""
        self._stop.set()

    def take(self, built: Mapping[str, Path]) -> Path:
        self._taken = True
        dst = self._copy.wait()  # (a failed copy removed itself)
        try:
            return _add_built(dst, built, self._stop)
        except BaseException:
            shutil.rmtree(dst.parent, ignore_errors=True)
            raise

    def discard(self) -> None:
        self.abandon()
        try:
            dst = self._copy.wait()
        except BaseException:  # noqa: BLE001 - a failed copy removed itself
            return
        if not self._taken:
            shutil.rmtree(dst.parent, ignore_errors=True)


def stale_copies(root: Path) -> list[Path]:
    """Copies an interrupted post-check left beside the palace."""
    # the whole name (mkdtemp's 8 characters after the prefix), not a glob (the name may
    # hold [ or *) nor a prefix: a palace "a" must not take "a.chaosfix-verify-x"'s copies
    names = re.compile(rf"\.{sibling_stems_re(root)}{re.escape(COPY_PREFIX)}[a-z0-9_]{{8}}")
    return [d for d in root.parent.iterdir() if names.fullmatch(d.name) and d.is_dir() and not d.is_symlink()]


def clear_stale_copies(root: Path) -> list[str]:
    """Remove them (copies only: the palace never depends on them). Call under the lock."""
    gone = []
    for d in stale_copies(root):
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d.name)
    return gone


class StartedChild:
    """The post-check's child started ahead: it imports chromadb (2-3 s) while the repair
    runs, then waits for its spec on stdin. ``close`` kills it if it was never used; a
    parent that dies closes its stdin, and the child exits."""

    def __init__(self, python: str | None) -> None:
        from chaosfix.workload import start_child

        self.python = python
        self.proc = start_child([python or sys.executable, "-I", str(CHILD), "-"], stdin=True)
        self._lock = threading.Lock()  # the post-check thread and the caller may both end it
        self._closed = False

    def kill(self) -> None:
        """SIGKILL its process group (pipes stay open: a reader thread may still be on them)."""
        with self._lock:
            if not self._closed and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass

    def close(self) -> None:
        """Kill it if still running, reap it, close its pipes; once, from any thread."""
        self.kill()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


def loads_beside(built: Collection[Path], available: int | None, others: Collection[Path] = ()) -> bool:
    """Whether chromadb's child may load the repaired index while chaosfix's verification
    still holds its own (``available``: ``sysmem.available_memory()``; ``others``: the
    folders of the other collections the child judges, which it loads too). Beside it,
    the child's get, self-queries and probe run on the core the verification leaves, and
    the post-check ends with the verification: A/B on this 2-CPU VM, 100k + 5k orphans,
    rounds alternated, the command 7.01-7.71 s against 7.78-8.81 s (0.6.3, 7 rounds) and
    6.68-7.02 s against 7.56-7.74 s (1.5.9, 3); at 500k the post-check stage 7.7-9.0 s
    against 9.5-9.9 s (in a slow phase of the VM's host, 2026-12-03, waiting had won:
    benchmarks/README.md). But then two indexes sit in memory at once (1.2 GB each at 500k),
    so where the machine (or the process's cgroup) cannot give both with room to spare,
    or says nothing, the child waits until the verification has freed its index, and
    the two never overlap."""
    if available is None:
        return False
    size = sum(folder_size(folder)[0] for folder in (*built, *others))
    return available >= BESIDE_FACTOR * size + BESIDE_MARGIN


def start_post_check(palace_gen: Generation, python: str | None) -> StartedChild | None:
    """The child for a post-check that will run (None when it would be skipped)."""
    return None if plan_post_check(palace_gen, python)[1] else StartedChild(python)


def verify_with_chromadb(palace: Path, targets: list[Target], palace_gen: Generation, python: str | None = None,
                         seed: int = 0, timeout: float = 1800, progress: ProgressFn | None = None,
                         started: StartedChild | None = None, meanwhile: Callable[[], None] | None = None,
                         built: Mapping[str, Path] | None = None, skip: Collection[str] = (),
                         prepare: Callable[[Path], None] | None = None, early: EarlyCopy | None = None,
                         verified: threading.Event | None = None) -> dict:
    """``{"ok": bool, ...}``: chromadb's judgement of the repaired collections, made on a
    copy; ``{"ok": True, "skipped": why}`` when no chromadb of the palace's generation is
    at hand. ``started``: the child ``start_post_check`` started ahead (closed here).
    ``meanwhile`` runs in this thread while the copy is made and chromadb works (the
    copy waits on the kernel, chromadb on its own process); the targets are judged after
    it returns, so it may still set their ``expect_count`` and ``quirk_rate``; if it
    raises, the child is killed and the copy removed. ``built``/``skip``: see
    ``copy_palace``; ``prepare(db)`` writes the repair's SQL into the copy's database
    before chromadb opens it; ``early``: the copy begun before the build (made with the
    same ``skip``), taken here; ``verified``: chromadb's child gets its spec once it is
    set, when ``meanwhile``'s verification has freed its index (``loads_beside`` says
    when the caller sets it at once): the two then never hold an index at once."""
    run = partial(_verify, palace, targets, palace_gen, python, seed, timeout, progress, started, built, skip,
                  prepare, early, verified)

    if meanwhile is None:
        if verified is not None:  # (no verification runs here to set it)
            verified.set()
        try:
            res = run()
        finally:
            if started is not None:  # (already closed unless _verify failed before its copy)
                started.close()
        return _judged(res, targets, python)
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["res"] = run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        meanwhile()
        thread.join()
    except BaseException:  # (Ctrl-C included) the child dies, so the thread returns and
        if started is not None:  # removes its copy, here, before the interpreter exits
            started.kill()
        if early is not None:  # (not after the built folders' copy: at 500k, 855 MB)
            early.abandon()
        if verified is not None:  # (an interrupt inside meanwhile's finally may beat its set)
            verified.set()
        thread.join()
        raise
    finally:
        if started is not None:
            started.close()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return _judged(box["res"], targets, python)  # type: ignore[arg-type]


def _judged(res: dict, targets: list[Target], python: str | None) -> dict:
    if "skipped" in res:
        return res
    out = judge(res, {t.name: t for t in targets}, python)
    out["seconds"] = res["_seconds"]
    return out


def _verify(palace: Path, targets: list[Target], palace_gen: Generation, python: str | None, seed: int,
            timeout: float, progress: ProgressFn | None, started: StartedChild | None,
            built: Mapping[str, Path] | None, skip_dirs: Collection[str], prepare: Callable[[Path], None] | None,
            early: EarlyCopy | None = None, verified: threading.Event | None = None) -> dict:
    """The child's raw record of what chromadb did (``judge`` turns it into a verdict)."""
    version, skip = plan_post_check(palace_gen, python)
    if skip:
        return {"ok": True, "skipped": skip, "version": version}
    t0 = time.perf_counter()
    copy = early.take(built or {}) if early is not None else copy_palace(palace, built, skip_dirs)
    t1 = time.perf_counter()
    try:
        if prepare is not None:
            prepare(copy / SQLITE_NAME)
        spec: dict = {"path": str(copy), "ks": KS, "seed": seed, "collections": {}, "progress": progress is not None}
        for t in targets:
            ids = sorted(t.repaired)
            if len(ids) > MAX_REPAIRED:
                ids = sorted(random.Random(seed).sample(ids, MAX_REPAIRED))
            asked = sorted(random.Random(seed).sample(ids, min(QUERY_REPAIRED, len(ids))))
            kept = sorted(t.kept)
            c: dict = {"repaired": ids, "sample": t.sample, "query": asked + t.sample, "space": t.space,
                       "kept": kept, "collection": t.collection or t.name, "tenant": t.tenant,
                       "database": t.database}
            if ids or kept:
                c["planned"] = str(copy.parent / f"planned-{len(spec['collections'])}.npy")
                _save_planned(Path(c["planned"]), {**t.kept, **t.repaired}, ids + kept)
            spec["collections"][t.name] = c
        if verified is not None:
            verified.wait()
        res = _run(spec, copy.parent / "spec.json", python, timeout, progress, started)
    finally:
        if started is not None:  # dead before its copy goes (an interrupt mid-run)
            started.close()
        shutil.rmtree(copy.parent, ignore_errors=True)
    res["_seconds"] = {"copy": round(t1 - t0, 2), "chromadb": round(time.perf_counter() - t1, 2),
                       "chromadb_start": res.get("seconds_start")}
    return res


def _save_planned(path: Path, vectors: Mapping[str, np.ndarray], ids: list[str], step: int = 1024) -> None:
    """The planned vectors of ``ids`` as one float32 .npy, written a slice at a time: it is
    written while the verification reads the built folder, and one stacked float64 copy
    of 10,000 384-d vectors is 30 MB."""
    dim = len(vectors[ids[0]])
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (len(ids), dim)})
        for s in range(0, len(ids), step):
            f.write(np.asarray([vectors[i] for i in ids[s : s + step]], dtype="<f4").tobytes())


def _run(spec: dict, spec_file: Path, python: str | None, timeout: float, progress: ProgressFn | None,
         started: StartedChild | None = None) -> dict:
    """The child, by path with ``-I`` (no PYTHONPATH, no script folder: it cannot import
    chaosfix by accident); its spec in a file (repaired id lists outgrow an argument)."""
    from chaosfix.workload import run_child

    spec_file.write_text(json.dumps(spec))
    try:
        res = run_child(spec, timeout=timeout, progress=progress,
                        command=[python or sys.executable, "-I", str(CHILD), str(spec_file)],
                        started=started.proc if started else None, stdin_line=json.dumps(str(spec_file)))
    except RuntimeError as exc:  # timed out
        return {"error": f"chromadb post-check: {exc}"}
    if not res.result:
        tail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return {"error": f"chromadb child died: {tail[0][:300]}"}
    return res.result


def judge(res: dict, targets: dict[str, Target], python: str | None) -> dict:
    """The verdict on what the child recorded: every repaired row found with its planned
    vector, no self-query or filtered miss left at the largest k beyond hnswlib's known
    unreachable rate, the count right, the probe write found."""
    out = {"ok": True, "version": res.get("version"), "python": python or sys.executable, "on": "copy",
           "collections": res.get("collections", {}), "errors": []}
    if res.get("error"):
        out["errors"].append(res["error"])
    if res.get("migrations_before") != res.get("migrations_after"):
        out["notes"] = [f"chromadb migrated the copy: {res.get('migrations_before')} -> {res.get('migrations_after')}"]
    for name, t in targets.items():
        c = res.get("collections", {}).get(name)
        if c is None:
            if not res.get("error"):
                out["errors"].append(f"{name}: not judged")
            continue
        errs = [f"{name}: {e}" for e in c.get("errors", [])]
        if t.expect_count is not None and "count" in c and c["count"] != t.expect_count:
            errs.append(f"{name}: count {c['count']}, expected {t.expect_count}")
        if c.get("missing_count"):
            errs.append(f"{name}: {c['missing_count']} rows without an embedding, e.g. {c['missing'][:3]}")
        if c.get("wrong_vector_count"):
            errs.append(f"{name}: {c['wrong_vector_count']} repaired or kept rows with another vector "
                        f"(e.g. {', '.join(map(str, c.get('wrong_vectors', [])[:3]))})")
        # judged apart: the repaired rows, and the untouched sample (what the same chromadb
        # does on this palace's healthy rows)
        unreachable = set(c.get("unreachable", []))
        asked_repaired = min(QUERY_REPAIRED, len(t.repaired))
        for what, ids, n in (("repaired", unreachable & t.repaired.keys(), asked_repaired),
                             ("sampled", unreachable - t.repaired.keys(), c.get("queried", 0) - asked_repaired)):
            if len(ids) > unreachable_allowed(n, t.quirk_rate) and t.depth is not None:
                t.quirk_rate, t.depth = max(t.quirk_rate, t.depth()), None
            if len(ids) > unreachable_allowed(n, t.quirk_rate):
                errs.append(f"{name}: {len(ids)} of {n} {what} rows' self-queries miss at k up to {KS[-1]}")
        if c.get("filtered_misses"):
            errs.append(f"{name}: filtered queries miss {c['filtered_misses'][:3]}")
        if "errors" in c and not c["errors"] and c.get("probe_found") is False:
            errs.append(f"{name}: the probe write was not found")
        out["errors"] += errs
    out["ok"] = not out["errors"]
    return out
