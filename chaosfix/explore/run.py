"""Run a workload once to count its persistence points, replay it stopped at each, and
judge every state before and after chaosfix.

A state's verdict compares four views: chromadb's (a fresh process on a copy: every row,
exact vectors, self-query, phantoms, a probe write), the acknowledgement log (every batch
chromadb returned from must be kept; the batch in flight may be either way), ``check``
and ``reconcile`` (then chromadb's view again on the repaired palace).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chaosfix import workload as wl_mod
from chaosfix.check import ERROR, INFO, check_palace
from chaosfix.drawers import drawer
from chaosfix.embedder import embed_text
from chaosfix.errors import ChaosfixError, UsageProblem
from chaosfix.explore import trace as tr
from chaosfix.explore.workloads import Workload
from chaosfix.faults import restore_segment, segment_dir, snapshot_segment, torn_mix
from chaosfix.scratch import EXPLORE_SCRATCH, Scratch

CATEGORIES = ("healthy", "healed by chromadb", "repaired", "known gap", "missed", "false alarm",
              "repair failed", "data lost")
BAD = ("missed", "false alarm", "repair failed", "data lost")
POWER = "powerloss"
PERSIST_MARK = tr.Point("write", "segment/header.bin", 1)  # each persist writes the header first


@dataclass
class StateResult:
    workload: str
    cls: str  # syscall class, or powerloss
    point: str  # CLASS:FILE:N, or powerloss:lost|torn:N
    category: str
    reasons: list[str] = field(default_factory=list)
    acked: int = 0
    check_codes: dict[str, int] = field(default_factory=dict)
    check_exit: int = 0
    reconcile_exit: int | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    repro: str = ""


@dataclass
class ExploreReport:
    chromadb: str
    seed: int
    points: dict[str, dict[str, int]] = field(default_factory=dict)  # workload -> class -> N
    states: list[StateResult] = field(default_factory=list)

    def matrix(self) -> dict[tuple[str, str], Counter]:
        out: dict[tuple[str, str], Counter] = {}
        for s in self.states:
            out.setdefault((s.workload, s.cls), Counter())[s.category] += 1
        return out

    @property
    def bad(self) -> list[StateResult]:
        return [s for s in self.states if s.category in BAD]

    def to_json(self) -> dict:
        return {
            "schema": "chaosfix.explore/1",
            "chromadb": self.chromadb,
            "seed": self.seed,
            "points": self.points,
            "matrix": [{"workload": w, "class": c, **{k: n[k] for k in CATEGORIES}}
                       for (w, c), n in sorted(self.matrix().items())],
            "states": [asdict(s) for s in self.states],
        }


class Explorer:
    """One workload on the installed chromadb, in a scratch folder."""

    def __init__(self, wl: Workload, scratch: Path, seed: int = 0, keep: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.wl, self.scratch, self.seed, self.keep = wl, scratch, seed, keep
        self.log = log or (lambda _m: None)
        self.base = wl_mod.template(wl.spec)
        self.ids = wl.doc_index()
        self.full: Path | None = None  # the palace of the uninterrupted run
        self.snapshots: dict[int, Path] = {}
        self.t0 = time.monotonic()

    # ---- running the workload ------------------------------------------------------
    def _spec(self, palace: Path, ack: Path) -> dict:
        s = self.wl.spec
        return {"mode": "run", "path": str(palace), "ack": str(ack), "batches": self.wl.batches,
                "collection": s.collection, "space": s.space, "sync_threshold": s.sync_threshold,
                "batch_size": s.batch_size, "seed": s.seed, "dim": s.dim}

    def run(self, name: str, stop: tr.Point | None,
            on_point: Callable[[Path, tr.Point], None] | None = None) -> tuple[Path, int, tr.Trace]:
        """A copy of the base palace with the workload run on it (stopped at ``stop``):
        (palace, acknowledged batches, trace)."""
        palace = self.scratch / name
        if palace.exists():
            shutil.rmtree(palace)
        wl_mod.copy_palace(self.base, palace)
        ack = self.scratch / f"{name}.ack"
        ack.unlink(missing_ok=True)
        ack.touch()
        cmd = wl_mod.child_command(self._spec(palace, ack))
        cmd[2] = "chaosfix.explore.child"
        t = tr.run_traced(cmd, palace, stop=stop, env=wl_mod.child_env(),
                          on_point=(lambda pt: on_point(palace, pt)) if on_point else None)
        if stop is None and (t.returncode != 0 or '"ok": true' not in t.stdout):
            raise ChaosfixError(f"workload {self.wl.name} failed without a crash: "
                                f"{(t.stdout + t.stderr).strip().splitlines()[-1:]}")
        return palace, len(ack.read_text().split()), t

    def count(self) -> list[tr.Point]:
        """Run once uninterrupted; its persistence points, in order. The vector segment is
        copied aside at the start of each persist (the writing thread is held at the
        entry of its first header write, every earlier call has finished), for the
        power-loss states."""
        def snap(palace: Path, pt: tr.Point) -> None:
            if pt.cls == PERSIST_MARK.cls and pt.file == PERSIST_MARK.file:
                dst = self.scratch / f"snap-{pt.n}" / "seg"
                src = _segment(palace)
                self.snapshots[pt.n] = snapshot_segment(palace, src.name if src else None, dst)

        palace, acked, t = self.run("full", None, snap)
        assert acked == len(self.wl.batches)
        self.full = palace
        return t.points

    # ---- judging -------------------------------------------------------------------
    def view(self, palace: Path, acked: int) -> dict:
        """chromadb's view of ``palace`` (in place: pass a copy to keep the state), held
        against the model after ``acked`` batches. Problems only; empty means correct."""
        s = self.wl.spec
        req = {"mode": "judge", "path": str(palace), "collection": s.collection, "dim": s.dim,
               "seed": s.seed, "probe_rows": s.batch_size + 1}
        cmd = wl_mod.child_command(req)
        cmd[2] = "chaosfix.explore.child"
        res = _run(cmd)
        if not res:
            return {"errors": ["chromadb child died"]}
        _, allowed = self.wl.expected(acked)
        out: dict = {}
        if res.get("errors"):
            out["errors"] = res["errors"][:3]
        if "rows" not in res or res.get("error"):
            out.setdefault("errors", []).append(res.get("error", "no rows"))
            return out
        lost, seen = [], set()
        for rid, doc in res["rows"].items():
            i = self.ids.get(rid)
            if i is None:
                lost.append(f"unknown row {rid}")
                continue
            seen.add(i)
            if self.wl.version_of(i, doc) not in allowed.get(i, {None}):
                lost.append(f"{rid}: text v{self.wl.version_of(i, doc)} not in {sorted(map(str, allowed[i]))}")
        for i, ok in allowed.items():
            if i not in seen and None not in ok:
                lost.append(f"missing {sorted(ok)} row {i}")
        for key, label in (("bad_vectors", "vectors"), ("self_miss", "self_miss"), ("phantoms", "phantoms")):
            if res.get(key):
                out[label] = len(res[key])
        stale = sum(1 for rid, v in res.get("bad_vector_values", {}).items() if self._stale(rid, v))
        if stale:
            out["stale"] = stale
        if lost:
            out["lost"] = len(lost)
            out["lost_sample"] = lost[:3]
        return out

    def _stale(self, rid: str, vec: list[float]) -> bool:
        """Whether ``vec`` is exactly the embedding of another text this workload wrote
        for ``rid`` (an older version kept by a lost flush), not damage."""
        i = self.ids.get(rid)
        if i is None:
            return False
        versions = {0} | {int(b.get("version", 0)) for b in self.wl.batches}
        got = np.asarray(vec, dtype=np.float32)
        return any(np.allclose(got, embed_text(drawer(i, self.wl.spec.seed, v)[1], self.wl.spec.dim), atol=1e-5)
                   for v in versions)

    def judge(self, palace: Path, acked: int, cls: str, point: str) -> StateResult:
        from chaosfix.embedder import HashEmbedder
        from chaosfix.reconcile import ReconcileOptions, reconcile_palace

        res = StateResult(self.wl.name, cls, point, "", acked=acked, repro=self.repro(point))
        copy = palace.with_name(palace.name + "-view")
        shutil.rmtree(copy, ignore_errors=True)
        wl_mod.copy_palace(palace, copy)
        res.before = self.view(copy, acked)
        shutil.rmtree(copy, ignore_errors=True)
        if cls == POWER:  # kept for the deep pass: stale vectors only re-embedding finds
            wl_mod.copy_palace(palace, copy)
        try:
            rep = check_palace(palace)
            res.check_codes = {f.code: f.count for f in rep.findings}
            errors = [f.code for f in rep.findings if f.severity == ERROR]
            res.check_exit = 0 if rep.consistent else 4
            infos = all(f.severity == INFO for f in rep.findings)
        except ChaosfixError as exc:
            res.check_exit, errors, infos = exc.exit_code, [str(exc)], False
        refused = None
        try:
            rrep = reconcile_palace(palace, ReconcileOptions(embedder=HashEmbedder(self.wl.spec.dim),
                                                             chromadb_check=False))
            refused = _guard_refusal(rrep)
            if refused:  # nothing in the palace proves the embedder: what --trust-embedder does
                rrep = reconcile_palace(palace, ReconcileOptions(embedder=HashEmbedder(self.wl.spec.dim),
                                                                 chromadb_check=False, trust_embedder=True))
            res.reconcile_exit = rrep.exit_code
            if rrep.after is not None and not rrep.after.consistent:
                res.reasons.append("check after reconcile: " + ",".join(sorted(rrep.after.codes())))
            if rrep.exit_code == 4:
                res.reasons.append("reconcile left: " + "; ".join((rrep.unrepaired + rrep.left)[:2]))
        except ChaosfixError as exc:
            res.reconcile_exit = exc.exit_code
            res.reasons.append(f"reconcile: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug in chaosfix is a finding here
            res.reconcile_exit = -1
            res.reasons.append(f"reconcile crashed: {type(exc).__name__}: {exc}")
        if res.reconcile_exit == 0:
            res.after = dict(res.before)  # nothing changed: chromadb's view is the one above
        elif res.reconcile_exit == 1:
            res.after = self.view(palace, acked)
            if rrep.after is not None and not rrep.after.consistent:
                res.after["check"] = sorted(rrep.after.codes())
        res.category = self._categorize(res, errors, infos)
        try:
            if res.category == "known gap" and _only_stale(res.after):
                res.category = self._deep(copy, acked, res, trust=refused is not None)
        finally:
            self._clear(copy)
        if refused and res.category == "repaired":
            res.reasons.append(f"the embedder guard refused the workload's own embedder ({refused}); "
                               "reconcile --trust-embedder repaired it")
            res.category = "known gap"
        return res

    @staticmethod
    def _clear(palace: Path) -> None:
        """A state's palace and whatever reconcile left beside it (backups)."""
        shutil.rmtree(palace, ignore_errors=True)
        for b in palace.parent.glob(palace.name + ".chaosfix-*"):
            shutil.rmtree(b, ignore_errors=True)

    def _deep(self, palace: Path, acked: int, res: StateResult, trust: bool = False) -> str:
        """A power-loss state that kept old vectors of rewritten rows, on the untouched
        state: ``check --deep`` must name them (STALE_VECTOR) and one ``reconcile --deep``
        must leave chromadb serving every row's own vector; else it stays a known gap
        (or is data lost, or a failed repair, like any other reconcile). ``trust``: the
        guard refused the workload's own embedder on this state (nothing proves it)."""
        from chaosfix.deep import deep_check
        from chaosfix.embedder import HashEmbedder
        from chaosfix.reconcile import ReconcileOptions, reconcile_palace

        emb = HashEmbedder(self.wl.spec.dim)
        try:
            found = deep_check(palace, embedder=emb, trust=trust).codes().get("STALE_VECTOR", 0)
            res.check_codes["deep:STALE_VECTOR"] = found
            rrep = reconcile_palace(palace, ReconcileOptions(embedder=emb, deep=True, chromadb_check=False,
                                                             backup=False, trust_embedder=trust))
        except ChaosfixError as exc:
            res.reasons.append(f"reconcile --deep: {exc}")
            return "repair failed"
        except Exception as exc:  # noqa: BLE001 - a bug in chaosfix is a finding here
            res.reasons.append(f"check/reconcile --deep crashed: {type(exc).__name__}: {exc}")
            return "repair failed"
        if rrep.exit_code not in (0, 1):
            res.reasons.append(f"reconcile --deep exits {rrep.exit_code}: {(rrep.unrepaired + rrep.left)[:2]}")
            return "repair failed"
        after = self.view(palace, acked) if rrep.exit_code == 1 else dict(res.before)
        if after.get("lost"):
            res.reasons.append(f"acknowledged writes lost by reconcile --deep: {after.get('lost_sample')}")
            return "data lost"
        if found < res.after.get("stale", 0) or after:
            res.reasons.append(f"--deep: {found} STALE_VECTOR found, chromadb after reconcile --deep: {after}")
            return "known gap"
        res.reasons.append(f"repaired by --deep: check --deep found {found} STALE_VECTOR, one reconcile --deep "
                           "fixed them")
        return "repaired"

    def _categorize(self, res: StateResult, errors: list[str], infos_only: bool) -> str:
        before_ok = not res.before
        after_ok = res.reconcile_exit in (0, 1) and not res.after
        if res.after.get("lost") or (res.reconcile_exit not in (0, 1) and res.before.get("lost")):
            res.reasons.append(f"acknowledged writes lost: {res.after.get('lost_sample') or res.before.get('lost_sample')}")
            return "data lost"
        if _only_unreachable(res.before) and res.reconcile_exit in (0, 1) and res.after in ({}, res.before):
            # 0.6's replay inserts with several threads: which row a small graph full of
            # deleted elements fails to reach differs from run to run (a replay of the same
            # state was healthy); reconcile does not rebuild a graph nothing damaged
            res.reasons.append(f"chromadb's own graph: {res.before['self_miss']} row(s) its self-query misses at "
                               "every k, before chaosfix and after")
            return "known gap" if res.after else "repaired"
        if before_ok:
            if not after_ok:
                res.reasons.append(f"chromadb served it; after chaosfix: {res.after or res.reconcile_exit}")
                return "repair failed"
            if errors and "TORN" in errors and after_ok:
                # what chromadb makes of a torn slot depends on the garbage it meets: the same
                # state (0.6.3, add write:segment/data_level0.bin:27) was served on one open and
                # segfaulted on the next, so TORN names a concrete future failure
                res.reasons.append(f"torn index chromadb happened to serve this time: {','.join(errors)}")
                return "repaired"
            if errors:
                res.reasons.append(f"error findings on a state chromadb serves: {','.join(errors)}")
                return "false alarm"
            if res.check_exit != 0 and res.reconcile_exit == 0:
                res.reasons.append(f"check exits {res.check_exit}, reconcile has nothing to do")
                return "false alarm"
            # chromadb heals it on open (WAL replay, journal rollback); reconcile may do the same
            return "healthy" if not res.check_codes else "healed by chromadb"
        if after_ok and res.reconcile_exit == 1:
            return "repaired"
        if res.cls == POWER and res.reconcile_exit in (0, 1) and _only_stale(res.after):
            # what is left (or was there all along) is old vectors of rewritten rows
            res.reasons.append(f"{res.after['stale']} stale vectors after a lost flush: only re-embedding "
                               "finds them (check --deep)")
            return "known gap"
        if not errors and res.reconcile_exit == 0:
            res.reasons.append(f"chromadb: {res.before}; check: {res.check_codes or 'consistent'}")
            return "missed"
        res.reasons.append(f"before: {res.before}; after: {res.after}")
        return "repair failed"

    def repro(self, point: str) -> str:
        return (f"chaosfix explore --workload {self.wl.name} --seed {self.seed} --at {point}")

    # ---- states --------------------------------------------------------------------
    def kill_state(self, pt: tr.Point) -> StateResult:
        self.t0 = time.monotonic()
        name = f"kill-{pt.cls}-{pt.file.replace('/', '_')}-{pt.n}"
        palace, acked, t = self.run(name, pt)
        if t.stopped_at is None:  # this run never reached it (a different thread order)
            res = StateResult(self.wl.name, pt.cls, pt.key(), "healthy", ["point not reached on replay"],
                              acked=acked, repro=self.repro(pt.key()))
        else:
            res = self.judge(palace, acked, pt.cls, pt.key())
        self._done(palace, res)
        return res

    def snapshot_before_persist(self, n: int) -> Path:
        """The vector segment as it was just before the ``n``-th persist started."""
        if n not in self.snapshots:
            raise ChaosfixError(f"{self.wl.name} has no persist {n} (it has {len(self.snapshots)})")
        return self.snapshots[n]

    def power_state(self, mode: str, n: int) -> StateResult:
        """Power loss after the whole workload: every HNSW write since persist ``n`` began
        is lost whole (``lost``) or torn at 4 KiB pages (``torn``); SQLite (fsynced) keeps
        every commit."""
        assert self.full is not None
        self.t0 = time.monotonic()
        snap = self.snapshot_before_persist(n)
        palace = self.scratch / f"power-{mode}-{n}"
        shutil.rmtree(palace, ignore_errors=True)
        wl_mod.copy_palace(self.full, palace)
        seg = _segment(palace)
        if mode == "lost" or seg is None:
            restore_segment(palace, snap, seg.name if seg else None)
        else:
            torn_mix(snap, seg, seed=self.seed * 1000 + n)
        res = self.judge(palace, len(self.wl.batches), POWER, f"{POWER}:{mode}:{n}")
        self._done(palace, res)
        return res

    def _done(self, palace: Path, res: StateResult) -> None:
        self.log(f"{res.workload} {res.point}: {res.category} [{time.monotonic() - self.t0:.0f}s]"
                 + (f" ({res.reasons[0]})" if res.reasons else ""))
        if self.keep is not None and res.category in BAD:
            dest = self.keep / f"{res.workload}-{res.point.replace(':', '_').replace('/', '_')}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(palace, dest, symlinks=True)
        self._clear(palace)


