"""Declarative crash scenarios: load ``scenarios/*.toml`` and run the whole loop.

A scenario file (TOML) says what it reproduces and how to judge the outcome:

    name = "partial-flush"
    summary = "one line: what it reproduces"
    field_report = "where it was seen (optional)"
    versions = ["0.6", "1.x"]            # chromadb families it applies to
    [palace]                             # PalaceSpec fields (drawers, dim, space, ...)
    [[steps]]                            # in order; `do` names a step, other keys are its arguments
    do = "write"                         # chromadb writes in a child: ops, kill_point, strace, kill_after
    do = "<fault primitive>"             # any chaosfix.faults.REGISTRY name; `file = "data_level0.bin"`
    [expect]                             # judged after the break; `[expect."0.6"]` overrides per family
    codes = { SQL_ONLY = 150 }           # exact non-info check codes and counts ("*" = any count)
    codes_among = ["TORN", ...]          # instead of codes: some findings, all from this list
    reopen = "ok" | "<substring of chromadb's error>" | [alternatives]
    repair = 1                           # reconcile exit code
    embedder = "chaosfix.embedder:HashEmbedder"   # for rows with no vector anywhere

The loop (``run_scenario``): build (template copy) -> break -> observe chromadb on a copy
-> check -> reconcile -> verify (check consistent, chromadb reads every row with its
embedding, self/filtered queries, a probe write lands, no row lost).
"""

from __future__ import annotations

import inspect
import os
import shlex
import shutil
import tarfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from chaosfix import faults, workload
from chaosfix.check import check_palace
from chaosfix.errors import OperationalError, UsageProblem, whole_number_problem
from chaosfix.palace.idmap import FILENAME as PICKLE_NAME
from chaosfix.progress import ProgressFn
from chaosfix.safe_fs import ensure_inside
from chaosfix.scratch import SIMULATE_SCRATCH, Scratch
from chaosfix.workload import PalaceSpec, chroma_major

BUILTIN = "chaosfix.scenarios"  # the repo's scenarios/ folder, shipped in the package (see pyproject.toml)
SEGMENT_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", PICKLE_NAME)


@dataclass
class Scenario:
    name: str
    summary: str
    versions: list[str]
    palace: dict
    steps: list[dict]
    expect: dict
    field_report: str = ""
    path: Path | Traversable | None = None
    # its steps and expectations hold at any palace size (``--drawers``); most scenarios
    # write at fixed row positions and count what a 300-drawer palace's flushes leave
    resizable: bool = False

    def applies(self, major: str | None = None) -> bool:
        return (major or chroma_major()) in self.versions

    def expectations(self, major: str | None = None) -> dict:
        major = major or chroma_major()
        base = {k: v for k, v in self.expect.items() if not isinstance(v, dict) or k == "codes"}
        base.update(self.expect.get(major, {}))
        return base

    def drawers_problem(self, drawers: int | None) -> str | None:
        """Why this scenario cannot run at ``drawers`` (None: it can, or none was asked)."""
        if drawers is None:
            return None
        if why := whole_number_problem("drawers", drawers, 1):
            return f"scenario {self.name}: {why}"
        t = int(self.palace.get("sync_threshold", PalaceSpec().sync_threshold))
        if self.resizable and drawers % t:
            return (f"scenario {self.name} resizes to whole flushes: --drawers a multiple of its sync_threshold {t} "
                    f"(0.6 persists every {t} rows, and a palace of {drawers} leaves another count pending)")
        if not self.resizable and drawers != self.palace.get("drawers"):
            return (f"scenario {self.name} is written for its own {self.palace.get('drawers', 'default')} drawers "
                    "(rows at fixed positions, counts of what its flushes leave); --drawers applies to the "
                    "scenarios whose file says resizable = true")
        return None

    def spec(self, seed: int | None = None, drawers: int | None = None) -> PalaceSpec:
        kw = dict(self.palace)
        if seed is not None:
            kw["seed"] = seed
        if drawers is not None:
            kw["drawers"] = drawers
        return PalaceSpec(**kw)


