"""findings -> plan -> new segment -> verify -> swap, under exclusive access.

Order of work, each step a kill point for the crash tests (CHAOSFIX_KILL_AT):
  locked        flock + no other process holds palace files + BEGIN EXCLUSIVE
  backed-up     sqlite backup API copy (only when SQL changes)
  built         new segment folders built aside and fsynced
  verified      zero-diff + self-query on every built folder
  swapped       renameat2(RENAME_EXCHANGE) new <-> old (atomic per segment)
  old-moved     old folders moved into the backup (or deleted with --no-backup)
  sql-written   max_seq_id / WAL floor rows written, not yet committed
  committed     COMMIT; marker removed
A kill anywhere leaves either the old palace, or the new index with the old SQL (a
rerun redoes the same plan), plus our own leftovers, which a rerun recognises and
clears (a hot journal is rolled back only when our marker proves it is ours).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaosfix.check import CheckReport, check_palace, deep_findings
from chaosfix.embedders.select import EmbedderSelector
from chaosfix.errors import EXIT_OK, EXIT_REPAIRED, EXIT_UNREPAIRED, OperationalError
from chaosfix.palace import UUID_RE, palace_db
from chaosfix.palace.sql import PalaceSql, journal_synced
from chaosfix.progress import ProgressFn
from chaosfix.reconcile import build as build_mod
from chaosfix.reconcile.plan import CollectionPlan, plan_collection
from chaosfix.reconcile.safety import LOCK_NAME, PalaceLock, exchange, fsync_path, killpoint, other_holders, sparse_copy
from chaosfix.reconcile.sources import Embedder
from chaosfix.reconcile.verify import EF_MAX, Verification, verify_segment

MARKER = ".chaosfix-txn"
BUILD_PREFIX = ".chaosfix-build-"
OLD_PREFIX = ".chaosfix-old-"
FLOOR_ID = "__chaosfix_seq_floor__"


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
    deep: bool = False  # re-embed every row and replace stale vectors (STALE_VECTOR)
    sample: int = 1000
    seed: int = 0


@dataclass
class ReconcileReport:
    palace: str
    dry_run: bool
    plans: list[CollectionPlan] = field(default_factory=list)
    queue_floor: int | None = None
    verifications: dict[str, Verification] = field(default_factory=dict)
    backup: str | None = None
    after: CheckReport | None = None
    chromadb: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prune_dirs: list[str] = field(default_factory=list)  # orphan segment folders to move to the backup
    left: list[str] = field(default_factory=list)  # findings deliberately left, with why (exit 4)
    swapping: bool = field(default=False, repr=False)  # past this point a build folder may hold the old segment

    @property
    def has_work(self) -> bool:
        return any(p.has_work for p in self.plans) or self.queue_floor is not None or bool(self.prune_dirs)

    @property
    def unrepaired(self) -> list[str]:
        return [i for p in self.plans for i in p.unrepaired]

    @property
    def exit_code(self) -> int:
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
            "verification": {k: vars(v) for k, v in self.verifications.items()},
            "backup": self.backup,
            "after_consistent": self.after.consistent if self.after else None,
            "chromadb": self.chromadb,
            "timings": self.timings,
            "notes": self.notes,
            "left": self.left,
        }


def _refuse_sql_damage(rep: CheckReport, root: Path) -> None:
    codes = rep.codes()
    if any(f.code == "HOT_JOURNAL" and f.severity == "error" for f in rep.findings):
        raise OperationalError(f"{root}: chroma.sqlite3-journal present (interrupted transaction); "
                               "open the palace with chromadb once to roll it back, then rerun")
    if "SQLITE_CORRUPT" in codes:
        raise OperationalError(f"{root}: chroma.sqlite3 is corrupt (PRAGMA quick_check fails); restore it first")


def _recover_own_leftovers(root: Path, notes: list[str]) -> None:
    """Clear what an interrupted chaosfix left. Build/old folders are never deleted here
    (one may be the only copy of the old segment): a missing segment gets its folder
    back, anything else moves to a recovered-folder beside the palace. A hot journal is
    rolled back only when our marker proves it is ours (a read-write open does it)."""
    stash: Path | None = None
    for d in sorted(root.iterdir()):
        prefix = next((x for x in (BUILD_PREFIX, OLD_PREFIX) if d.name.startswith(x)), None)
        if prefix is None or not d.is_dir():
            continue
        seg = d.name[len(prefix):]
        if not (root / seg).exists() and prefix == OLD_PREFIX:
            os.rename(d, root / seg)  # two-rename fallback interrupted between its renames
            notes.append(f"restored segment {seg} from an interrupted swap")
        else:
            if stash is None:
                stash = _new_dir(root.parent / f"{root.name}.chaosfix-recovered-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(d, stash / d.name)
            notes.append(f"moved leftover {d.name} to {stash}")
    marker = root / MARKER
    if marker.exists():
        conn = sqlite3.connect(str(root / "chroma.sqlite3"), timeout=1.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # rolls back a hot journal
        finally:
            conn.close()
        marker.unlink()
        notes.append("rolled back an interrupted chaosfix transaction")
    fsync_path(root)


def _new_dir(base: Path) -> Path:
    """Create ``base``, or ``base-2``, ``base-3``...: a rerun in the same second as a killed
    run must not collide with the folder that run left (FileExistsError, exit 8)."""
    n = 1
    while True:
        d = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            d.mkdir(parents=True)
            fsync_path(d.parent)  # the folder's own entry must survive a power cut
            return d
        except FileExistsError:
            n += 1


def reconcile_palace(path: str | Path, opts: ReconcileOptions | None = None,
                     progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
                     ) -> ReconcileReport:
    """Repair a palace. See the module docstring for the order of work."""
    opts = opts or ReconcileOptions()
    say = log or (lambda _m: None)
    root = palace_db(path).parent
    rep = ReconcileReport(palace=str(root), dry_run=opts.dry_run)
    from chaosfix.embedders.resolve import MEMPALACE_MINILM

    for ref in opts.embedder if isinstance(opts.embedder, (list, tuple)) else [opts.embedder]:
        if isinstance(ref, str) and ":" not in ref and ref.strip().lower() not in MEMPALACE_MINILM:
            raise OperationalError(f"--embedder {ref!r}: expected MODULE:ATTR, or default/minilm")
    selector = EmbedderSelector(root, opts.embedder, opts.trust_embedder, seed=opts.seed)
    try:
        return _reconcile(root, rep, opts, selector, progress, say)
    finally:
        selector.close()


def _reconcile(root: Path, rep: ReconcileReport, opts: ReconcileOptions, embedder: EmbedderSelector,
               progress: ProgressFn | None, say: Callable[[str], None]) -> ReconcileReport:
    t0 = time.perf_counter()
    if not opts.dry_run and ((root / MARKER).exists() or (root / LOCK_NAME).exists() or any(
            d.name.startswith((BUILD_PREFIX, OLD_PREFIX)) for d in root.iterdir())):
        with PalaceLock(root):
            _recover_own_leftovers(root, rep.notes)
    first_look = _fingerprint(root)
    before = check_palace(root, opts.collection)
    _refuse_sql_damage(before, root)
    rep.plans, rep.queue_floor, rep.prune_dirs = _plan_all(root, before, None, embedder, opts)
    orphans = before.codes().get("SEGMENT_DIR_ORPHAN", 0)
    if orphans and not opts.prune_orphan_dirs:
        rep.notes.append(f"{orphans} segment folder(s) no segment owns left in place (chromadb never reads them); "
                         "--prune-orphan-dirs moves them into the backup")
    rep.timings["plan"] = time.perf_counter() - t0
    if opts.dry_run or not rep.has_work:
        return rep

    with PalaceLock(root):
        holders = other_holders(root)
        if holders:
            raise OperationalError(f"{root}: palace files are open in process(es) {holders[:5]}; close them first")
        conn = sqlite3.connect(str(root / "chroma.sqlite3"), timeout=0.5, isolation_level=None)
        try:
            try:
                conn.execute("BEGIN EXCLUSIVE")
            except sqlite3.OperationalError as exc:
                raise OperationalError(f"{root}: chroma.sqlite3 is busy ({exc}); is chromadb running?") from None
            (root / MARKER).write_text(str(os.getpid()))
            fsync_path(root)
            killpoint("locked")
            # re-plan under the lock if any palace file changed since the first look
            if _fingerprint(root) != first_look:
                rep.notes.append("the palace changed since the first look: planned again under the lock")
                before = check_palace(root, opts.collection, conn=conn)
                _refuse_sql_damage(before, root)
                rep.plans, rep.queue_floor, rep.prune_dirs = _plan_all(root, before, conn, embedder, opts)
            _execute(root, conn, rep, opts, progress, say)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            (root / MARKER).unlink(missing_ok=True)
            if rep.swapping:  # an exchanged build folder holds the old segment: keep it
                _recover_own_leftovers(root, rep.notes)
            else:
                for d in root.iterdir():
                    if d.name.startswith(BUILD_PREFIX):
                        shutil.rmtree(d, ignore_errors=True)
            raise
        conn.close()
        (root / MARKER).unlink(missing_ok=True)
        fsync_path(root)
        killpoint("committed")
    rep.timings["total_repair"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rep.after = check_palace(root, opts.collection)
    if opts.chromadb_check:
        from chaosfix.chromadb_probe import verify_with_chromadb

        rep.chromadb = verify_with_chromadb(root, [p.collection for p in rep.plans if p.has_work], progress=progress)
    rep.timings["post_verify"] = time.perf_counter() - t1
    return rep


def _fingerprint(root: Path) -> list[tuple[str, int, int, int]]:
    """(path, size, mtime_ns, inode) of every palace file but our own lock and marker: any
    write by chromadb or another tool changes it, so an unchanged one lets the plan made
    at the first look stand once the lock is held."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (LOCK_NAME, MARKER):
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def _plan_all(root: Path, rep: CheckReport, conn: sqlite3.Connection | None, embedder: EmbedderSelector,
              opts: ReconcileOptions) -> tuple[list[CollectionPlan], int | None, list[str]]:
    """Plans per collection, the WAL floor seq_id (QUEUE_RESET), orphan folders to prune."""
    sql = PalaceSql(root / "chroma.sqlite3", conn)
    try:
        stale = deep_findings(sql, rep, embedder) if opts.deep else {}
        plans = [plan_collection(sql, st, rep, embedder.for_collection, opts.strategy, opts.apply_pending,
                                 stale.get(st.info.name)) for st in rep.states]
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
        return plans, floor, prune
    finally:
        sql.close()


