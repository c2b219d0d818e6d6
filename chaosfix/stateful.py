"""A hypothesis state machine that writes to a palace through the real chromadb, crashes
it, reopens it and reconciles it, checking after every step that nothing acknowledged
is lost silently.

Rules: ``add``, ``upsert`` (or update), ``delete`` (each one chromadb write in a child
process; the write is *acknowledged* when the child returns normally), ``crash`` (a write
interrupted by a fault from ``chaosfix.strategies.fault_specs``: a kill point, an strace
kill, a lost persist or torn pages), ``reopen`` (chromadb opens the palace in a child)
and ``reconcile``.

Invariants:
- every acknowledged write survives or is reported: the palace's rows (SQL plus the WAL
  chromadb will replay) hold, for every drawer, a state the model allows (an acknowledged
  write is certain; an interrupted one may or may not have landed), or chaosfix check
  reports a finding; a palace that check calls consistent must read back through chromadb
  with every row, its exact embedding and its own nearest-neighbour hit (``reopen``);
- after ``reconcile``: strict zero-diff and top-k self-query hold.

Profiles (hypothesis settings profiles, registered as ``chaosfix-dev``, ``chaosfix-ci`` and
``chaosfix-nightly``): ``dev`` (10 programs of 8 steps, shrinking), ``ci`` (2 programs of 4
steps, derandomized, no shrinking), ``nightly`` (200 of 25). ``profile_settings()`` picks
``$CHAOSFIX_PROFILE`` (pytest: ``--chaos-profile``), default ``ci``.

On failure one line is added to the error: ``chaosfix replay: python -m chaosfix.stateful
--replay FILE``. FILE (under ``$CHAOSFIX_REPLAY_DIR``, default ``.chaosfix/replay``) holds
the machine, the palace spec, the seed and the exact steps; replaying runs them again in
order, checking the invariants after each, with no hypothesis involved.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import INVARIANT_MARKER, RuleBasedStateMachine, invariant, precondition, rule

from chaosfix import workload
from chaosfix.check import CheckReport, check_palace
from chaosfix.drawers import drawer
from chaosfix.errors import OperationalError
from chaosfix.palace import PalaceSql, palace_db
from chaosfix.strategies import fault_specs, fault_steps
from chaosfix.workload import PalaceSpec, chroma_major, chromadb_version

CASE_SCHEMA = "chaosfix.stateful-case/1"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


PROFILES = {"dev": "chaosfix-dev", "ci": "chaosfix-ci", "nightly": "chaosfix-nightly"}


def _register_profiles() -> None:
    """chaosfix's profiles, registered as ``chaosfix-dev``/``-ci``/``-nightly`` so they never
    replace a user's (or hypothesis's own built-in ``ci``) profile of the same short name."""
    common = {"deadline": None, "suppress_health_check": _SUPPRESS, "print_blob": True}
    profiles = {
        # a failure in CI is reported as found (with its replay line), not shrunk: each
        # shrink step costs chromadb child processes
        "ci": {"max_examples": 2, "stateful_step_count": 4, "derandomize": True, "database": None,
               "phases": (Phase.explicit, Phase.reuse, Phase.generate)},
        "dev": {"max_examples": 10, "stateful_step_count": 8},
        "nightly": {"max_examples": 200, "stateful_step_count": 25},
    }
    for short, kw in profiles.items():
        settings.register_profile(PROFILES[short], **common, **kw)


_register_profiles()


def profile_settings(name: str | None = None) -> settings:
    """The settings of profile ``name`` (dev, ci, nightly, or any registered profile),
    else ``$CHAOSFIX_PROFILE``, else ci."""
    name = name or os.environ.get("CHAOSFIX_PROFILE") or "ci"
    name = "nightly" if name == "full" else name  # (explore's exhaustive profile: the machines' longest)
    try:
        return settings.get_profile(PROFILES.get(name, name))
    except InvalidArgument:
        raise ValueError(f"chaosfix profile {name!r}: one of {', '.join(PROFILES)}, full, "
                         "or a registered hypothesis profile") from None


# a count is either a number of records or a position relative to sync_threshold
COUNTS = st.one_of(st.sampled_from(["t-1", "t", "t+1", "2t"]), st.integers(1, 30))
# an interrupted write should reach a persist (or two) so the fault has something to hit
CRASH_COUNTS = st.sampled_from(["t", "t+1", "2t", "3t"])
_DOC = re.compile(r"^drawer (\d+) in \S+ \(seed -?\d+, v(\d+)\)")


def _replay_dir() -> Path:
    return Path(os.environ.get("CHAOSFIX_REPLAY_DIR") or Path.cwd() / ".chaosfix" / "replay")


def _is_final() -> bool:
    try:
        from hypothesis.control import current_build_context

        return bool(current_build_context().is_final)
    except InvalidArgument:
        return True  # not under hypothesis (a replay, or a direct call)


def recorded(fn):  # noqa: ANN001, ANN201
    """Record a rule's call (for the replay file) and annotate a failure with the replay line."""

    @functools.wraps(fn)
    def wrapper(self: CrashMachine, **kwargs: Any) -> Any:
        self.steps.append({"rule": fn.__name__, "args": kwargs})
        try:
            return fn(self, **kwargs)
        except BaseException as exc:
            self.failed(exc)
            raise

    return wrapper