def _guard_refusal(rep: object) -> str | None:
    """The embedder guard's refusal line, when it left rows unrepaired."""
    if getattr(rep, "exit_code", None) != 4:
        return None
    for plan in getattr(rep, "plans", []):
        choice = getattr(plan, "embedder", None)
        if choice is not None and choice.refused and choice.guard is not None and plan.unrepaired:
            return choice.refused
    return None


UNREACHABLE_GAP = 2  # rows chromadb's own graph may fail to reach in a workload's palace


def _only_unreachable(view: dict) -> bool:
    return set(view) == {"self_miss"} and view["self_miss"] <= UNREACHABLE_GAP


def _only_stale(view: dict) -> bool:
    return bool(view) and view.get("stale", 0) == view.get("vectors", 0) > 0 and \
        set(view) <= {"vectors", "stale", "self_miss"} and view.get("self_miss", 0) <= view["stale"]


def _segment(palace: Path) -> Path | None:
    try:
        return segment_dir(palace)
    except Exception:  # noqa: BLE001 - no vector segment folder yet
        return None


def _run(cmd: list[str], timeout: float = 120) -> dict:
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=wl_mod.child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # e.g. 1.x growing link_lists.bin of a torn index
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"errors": [f"chromadb hung for {timeout:.0f}s"]}
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    res = wl_mod.parse_result(p.stdout)
    if not res:
        sig = f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        return {"errors": [f"chromadb died ({sig}): {(p.stderr.strip().splitlines() or [''])[-1][:200]}"]}
    return res