def builtin_dir() -> Traversable:
    """The built-in catalogue, read through importlib.resources so it works the same from a
    wheel, a plain ``pip install .`` and an editable checkout (where it is ``scenarios/``)."""
    return resources.files(BUILTIN)


def fixture(name: str) -> Traversable:
    """A file of the built-in ``fixtures/`` folder (e.g. a palace written by chromadb 0.6.3):
    a plain file name, never a path (helper-43 unpacked a tar from anywhere)."""
    if not isinstance(name, str) or _outside(name) or "/" in name:
        raise UsageProblem(f"fixture {name!r}: the name of a file of chaosfix's fixtures folder, not a path")
    return builtin_dir().joinpath("fixtures", name)


def scenario_dirs(extra: list[str | Path] | None = None) -> list[Path | Traversable]:
    """Folders searched in order: ``extra``, ``$CHAOSFIX_SCENARIOS``, then the built-in one."""
    dirs: list[Path | Traversable] = [Path(d) for d in (extra or [])]
    env = os.environ.get("CHAOSFIX_SCENARIOS")
    if env:
        dirs += [Path(d) for d in env.split(os.pathsep) if d]
    return dirs + [builtin_dir()]


# the steps ``_run_step`` runs itself; any other ``do`` names a function of faults.REGISTRY
OWN_STEPS = ("write", "unpack", "snapshot_segment", "restore_segment", "torn_mix", "copy_sqlite",
             "restore_older_sqlite", "delete_file")


