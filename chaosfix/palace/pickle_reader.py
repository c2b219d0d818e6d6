"""Bounds for ``index_metadata.pickle`` before and after the restricted unpickler runs.

The allow-list in ``idmap`` stops code from running; it does not stop a 20-byte pickle
from costing gigabytes: CPython's unpickler grows its memo table to the index a
``LONG_BINPUT``/``PUT`` opcode names (index 2**28 = 4 GB of RSS). ``scan`` walks the
opcode stream first (a tight reader over ``pickletools``' opcode table, about 5x faster
than ``pickletools.genops``; it never builds an object) and refuses memo indexes beyond
the file's own length, ints wider than 64 bits (which would be refused after loading
anyway, but could first make the unpickler's dicts quadratic: ints collide by design),
unknown opcodes and a stream without STOP. Every other opcode
costs memory in proportion to the bytes that encode it, so after the scan the unpickler
runs in O(file size). ``Scan`` runs the walk of a large pickle in a child process
while the caller reads SQL and the HNSW files on the other core. ``check_nesting``
bounds what the loaded value may contain (a 200k-deep list would make later code hit
RecursionError), walking it iteratively.
"""

from __future__ import annotations

import os
import pickletools
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

MAX_NESTING = 32  # chromadb's maps nest 2 deep
MAX_INT_BITS = 64  # labels and counts are hnswlib's u64 at most

_ARGN: list[int | None] = [None] * 256
for _op in pickletools.opcodes:
    _ARGN[ord(_op.code)] = _op.arg.n if _op.arg is not None else 0
_STOP, _PUT, _LONG_BINPUT = 0x2E, 0x70, 0x72
_INT_TEXT, _LONG_TEXT, _LONG1, _LONG4 = 0x49, 0x4C, 0x8A, 0x8B
# an int wider than 64 bits is refused after loading (check_nesting) anyway; refused here
# it cannot first make the unpickler's dicts quadratic (ints collide by design: k*(2**61-1)
# all hash to 0; 9 bytes or 24 characters allow at most ~1,000 such keys)
_INT_BYTES, _INT_DIGITS = 9, 24
_TWO_LINES = (0x63, 0x69)  # GLOBAL, INST


CHILD_MIN_BYTES = 4 << 20  # below this (about 50k ids) the child's start costs more than it saves
_REFUSED = 3  # the child's exit code for PickleBoundsError (its message on stdout)


class PickleBoundsError(ValueError):
    """The pickle is malformed or asks for more than its size justifies."""


