"""Persistence points of a child process, counted across all its threads, in pure Python.

Why not ``strace -e inject=...:when=k``: strace counts ``when`` per thread, and chromadb
1.x calls SQLite from several threads, so "the k-th write to chroma.sqlite3" is not
something strace can stop at. An LD_PRELOAD shim would need a C compiler at run time
and does not see chromadb 1.x's HNSW writes (raw syscalls from Rust). So chaosfix traces
the child itself with ptrace and a seccomp filter:

- the child (``preexec_fn``, before exec) calls ``PTRACE_TRACEME``, stops itself, and
  once the tracer has set its options installs a seccomp BPF filter that returns
  ``SECCOMP_RET_TRACE`` for the file-changing syscalls only (open*, write*, pwrite*,
  fsync, fdatasync, ftruncate, unlink*, rename*, mkdir*); every other syscall runs at
  full speed, with no stop;
- the tracer (this process, one thread) gets a ``PTRACE_EVENT_SECCOMP`` stop at the
  *entry* of each such call, from any thread (``PTRACE_O_TRACECLONE`` follows new
  threads), resolves the file from the arguments (``/proc/TID/fd``, ``/proc/TID/mem``),
  and keeps one counter per (class, file) shared by all threads;
- a counted call is resumed with ``PTRACE_SYSCALL``, so the tracer also sees it finish;
- to crash at a point it holds the calling thread at syscall entry (and any later
  counted call of another thread), waits until every call counted before it has
  finished, then SIGKILLs the whole process: that call never runs, every one before it
  has run completely.

Only files under the palace folder count. Segment folders are named by random UUIDs, so
a file in one is named ``segment/<file>`` (one collection per workload palace).
x86_64 Linux only (the register layout); ``available()`` says whether it works here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaosfix.palace import UUID_RE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PTRACE_TRACEME, PTRACE_CONT, PTRACE_SYSCALL, PTRACE_GETREGS, PTRACE_SETOPTIONS = 0, 7, 24, 12, 0x4200
O_TRACESYSGOOD, O_TRACEFORK, O_TRACEVFORK, O_TRACECLONE, O_TRACEEXEC = 1, 2, 4, 8, 0x10
O_TRACESECCOMP, O_EXITKILL = 0x80, 0x100000
EVENT_SECCOMP = 7
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_PDEATHSIG = 38, 22, 2, 1
SECCOMP_RET_ALLOW, SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
AUDIT_ARCH_X86_64 = 0xC000003E
AT_FDCWD = -100
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

# x86_64 syscall number -> (name, class)
SYSCALLS: dict[int, tuple[str, str]] = {
    2: ("open", "openat"), 257: ("openat", "openat"), 85: ("creat", "openat"), 437: ("openat2", "openat"),
    1: ("write", "write"), 20: ("writev", "write"),
    18: ("pwrite64", "pwrite64"), 296: ("pwritev", "pwrite64"), 328: ("pwritev2", "pwrite64"),
    74: ("fsync", "fsync"), 75: ("fdatasync", "fsync"), 277: ("sync_file_range", "fsync"),
    76: ("truncate", "truncate"), 77: ("ftruncate", "truncate"),
    87: ("unlink", "unlink"), 263: ("unlinkat", "unlink"), 84: ("rmdir", "unlink"),
    82: ("rename", "rename"), 264: ("renameat", "rename"), 316: ("renameat2", "rename"),
    83: ("mkdir", "mkdir"), 258: ("mkdirat", "mkdir"),
}
CLASSES = ("openat", "write", "pwrite64", "fsync", "truncate", "unlink", "rename", "mkdir")


class _Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi",
        "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


@dataclass(frozen=True)
class Point:
    """One persistence point: the ``n``-th call (1-based, all threads) of ``cls`` on ``file``."""

    cls: str
    file: str
    n: int

    def key(self) -> str:
        return f"{self.cls}:{self.file}:{self.n}"

    @classmethod
    def parse(cls, text: str) -> Point:
        kind, _, rest = text.partition(":")
        file, _, n = rest.rpartition(":")
        if kind not in CLASSES or not file or not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad point {text!r}: want CLASS:FILE:N, e.g. write:segment/data_level0.bin:3")
        return cls(kind, file, int(n))


@dataclass
class Trace:
    """What one traced run did: its exit, its points in order, and whether it was stopped."""

    returncode: int
    points: list[Point] = field(default_factory=list)
    stopped_at: Point | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def _bpf_filter() -> bytes:
    """seccomp program: RET_TRACE for SYSCALLS on x86_64, RET_ALLOW for everything else."""
    ins = []

    def stmt(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        ins.append(struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF))

    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    nrs = sorted(SYSCALLS)
    stmt(ld_w_abs, 4)  # seccomp_data.arch
    stmt(jeq_k, AUDIT_ARCH_X86_64, 1, 0)
    stmt(ret_k, SECCOMP_RET_ALLOW)
    stmt(ld_w_abs, 0)  # seccomp_data.nr
    for i, nr in enumerate(nrs):
        # jump to the RET_TRACE at the end when equal
        stmt(jeq_k, nr, len(nrs) - i, 0)
    stmt(ret_k, SECCOMP_RET_ALLOW)
    stmt(ret_k, SECCOMP_RET_TRACE)
    return b"".join(ins)


_FILTER = _bpf_filter()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _spawn(cmd: list[str], env: dict, out_fd: int, err_fd: int) -> int:
    """fork + exec ``cmd`` as a tracee (subprocess.Popen cannot: it waits for the exec,
    and the child stops before it). The child becomes traceable, stops until the tracer
    has set its options, installs the filter, then execs. Everything the child needs is
    prepared before the fork."""
    import shutil

    exe = cmd[0] if "/" in cmd[0] else (shutil.which(cmd[0], path=env.get("PATH")) or cmd[0])
    buf = ctypes.create_string_buffer(_FILTER, len(_FILTER))
    prog = _SockFprog(len(_FILTER) // 8, ctypes.cast(buf, ctypes.c_void_p))
    tracer = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: only exits from here on
        # dies with the tracer: killed before it set PTRACE_O_EXITKILL, this child stayed
        # in its stop below for good (seen after a SIGKILLed explore)
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != tracer:
            os._exit(123)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        # explore's own descriptors close at exec; until then (the ptrace handshake) this
        # child held them, its scratch folder's lock too, and a sweep just after a kill
        # found that folder still locked
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        if _libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
            os._exit(121)
        os.kill(os.getpid(), signal.SIGSTOP)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or _libc.prctl(
                PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
            os._exit(122)
        os.execve(exe, cmd, env)
    except BaseException:  # noqa: BLE001 - never return into the parent's code
        pass
    os._exit(127)


_WALL = 0x40000000  # waitpid's __WALL: threads (clone children) too; not in the os module


def _reap(pid: int) -> int:
    """Wait for a killed tracee: its other threads' exits are ours to collect (``__WALL``)
    before its leader can be, so waiting for the leader alone hung a Ctrl-C'd explore."""
    while True:
        try:
            got, status = os.waitpid(-1, _WALL)
        except ChildProcessError:
            return -signal.SIGKILL
        except InterruptedError:
            continue
        if got == pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return os.waitstatus_to_exitcode(status)


