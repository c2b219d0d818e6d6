"""findings -> plan -> new segment -> verify -> swap, under exclusive access.

Order of work, each step a kill point for the crash tests (CHAOSFIX_KILL_AT; CHAOSFIX_STOP_AT
stops the process there instead, for a test to look at the palace before SIGCONT):
  planned       the first look's plan made, the lock not yet taken (nothing written)
  locked        flock + no other process holds palace files + BEGIN EXCLUSIVE
  copied        the backup folder made under its partial name, the db files copied
                into it (only when SQL changes), not yet renamed into place
  backed-up     the backup whole, under its own name
  linked        an incremental build's data_level0.bin is still a hard link to the
                palace's own (hnswlib has loaded it; the copy that replaces the link
                before any write is on its way)
  built         new segment folders built aside (their fsync runs on in the background)
  verified      zero-diff + self-query on every built folder, chromadb's post-check of
                the palace to be (on a copy), the built folders fsynced
  swapped       renameat2(RENAME_EXCHANGE) new <-> old (atomic per segment)
  old-moved     old folders moved into the backup (or deleted with --no-backup)
  sql-written   dropped foreign triggers/views, max_seq_id / WAL floor rows written (the
                same writes the post-check made on its copy), not yet committed
  committed     COMMIT; marker removed
From locked to committed the transaction's lock holds: every copy of the db and its
sidecars is made by a child (``filecopy.copy_locked``), as this process closing a
descriptor of the db would drop the lock (POSIX) and let a writer in under the repair.
A kill anywhere leaves either the old palace, or the new index with the old SQL (a
rerun redoes the same plan), plus our own leftovers, which a rerun recognises and
clears (a hot journal is rolled back only when our marker proves it is ours).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from chaosfix.check import ERROR, INFO, WARNING, CheckReport, Finding, check_palace, deep_findings
from chaosfix.embedders.select import EmbedderSelector
from chaosfix.errors import (
    EXIT_OK,
    EXIT_OPERATIONAL,
    EXIT_REPAIRED,
    EXIT_UNREPAIRED,
    ChaosfixError,
    OperationalError,
    UsageProblem,
    os_error_line,
    whole_number_problem,
)
from chaosfix.filecopy import copy_locked
from chaosfix.memtrim import release_freed_memory
from chaosfix.palace import SQLITE_NAME, UUID_RE, palace_db, schema_guard
from chaosfix.palace.leftovers import BACKUP_GLOB, STAMP, own_folders_re, sibling_stem, sibling_stems_re
from chaosfix.palace.schema_guard import STALE_GONE, ForeignObject
from chaosfix.palace.sql import FTS_TABLE, PalaceSql, StaleRows, journal_synced, odd_sidecars
from chaosfix.palace.state import written_in_rollback
from chaosfix.progress import ProgressFn
from chaosfix.reconcile import build as build_mod
from chaosfix.reconcile import space
from chaosfix.reconcile.plan import CollectionPlan, plan_collection
from chaosfix.reconcile.safety import (
    LOCK_NAME,
    PalaceLock,
    Syncing,
    back_up,
    exchange,
    fsync_path,
    interrupts_deferred,
    killpoint,
    move_out,
    other_holders,
    rename_noreplace,
)
from chaosfix.reconcile.sources import Embedder
from chaosfix.reconcile.verify import EF_FIRST, EF_GATE, EF_MAX, Verification, verify_segment
from chaosfix.safe_fs import create_new, ensure_inside, is_link, is_uuid, mkdir_new, shown

if TYPE_CHECKING:
    import numpy as np

    from chaosfix.chromadb_probe import EarlyCopy, StartedChild
    from chaosfix.palace.generation import Generation

MARKER = ".chaosfix-txn"
BUILD_PREFIX = ".chaosfix-build-"
OLD_PREFIX = ".chaosfix-old-"
FLOOR_ID = "__chaosfix_seq_floor__"
Verify = Callable[[], None]  # the repair's own verification
FOREIGN_SQL_FILE = "foreign-sql.sql"  # dropped triggers/views, to recreate by hand if wanted
JOURNAL = SQLITE_NAME + "-journal"
ROLLED_BACK = SQLITE_NAME + ".rolled-back"  # the db after a journal's rollback, before the repair


@dataclass
class ReconcileOptions:
    collection: str | None = None
    dry_run: bool = False
    backup: bool = True
    # None: the palace's own record, its chromadb config, or chromadb's default model on disk;
    # several: the guard picks the one that reproduces the palace
    embedder: str | Embedder | list | None = None
    trust_embedder: bool = False  # use the embedder even when the guard says it does not reproduce the palace
    strategy: str = "auto"  # auto | incremental | rebuild
    verify_full: bool = False
    chromadb_check: bool = True
    apply_pending: bool = False
    prune_orphan_dirs: bool = False
    drop_foreign_sql: bool = False
    chromadb_python: str | None = None  # the application's interpreter, for the chromadb post-check
    chromadb_sample: int = 100  # unrepaired rows the chromadb post-check self-queries
    deep: bool = False  # re-embed every row and replace stale vectors (STALE_VECTOR)
    sample: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        """The library checks what the CLI's options check (a library caller, e.g. the
        pytest fixture, passed strategy="fast" and got auto, or a negative seed and a
        numpy traceback deep in the plan)."""
        if self.strategy not in STRATEGIES:
            raise UsageProblem(f"strategy {self.strategy!r}: one of {', '.join(STRATEGIES)}")
        for name in ("sample", "chromadb_sample", "seed"):
            if why := whole_number_problem(name, getattr(self, name), 0):
                raise UsageProblem(why)


STRATEGIES = ("auto", "incremental", "rebuild")


@dataclass
class ReconcileReport:
    palace: str
    dry_run: bool
    plans: list[CollectionPlan] = field(default_factory=list)
    queue_floor: int | None = None
    stale: StaleRows | None = None  # leftover metadata/full-text rows to delete (STALE_ROWS)
    verifications: dict[str, Verification] = field(default_factory=dict)
    backup: str | None = None
    after: CheckReport | None = None
    chromadb: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prune_dirs: list[str] = field(default_factory=list)  # orphan segment folders to move to the backup
    left: list[str] = field(default_factory=list)  # findings deliberately left, with why (exit 4)
    foreign_sql: list[ForeignObject] = field(default_factory=list)  # triggers/views to drop (asked for)
    swapping: bool = field(default=False, repr=False)  # past this point a build folder may hold the old segment
    touched: bool = field(default=False, repr=False)  # a folder of the palace was swapped or moved out
    journal_rollback: bool = False  # a synced journal is (or, dry run: would be) rolled back first
    refusal: str | None = None  # dry run: why a real run would refuse (exit 8), e.g. no room for the repair

    @property
    def has_work(self) -> bool:
        return (any(p.has_work for p in self.plans) or self.queue_floor is not None or bool(self.prune_dirs)
                or bool(self.foreign_sql) or bool(self.stale) or self.journal_rollback)

    @property
    def unrepaired(self) -> list[str]:
        return [i for p in self.plans for i in p.unrepaired]

    @property
    def exit_code(self) -> int:
        if self.refusal:
            return EXIT_OPERATIONAL
        if self.unrepaired or self.left or (self.chromadb is not None and not self.chromadb.get("ok", False)):
            return EXIT_UNREPAIRED
        return EXIT_REPAIRED if self.has_work else EXIT_OK

    def to_json(self) -> dict:
        return {
            "schema": "chaosfix.reconcile/1",
            "palace": self.palace,
            "dry_run": self.dry_run,
            "exit_code": self.exit_code,
            "plans": [p.to_json() for p in self.plans],
            "queue_floor": self.queue_floor,
            "stale_rows": ({"ids": len(self.stale.ids), "metadata": len(self.stale.metadata),
                            "fulltext": len(self.stale.fulltext)} if self.stale else None),
            "journal_rollback": self.journal_rollback,
            "verification": {k: {a: b for a, b in vars(v).items() if a != "depth"}
                             for k, v in self.verifications.items()},
            "backup": self.backup,
            "after_consistent": self.after.consistent if self.after else None,
            "chromadb": self.chromadb,
            "timings": self.timings,
            "notes": self.notes,
            "left": self.left,
            "refusal": self.refusal,
            "foreign_sql_dropped": [o.describe() for o in self.foreign_sql],
        }


def _refuse_sql_damage(rep: CheckReport, root: Path) -> None:
    codes = rep.codes()
    gen = rep.generation
    if gen is not None and not gen.known and "SQLITE_CORRUPT" not in codes:
        raise OperationalError(f"{root}: palace written by a chromadb generation chaosfix does not know "
                               f"({gen.evidence[0]}); refusing to write to it")
    corrupt = next((f for f in rep.findings if f.code == "SQLITE_CORRUPT"), None)
    if corrupt is not None:
        foreign = next((f for f in rep.findings if f.code == "FOREIGN_SQL"), None)
        needs = next((x for x in (*corrupt.sample, corrupt.detail) if "no such collation" in x
                      or "no such function" in x), None)
        if needs and foreign is not None:  # not damage: an object someone added needs code chromadb lacks
            raise OperationalError(f"{root}: chroma.sqlite3 cannot be checked: {needs[:120]}, which "
                                   f"{', '.join(foreign.sample[:3])} (chromadb never creates it) needs; the data is "
                                   "not corrupt: drop that object with sqlite3, then rerun")
        why = corrupt.detail if corrupt.detail.startswith("chromadb's schema") else "PRAGMA quick_check fails"
        raise OperationalError(f"{root}: chroma.sqlite3 is corrupt ({why[:200]}); restore it first")


def _refuse_unsafe(rep: CheckReport, root: Path, opts: ReconcileOptions,
                   conn: sqlite3.Connection | None = None) -> list[ForeignObject]:
    """Refuse (exit 8, one line naming the object) a palace whose names, links or SQL
    would act: a non-UUID id, a symlinked segment, a foreign trigger/view on chromadb's
    tables (unless --drop-foreign-sql: then they are returned, to be dropped)."""
    for f in rep.findings:
        if f.code == "UNSAFE_ID":
            raise OperationalError(f"{root}: collection {shown(f.collection)}: {f.detail.split(';')[0]}; refused")
        if f.code == "SYMLINK" and f.severity == "error":
            raise OperationalError(f"{root}: {shown(f.sample[0])} is a symlink; chaosfix never follows symlinks "
                                   "in a palace: replace it with the real folder, then rerun")
    sql = PalaceSql(root / SQLITE_NAME, conn)  # under the lock: through our own connection
    try:
        foreign = schema_guard.inspect(sql.conn).dangerous
    finally:
        sql.close()
    if foreign and not opts.drop_foreign_sql:
        raise OperationalError(f"{root}: chroma.sqlite3 holds {foreign[0].describe()}, which chromadb never creates "
                               f"({len(foreign)} such object(s)); refusing to write (--drop-foreign-sql drops them "
                               "after saving their SQL in the backup)")
    for o in foreign:
        if o.type == "view" and o.name.lower() in schema_guard.CHROMA_TABLES:
            raise OperationalError(f"{root}: {o.describe()} stands in for chromadb's table; restore the table first")
    return foreign


def _refuse_links(root: Path) -> None:
    """Entries chaosfix writes or reads in place must not be symlinks (never followed)."""
    for name in (SQLITE_NAME, MARKER, LOCK_NAME, SQLITE_NAME + "-journal", SQLITE_NAME + "-wal"):
        if is_link(root / name):
            raise OperationalError(f"{root / name}: is a symlink; reconcile never writes through one "
                                   "(copy the real file into the palace, then rerun)")
    odd = odd_sidecars(root / SQLITE_NAME)
    if odd:  # (a FIFO would block SQLite's open, Ctrl-C included)
        raise OperationalError(f"{root}: {'; '.join(odd)}, where SQLite keeps a regular file; "
                               "move it out of the palace, then rerun")
    for d in root.iterdir():
        if d.name.startswith((BUILD_PREFIX, OLD_PREFIX)) and is_link(d):
            raise OperationalError(f"{d}: is a symlink named like chaosfix's own folder; remove it, then rerun")


def _recover_own_leftovers(root: Path, notes: list[str]) -> None:
    """Clear what an interrupted chaosfix left. Build/old folders are never deleted here
    (one may be the only copy of the old segment): a missing segment gets its folder
    back, anything else moves to a recovered-folder beside the palace. A hot journal is
    rolled back only when our marker proves it is ours (a read-write open does it)."""
    _drop_partial_moves(root, notes)  # first: the room they take is what the moves below need
    stash: Path | None = None
    for d in sorted(root.iterdir()):
        prefix = next((x for x in (BUILD_PREFIX, OLD_PREFIX) if d.name.startswith(x)), None)
        if prefix is None or is_link(d) or not d.is_dir() or not is_uuid(d.name[len(prefix):]):
            continue  # only our own names: a prefix plus a segment UUID, a real folder
        seg = d.name[len(prefix):]
        if not (root / seg).exists() and prefix == OLD_PREFIX:
            os.rename(d, root / seg)  # two-rename fallback interrupted between its renames
            notes.append(f"restored segment {seg} from an interrupted swap")
        else:
            if prefix == BUILD_PREFIX:
                _drop_links_to_live(d, root / seg)
            if stash is None:
                stash = _new_dir(root.parent / f"{sibling_stem(root)}.chaosfix-recovered-{time.strftime('%Y%m%d-%H%M%S')}")
            move_out(d, stash / d.name)
            notes.append(f"moved leftover {d.name} to {stash}")
    marker = root / MARKER
    if marker.exists():
        conn = sqlite3.connect(str(root / SQLITE_NAME), timeout=1.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # rolls back a hot journal
        finally:
            conn.close()
        marker.unlink()
        notes.append("rolled back an interrupted chaosfix transaction")
    fsync_path(root)


def _is_partial_move(name: str) -> bool:
    """``name`` is one ``move_out`` or ``back_up`` gives a copy in progress: ``.`` + a
    segment folder, one of our leftover folders, the stale journal or the db's copy after
    a journal's rollback + ``.moving``."""
    if not (name.startswith(".") and name.endswith(".moving")):
        return False
    moved = name[1 : -len(".moving")]
    prefix = next((x for x in (BUILD_PREFIX, OLD_PREFIX) if moved.startswith(x)), "")
    return moved in (JOURNAL, ROLLED_BACK) or is_uuid(moved[len(prefix):])


