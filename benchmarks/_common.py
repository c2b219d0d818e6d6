"""Helpers shared by the benchmarks: the cached benchmark palace, the chaosfix command
line of this interpreter, and timing a child process (wall time and its own peak RSS).

The benchmark scripts run as ``python benchmarks/<name>.py``, so this folder is on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from chaosfix.progress import StderrBar
from chaosfix.workload import PalaceSpec, apply_ops, cache_dir, copy_palace

MB = 1 << 20
BASE = 100_000  # a larger palace grows from the cached palace of this size...
LADDER = (BASE, 500_000)  # ...or from the largest of these already cached below it...
STEP = 25_000  # ...and every palace is built by this many drawers per chromadb child
BAR = StderrBar()  # progress of palace builds (minutes) on stderr, when it is a terminal


def spec_for(drawers: int, dim: int) -> PalaceSpec:
    """The benchmark palace: chromadb's defaults, not the small test defaults."""
    return PalaceSpec(drawers=drawers, dim=dim, space="cosine", sync_threshold=1000, batch_size=100)


def cached_template(spec: PalaceSpec, log: Callable[[str], None]) -> Path:
    """The cached palace for ``spec`` (``chaosfix.workload.template``'s cache), built on
    first use by ``STEP`` drawers per chromadb child process: one child building 100k
    drawers on a loaded machine outlives ``chaosfix.workload.run_child``'s 15-minute
    timeout. Above ``BASE`` drawers it grows from the largest cached ``LADDER`` palace
    below it (building the ``BASE``-drawer one first if none is cached)."""
    dest = cache_dir() / spec.key()
    cached = (dest / "chroma.sqlite3").is_file()
    log(f"palace cache: {dest}")
    if cached:
        return dest
    log(f"building the {spec.drawers:,}-drawer palace with chromadb (once; minutes)...")
    t0 = time.perf_counter()
    base = None
    if spec.drawers > BASE:
        below = [n for n in LADDER if n < spec.drawers]
        size = max([n for n in below if (cache_dir() / spec.with_(drawers=n).key() / "chroma.sqlite3").is_file()],
                   default=BASE)
        base = cached_template(spec.with_(drawers=size), log)
    palace = _grow(spec, base, log)
    log(f"palace ready in {time.perf_counter() - t0:.1f} s (built): {palace}")
    return palace


def _grow(spec: PalaceSpec, base: Path | None, log: Callable[[str], None]) -> Path:
    dest = cache_dir() / spec.key()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        p = copy_palace(base, tmp / "p") if base is not None else tmp / "p"  # else the first add creates it
        first = _drawers_in(base) if base is not None else 0
        for start in range(first, spec.drawers, STEP):
            count = min(STEP, spec.drawers - start)
            t = time.perf_counter()
            res = apply_ops(p, spec, [{"op": "add", "start": start, "count": count}],
                            progress=lambda _s, done, _t, start=start, first=first: BAR(
                                "building palace", start - first + done, spec.drawers - first))
            if not res.ok:
                raise SystemExit(f"adding drawers {start:,}+{count:,} failed: "
                                 f"{res.result.get('error') or res.stderr[-500:]}")
            BAR.close()  # the log line goes below the bar, not into it
            log(f"  {start + count:,} drawers ({time.perf_counter() - t:.0f} s for this step)")
        try:
            os.rename(p, dest)  # another run may have won the race: fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _drawers_in(palace: Path) -> int:
    """How many drawers a cached palace holds: its size is in its spec, so read the rows."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(f"file:{palace / 'chroma.sqlite3'}?mode=ro", uri=True)) as db:
        return db.execute("SELECT count(*) FROM embeddings").fetchone()[0]


def chaosfix_command(*args: str | Path) -> list[str]:
    """``chaosfix ARGS...`` with this interpreter's console script (or ``-c`` fallback)."""
    script = Path(sys.executable).parent / "chaosfix"
    head = [str(script)] if script.is_file() else [sys.executable, "-c", "from chaosfix.cli import main; main()"]
    return head + [str(a) for a in args]


# Runs the chaosfix command line in this interpreter and, at exit, writes its own peak RSS
# and that of the children it waited for (the chromadb post-check child) to the file
# named by $CHAOSFIX_BENCH_RUSAGE: os.wait4 on the command alone folds both into one.
# Also the memory each side first touched (minor page faults, 4 KB each): on a VM whose
# host takes freed pages back, touching fresh memory is a cost of its own (bench_floors).
_RUSAGE_WRAPPER = """
import atexit, json, os, resource, sys
def _dump():
    k = 1 if sys.platform == "darwin" else 1024
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.environ["CHAOSFIX_BENCH_RUSAGE"], "w") as f:
        json.dump({"self": me.ru_maxrss * k, "children": kids.ru_maxrss * k,
                   "self_faults": me.ru_minflt, "children_faults": kids.ru_minflt}, f)
atexit.register(_dump)
sys.argv = ["chaosfix", *sys.argv[1:]]
from chaosfix.cli import main
main()
"""


def measured_command(*args: str | Path) -> list[str]:
    """``chaosfix ARGS...`` run so that ``run_rusage`` can tell the peak RSS of the command
    itself from that of the processes it starts."""
    return [sys.executable, "-c", _RUSAGE_WRAPPER, *(str(a) for a in args)]


def run_rusage(cmd: list[str], ok: tuple[int, ...] = (0, 4)) -> tuple[Timed, dict[str, int]]:
    """``run_timed`` for a ``measured_command``: also {"self": bytes, "children": bytes}."""
    with tempfile.NamedTemporaryFile(prefix="chaosfix-rusage-", suffix=".json") as f:
        env = dict(os.environ, CHAOSFIX_BENCH_RUSAGE=f.name)
        t = run_timed(cmd, ok=ok, env=env)
        try:
            usage = json.loads(Path(f.name).read_text() or "{}")
        except ValueError:
            usage = {}
    return t, usage


def evict(palace: Path) -> int:
    """Drop the palace's clean pages from the page cache (read-only: no byte or mtime
    changes). Returns how many files were advised; 0 when the platform lacks fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for p in palace.rglob("*"):
        if not p.is_file():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return n


class Timed(NamedTuple):
    wall: float  # seconds
    rss: int  # peak RSS of that one child, bytes
    rc: int
    out: str
    err: str
    cpu: float = 0.0  # user + system seconds of the child and the children it waited for


def run_timed(cmd: list[str], ok: tuple[int, ...] = (0, 4), env: dict[str, str] | None = None) -> Timed:
    """Run ``cmd`` to completion; time it and take its peak RSS from ``os.wait4``.

    stdout and stderr go to temporary files (a pipe left unread while waiting could fill
    and stall the child). stderr is echoed when the exit code is not in ``ok``.
    """
    # PYTHONSAFEPATH: a ``python -c`` child would import chaosfix from the current folder
    # first (a checkout's source instead of what is installed, or a PYTHONPATH tree)
    env = {**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"}
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    if rc not in ok:
        sys.stderr.write(etext)
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return Timed(wall, rss, rc, text, etext, usage.ru_utime + usage.ru_stime)


def index_files(palace: Path) -> list[Path]:
    return sorted(palace.glob("*/data_level0.bin"))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def print_rows(rows: list[tuple[str, str]]) -> None:
    """A two-column key/value table on stdout."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
