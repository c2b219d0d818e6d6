"""chaosfix as a pytest plugin (registered through the ``pytest11`` entry point as ``chaosfix``).

Loading the plugin never imports chromadb: chromadb only ever runs in child processes
that a fixture starts (and may kill).

Fixtures
    ``palace_factory``   ``palace_factory(drawers=500, dim=16, ...) -> Path``: a private copy
                         of a throwaway palace built by the installed chromadb (the template
                         is built once per spec and chromadb version, then copied).
    ``palace``           the default palace (``palace_spec``); under
                         ``@pytest.mark.scenario(NAME)``, that scenario's broken palace.
    ``palace_spec``      the default ``PalaceSpec`` (seed from ``--chaos-seed``).
    ``crash``            ``crash(fault, palace=None, **args)``: apply a fault primitive by
                         name, a scenario step dict, a list of steps, a fault spec from
                         ``chaosfix.strategies`` or any callable; returns a ``CrashResult``.
    ``chroma_child``     run chromadb writes in a child process that a kill point, strace,
                         a timer or the test itself may SIGKILL; ``observe`` reopens.
    ``reconciler``       ``reconciler(palace, **ReconcileOptions) -> ReconcileReport``.
    ``scenario``         parametrized over the catalogue (or the names of a
                         ``@pytest.mark.scenario`` marker): a ``ScenarioCase``.
    ``chaos_seed``       the run's seed.

Options: ``--chaos-scenarios DIR`` (repeatable) adds scenario folders, ``--chaos-seed N``,
``--chaos-keep`` keeps the palaces of failed tests (``--chaos-keep-dir``, default
``.chaosfix-keep`` under the rootdir) and prints where, ``--chaos-profile`` names the
hypothesis profile for ``chaosfix.stateful`` machines.
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from chaosfix import workload
from chaosfix.errors import whole_number_problem
from chaosfix.workload import PalaceSpec

if TYPE_CHECKING:  # pragma: no cover
    from chaosfix.check import CheckReport
    from chaosfix.reconcile.run import ReconcileReport
    from chaosfix.scenario import Scenario, SimulationResult

_PALACES = pytest.StashKey[list]()
_STATE = pytest.StashKey["_ChaosConfig"]()
_ENV = pytest.StashKey[dict]()
_current_item: list[pytest.Item] = []


def pickle_format(major: str | None = None) -> str:
    """The id-map pickle format the installed chromadb writes: 'object' (0.6) or 'dict' (1.x)."""
    return "object" if (major or workload.chroma_major()) == "0.6" else "dict"


@dataclass
class _ChaosConfig:
    seed: int
    scenario_dirs: list[Path]
    keep_dir: Path | None

    @cached_property
    def catalogue(self) -> dict[str, Scenario]:
        from chaosfix.scenario import catalogue

        return catalogue(list(self.scenario_dirs))


def _state(config: pytest.Config) -> _ChaosConfig:
    return config.stash[_STATE]


# ---------------------------------------------------------------------------------------
# options, marker, header


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("chaosfix", "chaosfix crash testing")
    g.addoption("--chaos-scenarios", action="append", default=[], metavar="DIR",
                help="also load crash scenarios (*.toml) from DIR; repeatable")
    g.addoption("--chaos-seed", type=int, default=None, metavar="N",
                help="seed for palaces and seeded faults (default: $CHAOSFIX_SEED or 0)")
    g.addoption("--chaos-keep", action="store_true", default=False,
                help="keep the palaces of failed tests and print where they are")
    g.addoption("--chaos-keep-dir", default=None, metavar="DIR",
                help="where --chaos-keep puts them (default: .chaosfix-keep under the rootdir)")
    g.addoption("--chaos-profile", default=None, choices=("dev", "ci", "nightly", "full"),
                help="hypothesis profile for chaosfix.stateful machines and chaos_explore's states: "
                     "dev, ci (default), nightly or full (every crash state; nightly for machines)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "scenario(*names, seed=None, drawers=None): run the test against these catalogue scenarios "
        "(the `scenario` fixture, or `palace` broken as the scenario says)",
    )
    seed = config.getoption("--chaos-seed")
    if seed is None:
        raw = os.environ.get("CHAOSFIX_SEED", "0")
        try:
            seed = int(raw)
        except ValueError:
            raise pytest.UsageError(f"$CHAOSFIX_SEED {raw!r} is not an integer") from None
    if seed < 0:
        raise pytest.UsageError(f"chaosfix seed {seed} is negative (--chaos-seed or $CHAOSFIX_SEED: 0 or more)")
    keep_dir = None
    config.stash[_ENV] = {k: os.environ.get(k) for k in ("CHAOSFIX_KEEP_DIR", "CHAOSFIX_PROFILE")}
    if config.getoption("--chaos-keep"):
        keep_dir = Path(config.getoption("--chaos-keep-dir") or config.rootpath / ".chaosfix-keep").resolve()
        there = next((a for a in (keep_dir, *keep_dir.parents) if a.exists()), None)
        if there is not None and not there.is_dir():
            raise pytest.UsageError(f"--chaos-keep-dir {keep_dir}: {there} is not a folder")
        os.environ["CHAOSFIX_KEEP_DIR"] = str(keep_dir)  # chaosfix.stateful keeps its palace there
    if config.getoption("--chaos-profile"):
        os.environ["CHAOSFIX_PROFILE"] = config.getoption("--chaos-profile")
    dirs = [Path(d).resolve() for d in config.getoption("--chaos-scenarios")]
    for d in dirs:
        if not d.is_dir():
            raise pytest.UsageError(f"--chaos-scenarios {d}: no such folder")
    config.stash[_STATE] = _ChaosConfig(seed, dirs, keep_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_ENV, {})
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_report_header(config: pytest.Config) -> list[str]:
    st = _state(config)
    major = workload.chroma_major()
    try:
        cat = st.catalogue
        scen = f"{len(cat)} scenarios ({sum(1 for s in cat.values() if s.applies(major))} apply)"
    except Exception as exc:  # noqa: BLE001 - a bad scenario folder is reported by the tests using it
        scen = f"scenarios unreadable: {exc}"
    return [f"chaosfix: chromadb {workload.chromadb_version()} ({major}), pickle format {pickle_format(major)}, "
            f"seed {st.seed}, {scen}"]


# ---------------------------------------------------------------------------------------
# scenario parametrization


MARKER_KEYWORDS = ("seed", "drawers")


def _marker_names(metafunc: pytest.Metafunc) -> list[str] | None:
    names: list[str] = []
    found = False
    for m in metafunc.definition.iter_markers("scenario"):
        found = True
        for a in m.args:
            many = isinstance(a, (list, tuple)) and all(isinstance(x, str) for x in a)
            if not isinstance(a, str) and not many:
                _marker_fail(metafunc, f"scenario names are strings (or a list of them), not {a!r}")
            names.extend([a] if isinstance(a, str) else list(a))
        odd = sorted(set(m.kwargs) - set(MARKER_KEYWORDS))
        if odd:
            _marker_fail(metafunc, f"unknown keyword {', '.join(odd)} (it takes {', '.join(MARKER_KEYWORDS)})")
    return names if found else None


def _marker_fail(metafunc: pytest.Metafunc, why: str) -> NoReturn:
    """A misused marker: one line at collection, no traceback (a UsageError raised here
    shows under pluggy's)."""
    pytest.fail(f"{metafunc.definition.nodeid}: @pytest.mark.scenario: {why}", pytrace=False)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "_chaos_scenario" not in metafunc.fixturenames:
        return
    names = _marker_names(metafunc)
    if names is None and "scenario" not in metafunc.fixturenames:
        return
    st = _state(metafunc.config)
    cat = st.catalogue
    major = workload.chroma_major()
    explicit = names is not None
    if not explicit:
        names = sorted(cat)
    elif not names:
        _marker_fail(metafunc, "needs at least one name")
    kw = dict(m.kwargs) if (m := metafunc.definition.get_closest_marker("scenario")) else {}
    if kw.get("seed") is not None and (why := whole_number_problem("seed", kw["seed"], 0)):
        _marker_fail(metafunc, why)
    params = []
    for n in names:
        if n not in cat:
            _marker_fail(metafunc, f"unknown scenario {n!r} (known: {', '.join(sorted(cat))}; "
                                   "add folders with --chaos-scenarios)")
        sc = cat[n]
        if sc.applies(major) and (why := sc.drawers_problem(kw.get("drawers"))):
            _marker_fail(metafunc, why)
        marks = [] if sc.applies(major) else [pytest.mark.skip(
            reason=f"scenario {n} applies to chromadb {', '.join(sc.versions)}, not {workload.chromadb_version()}")]
        params.append(pytest.param(n, marks=marks, id=n))
    metafunc.parametrize("_chaos_scenario", params, indirect=True)


@dataclass
class ScenarioCase:
    """One catalogue scenario bound to a test: its palace is built and broken on first use."""

    scenario: Scenario
    seed: int
    workdir: Path
    drawers: int | None = None
    steps: list[dict] = field(default_factory=list)
    _register: Callable[[Path], None] | None = None
    keep_runs: bool = False  # keep run()'s scratch for --chaos-keep

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def spec(self) -> PalaceSpec:
        return self.scenario.spec(seed=self.seed, drawers=self.drawers)

    @property
    def expected(self) -> dict:
        """The scenario's expectations for the installed chromadb (codes, reopen, repair)."""
        return self.scenario.expectations()

    @cached_property
    def palace(self) -> Path:
        """The palace built and broken as the scenario's steps say (not checked, not repaired)."""
        from chaosfix.scenario import Ctx, apply_step

        path = self.workdir / "palace"
        scratch = self.workdir / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        workload.fresh_palace(path, self.spec)
        if self._register:
            self._register(path)
        ctx = Ctx(path, self.spec, scratch, self.seed)
        self.steps = [apply_step(ctx, s) for s in self.scenario.steps]
        return path

    def check(self) -> CheckReport:
        from chaosfix.check import check_palace

        return check_palace(self.palace)

    def run(self) -> SimulationResult:
        """The whole ``chaosfix simulate`` loop on a palace of its own (build, break,
        observe, check, reconcile, verify); with --chaos-keep its files are kept on failure."""
        from chaosfix.scenario import run_scenario

        keep = self.workdir / "simulate" if self.keep_runs else None
        res = run_scenario(self.scenario, seed=self.seed, drawers=self.drawers, keep=keep)
        if self._register and keep is not None and keep.exists():
            self._register(keep)
        return res

    def assert_expected(self, res: SimulationResult | None = None) -> SimulationResult:
        """Run the loop (or take a result) and fail with every unmet expectation."""
        res = res or self.run()
        failed = [f"{s.name}: {s.detail}" for s in res.stages if not s.ok]
        if failed:
            raise AssertionError(f"scenario {self.name} on chromadb {res.chromadb} (seed {res.seed}):\n  "
                                 + "\n  ".join(failed))
        return res


@pytest.fixture
def _chaos_scenario(request: pytest.FixtureRequest) -> str | None:
    return getattr(request, "param", None)


def _marker_kwargs(request: pytest.FixtureRequest) -> dict:
    m = request.node.get_closest_marker("scenario")
    return dict(m.kwargs) if m else {}


@pytest.fixture
def scenario(request: pytest.FixtureRequest, _chaos_scenario: str | None, chaos_seed: int,
             tmp_path: Path) -> ScenarioCase:
    """The catalogue scenario this test instance runs (parametrized over the catalogue, or
    over the names given by ``@pytest.mark.scenario``)."""
    if _chaos_scenario is None:
        raise pytest.UsageError("the scenario fixture is parametrized by chaosfix; do not request it indirectly")
    kw = _marker_kwargs(request)
    sc = _state(request.config).catalogue[_chaos_scenario]
    return ScenarioCase(sc, int(kw.get("seed", chaos_seed)), tmp_path / f"scenario-{sc.name}",
                        drawers=kw.get("drawers"), _register=lambda p: _register(request.node, p),
                        keep_runs=_state(request.config).keep_dir is not None)


# ---------------------------------------------------------------------------------------
# palaces


def _register(item: pytest.Item, path: Path) -> None:
    item.stash.setdefault(_PALACES, []).append(Path(path))


def register_palace(path: str | Path) -> None:
    """Mark ``path`` as a palace of the running test (kept on failure with ``--chaos-keep``)."""
    if _current_item:
        _register(_current_item[-1], Path(path))


@pytest.fixture(scope="session")
def chaos_seed(pytestconfig: pytest.Config) -> int:
    """The run's seed (``--chaos-seed``, ``$CHAOSFIX_SEED`` or 0)."""
    return _state(pytestconfig).seed


@pytest.fixture
def palace_spec(chaos_seed: int) -> PalaceSpec:
    """The default palace: 300 drawers, 384-d cosine, sync_threshold 100 (three persists)."""
    return PalaceSpec(seed=chaos_seed)


class PalaceFactory:
    """``factory(spec=None, *, name=None, **fields) -> Path``: a private copy of the cached
    template palace for ``spec`` with ``fields`` replaced."""

    def __init__(self, base: PalaceSpec, root: Path, register: Callable[[Path], None]) -> None:
        self.base = base
        self.root = root
        self._register = register
        self.specs: dict[Path, PalaceSpec] = {}

    def __call__(self, spec: PalaceSpec | None = None, *, name: str | None = None, **fields: Any) -> Path:
        spec = (spec or self.base).with_(**fields) if fields else (spec or self.base)
        name = name or ("palace" if not self.specs else f"palace-{len(self.specs) + 1}")
        dst = self.root / name
        if dst.exists():
            raise ValueError(f"palace {name!r} already exists in this test")
        self.root.mkdir(parents=True, exist_ok=True)
        workload.fresh_palace(dst, spec)
        self.specs[dst] = spec
        self._register(dst)
        return dst

    def spec_of(self, palace: str | Path) -> PalaceSpec:
        """The spec a palace of this test was made from (the default spec for others)."""
        return self.specs.get(Path(palace), self.base)

    @property
    def last(self) -> Path | None:
        return next(reversed(self.specs), None)


@pytest.fixture
def palace_factory(request: pytest.FixtureRequest, palace_spec: PalaceSpec, tmp_path: Path) -> PalaceFactory:
    """Make throwaway palaces: ``palace_factory(drawers=500, dim=16)`` -> Path under tmp_path."""
    return PalaceFactory(palace_spec, tmp_path / "palaces", lambda p: _register(request.node, p))


@pytest.fixture
def palace(request: pytest.FixtureRequest, palace_factory: PalaceFactory, _chaos_scenario: str | None) -> Path:
    """A private palace of the default spec; under ``@pytest.mark.scenario``, that
    scenario's palace, built and broken as its steps say."""
    if _chaos_scenario is not None:
        case: ScenarioCase = request.getfixturevalue("scenario")
        path = case.palace
        palace_factory.specs[path] = case.spec
        return path
    return palace_factory()


# ---------------------------------------------------------------------------------------
# crash


@dataclass
class CrashResult:
    """What a fault did: per step its outcome (``killed``, ``returncode`` for writes, the
    primitive's return value otherwise) and chaosfix's check of the palace afterwards."""

    fault: str
    palace: Path
    steps: list[dict]
    report: CheckReport

    @property
    def killed(self) -> bool:
        return any(s.get("killed") for s in self.steps)

    @property
    def codes(self) -> dict[str, int]:
        return self.report.codes()

    @property
    def consistent(self) -> bool:
        return self.report.consistent

    def __repr__(self) -> str:
        return f"CrashResult({self.fault!r}, killed={self.killed}, codes={self.codes})"


class Crash:
    """Apply faults to a test's palaces (see the module docstring)."""

    def __init__(self, factory: PalaceFactory, scratch: Path, seed: int) -> None:
        self.factory = factory
        self.scratch = scratch
        self.seed = seed
        self._ctx: dict[Path, Any] = {}

    @property
    def primitives(self) -> list[str]:
        from chaosfix import faults

        return sorted(faults.REGISTRY)

    def _context(self, palace: Path):  # noqa: ANN202
        from chaosfix.scenario import Ctx

        if palace not in self._ctx:
            scratch = self.scratch / f"{palace.name}-{len(self._ctx)}"
            scratch.mkdir(parents=True, exist_ok=True)
            self._ctx[palace] = Ctx(palace, self.factory.spec_of(palace), scratch, self.seed)
        return self._ctx[palace]

    def __call__(self, fault: str | dict | list | Callable[..., Any], palace: str | Path | None = None,
                 **args: Any) -> CrashResult:
        from chaosfix.check import check_palace
        from chaosfix.scenario import apply_step

        target = Path(palace) if palace is not None else self.factory.last
        if target is None:
            raise ValueError("crash: no palace yet; request `palace` or pass palace=")
        ctx = self._context(target)
        if callable(fault):
            name = getattr(fault, "__name__", repr(fault))
            out = [{"result": _call_injected(fault, ctx, args)}]
        else:
            steps, name = _steps_of(fault, args)
            out = []
            for s in steps:
                if s.get("do") == "snapshot_segment":  # a new snapshot replaces the previous one
                    shutil.rmtree(ctx.scratch / "snapshot", ignore_errors=True)
                out.append(apply_step(ctx, s))
        return CrashResult(name, target, out, check_palace(target))


def _steps_of(fault: str | dict | list, args: dict) -> tuple[list[dict], str]:
    if isinstance(fault, str):
        return [{"do": fault, **args}], fault
    if isinstance(fault, dict) and "kind" in fault:  # a chaosfix.strategies fault spec
        from chaosfix.strategies import fault_steps

        if "ops" not in args:
            raise ValueError("crash: a fault spec needs ops=[...] (the write it interrupts)")
        return fault_steps(fault, args["ops"]), fault["kind"]
    if isinstance(fault, dict):
        return [{**fault, **args}], str(fault.get("do"))
    steps = [{"do": s} if isinstance(s, str) else dict(s) for s in fault]
    return steps, "+".join(str(s.get("do")) for s in steps)


def _call_injected(fn: Callable[..., Any], ctx: Any, args: dict) -> Any:
    """Call a user's fault function, passing palace/path/spec/seed/scratch if it asks."""
    params = inspect.signature(fn).parameters
    avail = {"palace": ctx.palace, "spec": ctx.spec, "seed": ctx.seed, "scratch": ctx.scratch}
    kw = {k: v for k, v in avail.items() if k in params and k not in args}
    if "path" in params and "path" not in args:
        from chaosfix.scenario import _resolve_file

        kw["path"] = _resolve_file(ctx, args.pop("file")) if "file" in args else ctx.palace
    return fn(**kw, **args)


@pytest.fixture
def crash(palace_factory: PalaceFactory, tmp_path: Path, chaos_seed: int) -> Crash:
    """``crash("truncate", file="index_metadata.pickle", fraction=0.5)``, ``crash("write",
    ops=[...], kill_point="after-pickle")``, ``crash(["snapshot_segment", ...])``, or
    ``crash(my_fn)``: applies to ``palace=`` or the test's last palace; returns a CrashResult."""
    return Crash(palace_factory, tmp_path / "crash-scratch", chaos_seed)


# ---------------------------------------------------------------------------------------
# the chromadb child process


class ChildHandle:
    """A running chromadb writer started by ``chroma_child.spawn``: kill it whenever."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the writer (its whole process group), like a crash in the field."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = 300) -> workload.ChildResult:
        out, err = self.proc.communicate(timeout=timeout)
        return workload.ChildResult(self.proc.returncode, workload.parse_result(out), err or "")


class ChromaChild:
    """chromadb in child processes, for workloads: ``run`` (synchronous, with an optional kill
    point, strace injection or timer), ``spawn`` (returns a killable handle), ``observe``."""

    def __init__(self, factory: PalaceFactory) -> None:
        self.factory = factory
        self.handles: list[ChildHandle] = []

    def _spec(self, palace: str | Path, spec: PalaceSpec | None) -> PalaceSpec:
        return spec or self.factory.spec_of(palace)

    def run(self, palace: str | Path, ops: list[dict], *, kill_point: str | None = None, hit: int = 1,
            strace: dict | None = None, kill_after: float | None = None,
            spec: PalaceSpec | None = None) -> workload.ChildResult:
        """Apply ``ops`` (``{"op": "add"|"upsert"|"update"|"delete", "start", "count"[, "version"]}``).

        ``kill_point`` (0.6: start, after-hnsw, after-pickle, before-commit), ``strace``
        (``{"file": "link_lists.bin", "nth": 1, "syscall": "write"}``) or ``kill_after``
        seconds SIGKILL the child; the result says ``killed`` / ``ok``."""
        from chaosfix import faults
        from chaosfix.scenario import _resolve_file

        spec = self._spec(palace, spec)
        kill = faults.kill_point(kill_point, hit) if kill_point else None
        prefix = None
        if strace:
            from chaosfix.scenario import Ctx

            ctx = Ctx(Path(palace), spec, Path(palace), 0)
            prefix = faults.strace_kill_prefix(_resolve_file(ctx, strace["file"]), int(strace.get("nth", 1)),
                                               strace.get("syscall", "openat"))
        return workload.apply_ops(palace, spec, ops, kill=kill, prefix=prefix, kill_after=kill_after)

    def add(self, palace: str | Path, start: int, count: int, **kw: Any) -> workload.ChildResult:
        return self.run(palace, [{"op": "add", "start": start, "count": count}], **kw)

    def upsert(self, palace: str | Path, start: int, count: int, version: int = 1, **kw: Any) -> workload.ChildResult:
        return self.run(palace, [{"op": "upsert", "start": start, "count": count, "version": version}], **kw)

    def delete(self, palace: str | Path, start: int, count: int, **kw: Any) -> workload.ChildResult:
        return self.run(palace, [{"op": "delete", "start": start, "count": count}], **kw)

    def spawn(self, palace: str | Path, ops: list[dict], spec: PalaceSpec | None = None) -> ChildHandle:
        """Start a writer in the background; ``handle.kill()`` SIGKILLs it, ``handle.wait()``
        collects its result. Children still running at teardown are killed."""
        spec = self._spec(palace, spec)
        req = asdict(spec) | {"path": str(palace), "mode": "build", "ops": ops, "kill": None}
        proc = subprocess.Popen(workload.child_command(req), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=workload.child_env(), text=True, start_new_session=True)
        h = ChildHandle(proc)
        self.handles.append(h)
        return h

    def observe(self, palace: str | Path, write_probe: bool = False, spec: PalaceSpec | None = None) -> dict:
        """Reopen with chromadb in a child; what it did (count, errors, query misses...)."""
        return workload.observe(palace, self._spec(palace, spec), write_probe=write_probe)

    def close(self) -> None:
        for h in self.handles:
            h.kill()
            try:
                h.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


@pytest.fixture
def chroma_child(palace_factory: PalaceFactory) -> Iterator[ChromaChild]:
    """chromadb writers in killable child processes (the test process never imports chromadb)."""
    c = ChromaChild(palace_factory)
    yield c
    c.close()


# ---------------------------------------------------------------------------------------
# reconciler


class Reconciler:
    """``reconciler(palace, **options) -> ReconcileReport``. Defaults for tests: the
    HashEmbedder of the palace's dimension (re-embeds rows whose vector exists nowhere
    else, exactly as chaosfix's palaces were built), no backup, no chromadb reopen (use
    ``assert_chromadb_consistent``), seed from ``--chaos-seed``."""

    def __init__(self, factory: PalaceFactory, seed: int) -> None:
        self.factory = factory
        self.seed = seed
        self.reports: list[ReconcileReport] = []

    def options(self, palace: str | Path, **options: Any):  # noqa: ANN201
        from chaosfix.embedder import HashEmbedder
        from chaosfix.reconcile import ReconcileOptions

        opts: dict[str, Any] = {"backup": False, "chromadb_check": False, "seed": self.seed}
        if "embedder" not in options:
            opts["embedder"] = HashEmbedder(self.factory.spec_of(palace).dim)
        odd = sorted(set(options) - {f.name for f in fields(ReconcileOptions)})
        if odd:
            raise TypeError(f"reconciler: unknown option {', '.join(odd)}; the options are "
                            f"{', '.join(f.name for f in fields(ReconcileOptions))}")
        opts.update(options)
        return ReconcileOptions(**opts)

    def __call__(self, palace: str | Path, **options: Any) -> ReconcileReport:
        from chaosfix.reconcile import reconcile_palace

        rep = reconcile_palace(palace, self.options(palace, **options))
        self.reports.append(rep)
        return rep

    def dry_run(self, palace: str | Path, **options: Any) -> ReconcileReport:
        return self(palace, dry_run=True, **options)


@pytest.fixture
def reconciler(palace_factory: PalaceFactory, chaos_seed: int) -> Reconciler:
    """Repair a test palace in-process: ``rep = reconciler(palace); assert rep.exit_code == 1``."""
    return Reconciler(palace_factory, chaos_seed)


@pytest.fixture
def chaos_explore(chaos_seed: int) -> Callable[..., Any]:
    """Explore a workload's crash states (``chaosfix.explore``): ``rep = chaos_explore("upsert")``
    then ``assert not rep.bad``. The profile follows ``--chaos-profile`` / ``$CHAOSFIX_PROFILE``
    (ci: 2 seeded states per workload, dev, nightly, full); a workload is a built-in name,
    a workload .toml, or a ``chaosfix.explore.workloads.Workload``."""
    from chaosfix.explore.run import PROFILES, explore
    from chaosfix.explore.workloads import Workload, load

    def run(*workloads: str | Workload, profile: str | None = None, **kw: Any) -> Any:
        name = profile or os.environ.get("CHAOSFIX_PROFILE") or "ci"
        if name not in PROFILES:  # (a typo ran the ci profile, silently)
            raise ValueError(f"chaos_explore profile {name!r}: one of {', '.join(PROFILES)}")
        if not workloads:
            raise ValueError("chaos_explore needs a workload: a built-in name, a .toml or a Workload")
        wls = [w if isinstance(w, Workload) else load(w, chaos_seed) for w in workloads]
        return explore(wls, PROFILES[name], seed=chaos_seed, **kw)

    return run


# ---------------------------------------------------------------------------------------
# failures: keep palaces, say how to rerun


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201
    _current_item.append(item)
    try:
        yield
    finally:
        _current_item.remove(item)


def _from_invocation(item: pytest.Item) -> str:
    """The test's node id with its file relative to the folder pytest was run from (node
    ids are relative to the rootdir, which may be a parent: from a subfolder, or when an
    option's path moved it), so the rerun line runs where it is printed."""
    _, sep, rest = item.nodeid.partition("::")  # (a file outside the rootdir has no path in it)
    return os.path.relpath(item.path, item.config.invocation_params.dir) + sep + rest