PARTIAL_BACKUP = ".chaosfix-part-"  # a backup being made: ``.<palace>.chaosfix-part-<time>``


def _own_names(root: Path) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The exact names chaosfix gives folders beside the palace ``root``: its backup and
    recovered folders, and a backup still being made (``_new_backup``; before its
    ``.chaosfix-part-`` name, 2026-12-02's releases made it as
    ``.<palace>.chaosfix-backup-<time>[.<random>|-N].moving``)."""
    stems = sibling_stems_re(root)
    return (own_folders_re(root, "backup", "recovered"),
            re.compile(rf"\.{stems}(?:{re.escape(PARTIAL_BACKUP)}{STAMP}"
                       rf"|\.chaosfix-backup-{STAMP}(?:\.[A-Za-z0-9_]+)?\.moving)"))


def _unfinished_beside(root: Path) -> bool:
    """A backup still being made is beside the palace: a run was interrupted (perhaps by a
    power cut that also took the lock file, which is never fsynced)."""
    unfinished = _own_names(root)[1]
    try:
        return any(unfinished.fullmatch(n) for n in os.listdir(root.parent))
    except OSError:
        return False


def _drop_partial_moves(root: Path, notes: list[str]) -> None:
    """What an interrupted run left half made beside the palace, which is only garbage:
    a backup folder killed while its db files were copied (``_new_backup``: its partial
    folder); a partial ``.<name>.moving`` in a backup or recovered folder, from a move
    across file systems (``move_out``: its source is still whole in the palace, as the
    rename into place comes first and the removal last) or the db's copy after a
    journal's rollback (``back_up``); and a backup or recovered folder left empty (a
    kill before anything was moved into it). Only chaosfix's exact names for this palace
    are looked at (the parent's other entries are not even stat'ed: a dead mount there
    must not stop this), nothing is followed through a symlink, and an entry that cannot
    be read or removed is noted, not fatal."""
    ours, unfinished = _own_names(root)
    try:
        names = sorted(n for n in os.listdir(root.parent) if ours.fullmatch(n) or unfinished.fullmatch(n))
    except OSError as exc:
        notes.append(f"left a partial copy beside the palace: {exc}")
        return
    for name in names:
        folder = root.parent / name
        try:
            if unfinished.fullmatch(name):
                shutil.rmtree(folder)  # (refuses a symlink; never follows one inside)
                notes.append(f"removed {folder}, a backup an interrupted run left unfinished")
                continue
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                for entry in os.listdir(fd):
                    if not _is_partial_move(entry):
                        continue
                    if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                        shutil.rmtree(entry, dir_fd=fd)
                    else:
                        os.unlink(entry, dir_fd=fd)
                    notes.append(f"removed {folder / entry}, a copy an interrupted move left")
                empty = not os.listdir(fd)
            finally:
                os.close(fd)
            if empty:
                folder.rmdir()  # (a symlink put there since is refused: ENOTDIR)
                notes.append(f"removed the empty {folder}")
        except (FileNotFoundError, NotADirectoryError):
            continue  # (not a folder, or gone)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: never ours
                continue
            notes.append(f"left a partial copy beside the palace: {exc}")


def _drop_links_to_live(build: Path, live: Path) -> None:
    """A build killed between its hard link and the copy replacing it (linked)
    holds a second name of the live segment's file: drop that name (the palace keeps the
    file), so nothing can ever write the palace through the leftover or its backup."""
    for f in build.iterdir():
        try:
            a, b = f.stat(follow_symlinks=False), (live / f.name).stat(follow_symlinks=False)
        except OSError:
            continue
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            f.unlink()


def _new_dir(base: Path, suffix: str = "") -> Path:
    """Create ``base``, or ``base-2``, ``base-3``... (then ``suffix``): a rerun in the same
    second as a killed run must not collide with the folder that run left
    (FileExistsError, exit 8). mkdir never follows a planted symlink: an existing entry
    of any kind is skipped."""
    n = 1
    while True:
        d = base.with_name(f"{base.name}{'' if n == 1 else f'-{n}'}{suffix}")
        try:
            mkdir_new(d)
            fsync_path(d.parent)  # the folder's own entry must survive a power cut
            return d
        except FileExistsError:
            n += 1


def _new_backup(root: Path, rep: ReconcileReport, files: tuple[str, ...], optional: tuple[str, ...] = ()) -> Path:
    """A new backup folder beside the palace (recorded as ``rep.backup``) holding copies
    of the palace's ``files`` (each must exist) and ``optional`` files (when they do),
    all of them or none: they are copied into a partial folder
    (``.<palace>.chaosfix-part-<time>``), fsynced, and the folder is renamed into place, so a db is never found apart from its
    journal or WAL (a db whose hot journal is missing is malformed). A file that changes
    meanwhile (another program's SQLite rolling the journal back) stops it. A kill
    leaves the partial folder, which the rerun removes; an error or Ctrl-C removes it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # (the partial name is no longer than the backup's: a long palace name fits both)
    tmp = _new_dir(root.parent / f".{sibling_stem(root)}{PARTIAL_BACKUP}{stamp}")
    try:
        seen: dict[str, tuple[int, int, int]] = {}
        for name in (*files, *optional):
            if name in optional and not (root / name).is_file():
                continue
            seen[name] = _identity(root / name)
            copy_locked(root / name, tmp / name)  # (under our SQLite lock: never opened here)
            fsync_path(tmp / name)
        for name, ident in seen.items():
            if _identity(root / name) != ident:
                raise OperationalError(f"{root}: {name} changed while chaosfix backed it up (is chromadb "
                                       "running?); nothing was changed")
        fsync_path(tmp)
        killpoint("copied")
        _place(tmp, root.parent / f"{sibling_stem(root)}{BACKUP_GLOB}{stamp}", rep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(root.parent)
    return Path(rep.backup)


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _place(folder: Path, base: Path, rep: ReconcileReport) -> None:
    """Rename ``folder`` to ``base``, or ``base-2``, ``base-3``..., never onto an existing
    entry (a plain rename would replace an empty folder), and record it as
    ``rep.backup``. Ctrl-C waits until both are done: a backup in place that the run
    does not know of would outlive a repair stopped before any change, and one recorded
    but not placed would name another run's backup."""
    with interrupts_deferred():
        n = 1
        while True:
            dst = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                placed = rename_noreplace(folder, dst)
                if not placed and not os.path.lexists(dst):  # (no renameat2 here: a plain rename)
                    os.rename(folder, dst)
                    placed = True
            except FileExistsError:
                placed = False
            if placed:
                rep.backup = str(dst)
                return
            n += 1


def reconcile_palace(path: str | Path, opts: ReconcileOptions | None = None,
                     progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
                     ) -> ReconcileReport:
    """Repair a palace. See the module docstring for the order of work."""
    opts = opts or ReconcileOptions()
    say = log or (lambda _m: None)
    # absolute, lexically (links stay links: they are refused below): "." or "sub/.." has
    # no name and no parent, and the backup, the post-check's copy and the recovered
    # leftovers, all made "beside the palace", went inside it
    root = Path(os.path.abspath(palace_db(path).parent))
    rep = ReconcileReport(palace=str(root), dry_run=opts.dry_run)
    from chaosfix.embedders.resolve import MEMPALACE_MINILM

    for ref in opts.embedder if isinstance(opts.embedder, (list, tuple)) else [opts.embedder]:
        if isinstance(ref, str) and ":" not in ref and ref.strip().lower() not in MEMPALACE_MINILM:
            raise UsageProblem(f"--embedder {ref!r}: expected MODULE:ATTR, or default/minilm")
    selector = EmbedderSelector(root, opts.embedder, opts.trust_embedder, seed=opts.seed)
    try:
        return _reconcile(root, rep, opts, selector, progress, say)
    finally:
        selector.close()


def _reconcile(root: Path, rep: ReconcileReport, opts: ReconcileOptions, embedder: EmbedderSelector,
               progress: ProgressFn | None, say: Callable[[str], None]) -> ReconcileReport:
    t0 = time.perf_counter()
    _refuse_links(root)
    if not opts.dry_run and ((root / MARKER).exists() or (root / LOCK_NAME).exists() or any(
            d.name.startswith((BUILD_PREFIX, OLD_PREFIX)) for d in root.iterdir()) or _unfinished_beside(root)):
        with PalaceLock(root):
            _recover_own_leftovers(root, rep.notes)
    if not opts.dry_run:
        from chaosfix.chromadb_probe import clear_stale_copies, stale_copies

        if stale_copies(root):
            with PalaceLock(root):
                rep.notes += [f"removed {n}, a copy an interrupted post-check left" for n in clear_stale_copies(root)]
    # the leftover journal is the evidence of a 0.6 persist inside a rolled-back
    # transaction (INDEX_AHEAD): note which segments it covers before rolling it back
    journal = (root / JOURNAL).exists()
    suspects = {d.name for d in root.iterdir() if UUID_RE.match(d.name) and d.is_dir()
                and written_in_rollback(d, root / SQLITE_NAME)} if journal else set()
    if journal and journal_synced(root / SQLITE_NAME):
        _roll_back_journal(root, rep, opts)
    first_look = _fingerprint(root)
    before = _check(root, opts, suspects)
    _refuse_sql_damage(before, root)
    rep.foreign_sql = _refuse_unsafe(before, root, opts)
    started: StartedChild | None = None  # the post-check's chromadb child, started ahead
    early: EarlyCopy | None = None  # the post-check's copy, begun before the build
    if (not opts.dry_run and opts.chromadb_check and before.generation is not None
            and any(f.severity != INFO for f in before.findings)):
        from chaosfix.chromadb_probe import start_post_check

        # a bad --chromadb-python is exit 8 here, before any change; the child imports
        # chromadb (2-3 s of a CPU) while the plan is made on one CPU, not beside the
        # build's two threads
        started = start_post_check(before.generation, opts.chromadb_python)
    try:
        rep.plans, rep.queue_floor, rep.prune_dirs, rep.stale = _plan_all(root, before, None, embedder, opts)
        rep.left += [p.unrepaired_reason for p in rep.plans if p.unrepaired_reason]
        orphans = before.codes().get("SEGMENT_DIR_ORPHAN", 0)
        if orphans and not opts.prune_orphan_dirs:
            rep.notes.append(f"{orphans} segment folder(s) no segment owns left in place (chromadb never reads "
                             "them); --prune-orphan-dirs moves them into the backup")
        rep.timings["plan"] = time.perf_counter() - t0
        work = bool(any(p.has_work for p in rep.plans) or rep.queue_floor is not None or rep.prune_dirs
                    or rep.foreign_sql or rep.stale)
        short = None
        if work:  # (the child is started ahead only when a finding called for it before the plan)
            post = started is not None or (opts.chromadb_check and before.generation is not None
                                           and _post_check_runs(before.generation, opts))
            short = (_short_of_space(root, rep, opts, post) or _path_unusable(root, rep, post)
                     or _not_writable(root, rep, opts, post))
            if opts.dry_run and not short:  # what the real run meets when it takes the lock
                short = _held_elsewhere(root)
        if short and opts.dry_run:
            rep.refusal = rep.refusal or short  # (the journal's rollback refused first)
        if opts.dry_run or not work:
            if rep.journal_rollback and not opts.dry_run:
                rep.after = check_palace(root, opts.collection)
            return rep
        if short:
            if rep.journal_rollback:  # (done first, with its own backup)
                kept = f" (backup: {rep.backup})" if rep.backup else ""
                short = short.replace("nothing was changed", f"only the leftover journal was rolled back{kept}")
            raise OperationalError(short)
        killpoint("planned")
        with PalaceLock(root):
            held = _held_elsewhere(root)
            if held:
                raise OperationalError(held)
            conn = sqlite3.connect(str(root / SQLITE_NAME), timeout=0.5, isolation_level=None)
            try:
                # nothing a trigger or view would do may run; rows only in max_seq_id/WAL
                _guard(conn, rep)
                try:
                    conn.execute("BEGIN EXCLUSIVE")
                except sqlite3.OperationalError as exc:
                    raise OperationalError(f"{root}: chroma.sqlite3 is busy ({exc}); is chromadb running?") from None
                create_new(root / MARKER, str(os.getpid()).encode())
                fsync_path(root)
                killpoint("locked")
                # re-plan under the lock if any palace file changed since the first look
                if _fingerprint(root) != first_look:
                    rep.notes.append("the palace changed since the first look: planned again under the lock")
                    before = _check(root, opts, suspects, conn)
                    _refuse_sql_damage(before, root)
                    rep.foreign_sql = _refuse_unsafe(before, root, opts, conn)
                    rep.plans, rep.queue_floor, rep.prune_dirs, rep.stale = _plan_all(root, before, conn, embedder, opts)
                    rep.left = [x for x in rep.left if "INDEX_AHEAD" not in x]
                    rep.left += [p.unrepaired_reason for p in rep.plans if p.unrepaired_reason]
                _guard(conn, rep)  # (the plan under the lock may differ)
                rows_before = schema_guard.RowFingerprint.take(conn, _stale_tables(rep))
                post_check = None
                if opts.chromadb_check and before.generation is not None:
                    if started is not None:  # it will run: its copy begins beside the build
                        from chaosfix.chromadb_probe import EarlyCopy

                        early = EarlyCopy(root, {p.segment for p in rep.plans if p.index_changes and p.segment},
                                          rep.prune_dirs)
                    post_check = partial(_post_check, root, rep, before.generation, opts, progress, started, early)
                _execute(root, conn, rep, opts, progress, say, rows_before, post_check)
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
                (root / MARKER).unlink(missing_ok=True)
                if rep.swapping:  # an exchanged build folder holds the old segment: keep it
                    try:
                        _recover_own_leftovers(root, rep.notes)
                    except OSError as again:  # (a full parent): the rerun recovers them; say the first error
                        rep.notes.append(f"leftovers stay in the palace for the rerun: {again}")
                else:
                    for d in root.iterdir():
                        if d.name.startswith(BUILD_PREFIX) and not is_link(d):
                            shutil.rmtree(d, ignore_errors=True)
                _drop_useless_backup(rep)
                if isinstance(exc, (OSError, sqlite3.Error)) and not isinstance(exc, ChaosfixError):
                    # a full disk ("database or disk is full" from SQLite), a file system gone read-only,
                    # a constraint of the palace's own schema refusing the repair's write
                    raise OperationalError(_stopped_by(root, exc, rep.touched)) from None
                raise
            conn.close()
            (root / MARKER).unlink(missing_ok=True)
            fsync_path(root)
            killpoint("committed")
            rep.timings["total_repair"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            rep.after = check_palace(root, opts.collection)
            rep.timings["after_check"] = rep.timings["post_verify"] = time.perf_counter() - t1
    finally:
        if started is not None:  # used and closed by the post-check, or never used
            started.close()
        if early is not None:  # taken (and removed) by the post-check, or never taken
            early.discard()
    return rep


def _stopped_by(root: Path, exc: OSError | sqlite3.Error, touched: bool) -> str:
    """One line for a system or SQLite error that stopped a repair: the file, the
    system's words, and what state the palace is in."""
    if isinstance(exc, OSError):
        what, full = os_error_line(exc), exc.errno == errno.ENOSPC
    else:
        what = "chroma.sqlite3: " + (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        full = "full" in what
    state = ("it had begun changing the palace: run reconcile again to finish it" if touched
             else "nothing was changed")
    hint = " (free some space beside the palace and run it again)" if full else ""
    return f"{root}: the repair stopped: {what}; {state}{hint}"


def _post_check_runs(gen: Generation, opts: ReconcileOptions) -> bool:
    """A real run would run chromadb's post-check (a dry run starts no child to tell)."""
    from chaosfix.chromadb_probe import plan_post_check

    return plan_post_check(gen, opts.chromadb_python)[1] is None


def _sql_changes(rep: ReconcileReport) -> bool:
    """The repair writes chroma.sqlite3 (and so backs it up first)."""
    return (any(p.seq_writes for p in rep.plans) or rep.queue_floor is not None or bool(rep.foreign_sql)
            or bool(rep.stale))


def _makes_backup(rep: ReconcileReport, opts: ReconcileOptions) -> bool:
    """This run makes a backup folder (the journal rollback's aside): pruned folders,
    dropped SQL and deleted leftovers always go to one, replaced files unless
    ``--no-backup``."""
    return bool((opts.backup and rep.has_work) or rep.prune_dirs or rep.foreign_sql or rep.stale)


def _short_of_space(root: Path, rep: ReconcileReport, opts: ReconcileOptions, post_check: bool) -> str | None:
    """The refusal's text when the palace's file system cannot hold what the repair
    writes (``space``), else None."""
    # a dry run has not rolled the journal back: its backup (which then also takes the
    # repair's copy of the db) and its writes come on top, as a real run's free space shows
    pending = opts.dry_run and rep.journal_rollback
    backup = rep.backup is not None or _makes_backup(rep, opts) or (pending and opts.backup)
    sql_backup = _sql_changes(rep) and backup
    if not (any(p.index_changes for p in rep.plans) or sql_backup or rep.prune_dirs or rep.stale):
        return None
    from chaosfix.chromadb_probe import COPY_PREFIX  # (a killed probe's folder is a stale copy to clear)

    stale_ids = len(rep.stale.ids) if rep.stale else 0

    def short(clones: bool) -> str | None:
        need = space.space_needed(root, rep.plans, post_check, sql_backup, rep.prune_dirs, clones, backup=backup,
                                  stale_ids=stale_ids)
        if pending:
            rolled = space.rollback_need(root, opts.backup)
            need.restored, need.journal_backup = rolled.restored, rolled.journal_backup
        return space.shortage(root, need)

    # every copy counted whole first; only when that does not fit is the file system asked
    # whether it clones (a dry run writes nothing, not even that probe)
    whole = short(clones=False)
    if whole is None or opts.dry_run or not space.clones_files(root.parent, f".{sibling_stem(root)}{COPY_PREFIX}"):
        return whole
    return short(clones=True)


def _drop_useless_backup(rep: ReconcileReport) -> None:
    """After a failed run: a backup folder holding only our copies of SQL that stayed
    unchanged (rolled back) is removed; one holding a moved segment, folder or journal
    is the only copy of it and stays."""
    if rep.backup is None:
        return
    b = Path(rep.backup)
    ours = {SQLITE_NAME, SQLITE_NAME + "-wal", FOREIGN_SQL_FILE}
    try:
        names = {e.name for e in os.scandir(b)}
    except OSError:
        return
    if names <= ours and not is_link(b):
        shutil.rmtree(b, ignore_errors=True)
        rep.backup = None


def _post_check(root: Path, rep: ReconcileReport, gen: Generation, opts: ReconcileOptions,
                progress: ProgressFn | None, started: StartedChild | None, early: EarlyCopy | None,
                verify: Verify, built: dict[str, Path]) -> dict:
    """chromadb's judgement of the palace the swap will make: a throwaway copy of it (the
    built folders in place of the old ones, the repair's SQL written), made while
    ``verify`` (chaosfix's own verification) runs here, and judged by chromadb in its
    own process: beside the verification where the machine can hold both indexes
    (``loads_beside``), else once the verification has freed its own. The rows and the
    sample come from the plans' states (reconcile never writes a row); each
    collection's quirk rate from its verification, read once it has run."""
    from chaosfix.chromadb_probe import Target, loads_beside, verify_with_chromadb
    from chaosfix.sysmem import available_memory

    targets: dict[str, Target] = {}
    for p in rep.plans:
        st = p.state
        if not p.has_work or st is None:
            continue
        repaired = {i: p.vectors[i] for i in (*p.add, *p.replace) if i in p.vectors}
        targets[p.collection] = Target(p.collection, st.info.space, repaired, _post_check_sample(p, opts),
                                       expect_count=_expected_count(p), kept=p.kept_before,
                                       collection=st.info.name, tenant=st.info.tenant, database=st.info.database)

    verified = threading.Event()  # chaosfix's verification has ended: chromadb's child may load
    others = [root / p.segment for p in rep.plans  # (judged by chromadb, loaded as they are)
              if p.collection in targets and p.segment and is_uuid(p.segment) and p.segment not in built
              and (root / p.segment).is_dir() and not is_link(root / p.segment)]
    beside = loads_beside(list(built.values()), available_memory(), others)
    if beside:  # (the machine holds both indexes: no need to wait)
        verified.set()

    def meanwhile() -> None:
        try:
            verify()
        finally:
            release_freed_memory()  # (the index's link lists, freed into glibc's heap)
            verified.set()  # (also after a failure: the caller then kills the child)
        for name, t in targets.items():
            v = rep.verifications.get(name)
            t.quirk_rate = v.unreachable / v.queried if v is not None and v.queried else 0.0
            t.depth = v.depth if v is not None else None  # (graph proof) asked only if chromadb misses

    def prepare(db: Path) -> None:
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            _guard(conn, rep)
            conn.execute("BEGIN EXCLUSIVE")
            _write_sql(conn, rep)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OperationalError(f"{root}: the post-check's copy refused the repair's SQL ({exc}); "
                                   "nothing was changed") from None
        finally:
            conn.close()

    if started is None:  # (no finding called for it before the plan): started here, so a
        from chaosfix.chromadb_probe import start_post_check  # failed verification can kill it

        started = start_post_check(gen, opts.chromadb_python)
    out = verify_with_chromadb(root, list(targets.values()), gen, opts.chromadb_python, seed=opts.seed,
                               progress=progress, started=started, meanwhile=meanwhile, built=built,
                               skip=rep.prune_dirs, prepare=prepare, early=early, verified=verified)
    if "skipped" not in out:
        out["beside_verification"] = beside
    return out


def _path_unusable(root: Path, rep: ReconcileReport, post: bool) -> str | None:
    """hnswlib takes its folder as UTF-8 text, and the post-check hands chromadb the path
    in JSON: a palace path with a byte that is not UTF-8 (it reaches Python as a
    surrogate escape) can be neither built nor post-checked, by chaosfix or chromadb."""
    if not post and not any(p.index_changes for p in rep.plans):
        return None
    try:
        str(root).encode("utf-8")
    except UnicodeEncodeError:
        return (f"{shown(str(root), 160)}: the palace's path is not UTF-8, which hnswlib (chromadb's index "
                "library) cannot open; move the palace to a UTF-8 path, then rerun; nothing was changed")
    return None


def _not_writable(root: Path, rep: ReconcileReport, opts: ReconcileOptions, post: bool) -> str | None:
    """A folder the repair must write and this user cannot (or a read-only file system):
    the palace (its lock, its swaps), each segment folder it moves out (a rename into
    another folder writes the folder's own '..'), and the parent, where the backup and
    the post-check's copy go. Asked before any change, so the dry run says it too."""
    need = [(root, "the palace")]
    need += [(root / p.segment, "a segment folder the repair moves") for p in rep.plans
             if p.index_changes and p.segment and (root / p.segment).is_dir()]
    need += [(root / d, "a folder the repair moves") for d in rep.prune_dirs]
    if opts.backup or post:
        need.append((root.parent, "the folder the backup and the post-check's copy go in"))
    for where, what in need:
        if not os.access(where, os.W_OK | os.X_OK):
            try:
                ro = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
            except OSError:
                ro = False
            why = "on a read-only file system" if ro else f"not writable by this user ({os.strerror(errno.EACCES)})"
            return f"{where}: {what} is {why}; nothing was changed"
    return None


def _held_elsewhere(root: Path) -> str | None:
    """The refusal when another process (chromadb, an app) has palace files open."""
    holders = other_holders(root)
    return f"{root}: palace files are open in process(es) {holders[:5]}; close them first" if holders else None


def _post_check_sample(p: CollectionPlan, opts: ReconcileOptions) -> list[str]:
    """The rows the post-check asks beside the repaired ones: a seeded sample of the rest
    (rows with no vector source are listed, exit 4, not chromadb's to find). Drawn once
    per plan: a rebuild reads the sample's old vectors before the post-check asks it."""
    assert p.state is not None
    if p.post_check_sample is not None:
        return p.post_check_sample
    repaired, left = {*p.add, *p.replace}, set(p.unrepaired) | p.state.replay_removes
    rest = list(itertools.filterfalse(repaired.__contains__, p.state.sql_rows))  # in C: 10^5..10^6 rows
    if left:
        rest = [i for i in rest if i not in left]
    p.post_check_sample = random.Random(opts.seed).sample(rest, min(opts.chromadb_sample, len(rest)))
    return p.post_check_sample


def _kept_sample(p: CollectionPlan, opts: ReconcileOptions) -> dict[str, np.ndarray]:
    """A rebuild's sampled kept rows -> the vector chromadb returned for each before (read
    from the old index, before its facts are dropped): a rebuild in the wrong space or
    without length.bin would change them all. (An incremental repair keeps their bytes.)"""
    if p.strategy != "rebuild" or p.state is None or p.state.files is None:
        return {}
    ids = [i for i in _post_check_sample(p, opts) if i in p.keep]
    return dict(zip(ids, build_mod.kept_vectors(p, ids))) if ids else {}


def _expected_count(p: CollectionPlan) -> int | None:
    """The count chromadb must report once the repair lands: every SQL row (reconcile
    never writes one), unless WAL rows stay pending for chromadb to replay. Unknown
    (None) when a max_seq_id is poisoned or missing: the pending rows were counted from
    it, and the repair rewrites it."""
    st = p.state
    assert st is not None
    if any(s is None or s.poisoned for s in (st.vector_seq, st.metadata_seq)):
        return None
    left = st.pending if not p.index_changes else [w for w in st.pending if w.seq_id > st.reflected_seq]
    return None if left else len(st.sql_rows)


def _check(root: Path, opts: ReconcileOptions, suspects: set[str], conn: sqlite3.Connection | None = None
           ) -> CheckReport:
    rep = check_palace(root, opts.collection, conn=conn, for_repair=True)
    for st in rep.states:
        if (st.seg_dir is not None and st.seg_dir.name in suspects and st.idmap is not None
                and st.idmap.fmt == "object"):  # only 0.6 persists inside the transaction
            if not st.written_in_rollback and not any(f.severity == ERROR and f.collection == st.info.label
                                                      for f in rep.findings):
                rep.findings.append(Finding("INDEX_AHEAD", WARNING, st.info.label, st.info.vector_segment, 1, [],
                                            "data_level0.bin written by a transaction that rolled back"))
            st.written_in_rollback = True
    return rep


def _roll_back_journal(root: Path, rep: ReconcileReport, opts: ReconcileOptions) -> None:
    """A synced journal: chroma.sqlite3 may hold pages of a transaction that never
    committed, and SQLite rolls them back at the next read-write open (chromadb's next
    start). Do exactly that here, under the lock and with no other process on the
    palace, after copying the db and the journal into the backup, so one run repairs
    everything. A kill during SQLite's rollback leaves the journal for the next run."""
    rep.journal_rollback = True
    short = space.shortage(root, space.rollback_need(root, opts.backup))
    if opts.dry_run:
        rep.notes.append("would roll back the interrupted transaction in chroma.sqlite3-journal (as SQLite does)")
        rep.refusal = short
        return
    if short:
        raise OperationalError(short)
    with PalaceLock(root):
        holders = other_holders(root)
        if holders:
            raise OperationalError(f"{root}: palace files are open in process(es) {holders[:5]}; close them first")
        if opts.backup:
            try:
                _new_backup(root, rep, (SQLITE_NAME, JOURNAL))
            except OSError as exc:
                raise OperationalError(_stopped_by(root, exc, touched=False)) from None
        conn = sqlite3.connect(str(root / SQLITE_NAME), timeout=1.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # SQLite rolls the journal back
        except sqlite3.Error as exc:
            raise OperationalError(f"{root}: SQLite could not roll back chroma.sqlite3-journal: {exc}") from None
        finally:
            conn.close()
        if (root / JOURNAL).exists() and journal_synced(root / SQLITE_NAME):
            raise OperationalError(f"{root}: chroma.sqlite3-journal is still hot after SQLite's rollback")
        fsync_path(root)
    rep.notes.append("rolled back the interrupted transaction in chroma.sqlite3-journal"
                     + (f" (db and journal copied to {rep.backup})" if rep.backup else ""))


def _fingerprint(root: Path) -> list[tuple[str, int, int, int]]:
    """(path, size, mtime_ns, inode) of every palace file but our own lock and marker: any
    write by chromadb or another tool changes it, so an unchanged one lets the plan made
    at the first look stand once the lock is held. A WAL-mode palace's ``-shm`` (an index
    of the WAL that every reader writes) and an empty ``-wal`` (no commit in it) are not
    content: opening the repair's own connection creates both."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and rel not in (LOCK_NAME, MARKER, SQLITE_NAME + "-shm"):
            st = p.stat()
            if rel != SQLITE_NAME + "-wal" or st.st_size:
                out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def _plan_all(root: Path, rep: CheckReport, conn: sqlite3.Connection | None, embedder: EmbedderSelector,
              opts: ReconcileOptions) -> tuple[list[CollectionPlan], int | None, list[str], StaleRows | None]:
    """Plans per collection, the WAL floor seq_id (QUEUE_RESET), orphan folders to prune,
    leftover rows to delete (STALE_ROWS)."""
    sql = PalaceSql(root / SQLITE_NAME, conn)
    try:
        stale = deep_findings(sql, rep, embedder) if opts.deep else {}
        plans = [plan_collection(sql, st, rep, embedder.for_collection, opts.strategy, opts.apply_pending,
                                 stale.get(st.info.id)) for st in rep.states]
        floor = None
        if "QUEUE_RESET" in rep.codes():
            seqs = [s.value for s in sql.max_seq_ids().values() if not s.poisoned]
            seqs += [w.value for p in plans for w in p.seq_writes]
            floor = max(seqs, default=0)
        prune: list[str] = []
        if opts.prune_orphan_dirs and opts.collection is None and "SEGMENT_DIR_ORPHAN" in rep.codes():
            known = sql.all_segment_ids()
            prune = sorted(d.name for d in root.iterdir()
                           if d.is_dir() and UUID_RE.match(d.name) and d.name not in known)
        return plans, floor, prune, (sql.stale_rows() or None) if "STALE_ROWS" in rep.codes() else None
    finally:
        sql.close()


def _execute(root: Path, conn: sqlite3.Connection, rep: ReconcileReport, opts: ReconcileOptions,
             progress: ProgressFn | None, say: Callable[[str], None], rows_before: schema_guard.RowFingerprint,
             post_check: Callable[[Verify, dict[str, Path]], dict] | None = None) -> None:
    """Backup, build, verify (then chromadb's post-check on a copy of the palace to be),
    swap, write the SQL, commit. Every SQL write happens after the swap, in one
    transaction, by ``_write_sql``: the post-check's copy gets the same writes."""
    sql_changes = _sql_changes(rep)
    backup_dir = None
    if rep.backup is not None:  # made by the journal rollback: one backup per run
        backup_dir = Path(rep.backup)
        if sql_changes:
            back_up(root / SQLITE_NAME, backup_dir / ROLLED_BACK)
    elif _makes_backup(rep, opts):  # (deleted leftovers are often a record's only remaining text)
        # SQLite's backup API refuses a source connection inside a write transaction
        # (SQLITE_LOCKED, retried forever), and releasing our EXCLUSIVE lock to run it
        # would let a writer in. Under EXCLUSIVE with nothing written yet, the file is a
        # consistent, committed snapshot, so a plain copy is the same backup (with its
        # -wal when another tool put it in WAL mode: committed pages live there).
        if sql_changes:
            say(f"backing up chroma.sqlite3 beside the palace, in {root.parent}")
        backup_dir = _new_backup(root, rep, (SQLITE_NAME,) if sql_changes else (),
                                 optional=(SQLITE_NAME + "-wal",) if sql_changes else ())
    _clear_stale_journal(root, backup_dir)
    if rep.foreign_sql:  # dropped with the other SQL writes, after the swap
        assert backup_dir is not None
        create_new(backup_dir / FOREIGN_SQL_FILE,
                   "".join(f"{o.sql};\n" for o in rep.foreign_sql).encode())
    killpoint("backed-up")
    work = [p for p in rep.plans if p.index_changes]
    built: dict[str, Path] = {}
    t = time.perf_counter()
    for p in work:
        assert p.segment is not None and is_uuid(p.segment)
        out = ensure_inside(root / f"{BUILD_PREFIX}{p.segment}", root)
        say(f"building {p.collection} ({p.strategy}: +{len(p.add)} ~{len(p.replace)} -{len(p.remove_labels)})")
        build_mod.build(p, out, progress, sync=False)
        built[p.segment] = out
    # on disk before the swap; the verification and the post-check's copy read meanwhile
    syncing = Syncing(list(built.values()))
    for p in work:
        assert p.state is not None
        if opts.chromadb_check:
            p.kept_before = _kept_sample(p, opts)
        p.state.drop_index_facts()  # nothing reads the old map or slots past the build
    rep.timings["build"] = time.perf_counter() - t
    killpoint("built")
    t = time.perf_counter()

    def verify() -> None:
        for p in work:
            assert p.segment is not None and p.state is not None
            say(f"verifying {p.collection}")
            planned = {i: p.vectors[i] for i in (*p.add, *p.replace)}
            v = verify_segment(built[p.segment], p.state.info.space,
                               set(p.state.sql_rows) - set(p.unrepaired) - set(p.replay_removes),
                               planned, sample=opts.sample, seed=opts.seed, full=opts.verify_full, ef=EF_FIRST,
                               ef_max=EF_MAX, progress=progress, map_digest=p.map_digest, graph=True,
                               gate_ef=EF_GATE)
            v.unrepaired = len(p.unrepaired)
            v.zero_diff = v.zero_diff and not p.unrepaired  # SQL ids == index ids holds only with none left
            rep.verifications[p.collection] = v
            if not v.ok:
                raise OperationalError(f"verification of the {p.strategy} repair of {p.collection} failed: {v.problems[0]}; "
                                       "nothing was changed")
        rep.timings["verify"] = time.perf_counter() - t

    if post_check is None:
        verify()
    else:
        # chromadb judges a copy of the palace the swap will make: the copy is made while
        # chaosfix verifies (it waits on the kernel), chromadb's child works beside it or after
        rep.chromadb = post_check(verify, built)
        rep.timings["chromadb_check"] = time.perf_counter() - t
        if not rep.chromadb.get("ok", False):
            why = (rep.chromadb.get("errors") or [rep.chromadb.get("error") or "no verdict"])[0]
            raise OperationalError(f"chromadb's post-check of the repaired palace failed ({str(why)[:300]}); "
                                   "nothing was changed")
    syncing.wait()
    killpoint("verified")
    rep.swapping = True
    rep.touched = bool(work or rep.prune_dirs)
    for p in work:
        assert p.segment is not None
        live = ensure_inside(root / p.segment, root)
        new = built[p.segment]
        if not live.exists():
            os.rename(new, live)
        elif not exchange(new, live):
            old = root / f"{OLD_PREFIX}{p.segment}"
            os.rename(live, old)
            os.rename(new, live)
            new = old
        else:
            os.rename(new, root / f"{OLD_PREFIX}{p.segment}")
            new = root / f"{OLD_PREFIX}{p.segment}"
        fsync_path(root)
        killpoint("swapped")
        if new.exists():
            if backup_dir is not None:
                move_out(new, backup_dir / p.segment)
            else:
                shutil.rmtree(new)
        killpoint("old-moved")
    for name in rep.prune_dirs:
        assert backup_dir is not None and is_uuid(name)
        move_out(ensure_inside(root / name, root), backup_dir / name)
        rep.notes.append(f"moved orphan folder {name} into the backup")
    fsync_path(root)  # entries moved out of the palace into the backup
    if backup_dir is not None:
        fsync_path(backup_dir)
    rep.left += _write_sql(conn, rep)
    if rep.stale:  # what the deletes did, judged by the same query that found them
        sql = PalaceSql(root / SQLITE_NAME, conn)
        try:
            kept = set(sql.stale_rows().ids) & set(rep.stale.ids)
        finally:
            sql.close()
        if kept and not any(x.startswith("STALE_ROWS") for x in rep.left):
            rep.left.append(f"STALE_ROWS: the leftovers of {len(kept)} deleted record(s) are still there after "
                            f"their delete (ids {sorted(kept)[:5]})")
    if rep.foreign_sql:
        rep.notes.append(f"dropped {len(rep.foreign_sql)} foreign trigger(s)/view(s); their SQL is in "
                         f"{Path(rep.backup or '') / FOREIGN_SQL_FILE}")
    killpoint("sql-written")
    # second line of defence: the rows reconcile never writes are exactly as they were
    planned = {w.segment: (w.value.to_bytes(8, "big") if w.encoding == "blob" else w.value)
               for p in rep.plans for w in p.seq_writes}
    floor = rep.queue_floor if rep.queue_floor else None
    wrong = rows_before.problems(schema_guard.RowFingerprint.take(conn, _stale_tables(rep)), planned, floor)
    if wrong:
        raise OperationalError(f"{root}: SQL rows differ from the plan before COMMIT ({wrong[0]}); rolled back")
    conn.execute("COMMIT")


def _write_sql(conn: sqlite3.Connection, rep: ReconcileReport) -> list[str]:
    """Every SQL write of a repair, inside the caller's transaction: the foreign triggers
    and views asked to be dropped, max_seq_id, the WAL floor, the leftover rows of
    records whose embeddings row is gone. Run on the palace after the swap and, first,
    on the post-check's copy. Returns what it had to leave, with why."""
    for stmt in schema_guard.drop_statements(rep.foreign_sql):
        conn.execute(stmt)
    for p in rep.plans:
        for w in p.seq_writes:
            val = w.value.to_bytes(8, "big") if w.encoding == "blob" else w.value
            conn.execute("INSERT OR REPLACE INTO max_seq_id (segment_id, seq_id) VALUES (?, ?)", (w.segment, val))
    if rep.queue_floor is not None and rep.queue_floor > 0:
        _write_queue_floor(conn, rep)
    return _delete_stale(conn, rep.stale) if rep.stale else []


STALE_CHUNK = 500  # ids per DELETE (bound parameters; SQLite's old limit is 999)


def _delete_stale(conn: sqlite3.Connection, stale: StaleRows) -> list[str]:
    """Delete the leftovers of records whose embeddings row is gone, each only while that
    is still so, a set of ids per statement; full-text documents through FTS5 (which
    removes them from its index), under a savepoint: a damaged full-text index that
    refuses is reported (and its documents left) instead of failing the repair's other
    SQL writes."""
    for t in stale.tables:
        for s in range(0, len(stale.metadata), STALE_CHUNK):
            chunk = stale.metadata[s : s + STALE_CHUNK]
            conn.execute(f"DELETE FROM {t} WHERE id IN ({', '.join('?' * len(chunk))}) AND {STALE_GONE}", chunk)
    if not stale.fulltext:
        return []
    conn.execute("SAVEPOINT stale_fulltext")
    try:
        for s in range(0, len(stale.fulltext), STALE_CHUNK):
            chunk = stale.fulltext[s : s + STALE_CHUNK]
            conn.execute(f"DELETE FROM {FTS_TABLE} WHERE rowid IN ({', '.join('?' * len(chunk))}) "
                         "AND rowid NOT IN (SELECT id FROM embeddings)", chunk)
    except sqlite3.DatabaseError as exc:
        conn.execute("ROLLBACK TO stale_fulltext")
        return [f"STALE_ROWS: {len(stale.fulltext)} full-text document(s) of deleted records left: the full-text "
                f"index refused their delete ({exc}); chromadb's next add that gets one of their ids fails"]
    finally:
        conn.execute("RELEASE stale_fulltext")
    return []


def _stale_tables(rep: ReconcileReport) -> tuple[str, ...]:
    return rep.stale.tables if rep.stale else ()


def _guard(conn: sqlite3.Connection, rep: ReconcileReport) -> None:
    """The write transaction's authorizer for this plan (``schema_guard.writer_authorizer``)."""
    conn.set_authorizer(schema_guard.writer_authorizer(frozenset(o.name for o in rep.foreign_sql), bool(rep.stale)))


def _clear_stale_journal(root: Path, backup_dir: Path | None) -> None:
    """A leftover journal with a zeroed header never reached the db and SQLite ignores it
    (hot ones were refused earlier); under our EXCLUSIVE lock it is moved aside so the
    repaired palace carries no HOT_JOURNAL warning."""
    journal = root / JOURNAL
    if not journal.exists() or journal_synced(root / SQLITE_NAME):
        return
    if backup_dir is not None:
        move_out(journal, backup_dir / journal.name)
    else:
        journal.unlink()


def _write_queue_floor(conn: sqlite3.Connection, rep: ReconcileReport) -> None:
    """Make the next WAL seq_id exceed every consumed max_seq_id, as chromadb's own purge
    does by keeping one row: a harmless delete of a non-existent id at the floor."""
    assert rep.queue_floor is not None
    topic_row = conn.execute("SELECT topic FROM embeddings_queue LIMIT 1").fetchone()
    if topic_row is None:
        col = conn.execute("SELECT id FROM collections LIMIT 1").fetchone()
        topic = f"persistent://default/default/{col[0]}" if col else "persistent://default/default/none"
    else:
        topic = topic_row[0]
    cols = {r[1] for r in conn.execute("PRAGMA table_info(embeddings_queue)")}
    seq = rep.queue_floor
    fields = {"seq_id": seq, "operation": 3, "topic": topic, "id": FLOOR_ID}
    if "encoding" in cols:
        fields["encoding"] = None
    names = ", ".join(fields)
    conn.execute(f"INSERT OR IGNORE INTO embeddings_queue ({names}) VALUES ({', '.join('?' * len(fields))})",
                 tuple(fields.values()))