def persists(points: list[tr.Point]) -> int:
    return sum(1 for p in points if p.cls == PERSIST_MARK.cls and p.file == PERSIST_MARK.file)


@dataclass(frozen=True)
class Profile:
    """Which states to visit. ``states``: that many drawn from all of a workload's states;
    ``per_file``: that many points per (class, file), evenly spread, first and last
    included (SQLite writes hundreds of journal pages per transaction: neighbours leave
    the same kind of state); ``sample``: that many per class, seeded; none of them:
    every state. Power-loss states are all visited unless ``states`` is given."""

    sample: int | None = None
    states: int | None = None
    per_file: int | None = None


PROFILES = {"ci": Profile(states=2), "dev": Profile(per_file=1), "nightly": Profile(per_file=8),
            "full": Profile()}


def _spread(keys: list[str], k: int) -> list[str]:
    if k >= len(keys):
        return keys
    if k == 1:
        return [keys[len(keys) // 2]]
    return [keys[round(i * (len(keys) - 1) / (k - 1))] for i in range(k)]


def candidates(points: list[tr.Point], profile: Profile, seed: int, classes: tuple[str, ...] | None,
               power_loss: bool) -> list[str]:
    """The states to visit, as reproducible point strings, seeded."""
    by_file: dict[tuple[str, str], list[str]] = {}
    for p in points:
        if classes is None or p.cls in classes:
            by_file.setdefault((p.cls, p.file), []).append(p.key())
    power = ([f"{POWER}:{m}:{k}" for k in range(1, persists(points) + 1) for m in ("lost", "torn")]
             if power_loss and (classes is None or POWER in classes) else [])
    rng = random.Random(f"explore:{seed}")
    if profile.states is not None:
        every = [k for _, ks in sorted(by_file.items()) for k in ks] + power
        return rng.sample(every, min(profile.states, len(every)))
    if profile.per_file is not None:
        return [k for _, ks in sorted(by_file.items()) for k in _spread(ks, profile.per_file)] + power
    by_cls: dict[str, list[str]] = {}
    for (cls, _), ks in sorted(by_file.items()):
        by_cls.setdefault(cls, []).extend(ks)
    if power:
        by_cls[POWER] = power
    out: list[str] = []
    for _, ks in sorted(by_cls.items()):
        out += ks if profile.sample is None or profile.sample >= len(ks) else \
            sorted(rng.sample(ks, profile.sample), key=ks.index)
    return out


def explore(workloads: list[Workload], profile: Profile | None = None, seed: int = 0, power_loss: bool = True,
            classes: tuple[str, ...] | None = None, at: str | None = None, keep: str | Path | None = None,
            log: Callable[[str], None] | None = None) -> ExploreReport:
    """Enumerate (or sample) every crash state of each workload and judge it."""
    say = log or (lambda _m: None)
    _check_arguments(classes, at)
    why = tr.available()
    if why:
        raise ChaosfixError(why)
    profile = profile or Profile()
    report = ExploreReport(chromadb=wl_mod.chromadb_version(), seed=seed)
    keep_dir = Path(keep) if keep else None
    if keep_dir:
        keep_dir.mkdir(parents=True, exist_ok=True)
    for wl in workloads:
        held = Scratch(EXPLORE_SCRATCH)  # (a killed run's folder: removed by the next run)
        try:
            tmp = held.path
            ex = Explorer(wl, tmp, seed, keep_dir, say)
            t0 = time.monotonic()
            points = ex.count()
            counts = Counter(p.cls for p in points)
            counts[POWER] = 2 * persists(points)
            report.points[wl.name] = dict(sorted(counts.items()))
            say(f"{wl.name}: {len(points)} persistence points, {counts[POWER]} power-loss states "
                f"({dict(sorted(counts.items()))}), counted in {time.monotonic() - t0:.1f}s")
            if at is not None:
                _reached(at, points)
                say(f"{wl.name} {at}: replaying the workload to that state, then judging it (chromadb before, "
                    "check, reconcile, chromadb after): about a minute")
            todo = [at] if at is not None else candidates(points, profile, seed, classes, power_loss)
            for key in todo:
                report.states.append(_one(ex, key))
        finally:
            held.remove()
    return report


def _check_arguments(classes: tuple[str, ...] | None, at: str | None) -> None:
    """Bad classes and malformed points are usage errors, before any work."""
    known = (*tr.CLASSES, POWER)
    bad = [c for c in classes or () if c not in known]
    if bad:
        raise UsageProblem(f"unknown --class {', '.join(map(repr, bad))}: one of {', '.join(known)}")
    if at is None:
        return
    if at.startswith(POWER + ":"):
        _, mode, n = (at.split(":") + ["", ""])[:3]
        if mode not in ("lost", "torn") or not n.isdigit() or int(n) < 1 or at.count(":") != 2:
            raise UsageProblem(f"bad point {at!r}: want powerloss:lost:N or powerloss:torn:N (N from 1)")
        return
    try:
        tr.Point.parse(at)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None


def _reached(at: str, points: list[tr.Point]) -> None:
    """``at`` names a state this workload's run reaches (known once its calls are counted)."""
    if at.startswith(POWER + ":"):
        n, most = int(at.rsplit(":", 1)[1]), persists(points)
        if n > most:
            raise UsageProblem(f"bad point {at!r}: this workload persists {most} times (N from 1 to {most})")
        return
    p = tr.Point.parse(at)
    most = sum(1 for q in points if q.cls == p.cls and q.file == p.file)
    if p.n > most:
        raise UsageProblem(f"bad point {at!r}: this workload makes {most} {p.cls} calls on {p.file}")


def _one(ex: Explorer, at: str) -> StateResult:
    if at.startswith(POWER + ":"):
        _, mode, n = at.split(":")
        return ex.power_state(mode, int(n))
    return ex.kill_state(tr.Point.parse(at))