def _safe(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed or report.when == "teardown":
        return
    palaces = [p for p in item.stash.get(_PALACES, []) if p.exists()]
    uses = palaces or set(getattr(item, "fixturenames", ())) & {
        "palace", "palace_factory", "scenario", "crash", "chroma_child", "reconciler"}
    if not uses:
        return
    st = _state(item.config)
    lines = [f"chromadb {workload.chromadb_version()} ({pickle_format()} pickle), seed {st.seed}",
             f"rerun: pytest {shlex.quote(_from_invocation(item))} --chaos-seed {st.seed}"
             + "".join(f" --chaos-scenarios {shlex.quote(str(d))}" for d in st.scenario_dirs)]
    if st.keep_dir is not None:
        dest = st.keep_dir / _safe(item.nodeid)
        if dest.exists():
            shutil.rmtree(dest)
        for i, p in enumerate(palaces):
            shutil.copytree(p, dest / (p.name if p.name not in {x.name for x in palaces[:i]} else f"{p.name}-{i}"),
                            symlinks=True)
        if palaces:
            lines.append(f"kept palace: {dest}")
            report.user_properties.append(("chaosfix_kept", str(dest)))
    elif palaces:
        lines.append("keep the palace with --chaos-keep")
    report.sections.append(("chaosfix", "\n".join(lines)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    kept = []
    for rep in terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", []):
        for k, v in getattr(rep, "user_properties", []):
            if k == "chaosfix_kept":
                kept.append((rep.nodeid, v))
    if kept:
        terminalreporter.section("chaosfix kept palaces")
        for nodeid, path in kept:
            terminalreporter.write_line(f"{nodeid}: {path}")


__all__ = [
    "ChildHandle", "ChromaChild", "Crash", "CrashResult", "PalaceFactory", "Reconciler", "ScenarioCase",
    "pickle_format", "register_palace",
]

