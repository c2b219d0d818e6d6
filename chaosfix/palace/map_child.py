"""The id map's facts, found by a helper process, so a healthy check never unpickles.

A check of 500k drawers spent half its time turning ``index_metadata.pickle`` into a
million Python strings and comparing them with SQL's ids, on one core. A helper process
now does that on the other core, from the very bytes the check read (sent on stdin,
never the path): it bounds and unpickles them exactly as the check would
(``idmap.loads``: the opcode scan, then the restricted unpickler) and answers with the
map's facts (``idmap.summarize``), its sorted labels, and whether its ids are exactly
SQL's (sent after the pickle as one NUL-joined string, ``PalaceSql.id_blob``) and, when
they are not, the few ids on either side alone (``idmap.id_diff``). The check then holds
a deferred map (``idmap.deferred``) that unpickles in-process only when a finding needs
the ids themselves. Any other answer (unsafe, unreadable, or none: no
interpreter, a signal, a timeout, garbage on its stdout) sends the caller to the
in-process read (opcode scan, then unpickler), whose verdict stands: the helper only
ever confirms a sound map, so check and reconcile (which reads in-process) never
disagree about a hostile one.

The helper runs this file by path under ``python -I``: nothing from the current folder
(a palace's own ``json.py``) or the environment is imported; it puts its own package
root first on ``sys.path`` to import chaosfix from where this file is installed.

The reconciler asks the same helper another question (``ask="hits"``): how many of the
ids it needs a vector for a quarantined copy's map holds. A copy that holds none is not
read in-process at all: its opcode scan alone was 0.35 s at 100k ids, per copy, and
backups pile up beside a palace that is reconciled again and again.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import stat
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# started by ``prestart``, taken by the next MapFacts; with the interpreter it runs
_spare: tuple[subprocess.Popen[bytes], str] | None = None
_spare_lock = threading.Lock()
SCAN_MOST = 256  # folders of a palace ``prestart`` looks into (a palace has one per collection or two)
MIN_BYTES = 4 << 20  # below this (about 50k ids) the helper's start costs more than it saves
DIFF_MOST = 1 << 16  # ids in SQL or the map alone the helper names (beyond: the map is read in-process)
_NONE = 2**64 - 1  # "no SQL ids" in place of a length
_HEAD = struct.Struct("<Q")


class MapFacts:
    """The helper, started on ``raw``; ``send_ids`` then ``result``. A context manager
    so an exception in between still reaps it."""

    def __init__(self, raw: bytes, ask: str = "same") -> None:
        """``ask``: "same" (are the ids sent exactly the map's: ``same_ids``) or "hits"
        (how many of them the map holds: ``hits``)."""
        self.raw = raw
        self._ask = b"H" if ask == "hits" else b"S"
        self._ids: bytes | None = None
        self._ids_ready = threading.Event()
        self._out: dict[str, object] = {}
        self.thread: threading.Thread | None = None
        from chaosfix.palace.pickle_reader import spawn_isolated  # (not at the top: this file also runs by path)

        self.proc = _take_spare() or spawn_isolated(Path(__file__))
        if self.proc is not None:
            _widen(self.proc.stdin)
            self.thread = threading.Thread(target=self._talk, daemon=True)
            self.thread.start()

    def _talk(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            with proc.stdin:
                proc.stdin.write(_HEAD.pack(len(self.raw)))
                proc.stdin.write(self.raw)
                proc.stdin.write(self._ask)
                self._ids_ready.wait()
                ids = self._ids
                proc.stdin.write(_HEAD.pack(_NONE if ids is None else len(ids)))
                if ids is not None:
                    proc.stdin.write(ids)
            self._out["stdout"] = proc.stdout.read()
            proc.wait()
        except (OSError, ValueError) as exc:  # the helper died early (a broken pipe)
            self._out["error"] = exc

    def send_ids(self, blob: str | None) -> None:
        """SQL's ids for the same collection (``PalaceSql.id_blob``), or None."""
        self._ids = blob.encode("utf-8") if blob is not None else None
        self._ids_ready.set()

    def result(self) -> tuple[str, dict, bytes] | None:
        """("ok", answer, sorted labels as u64 bytes; for "hits", only the count and no
        labels) or ("unsafe" | "unreadable", answer with its "error", b""); None when the
        helper could not answer."""
        self._ids_ready.set()  # (no ids sent: the helper must not wait for them)
        if self.proc is None or self.thread is None:
            return None
        # a sound map unpickles at 40 MB/s here; past this the in-process read (its scan
        # refuses what can make the unpickler slow, e.g. colliding int keys) is quicker
        self.thread.join(timeout=10 + len(self.raw) / 2e6)
        self.close()
        self.thread.join()
        if self.proc.returncode == -signal.SIGINT:  # Ctrl-C reached the helper too: stop
            raise KeyboardInterrupt
        out = self._out.get("stdout")
        if self.proc.returncode != 0 or "error" in self._out or not isinstance(out, bytes):
            return None
        head, sep, rest = out.partition(b"\n")
        try:
            answer = json.loads(head)
            status = answer["status"]
        except (ValueError, KeyError, TypeError):
            return None
        if not sep or status not in ("ok", "unsafe", "unreadable"):
            return None
        if status == "ok" and (not isinstance(answer.get("hits"), int) if self._ask == b"H"
                               else len(rest) != 8 * answer["facts"]["count"] + _diff_bytes(answer)):
            return None
        return status, answer, rest

    def close(self) -> None:
        from chaosfix.palace.pickle_reader import reap

        reap(self.proc)

    def __enter__(self) -> MapFacts:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ids_ready.set()
        self.close()


def prestart(palace: str | os.PathLike[str]) -> None:
    """Start a helper now if ``palace`` looks like it will need one (a 1.x map of at least
    ``MIN_BYTES``), for the next MapFacts to take: its interpreter's start and imports
    (0.15 s at 500k ids, on the check's critical path) then run while the caller imports
    the rest of chaosfix. A hint only: the folders are looked at (lstat, two bytes of a
    regular file, nothing followed), never trusted; a spare nobody takes is reaped at
    exit, and the helper judges nothing before it is sent a pickle."""
    global _spare
    if _spare is not None or not _wants_helper(Path(palace)):
        return
    from chaosfix.palace.pickle_reader import spawn_isolated

    proc = spawn_isolated(Path(__file__))
    if proc is None:
        return
    _widen(proc.stdin)
    with _spare_lock:
        _spare, other = (proc, sys.executable), _spare
    if other is not None:  # (another thread's, started meanwhile)
        _discard(other[0])
    atexit.unregister(drop_spare)  # (once, however many checks this process runs)
    atexit.register(drop_spare)


def drop_spare() -> None:
    """Reap the helper ``prestart`` started if nothing took it."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None:
        _discard(spare[0])


def _take_spare() -> subprocess.Popen[bytes] | None:
    """The spare helper, if it still runs the interpreter a helper started now would."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    proc, python = spare
    if proc.poll() is not None or python != sys.executable:  # it died, or is not what was asked for
        _discard(proc)
        return None
    return proc


def _discard(proc: subprocess.Popen[bytes]) -> None:
    from chaosfix.palace.pickle_reader import reap

    reap(proc)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _wants_helper(palace: Path) -> bool:
    """``palace`` holds chroma.sqlite3 and a collection folder with a 1.x map (a
    protocol-3 pickle) of at least ``MIN_BYTES``. Each folder is opened without following
    a link and its map looked up from that very folder."""
    from chaosfix.safe_fs import is_regular

    if not is_regular(palace / "chroma.sqlite3"):
        return False
    try:
        with os.scandir(palace) as it:
            for n, entry in enumerate(it):
                if n >= SCAN_MOST:
                    return False
                if len(entry.name) == 36 and _big_dict_map(palace, entry.name):
                    return True
    except OSError:
        pass
    return False


def _big_dict_map(palace: Path, name: str) -> bool:
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        folder = os.open(palace / name, flags | os.O_DIRECTORY)
    except (OSError, AttributeError):  # a file, a link, gone; or no such flags here (no hint then)
        return False
    try:
        st = os.lstat("index_metadata.pickle", dir_fd=folder)
        if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_BYTES:
            return False
        fd = os.open("index_metadata.pickle", flags, dir_fd=folder)
        try:  # (a device swapped in after the lstat is opened, never read)
            return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 2, 0) == b"\x80\x03"
        finally:
            os.close(fd)
    except (OSError, NotImplementedError):  # (no map in this folder; no dir_fd on this system)
        return False
    finally:
        os.close(folder)