class Scan:
    """``scan(raw)`` started now and judged by ``wait()``: in a child process (the walk
    is pure Python, so a thread would hold the GIL the caller needs) for a pickle of at
    least ``CHILD_MIN_BYTES``, inline otherwise. The child gets the bytes themselves on
    stdin, never the path, so it judges exactly what the caller unpickles. If the child
    cannot run (no interpreter, a timeout, a signal) ``wait`` scans inline: the
    verdict never depends on the child. Use as a context manager so an exception in
    between still reaps the child."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: dict[str, object] = {}
        self.thread: threading.Thread | None = None
        if len(raw) < CHILD_MIN_BYTES:
            return
        self.proc = spawn_isolated(Path(__file__))  # standard library only
        if self.proc is not None:
            self.thread = threading.Thread(target=self._talk, daemon=True)
            self.thread.start()

    def _talk(self) -> None:
        assert self.proc is not None
        try:
            self.out["stdout"], _ = self.proc.communicate(self.raw, timeout=60 + len(self.raw) / 1e6)
        except (OSError, subprocess.SubprocessError) as exc:
            self.out["error"] = exc

    def wait(self) -> None:
        """Return when the pickle passed; raise PickleBoundsError when it did not."""
        if self.proc is not None and self.thread is not None:
            self.thread.join()
            self.close()
            if self.proc.returncode == 0 and "error" not in self.out:
                return
            if self.proc.returncode == _REFUSED:
                raise PickleBoundsError(bytes(self.out.get("stdout") or b"").decode("utf-8", "replace").strip())
            if self.proc.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: stop, no rescan
                raise KeyboardInterrupt
        scan(self.raw)  # no child, or it failed for its own reasons: judge here

    def close(self) -> None:
        reap(self.proc)

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn_isolated(script: Path) -> subprocess.Popen[bytes] | None:
    """``script`` run by path under ``python -I``, stdin and stdout piped: nothing from
    the current folder (a palace's own ``json.py``) or the environment can stand in for
    what it imports. None when no interpreter runs (the caller then works in-process)."""
    try:
        return subprocess.Popen([sys.executable, "-I", str(script.resolve())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def reap(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill ``proc`` if it still runs, and wait for it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _filecopy():  # noqa: ANN202 - the module
    """``chaosfix/filecopy.py`` loaded by its path, standard library only: this child runs
    by path with ``-I`` and keeps ``sys.path`` as it is (the standard library first)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_chaosfix_filecopy", Path(__file__).resolve().parents[1] / "filecopy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _child() -> None:
    """The child of ``Scan``: scan stdin's bytes; exit 0, or _REFUSED with the reason."""
    _filecopy().die_with_parent()
    try:
        scan(sys.stdin.buffer.read())
    except PickleBoundsError as exc:
        sys.stdout.write(str(exc))
        sys.stdout.flush()
        os._exit(_REFUSED)
    os._exit(0)


def read_bounded(path: Path) -> bytes:
    """The file's bytes, refusing a sparse file (a hole means zeroed, never-written
    data, and its apparent size may be any lie): only real bytes are read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            hole = os.lseek(f.fileno(), 0, os.SEEK_HOLE)
        except OSError:
            hole = size
        if hole < size:
            raise PickleBoundsError(f"sparse file: a hole at byte {hole} of {size}")
        f.seek(0)
        return f.read()


def scan(raw: bytes) -> None:
    """Walk the opcodes of ``raw`` without building anything; raise PickleBoundsError
    on an unknown opcode, a memo index above ``len(raw)``, or no STOP."""
    i, n, bound = 0, len(raw), len(raw)
    argn, unpack = _ARGN, struct.unpack_from
    try:
        while i < n:
            c = raw[i]
            i += 1
            a = argn[c]
            if a is None:
                raise PickleBoundsError(f"unknown opcode 0x{c:02x} at byte {i - 1}")
            if a > 0:
                if c == _LONG_BINPUT and unpack("<I", raw, i)[0] > bound:
                    raise PickleBoundsError(f"memo index {unpack('<I', raw, i)[0]} in a {n}-byte pickle")
                i += a
            elif a == 0:
                if c == _STOP:
                    return
            elif a == pickletools.UP_TO_NEWLINE:
                j = raw.index(b"\n", i)
                if c in _TWO_LINES:  # GLOBAL / INST: "module\nname\n"
                    j = raw.index(b"\n", j + 1)
                if c in (_INT_TEXT, _LONG_TEXT) and j - i > _INT_DIGITS:
                    raise PickleBoundsError(f"integer of {j - i} digits at byte {i - 1}")
                if c == _PUT:
                    arg = raw[i:j]
                    if len(arg) > 12:  # the C unpickler reads "  0_000001" as 1: so does this
                        arg = arg.strip().replace(b"_", b"").lstrip(b"+").lstrip(b"0") or b"0"
                    if len(arg) > 12 or int(arg) > bound:
                        raise PickleBoundsError(f"memo index {raw[i:j][:20]!r} in a {n}-byte pickle")
                i = j + 1
            elif a == pickletools.TAKEN_FROM_ARGUMENT1:
                if c == _LONG1 and raw[i] > _INT_BYTES:
                    raise PickleBoundsError(f"integer of {raw[i]} bytes at byte {i - 1}")
                i += 1 + raw[i]
            elif a in (pickletools.TAKEN_FROM_ARGUMENT4, pickletools.TAKEN_FROM_ARGUMENT4U):
                if c == _LONG4 and unpack("<I", raw, i)[0] > _INT_BYTES:
                    raise PickleBoundsError(f"integer of {unpack('<I', raw, i)[0]} bytes at byte {i - 1}")
                i += 4 + unpack("<I", raw, i)[0]
            else:
                i += 8 + unpack("<Q", raw, i)[0]
    except (IndexError, struct.error, ValueError) as exc:
        if isinstance(exc, PickleBoundsError):
            raise
        raise PickleBoundsError(f"malformed opcode argument near byte {i}") from None
    raise PickleBoundsError("truncated: no STOP opcode")


def check_nesting(value: object, limit: int = MAX_NESTING) -> None:
    """Refuse containers nested deeper than ``limit`` and ints wider than 64 bits,
    iteratively (no recursion) and visiting each object once (memo references may
    make a small pickle a DAG with exponentially many paths)."""
    seen: set[int] = set()
    todo: list[tuple[object, int]] = [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, int) and not isinstance(v, bool):
            if v.bit_length() > MAX_INT_BITS:
                raise PickleBoundsError(f"integer of {v.bit_length()} bits")
            continue
        if not isinstance(v, (dict, list, tuple, set, frozenset)) or id(v) in seen:
            continue
        if d >= limit:
            raise PickleBoundsError(f"values nested deeper than {limit}")
        seen.add(id(v))
        items = [x for kv in v.items() for x in kv] if isinstance(v, dict) else list(v)
        todo.extend((x, d + 1) for x in items if isinstance(x, (dict, list, tuple, set, frozenset, int)))


if __name__ == "__main__":  # run by path by ``Scan``
    _child()
