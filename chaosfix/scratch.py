"""Private scratch folders in $TMPDIR that a killed process's successor removes.

A hot journal's or WAL's private copy (check and reconcile read the committed state
there) and ``chaosfix simulate``'s throwaway palaces live in such a folder, held by an
flock for as long as they are used.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

# + <pid>-<random>, in $TMPDIR: a hot journal's or WAL's private copy, a simulation's or
# an exploration's palaces
JOURNAL_SCRATCH, WAL_SCRATCH = "chaosfix-journal-", "chaosfix-wal-"
SIMULATE_SCRATCH, EXPLORE_SCRATCH = "chaosfix-simulate-", "chaosfix-explore-"
SCRATCH_LOCK = ".lock"


class Scratch:
    """A private folder in $TMPDIR for a copy of the db and its journal or WAL (or a
    simulation's throwaway palaces), held by an exclusive flock on its ``.lock`` for as
    long as it is used. A check or reconcile killed while it read such a palace leaves
    its copy (as large as the journal's data: 31 GB once), and a killed simulate its
    palaces, where no rerun looked, so each new one first removes the folders whose lock
    nobody holds: the kernel drops a dead process's lock whatever its pid namespace, and a
    folder without the marker (one being made, or anyone else's) is never touched."""

    def __init__(self, kind: str) -> None:
        _sweep_scratch()
        self.path = Path(tempfile.mkdtemp(prefix=f"{kind}{os.getpid()}-"))
        self._fd: int | None = None
        try:
            # locked under another name, then renamed: a sweep between the lock file's
            # creation and its flock would find it unheld and remove a live folder
            making = self.path / (SCRATCH_LOCK + ".new")
            self._fd = os.open(making, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.rename(making, self.path / SCRATCH_LOCK)
        except BaseException:  # (a full $TMPDIR): no folder left that no sweep would remove
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sweep_scratch() -> None:
    """Remove this user's scratch folders whose lock no process holds (see ``Scratch``)."""
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith((JOURNAL_SCRATCH, WAL_SCRATCH, SIMULATE_SCRATCH, EXPLORE_SCRATCH)):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # (never a link, nor another user's)
                continue
            fd = os.open(os.path.join(e.path, SCRATCH_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its reader is alive
            shutil.rmtree(e.path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