def _cont(tid: int, sig: int = 0, op: int = 7) -> None:
    if _libc.ptrace(op, tid, None, ctypes.c_void_p(sig)) != 0:
        err = ctypes.get_errno()
        if err != errno.ESRCH:  # the thread died meanwhile (SIGKILL): fine
            raise OSError(err, os.strerror(err))


def _read_str(tid: int, addr: int, limit: int = 4096) -> str:
    out = b""
    try:
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
    except OSError:
        return ""
    try:
        while len(out) < limit:
            chunk = 4096 - (addr % 4096)
            try:
                data = os.pread(fd, chunk, addr)
            except OSError:
                break
            if not data:
                break
            nul = data.find(b"\0")
            if nul >= 0:
                out += data[:nul]
                break
            out += data
            addr += len(data)
    finally:
        os.close(fd)
    return out.decode("utf-8", "surrogateescape")


def _fd_path(tid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return ""


def _at_path(tid: int, dirfd: int, addr: int) -> str:
    p = _read_str(tid, addr)
    if not p or p.startswith("/"):
        return p
    base = _fd_path(tid, dirfd) if dirfd != AT_FDCWD and dirfd >= 0 else os.readlink(f"/proc/{tid}/cwd")
    return os.path.join(base, p)


def _call_file(tid: int, nr: int) -> tuple[str, str] | None:
    """(syscall name, absolute path) of the call a thread is stopped in, or None to ignore."""
    regs = _Regs()
    if _libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs)) != 0:
        return None
    a0, a1, a2 = regs.rdi, regs.rsi, regs.rdx
    name, cls = SYSCALLS[nr]
    sa = ctypes.c_long(a0).value  # dirfd arguments are signed
    if cls == "openat":
        if nr == 2:
            path, flags = _read_str(tid, a0), a1
        elif nr == 85:
            path, flags = _read_str(tid, a0), os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        elif nr == 437:
            path, flags = _at_path(tid, sa, a1), WRITE_FLAGS if a2 == 0 else _peek_u64(tid, a2)
        else:
            path, flags = _at_path(tid, sa, a1), a2
        if not flags & WRITE_FLAGS:
            return None  # a read-only open changes nothing
        return name, path
    if nr in (76, 87, 84, 82, 83):  # truncate/unlink/rmdir/rename/mkdir(path, ...)
        return name, _read_str(tid, a0)
    if nr in (263, 264, 316, 258):  # *at(dirfd, path, ...)
        return name, _at_path(tid, sa, a1)
    return name, _fd_path(tid, int(a0))


def _peek_u64(tid: int, addr: int) -> int:
    try:
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
        try:
            return struct.unpack("<Q", os.pread(fd, 8, addr))[0]
        finally:
            os.close(fd)
    except (OSError, struct.error):
        return WRITE_FLAGS


