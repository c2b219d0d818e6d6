"""Kill points for the chromadb writer child.

- ``kill_point``: the 0.6.x persist-path hooks built into ``chaosfix._child``
  (``start``, ``after-hnsw``, ``after-pickle``, ``before-commit``), for
  ``workload.apply_ops(kill=...)``.
- ``strace_kill_prefix``: any version, SIGKILL on the Nth call of a syscall on a named
  file, by strace fault injection; pass it as ``workload.apply_ops(prefix=...)``.
- ``seeded_delay``: a reproducible delay for ``workload.apply_ops(kill_after=...)``.
"""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from chaosfix._child import KILL_POINTS
from chaosfix.errors import OperationalError

STRACE_MISSING = "strace not found: apt-get install strace"


def kill_point(point: str, hit: int = 1) -> dict:
    """The ``kill=`` argument of ``apply_ops``: SIGKILL the ``hit``-th time the 0.6.x persist
    reaches ``point``. Note: ``after-hnsw`` fires inside ``open(pickle, "wb")``, so the
    pickle is already truncated to 0 bytes when the process dies."""
    if point not in KILL_POINTS:
        raise ValueError(f"unknown kill point {point!r}; one of {', '.join(KILL_POINTS)}")
    if hit < 1:
        raise ValueError("hit must be >= 1")
    return {"point": point, "hit": hit}


@functools.cache
def strace_path() -> str:
    """Path of a working strace, or OperationalError (one line, exit 8)."""
    exe = shutil.which("strace")
    if exe is None:
        raise OperationalError(STRACE_MISSING)
    try:
        probe = subprocess.run([exe, "-qq", "-o", "/dev/null", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationalError(f"strace unusable: {exc}") from None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise OperationalError(f"strace unusable (ptrace not permitted?): {last}")
    return exe


def strace_available() -> bool:
    try:
        strace_path()
    except OperationalError:
        return False
    return True


def strace_kill_prefix(path: str | Path | Iterable[str | Path], nth: int, syscall: str = "openat") -> list[str]:
    """Command prefix that SIGKILLs the traced program on the ``nth`` ``syscall`` on ``path``.

    Built on ``strace -f -e inject=SYSCALL:signal=KILL:when=N -P FILE``. ``path`` is one
    file or several (strace matches the exact path string and descriptors open on it; a
    file that does not exist yet is fine). Counting is per syscall and *per thread*: in
    1.x the Rust side touches a file from several threads, so pick a syscall and file
    that one thread owns (e.g. ``write`` on ``data_level0.bin``). Trace output goes to
    /dev/null; the child's own stderr is untouched. Raises OperationalError when strace
    is missing or unusable.
    """
    if nth < 1:
        raise ValueError("nth must be >= 1")
    exe = strace_path()
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    cmd = [exe, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", "signal=none",
           "-e", f"inject={syscall}:signal=KILL:when={nth}"]
    for p in paths:
        cmd += ["-P", str(Path(p).absolute())]
    return cmd


def seeded_delay(seed: int, lo: float, hi: float) -> float:
    """A delay in [lo, hi) seconds drawn from ``seed``: same seed, same kill moment."""
    if hi < lo:
        raise ValueError("hi must be >= lo")
    return random.Random(f"delay:{seed}").uniform(lo, hi)