def _widen(pipe: object) -> None:
    """Best effort: a 1 MB pipe instead of 64 KB, so the 40 MB of a 500k-id pickle cross
    it in 1 MB writes instead of 64 KB ones."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError, ValueError):
        pass


def _diff_bytes(answer: dict) -> int:
    diff = answer.get("diff")
    n = diff.get("map_bytes") if isinstance(diff, dict) else 0
    return n if isinstance(n, int) and n >= 0 else -1


def map_alone(answer: dict, rest: bytes) -> list[str] | None:
    """The map's ids SQL lacks, read from the bytes after the labels (None: malformed)."""
    diff = answer["diff"]
    at, out = 8 * answer["facts"]["count"], []
    while at < len(rest):
        if at + 8 > len(rest):
            return None
        (n,) = _HEAD.unpack_from(rest, at)
        if at + 8 + n > len(rest):
            return None
        try:
            out.append(rest[at + 8 : at + 8 + n].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            return None
        at += 8 + n
    return out if len(out) == diff.get("map_alone") else None


def _read(f, n: int) -> bytes:  # noqa: ANN001 - a binary stream
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _cap_memory(n: int) -> tuple[int, int] | None:
    """Cap this process's address space at what unpickling an ``n``-byte map can need
    (a legitimate one: under 32 bytes per pickle byte, e.g. 1-character ids), so a memo
    bomb fails with MemoryError instead of taking gigabytes: the C unpickler then needs
    no pure-Python opcode scan first (1 s at 500k ids). Returns the limit to restore;
    None where it cannot be set (no /proc, no RLIMIT_AS): the caller scans instead."""
    try:
        import resource

        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        old = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + 32 * n + (512 << 20)
        if old[1] != resource.RLIM_INFINITY:
            cap = min(cap, old[1])
        resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
        return old
    except (ImportError, OSError, ValueError, AttributeError):
        return None


def _uncap(old: tuple[int, int]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, old)


def _child() -> None:
    """The helper: read the pickle and SQL's ids from stdin; one JSON line and the
    sorted labels on stdout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from chaosfix.filecopy import die_with_parent
    from chaosfix.palace import idmap

    die_with_parent()
    inp = sys.stdin.buffer
    raw = _read(inp, _HEAD.unpack(_read(inp, 8))[0])
    cap = _cap_memory(len(raw))
    try:
        m = idmap.loads(raw, bounded=cap is not None, memo_after=cap is not None)
    except idmap.UnsafePickle as exc:
        m, answer = None, {"status": "unsafe", "error": str(exc)}
    except idmap.UnreadablePickle as exc:
        m, answer = None, {"status": "unreadable", "error": str(exc)}
    if cap is not None:
        _uncap(cap)  # SQL's ids below are as many as the palace holds, whatever the map's size
    ask = _read(inp, 1)
    n = _HEAD.unpack(_read(inp, 8))[0]
    blob = _read(inp, n) if n != _NONE else None  # read whatever the verdict: the parent is writing it
    labels = b""
    if m is not None and ask == b"H":  # (no facts, no labels: a quarter of the work at 500k ids)
        ids = blob.decode("utf-8").split("\0") if blob is not None else []
        answer = {"status": "ok", "hits": sum(map(m.id_to_label.__contains__, ids))}
    elif m is not None:
        facts, arr = idmap.summarize(m)
        answer, labels = {"status": "ok", "facts": facts, "same_ids": None}, arr.astype("<u8").tobytes()
        if blob is not None:
            ids = blob.decode("utf-8").split("\0")
            keys_fp = m.key_fingerprints() if idmap.SECRET_HASH_KEY else None  # (always, under -I)
            answer["same_ids"] = idmap.same_id_set(m.id_to_label, ids, keys_fp)
            diff = None if answer["same_ids"] else idmap.id_diff(m.id_to_label, ids, DIFF_MOST, keys_fp)
            if diff is not None:
                # SQL's side as positions in the list the parent split too; the map's as
                # length-prefixed bytes after the labels (JSON would join a pickle's
                # surrogate pair into one character, and swell long ids sixfold)
                alone = b"".join(_HEAD.pack(len(b)) + b for b in
                                 (rid.encode("utf-8", "surrogatepass") for rid in diff[1]))
                answer["diff"] = {"sql_at": diff[0], "map_alone": len(diff[1]), "map_bytes": len(alone)}
                labels += alone
    out = sys.stdout.buffer
    out.write(json.dumps(answer).encode() + b"\n")
    out.write(labels)
    out.flush()
    os._exit(0)  # no teardown of a million objects


if __name__ == "__main__":  # run by path by ``MapFacts``
    _child()