def file_name(root: str, path: str) -> str | None:
    """``path`` relative to the palace ``root``, segment folders as ``segment``; None outside."""
    if not path.startswith(root + "/"):
        return None
    parts = path[len(root) + 1:].split("/")
    if parts and UUID_RE.match(parts[0]):
        parts[0] = "segment"
    return "/".join(parts)


def available() -> str | None:
    """None when tracing works here, else why not (one line)."""
    if os.uname().machine != "x86_64" or not os.path.isdir("/proc/self/fd"):
        return "chaosfix explore needs x86_64 Linux"
    t = run_traced(["true"], root="/nonexistent-chaosfix")
    if t.returncode != 0:
        return f"ptrace/seccomp not permitted here (traced `true` exited {t.returncode})"
    return None


def run_traced(cmd: list[str], root: str | Path, stop: Point | None = None, env: dict | None = None,
               timeout: float = 600, stdout_path: Path | None = None,
               on_point: Callable[[Point], None] | None = None) -> Trace:
    """Run ``cmd`` traced; count its persistence points under ``root``; SIGKILL it on ``stop``.

    The tracer must be this process's only use of ``waitpid(-1)`` while it runs (it reaps
    the traced threads). ``timeout`` SIGKILLs a run that hangs.
    """
    import tempfile
    import time

    root_s = str(Path(root).absolute())
    out_f = open(stdout_path, "w+") if stdout_path else tempfile.TemporaryFile("w+")  # noqa: SIM115
    err_f = tempfile.TemporaryFile("w+")  # noqa: SIM115
    pid = _spawn(cmd, env if env is not None else dict(os.environ), out_f.fileno(), err_f.fileno())
    counts: dict[tuple[str, str], int] = {}
    trace = Trace(returncode=0)
    known: set[int] = {pid}
    rc: int | None = None
    inflight: set[int] = set()  # threads inside a counted call (resumed, exit not seen yet)
    stopping = False
    deadline = time.monotonic() + timeout
    started = False
    try:
        while known:
            if time.monotonic() > deadline and rc is None:
                os.killpg(pid, signal.SIGKILL)
                deadline = float("inf")
            try:
                tid, status = os.waitpid(-1, os.__dict__.get("__WALL", 0x40000000))
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                known.discard(tid)
                if tid == pid:
                    rc = os.waitstatus_to_exitcode(status)
                continue
            if not os.WIFSTOPPED(status):
                continue
            known.add(tid)
            sig, event = os.WSTOPSIG(status), status >> 16
            if not started and tid == pid and sig == signal.SIGSTOP:
                started = True
                opts = (O_TRACESECCOMP | O_TRACECLONE | O_TRACEFORK | O_TRACEVFORK | O_TRACEEXEC
                        | O_EXITKILL | O_TRACESYSGOOD)
                if _libc.ptrace(PTRACE_SETOPTIONS, pid, None, ctypes.c_void_p(opts)) != 0:
                    os.kill(pid, signal.SIGKILL)
                _cont(tid)
                continue
            if event == EVENT_SECCOMP:
                pt = _on_call(tid, root_s, counts)
                if pt is None:
                    _cont(tid)
                elif stopping:
                    continue  # after the stop point: held at entry until the kill
                elif pt == stop:
                    trace.stopped_at, stopping = pt, True
                    if not inflight:
                        os.kill(pid, signal.SIGKILL)
                else:
                    trace.points.append(pt)
                    if on_point is not None:
                        on_point(pt)
                    inflight.add(tid)
                    _cont(tid, op=PTRACE_SYSCALL)  # stop again at its exit: we know it ran
            elif sig == signal.SIGTRAP | 0x80:  # syscall-exit-stop of a counted call
                inflight.discard(tid)
                _cont(tid)
                if stopping and not inflight:
                    os.kill(pid, signal.SIGKILL)
            elif event or sig == signal.SIGSTOP:
                _cont(tid)  # clone/exec events, a new thread's first stop: no signal to pass
            else:
                _cont(tid, sig)  # a real signal: deliver it
    finally:
        if rc is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            rc = _reap(pid)
        out_f.seek(0)
        err_f.seek(0)
        trace.stdout, trace.stderr = out_f.read(), err_f.read()
        out_f.close()
        err_f.close()
    trace.returncode = rc
    return trace


def _on_call(tid: int, root: str, counts: dict) -> Point | None:
    """The point a thread stopped at syscall entry is about to be, or None when the call
    changes no palace file. Counts it."""
    regs = _Regs()
    if _libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs)) != 0:
        return None
    nr = int(regs.orig_rax)
    if nr not in SYSCALLS:
        return None
    got = _call_file(tid, nr)
    if got is None:
        return None
    name = file_name(root, got[1])
    if name is None:
        return None
    cls = SYSCALLS[nr][1]
    n = counts.get((cls, name), 0) + 1
    counts[(cls, name)] = n
    return Point(cls, name, n)