def _execute(root: Path, conn: sqlite3.Connection, rep: ReconcileReport, opts: ReconcileOptions,
             progress: ProgressFn | None, say: Callable[[str], None]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sql_changes = any(p.seq_writes for p in rep.plans) or rep.queue_floor is not None
    backup_dir = None
    if (opts.backup and rep.has_work) or rep.prune_dirs:  # pruned folders always go to a backup
        backup_dir = _new_dir(root.parent / f"{root.name}.chaosfix-backup-{stamp}")
        rep.backup = str(backup_dir)
        if sql_changes:
            # SQLite's backup API refuses a source connection inside a write transaction
            # (SQLITE_LOCKED, retried forever), and releasing our EXCLUSIVE lock to run it
            # would let a writer in. Under EXCLUSIVE with nothing written yet, the file is
            # a consistent, committed snapshot, so a plain copy is the same backup.
            say(f"backing up chroma.sqlite3 to {backup_dir}")
            sparse_copy(root / "chroma.sqlite3", backup_dir / "chroma.sqlite3")
            fsync_path(backup_dir / "chroma.sqlite3")
    _clear_stale_journal(root, backup_dir)
    killpoint("backed-up")
    work = [p for p in rep.plans if p.index_changes]
    built: dict[str, Path] = {}
    t = time.perf_counter()
    for p in work:
        assert p.segment is not None
        out = root / f"{BUILD_PREFIX}{p.segment}"
        say(f"building {p.collection} ({p.strategy}: +{len(p.add)} ~{len(p.replace)} -{len(p.remove_labels)})")
        build_mod.build(p, out, progress)
        built[p.segment] = out
    fsync_path(root)
    rep.timings["build"] = time.perf_counter() - t
    killpoint("built")
    t = time.perf_counter()
    for p in work:
        assert p.segment is not None and p.state is not None
        say(f"verifying {p.collection}")
        planned = {i: p.vectors[i] for i in (*p.add, *p.replace)}
        v = verify_segment(built[p.segment], p.state.info.space, set(p.state.sql_rows) - set(p.unrepaired),
                           planned, sample=opts.sample, seed=opts.seed, full=opts.verify_full, ef_max=EF_MAX,
                           progress=progress)
        v.unrepaired = len(p.unrepaired)
        v.zero_diff = v.zero_diff and not p.unrepaired  # SQL ids == index ids holds only with none left
        rep.verifications[p.collection] = v
        if not v.ok:
            raise OperationalError(f"verification of the rebuilt {p.collection} failed: {v.problems[0]}; "
                                   "nothing was changed")
    rep.timings["verify"] = time.perf_counter() - t
    killpoint("verified")
    rep.swapping = True
    for p in work:
        assert p.segment is not None
        live = root / p.segment
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
                os.rename(new, backup_dir / p.segment)
            else:
                shutil.rmtree(new)
        killpoint("old-moved")
    for name in rep.prune_dirs:
        assert backup_dir is not None
        os.rename(root / name, backup_dir / name)
        rep.notes.append(f"moved orphan folder {name} into the backup")
    fsync_path(root)  # entries moved out of the palace into the backup
    if backup_dir is not None:
        fsync_path(backup_dir)
    for p in rep.plans:
        for w in p.seq_writes:
            val = w.value.to_bytes(8, "big") if w.encoding == "blob" else w.value
            conn.execute("INSERT OR REPLACE INTO max_seq_id (segment_id, seq_id) VALUES (?, ?)", (w.segment, val))
    if rep.queue_floor is not None and rep.queue_floor > 0:
        _write_queue_floor(conn, rep)
    killpoint("sql-written")
    conn.execute("COMMIT")


def _clear_stale_journal(root: Path, backup_dir: Path | None) -> None:
    """A leftover journal with a zeroed header never reached the db and SQLite ignores it
    (hot ones were refused earlier); under our EXCLUSIVE lock it is moved aside so the
    repaired palace carries no HOT_JOURNAL warning."""
    journal = root / "chroma.sqlite3-journal"
    if not journal.exists() or journal_synced(root / "chroma.sqlite3"):
        return
    if backup_dir is not None:
        os.rename(journal, backup_dir / journal.name)
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