def load_file(path: Path | Traversable) -> Scenario:
    """One scenario file, checked as it is read (a bad file is the user's argument: exit
    2, before any palace is built)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageProblem(f"{path}: cannot read scenario: {exc}") from None
    kinds = {"name": str, "summary": str, "versions": list, "palace": dict, "steps": list, "expect": dict,
             "field_report": str, "resizable": bool}
    wrong = [f"{k} must be a {t.__name__}" for k, t in kinds.items() if k in data and not isinstance(data[k], t)]
    wrong += ["versions must list 0.6 and/or 1.x"] if not set(data.get("versions", [])) <= {"0.6", "1.x"} else []
    if wrong:
        raise UsageProblem(f"{path}: not a scenario: {'; '.join(wrong)}")
    try:
        sc = Scenario(
            name=data["name"], summary=data["summary"], versions=list(data.get("versions", ["0.6", "1.x"])),
            palace=dict(data.get("palace", {})), steps=list(data.get("steps", [])),
            expect=dict(data.get("expect", {})), field_report=data.get("field_report", ""), path=path,
            resizable=data.get("resizable", False),
        )
    except KeyError as exc:
        raise UsageProblem(f"{path}: scenario lacks {exc}") from None
    try:
        why = PalaceSpec(**sc.palace).problem()
    except TypeError:
        known = ", ".join(f.name for f in fields(PalaceSpec))
        why = f"[palace] takes {known}, not {', '.join(sorted(map(str, sc.palace)))}"
    if why:
        raise UsageProblem(f"{path}: {why}")
    for step in sc.steps:
        do = step.get("do") if isinstance(step, dict) else None
        if do not in OWN_STEPS and do not in faults.REGISTRY:
            known = ", ".join(sorted({*OWN_STEPS, *faults.REGISTRY}))
            raise UsageProblem(f"{path}: unknown step {do!r}: one of {known}")
        given = sorted(PATH_KEYS & step.keys())
        if given:  # (a fault's own path argument, given directly, skipped the file check: helper-43)
            raise UsageProblem(f"{path}: {', '.join(given)}: a step names its file with file = \"...\", "
                               "relative to the throwaway palace; chaosfix supplies every other path")
        if do == "unpack":
            fixture(step.get("fixture"))  # (a usage error now, not after the build)
        for name in (step.get("file"), (step.get("strace") or {}).get("file") if do == "write" else None):
            if name is not None and _outside(name):
                raise UsageProblem(f"{path}: file {name!r}: a step names a file of the throwaway palace, "
                                   "relative to it (a segment file, chroma.sqlite3...), never a path out of it")
        if do == "write" and "kill_point" in step and "1.x" in sc.versions:
            raise UsageProblem(f"{path}: a kill_point hooks chromadb 0.6's Python persist: a scenario that uses "
                               "one lists versions = [\"0.6\"] (1.x persists in Rust: kill with strace or kill_after)")
    return sc


def catalogue(extra: list[str | Path] | None = None) -> dict[str, Scenario]:
    """name -> scenario; earlier folders (user's own) win over the built-in ones."""
    out: dict[str, Scenario] = {}
    for d in scenario_dirs(extra):
        if not d.is_dir():
            raise UsageProblem(f"{d}: no such scenario folder")
        for f in sorted((f for f in d.iterdir() if f.name.endswith(".toml") and f.is_file()), key=lambda f: f.name):
            s = load_file(f)
            out.setdefault(s.name, s)
    return out


def get(name: str, extra: list[str | Path] | None = None) -> Scenario:
    cat = catalogue(extra)
    if name in cat:
        return cat[name]
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return load_file(p)
    raise OperationalError(f"unknown scenario {name!r}; `chaosfix scenarios` lists them")


# ---------------------------------------------------------------------------------------
# breaking


@dataclass
class Ctx:
    palace: Path
    spec: PalaceSpec
    scratch: Path
    seed: int
    notes: dict = field(default_factory=dict)
    snapshot: Path | None = None
    sqlite_copy: Path | None = None


# the faults' own path arguments: chaosfix sets each from the throwaway palace and its scratch
PATH_KEYS = frozenset({"path", "palace", "dst", "src", "old_dir", "new_dir", "marker_file"})


def _outside(name: object) -> bool:
    """A scenario's ``file`` that could reach beyond the palace: not a relative path of
    plain names (scenario folders are shared like palaces: a step breaks the throwaway
    palace only, never /etc/passwd)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return True
    parts = PurePosixPath(name).parts
    return PurePosixPath(name).is_absolute() or any(p in ("..", ".") for p in parts) or not parts


def _resolve_file(ctx: Ctx, name: str) -> Path:
    if _outside(name):  # (also a scenario built in code, never loaded from a file)
        raise UsageProblem(f"file {name!r}: not a path inside the throwaway palace")
    if name in SEGMENT_FILES:  # (the segment id is the palace's SQL's: an unpacked palace's may be hostile)
        return ensure_inside(faults.segment_dir(ctx.palace, ctx.spec.collection) / name, ctx.palace)
    return ensure_inside(ctx.palace / name, ctx.palace)


def _vector_segment(ctx: Ctx) -> str:
    return faults.segment_id(ctx.palace, "vector", ctx.spec.collection)


def _step_write(ctx: Ctx, step: dict) -> dict:
    kill = faults.kill_point(step["kill_point"], int(step.get("hit", 1))) if "kill_point" in step else None
    prefix = None
    if "strace" in step:
        st = step["strace"]
        prefix = faults.strace_kill_prefix(_resolve_file(ctx, st["file"]), int(st.get("nth", 1)),
                                           st.get("syscall", "openat"))
    kill_after = None
    if "kill_after" in step:
        lo, hi = step["kill_after"]
        kill_after = faults.seeded_delay(ctx.seed, float(lo), float(hi))
    res = workload.apply_ops(ctx.palace, ctx.spec, step["ops"], kill=kill, prefix=prefix, kill_after=kill_after)
    out = {"killed": res.killed, "returncode": res.returncode}
    if not res.killed and not res.ok:
        raise RuntimeError(f"write step failed: {res.result.get('error') or res.stderr.strip()[-300:]}")
    want = step.get("expect_killed")
    if want is not None and bool(want) != res.killed:
        raise RuntimeError(f"write step: expected killed={want}, got returncode {res.returncode}")
    return out


def _step_unpack(ctx: Ctx, step: dict) -> dict:
    """Replace the palace by a fixture archive (e.g. a palace written by chromadb 0.6.3)."""
    src = fixture(step["fixture"])
    shutil.rmtree(ctx.palace)
    with src.open("rb") as raw, tarfile.open(fileobj=raw) as tf:
        tf.extractall(ctx.palace, filter="data")
    return {"fixture": step["fixture"]}


def apply_step(ctx: Ctx, step: dict) -> dict:
    step = dict(step)
    do = step.pop("do")
    if do == "write":
        return _step_write(ctx, step)
    if do == "unpack":
        return _step_unpack(ctx, step)
    if do == "snapshot_segment":  # (of the spec's collection: a user's palace may name its own)
        ctx.snapshot = faults.snapshot_segment(ctx.palace, _vector_segment(ctx), dst=ctx.scratch / "snapshot")
        return {}
    if do == "restore_segment":
        assert ctx.snapshot is not None, "restore_segment needs a snapshot_segment step first"
        faults.restore_segment(ctx.palace, ctx.snapshot, _vector_segment(ctx))
        return {}
    if do == "torn_mix":
        assert ctx.snapshot is not None, "torn_mix needs a snapshot_segment step first"
        pages = faults.torn_mix(ctx.snapshot, faults.segment_dir(ctx.palace, ctx.spec.collection),
                                int(step.get("seed", ctx.seed)),
                                fraction=float(step.get("fraction", 0.5)))
        return {"new_pages": {k: len(v) for k, v in pages.items()}}
    if do == "copy_sqlite":
        ctx.sqlite_copy = faults.copy_sqlite(ctx.palace, ctx.scratch / "older.sqlite3")
        return {}
    if do == "restore_older_sqlite":
        assert ctx.sqlite_copy is not None, "restore_older_sqlite needs a copy_sqlite step first"
        faults.restore_older_sqlite(ctx.palace, ctx.sqlite_copy)
        return {}
    if do == "delete_file":
        _resolve_file(ctx, step["file"]).unlink()
        return {}
    fn = faults.REGISTRY.get(do)
    if fn is None:
        raise OperationalError(f"unknown step {do!r}")
    params = inspect.signature(fn).parameters
    if PATH_KEYS & step.keys():  # (also a scenario built in code, never loaded from a file)
        raise UsageProblem(f"step {do!r}: {', '.join(sorted(PATH_KEYS & step.keys()))}: name the file with file =")
    if "file" in step:
        step["path"] = _resolve_file(ctx, step.pop("file"))
    elif "path" in params and "path" not in step:
        step["path"] = _resolve_file(ctx, PICKLE_NAME)
    if "palace" in params:
        step["palace"] = ctx.palace
    if "seed" in params and "seed" not in step:
        step["seed"] = ctx.seed
    if "marker_file" in params:
        step["marker_file"] = ctx.scratch / "PWNED"
    res = fn(**step)
    return {"result": res if isinstance(res, (int, str, float, bool)) else None}


# ---------------------------------------------------------------------------------------
# the whole loop


@dataclass
class Stage:
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class SimulationResult:
    scenario: str
    chromadb: str
    seed: int
    stages: list[Stage] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # "broken" / "repaired" -> folder (--keep)
    repair_command: str | None = None  # what repairs the kept broken palace (its embedder named)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    def to_json(self) -> dict:
        return {
            "schema": "chaosfix.simulate/1",
            "scenario": self.scenario,
            "chromadb": self.chromadb,
            "seed": self.seed,
            "ok": self.ok,
            "kept": self.kept,
            "repair_command": self.repair_command,
            "stages": [vars(s) for s in self.stages],
        }


def _codes_match(want: dict, got: dict, among: list[str] | None = None) -> tuple[bool, str]:
    """Exact codes and counts; or, with ``among`` (seeded damage whose shape varies), at
    least one finding and none outside that list."""
    got = {k: v for k, v in got.items() if k != "PENDING"}
    if among is not None:
        if not got:
            return False, "no findings"
        extra = sorted(set(got) - set(among))
        return not extra, ("unexpected " + ", ".join(extra)) if extra else ""
    problems = []
    for code, count in want.items():
        if code not in got:
            problems.append(f"{code} missing")
        elif count != "*" and int(count) != got[code]:
            problems.append(f"{code} {got[code]} != {count}")
    extra = sorted(set(got) - set(want))
    if extra:
        problems.append("unexpected " + ", ".join(f"{c} {got[c]}" for c in extra))
    return not problems, "; ".join(problems)


def _reopen_matches(want: str | list[str] | None, obs: dict) -> tuple[bool, str]:
    """``want``: "ok", an error substring, or a list of alternatives (a damaged index can
    make chromadb raise or segfault depending on which garbage it reads first). The detail
    says whether an error is the symptom the scenario expects, so "ok: yes" beside an
    error reads right."""
    errs = [f"{where}: {msg}" for where, msg in obs.get("errors", [])]
    summary = "; ".join(errs) or f"chromadb reads {obs.get('count')} rows"
    if want is None:
        return True, summary
    alts = [want] if isinstance(want, str) else list(want)
    for alt in alts:
        if alt == "ok" and not errs:
            return True, summary
        if alt != "ok" and any(alt in e for e in errs):
            return True, f"expected symptom ({alt!r}): {summary}"
    return False, f"expected {' or '.join(map(repr, alts))}, got: {summary}"


def check_keep_dir(keep: str | Path) -> Path:
    """``--keep DIR`` must be a new or empty folder: checked before any work, so a run
    never ends in "nothing kept" (and never writes into a user's folder)."""
    dest = Path(keep)
    if dest.exists() and not dest.is_dir():
        raise OperationalError(f"--keep {dest}: is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise OperationalError(f"--keep {dest}: folder is not empty")
    return dest


def run_scenario(sc: Scenario, seed: int = 0, drawers: int | None = None, keep: str | Path | None = None,
                 log: Callable[[str], None] | None = None, progress: ProgressFn | None = None) -> SimulationResult:
    """Build, break, observe, check, reconcile, verify. Never raises for an unmet
    expectation: each stage records ok/detail; the result is ok only if all held.
    ``keep``: a new or empty folder that receives ``broken/`` (the palace as the scenario
    left it) and ``repaired/`` (after reconcile), checked before any work."""
    from chaosfix.reconcile import ReconcileOptions, reconcile_palace

    problem = sc.drawers_problem(drawers)
    if problem:
        raise UsageProblem(problem)
    keep_dir = check_keep_dir(keep) if keep is not None else None
    say = log or (lambda _m: None)
    major = chroma_major()
    exp = sc.expectations(major)
    result = SimulationResult(sc.name, workload.chromadb_version(), seed)
    if not sc.applies(major):
        raise OperationalError(f"scenario {sc.name} does not apply to chromadb {workload.chromadb_version()} "
                               f"(versions: {', '.join(sc.versions)})")
    held = Scratch(SIMULATE_SCRATCH)  # (a killed run's folder: removed by the next run)
    scratch = held.path
    palace = scratch / "palace"
    spec = sc.spec(seed=seed, drawers=drawers)

    def stage(name: str, fn):  # noqa: ANN001, ANN202
        say(f"{sc.name}: {name}")
        t = time.perf_counter()
        try:
            ok, detail, data = fn()
        except Exception as exc:  # noqa: BLE001 - a stage failure is a result, not a crash
            ok, detail, data = False, f"{type(exc).__name__}: {exc}"[:2000], {}
        result.stages.append(Stage(name, ok, round(time.perf_counter() - t, 2), detail, data))
        return ok

    try:
        ctx = Ctx(palace, spec, scratch, seed)

        def build():  # noqa: ANN202
            workload.fresh_palace(palace, spec, progress)
            return True, f"{spec.drawers} drawers", {"drawers": spec.drawers}

        def brk():  # noqa: ANN202
            out = [apply_step(ctx, s) for s in sc.steps]
            killed = sum(1 for o in out if o.get("killed"))
            return True, f"{len(out)} steps" + (f", {killed} killed" if killed else ""), {"steps": out}

        if not (stage("build", build) and stage("break", brk)):
            return result
        if keep_dir is not None:
            result.kept["broken"] = str(workload.copy_palace(palace, keep_dir / "broken"))
            emb = exp.get("embedder")
            result.repair_command = shlex.join(["chaosfix", "reconcile", result.kept["broken"],
                                                *(["--embedder", emb] if emb else [])])
        marker = scratch / "PWNED"

        def observe():  # noqa: ANN202
            copy = workload.copy_palace(palace, scratch / "observe")
            obs = workload.observe(copy, spec)
            shutil.rmtree(copy, ignore_errors=True)
            if marker.exists():  # chromadb itself unpickled the hostile payload (0.6.3 does)
                obs.setdefault("errors", []).append(("pickle", "hostile payload executed by chromadb"))
                marker.unlink()
            ok, summary = _reopen_matches(exp.get("reopen"), obs)
            return ok, summary, {"count": obs.get("count"), "errors": obs.get("errors")}

        stage("observe", observe)
        rows_before: dict[str, int] = {}

        def check():  # noqa: ANN202
            rep = check_palace(palace)
            rows_before.update({c["name"]: c["rows"] for c in rep.collections})
            ok, why = _codes_match(exp.get("codes", {}), rep.codes(), exp.get("codes_among"))
            if marker.exists():
                return False, "hostile pickle payload ran during check", {}
            return ok, why or ", ".join(f"{k} {v}" for k, v in rep.codes().items()) or "consistent", \
                {"codes": rep.codes()}

        stage("check", check)

        def reconcile():  # noqa: ANN202
            opts = ReconcileOptions(embedder=exp.get("embedder"), backup=True, chromadb_check=False, seed=seed)
            rep = reconcile_palace(palace, opts, progress=progress)
            want = int(exp.get("repair", 1))
            v = next(iter(rep.verifications.values()), None)
            detail = f"exit {rep.exit_code}" + (f", {len(rep.unrepaired)} unrepaired" if rep.unrepaired else "")
            if v is not None:
                detail += f", zero-diff {v.zero_diff}, {v.queried} self-queried, {v.unreachable} unreachable"
            return rep.exit_code == want, detail, rep.to_json()

        stage("reconcile", reconcile)
        if keep_dir is not None:
            result.kept["repaired"] = str(workload.copy_palace(palace, keep_dir / "repaired"))

        def verify():  # noqa: ANN202
            rep = check_palace(palace)
            problems = []
            if not rep.consistent:
                problems.append("check: " + ", ".join(f"{k} {v}" for k, v in rep.codes().items()))
            obs = workload.observe(palace, spec, write_probe=True)
            if obs.get("errors"):
                problems.append(f"chromadb: {obs['errors'][:2]}")
            if obs.get("bad_embedding_count"):
                problems.append(f"{obs['bad_embedding_count']} rows with a wrong embedding")
            if obs.get("query_misses") or obs.get("filtered_misses"):
                problems.append(f"self-query misses {len(obs.get('query_misses', []))}, "
                                f"filtered {len(obs.get('filtered_misses', []))}")
            if not obs.get("probe_found"):
                problems.append("probe write not found")
            lost = sum(rows_before.values()) - (obs.get("count") or 0)  # count is read before the probe
            if lost > 0:
                problems.append(f"{lost} rows lost")
            return not problems, "; ".join(problems) or (
                f"consistent; chromadb reads {obs.get('ids')} rows with embeddings; probe write found"), \
                {"count": obs.get("count"), "sampled": obs.get("sampled")}

        stage("verify", verify)
        return result
    finally:
        held.remove()