def guarded(fn):  # noqa: ANN001, ANN201
    """Annotate an invariant's failure with the replay line."""

    @functools.wraps(fn)
    def wrapper(self: CrashMachine) -> Any:
        try:
            return fn(self)
        except BaseException as exc:
            self.failed(exc)
            raise

    wrapper._chaosfix_guarded = True  # type: ignore[attr-defined]
    return wrapper


class CrashMachine(RuleBasedStateMachine):
    """Base: a private palace per example, the step log and the replay file. No rules."""

    spec: PalaceSpec = PalaceSpec(drawers=40, dim=16, sync_threshold=20, batch_size=10)

    def __init_subclass__(cls, **kw: Any) -> None:
        """A subclass's own ``@invariant`` gets the replay line too: each is ``guarded``
        (a plain one failed with no replay line or file)."""
        super().__init_subclass__(**kw)
        for name, fn in list(vars(cls).items()):
            marker = getattr(fn, INVARIANT_MARKER, None) if callable(fn) else None
            if marker is None or getattr(fn, "_chaosfix_guarded", False):
                continue
            wrapped = guarded(fn)
            try:  # (hypothesis calls the marker's function, not the attribute)
                setattr(wrapped, INVARIANT_MARKER, dataclasses.replace(marker, function=wrapped))
            except TypeError:  # a hypothesis whose marker is no dataclass: left as it is
                continue
            setattr(cls, name, wrapped)

    def __init__(self) -> None:
        super().__init__()
        self.major = chroma_major()
        self.workdir = Path(tempfile.mkdtemp(prefix="chaosfix-machine-"))
        self.palace = workload.fresh_palace(self.workdir / "palace", self.spec)
        self.steps: list[dict] = []
        self.case_file: Path | None = None

    def teardown(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- failure -> replay file ----------------------------------------------------------
    def case(self) -> dict:
        cls = type(self)
        cls = cls.__dict__.get("_replayed_from", cls)
        return {
            "schema": CASE_SCHEMA,
            "machine": f"{cls.__module__}:{cls.__qualname__}",
            "machine_file": _source_file(cls),
            "chromadb": chromadb_version(),
            "spec": asdict(self.spec),
            "seed": self.spec.seed,
            "steps": self.steps,
        }

    def failed(self, exc: BaseException) -> None:
        if getattr(exc, "_chaosfix_replay", False) or not _is_final():
            return
        case = self.case()
        blob = json.dumps(case, sort_keys=True)
        out = _replay_dir()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{type(self).__name__}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}.json"
        path.write_text(json.dumps(case, indent=1) + "\n")
        self.case_file = path
        line = f"chaosfix replay: python -m chaosfix.stateful --replay {path}"
        keep = os.environ.get("CHAOSFIX_KEEP_DIR")
        if keep and self.palace.exists():
            dest = Path(keep) / path.stem
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(self.palace, dest, symlinks=True)
            line += f"  (palace kept: {dest})"
        try:
            exc.add_note(line)
            exc._chaosfix_replay = True  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
            pass


