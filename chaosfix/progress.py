"""Progress of long stages: the library reports, the command line draws.

Library code never prints. A function whose work can take more than a couple of seconds
(building an index, verification queries, chromadb's post-check, building a palace)
takes ``progress: ProgressFn | None`` and calls ``progress(stage, done, total)`` as it
goes; ``None`` costs nothing. A chromadb child process reports the same way through its
stderr (``child_line``), which ``chaosfix.workload.run_child`` turns back into calls.

``StderrBar`` is the callback the CLI and the benchmarks pass: a click progress bar on
stderr, drawn only when stderr is a terminal, so pipes, logs and ``--json`` stay clean.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import IO

ProgressFn = Callable[[str, int, int], None]

CHILD_PREFIX = "chaosfix-progress "


def child_line(stage: str, done: int, total: int) -> str:
    """The stderr line a child process writes to report progress (``parse_child_line``)."""
    return f"{CHILD_PREFIX}{done} {total} {stage}\n"


def parse_child_line(line: str) -> tuple[str, int, int] | None:
    """``(stage, done, total)`` from a ``child_line``; None for any other stderr line."""
    if not line.startswith(CHILD_PREFIX):
        return None
    parts = line[len(CHILD_PREFIX):].rstrip("\n").split(" ", 2)
    try:
        return parts[2], int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


class StderrBar:
    """A ``ProgressFn`` drawing one click progress bar per stage on stderr (a terminal only).

    ``say`` prints a log line without tearing a bar that is being drawn. Thread-safe,
    one bar at a time: reconcile's verification and chromadb's post-check report at the
    same time, and a stage another thread reports while a bar is drawn is not shown
    until that bar ends (switching bars on every call would print a line per call)."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._bar = None
        self._key: tuple[str, int] | None = None
        self._pos = 0
        self._lock = threading.RLock()
        self._thread = 0  # the thread whose stage the bar draws

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        with self._lock:
            self._draw(stage, done, total)

    def _draw(self, stage: str, done: int, total: int) -> None:
        import click

        if self._key != (stage, total):
            if self._bar is not None and self._thread != threading.get_ident():
                return  # another thread's stage is drawn: this one waits (a new stage from
                # the same thread means that one is over)
            self.close()
            self._bar = click.progressbar(length=total, label=f"chaosfix: {printable(stage)}", file=self.stream,
                                          show_eta=True, show_pos=True, width=30)
            self._key, self._pos, self._thread = (stage, total), 0, threading.get_ident()
        step = max(0, min(done, total) - self._pos)
        self._pos += step
        self._bar.update(step)
        if self._pos >= total:
            self.close()

    def close(self) -> None:
        """End the current bar (its line stays, followed by a newline)."""
        with self._lock:
            if self._bar is not None:
                self._bar.render_finish()
            self._bar, self._key = None, None

    def say(self, msg: str) -> None:
        import click

        with self._lock:
            self.close()
            click.echo(f"chaosfix: {printable(msg)}", file=self.stream)


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``): a palace's names
    (collections, ids) are printed in reports, log lines and errors, and one holding a
    newline or a terminal escape must not forge a line (a fake "verdict: consistent") or
    drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