def _source_file(cls: type) -> str | None:
    try:
        import inspect

        return inspect.getfile(cls)
    except (TypeError, OSError):
        return None


class PalaceMachine(CrashMachine):
    """Writes, crashes, reopens and reconciles one palace; see the module docstring.

    Subclass to change ``spec`` (keep it small: each write is a chromadb child process)
    or ``fault_kinds`` (a subset of ``chaosfix.strategies.FAULT_KINDS``)."""

    fault_kinds: tuple[str, ...] | None = None
    # ops a power cut (lost_persist, torn) may interrupt; an upsert/update whose HNSW flush is
    # lost leaves stale vectors that check cannot see without an embedder (see README)
    power_cut_ops: tuple[str, ...] = ("add", "delete")

    def __init__(self) -> None:
        super().__init__()
        # drawer index -> the states the model allows: a version, or None (absent)
        self.model: dict[int, set[int | None]] = {i: {0} for i in range(self.spec.drawers)}
        self.next_index = self.spec.drawers
        self.crashes: list[dict] = []
        self.repairs = 0
        self._id_index = {drawer(i, self.spec.seed)[0]: i for i in range(self.spec.drawers)}

    # ---- helpers -------------------------------------------------------------------------
    def _count(self, c: int | str) -> int:
        t = self.spec.sync_threshold
        n = {"t-1": t - 1, "t": t, "t+1": t + 1, "2t": 2 * t, "3t": 3 * t}.get(c, c) if isinstance(c, str) else c
        return max(1, min(int(n), 5000))

    def _op(self, kind: str, at: int, count: int | str, version: int) -> dict:
        n = self._count(count)
        if kind == "add":
            return {"op": "add", "start": self.next_index, "count": n}
        if kind == "upsert":
            return {"op": "upsert", "start": at % (self.next_index + 1), "count": n, "version": version}
        start = at % max(1, self.next_index)
        op = {"op": kind, "start": start, "count": max(1, min(n, self.next_index - start))}
        if kind == "update":
            op["version"] = version
        return op

    def _learn_ids(self, op: dict) -> None:
        for i in range(op["start"], op["start"] + op["count"]):
            self._id_index.setdefault(drawer(i, self.spec.seed)[0], i)
        self.next_index = max(self.next_index, op["start"] + op["count"])

    def _expect(self, op: dict, certain: bool) -> None:
        def effect(s: int | None) -> int | None:
            kind = op["op"]
            if kind == "add":
                return 0 if s is None else s
            if kind == "upsert":
                return int(op.get("version", 0))
            if kind == "update":
                return None if s is None else int(op.get("version", 0))
            return None  # delete

        for i in range(op["start"], op["start"] + op["count"]):
            cur = self.model.get(i, {None})
            new = {effect(s) for s in cur}
            self.model[i] = new if certain else cur | new

    def _write(self, op: dict, fault: dict | None = None) -> dict:
        """One chromadb write (optionally interrupted); updates the model. Returns the outcome."""
        from chaosfix.scenario import Ctx, apply_step

        self._learn_ids(op)
        if fault is None:
            res = workload.apply_ops(self.palace, self.spec, [op])
            acked = res.ok
            outcome = {"killed": res.killed, "ok": res.ok, "error": res.result.get("error")}
        else:
            scratch = Path(tempfile.mkdtemp(prefix="crash-", dir=self.workdir))
            ctx = Ctx(self.palace, self.spec, scratch, self.spec.seed)
            outcome = {"fault": fault}
            acked = False
            try:
                for step in fault_steps(fault, [op]):
                    out = apply_step(ctx, step)
                    if step["do"] == "write":
                        acked = not out.get("killed")
                        outcome.update(out)
            except RuntimeError as exc:  # chromadb refused the write (a damaged palace): not acknowledged
                outcome["error"] = str(exc)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            self.crashes.append(outcome)
        self._expect(op, certain=acked)
        return outcome

    def actual(self, rep: CheckReport | None = None) -> tuple[dict[int, int | None], list[str]]:
        """drawer index -> version (None absent) as chromadb will see it after replaying its
        WAL (SQL rows, then WAL rows the metadata segment has not consumed), plus ids of rows
        that no write of this machine made."""
        rep = rep or check_palace(self.palace)
        col = next(s for s in rep.states if s.info.name == self.spec.collection)
        sql = PalaceSql(palace_db(self.palace))
        try:
            docs = sql.documents(col.info.metadata_segment) if col.info.metadata_segment else {}
            above = col.metadata_seq.value if col.metadata_seq and not col.metadata_seq.poisoned else 0
            wal = sql.wal(col.info.id, above=above)  # with its metadata: the document
        finally:
            sql.close()
        state: dict[str, int | None] = {}
        for rid, doc in docs.items():
            m = _DOC.match(doc or "")
            state[rid] = int(m.group(2)) if m else -1
        for w in wal:
            m = _DOC.match(w.document or "")
            v = int(m.group(2)) if m else -1
            if w.op == 3:
                state.pop(w.id, None)
            elif w.op == 0 and w.id not in state or w.op == 2 or (w.op == 1 and w.id in state):
                state[w.id] = v
        out: dict[int, int | None] = {i: None for i in self.model}
        strangers = []
        for rid, v in state.items():
            i = self._id_index.get(rid)
            if i is None:
                strangers.append(rid)
            else:
                out[i] = v
        return out, strangers

    # ---- rules ---------------------------------------------------------------------------
    @rule(count=COUNTS)
    @recorded
    def add(self, count: int | str) -> None:
        self._write(self._op("add", 0, count, 0))

    @rule(at=st.integers(0, 10**6), count=COUNTS, version=st.integers(1, 3), update=st.booleans())
    @recorded
    def upsert(self, at: int, count: int | str, version: int, update: bool) -> None:
        kind = "update" if update and self.next_index else "upsert"
        self._write(self._op(kind, at, count, version))

    @precondition(lambda self: self.next_index > 0)
    @rule(at=st.integers(0, 10**6), count=COUNTS)
    @recorded
    def delete(self, at: int, count: int | str) -> None:
        self._write(self._op("delete", at, count, 0))

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        fault = data.draw(fault_specs(self.major, self.fault_kinds), label="fault")
        kinds = ["add", "upsert", "delete"]
        if fault["kind"] in ("lost_persist", "torn"):
            kinds = [k for k in kinds if k in self.power_cut_ops] or ["add"]
        kind = data.draw(st.sampled_from(kinds), label="op")
        at = data.draw(st.integers(0, 10**6), label="at")
        count = data.draw(CRASH_COUNTS, label="count")
        self.crash_write(fault=fault, kind=kind, at=at, count=count, version=data.draw(st.integers(1, 3)))

    @recorded
    def crash_write(self, fault: dict, kind: str, at: int, count: int | str, version: int) -> None:
        """A write interrupted by ``fault`` (the recorded, replayable form of ``crash``)."""
        if kind == "delete" and not self.next_index:
            kind = "add"
        self._write(self._op(kind, at, count, version), fault=fault)

    @rule()
    @recorded
    def reopen(self) -> None:
        before = check_palace(self.palace)
        obs = workload.observe(self.palace, self.spec)
        if not before.consistent:
            return  # chromadb may well fail on a palace check flags: the damage is reported
        actual, _ = self.actual(before)
        present = sum(1 for v in actual.values() if v is not None)
        problems = [f"chromadb {w}: {m}" for w, m in obs.get("errors", [])]
        if obs.get("count") is not None and obs["count"] != present:
            problems.append(f"chromadb counts {obs['count']} rows, the writes left {present}")
        if obs.get("bad_embedding_count"):
            problems.append(f"{obs['bad_embedding_count']} rows read back with a wrong embedding: "
                            f"{obs['bad_embeddings'][:5]}")
        if obs.get("query_misses") or obs.get("filtered_misses"):
            problems.append(f"self-query misses {obs.get('query_misses')[:5]}, "
                            f"filtered {obs.get('filtered_misses', [])[:5]}")
        assert not problems, "chaosfix check called the palace consistent, but chromadb disagrees:\n  " + \
            "\n  ".join(problems)

    @rule()
    @recorded
    def reconcile(self) -> None:
        from chaosfix.assertions import assert_self_query, assert_zero_diff
        from chaosfix.embedder import HashEmbedder
        from chaosfix.reconcile import ReconcileOptions, reconcile_palace

        opts = ReconcileOptions(embedder=HashEmbedder(self.spec.dim), backup=False, chromadb_check=False,
                                seed=self.spec.seed, deep=True)  # deep: stale vectors of lost upserts too
        try:
            rep = reconcile_palace(self.palace, opts)
        except OperationalError as exc:
            if "journal" in str(exc) or "corrupt" in str(exc):
                return  # refused with a reason (an interrupted SQLite transaction): reported
            raise
        assert rep.exit_code in (0, 1), (f"reconcile exit {rep.exit_code}: unrepaired {rep.unrepaired[:5]}, "
                                         f"notes {rep.notes}")
        self.repairs += 1
        assert_zero_diff(self.palace)
        assert_self_query(self.palace)

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    @guarded
    def acknowledged_writes_survive_or_are_reported(self) -> None:
        rep = check_palace(self.palace)
        actual, strangers = self.actual(rep)
        lost = {i: (sorted(self.model[i], key=str), actual[i]) for i in self.model if actual[i] not in self.model[i]}
        if (lost or strangers) and rep.consistent:
            sample = ", ".join(f"drawer {i} ({drawer(i, self.spec.seed)[0]}): allowed {a}, found {f}"
                               for i, (a, f) in list(lost.items())[:5])
            raise AssertionError(
                f"{len(lost)} acknowledged writes lost and {len(strangers)} unexpected rows, yet chaosfix check "
                f"reports the palace consistent: {sample}{'; strangers ' + str(strangers[:5]) if strangers else ''}")
        for i, v in actual.items():
            if i not in lost:
                self.model[i] = {v}  # what landed is now certain


def _load_machine(case: dict) -> type[CrashMachine]:
    mod_name, qual = case["machine"].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        path = case.get("machine_file")
        if not path or not Path(path).is_file():
            raise
        spec = importlib.util.spec_from_file_location(f"_chaosfix_replay_{mod_name.replace('.', '_')}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def replay(case: dict | str | Path, log=print) -> CrashMachine:  # noqa: ANN001
    """Run a saved case again: the same machine, spec and steps, invariants after each step.
    Raises what the case raises; returns the machine (already torn down) when all held."""
    if not isinstance(case, dict):
        case = json.loads(Path(case).read_text())
    base = _load_machine(case)
    cls = type(base.__name__, (base,), {"spec": PalaceSpec(**case["spec"]), "_replayed_from": base})
    if case.get("chromadb") != chromadb_version():
        log(f"note: case recorded with chromadb {case.get('chromadb')}, replaying with {chromadb_version()}")
    invariants = [v for n, v in ((n, getattr(cls, n, None)) for n in dir(cls) if n != "TestCase")
                  if getattr(v, INVARIANT_MARKER, None)]
    m = cls()
    try:
        for inv in invariants:
            inv(m)
        for i, step in enumerate(case["steps"], 1):
            log(f"step {i}/{len(case['steps'])}: {step['rule']}({json.dumps(step['args'])})")
            getattr(m, step["rule"])(**step["args"])
            for inv in invariants:
                inv(m)
    finally:
        m.teardown()
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaosfix.stateful", description=__doc__.splitlines()[0])
    ap.add_argument("--replay", metavar="FILE", required=True, help="a case file written by a failing machine")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        case = json.loads(Path(args.replay).read_text())
    except (OSError, ValueError) as exc:
        print(f"chaosfix: cannot read {args.replay}: {exc}", file=sys.stderr)
        return 8
    print(f"replaying {case['machine']} on chromadb {chromadb_version()}: {len(case['steps'])} steps, "
          f"seed {case.get('seed')}", file=sys.stderr)
    try:
        replay(case, log=lambda m: print(m, file=sys.stderr))
    except Exception:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"reproduced ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
        return 1
    print(f"did not reproduce: every step and invariant held ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
