"""chaosfix.strategies and chaosfix.stateful: the strategies draw valid data, the crash
state machine runs (profile ``ci`` here: a few derandomized examples; ``CHAOSFIX_PROFILE=dev``
or ``nightly`` for more), a fixed crash/reopen/reconcile program holds every invariant,
and a failure prints one replay line whose command reproduces it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from chaosfix import workload
from chaosfix.stateful import PalaceMachine, profile_settings, replay
from chaosfix.strategies import KILL_POINTS, fault_specs, fault_steps, op_counts, palace_specs, workloads

pytest_plugins = ["pytester"]
CACHE = workload.cache_dir().parent


@pytest.fixture(autouse=True)
def _replay_files_in_tmp(tmp_path, monkeypatch):
    """Expected failures (the known-gap tests) write replay files: keep them out of the repo."""
    monkeypatch.setenv("CHAOSFIX_REPLAY_DIR", str(tmp_path / "replay"))


@settings(max_examples=60, deadline=None)
@given(spec=palace_specs(), data=st.data())
def test_strategies_draw_valid_data(spec, data):
    assert spec.batch_size <= spec.sync_threshold
    ops = data.draw(workloads(spec))
    nxt = spec.drawers
    for op in ops:
        assert op["count"] >= 1 and op["count"] <= 2 * spec.sync_threshold + 1
        if op["op"] == "add":
            assert op["start"] == nxt  # adds take fresh ids
        elif op["op"] in ("update", "delete"):
            assert op["start"] + op["count"] <= nxt
        else:
            assert op["start"] <= nxt and 1 <= op["version"] <= 3
        nxt = max(nxt, op["start"] + op["count"])
    fault = data.draw(fault_specs(major="0.6"))
    steps = fault_steps(fault, ops[:1])
    writes = [s for s in steps if s["do"] == "write"]
    assert len(writes) == 1 and writes[0]["ops"] == ops[:1]
    if fault["kind"] == "kill_point":
        assert writes[0]["kill_point"] in KILL_POINTS
    if fault["kind"] in ("lost_persist", "torn"):
        assert steps[0]["do"] == "snapshot_segment"


def test_fault_specs_respect_the_chromadb_family():
    @settings(max_examples=40, deadline=None)
    @given(fault_specs(major="1.x"))
    def one(fault):
        assert fault["kind"] != "kill_point"  # the persist-path hooks exist in 0.6 only

    one()
    with pytest.raises(ValueError):
        fault_specs(major="1.x", kinds=("kill_point",)).example()


def test_op_counts_sit_around_the_threshold():
    @settings(max_examples=80, deadline=None)
    @given(op_counts(20))
    def one(n):
        assert 1 <= n <= 41

    one()


def test_profiles_are_registered():
    assert profile_settings("ci").max_examples <= 3 and profile_settings("ci").derandomize
    assert profile_settings("nightly").max_examples >= 100
    assert profile_settings("dev").deadline is None


def test_palace_machine():
    """Random programs of writes, crashes, reopens and repairs (profile from
    $CHAOSFIX_PROFILE / --chaos-profile, default ci)."""
    run_state_machine_as_test(PalaceMachine, settings=profile_settings())


def _case(*steps: dict) -> dict:
    return {"machine": "chaosfix.stateful:PalaceMachine", "spec": asdict(PalaceMachine.spec), "seed": 0,
            "steps": list(steps)}


def _crash(fault: dict, kind: str, count: str = "2t", at: int = 0, version: int = 1) -> dict:
    return {"rule": "crash_write", "args": {"fault": fault, "kind": kind, "at": at, "count": count,
                                           "version": version}}


REOPEN, RECONCILE = {"rule": "reopen", "args": {}}, {"rule": "reconcile", "args": {}}


def test_fixed_crash_program_holds_every_invariant(major):
    """A kill mid-persist, then a power cut: each reported, repaired, read back by chromadb."""
    kill = ({"kind": "kill_point", "point": "after-pickle", "hit": 1} if major == "0.6"
            else {"kind": "strace", "file": "data_level0.bin", "syscall": "write", "nth": 1})
    case = _case(_crash(kill, "add"), REOPEN, RECONCILE, _crash({"kind": "lost_persist"}, "add", at=7),
                 {"rule": "delete", "args": {"at": 3, "count": "t"}}, RECONCILE, REOPEN)
    m = replay(case, log=lambda _m: None)
    assert m.crashes[0]["killed"], m.crashes[0]  # the fault really hit
    assert m.repairs == 2
    assert all(len(v) == 1 for v in m.model.values())  # every drawer's fate is now known


# Known gaps the machine found (strict xfail: when check/reconcile learn them, these turn
# XPASS and fail, so the marker gets removed together with the PalaceMachine restriction).


def test_upsert_under_power_cut_stale_vectors_are_found_and_replaced(tmp_path):
    """Was a known gap: an upsert whose HNSW flush is lost keeps the old vectors of
    existing ids (SQL ids == index ids). ``check --deep`` re-embeds the documents and
    reports STALE_VECTOR; the machine's reconcile (deep) replaces them, and chromadb then
    reads every row with its document's embedding."""
    m = replay(_case(_crash({"kind": "lost_persist"}, "upsert", at=7), RECONCILE, REOPEN), log=lambda _m: None)
    assert m.repairs == 1


def test_kill_mid_persist_of_a_delete_is_reported_and_repaired(major):
    """Found by the machine: 1.x, SIGKILL on the 2nd write of link_lists.bin while a delete
    persists leaves the deletes marked in data_level0.bin but still pending in the WAL, and
    chromadb 1.5.9 then fails every open ('Failed to apply logs'). check now reports
    REPLAY_CONFLICT and reconcile folds the deletes in; chromadb reads the palace after."""
    case = _case(_crash({"kind": "strace", "file": "link_lists.bin", "syscall": "write", "nth": 2}, "delete",
                        count="t+1"), REOPEN, RECONCILE, REOPEN)
    m = replay(case, log=lambda _m: None)  # 0.6 does not write link_lists.bin there: nothing to break
    if major != "0.6":
        assert m.crashes[0]["killed"], m.crashes[0]
        assert m.repairs == 1


@pytest.mark.parametrize("where", ["rule", "invariant"])
def test_failure_prints_one_replay_line_that_reproduces(pytester, monkeypatch, tmp_path, where):
    """A failing rule, or a user's own plain ``@invariant`` (which printed no replay line
    before: only invariants wrapped in ``guarded`` did)."""
    monkeypatch.setenv("CHAOSFIX_CACHE", str(CACHE))
    pytester.makepyfile(test_m=textwrap.dedent("""
        from hypothesis import settings
        from hypothesis import strategies as st
        from hypothesis.stateful import invariant, rule
        from chaosfix.stateful import CrashMachine, recorded

        class Fragile(CrashMachine):
            def __init__(self):
                super().__init__()
                self.total = 0

            @rule(n=st.integers(0, 10))
            @recorded
            def bump(self, n):
                self.total += n
                assert WHERE != "rule" or self.total < 12, f"total {self.total}"

            @invariant()
            def small(self):
                assert WHERE != "invariant" or self.total < 12, f"total {self.total}"

        TestFragile = Fragile.TestCase
        TestFragile.settings = settings(max_examples=200, deadline=None, database=None, derandomize=True)
    """).replace("WHERE", repr(where)))
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    lines = re.findall(r"chaosfix replay: python -m chaosfix\.stateful --replay (\S+)", out)
    assert len(set(lines)) == 1, out
    case_file = lines[0]
    assert case_file.startswith(str(tmp_path / "replay")), case_file
    # the replay runs the shrunk steps again, outside pytest and hypothesis, from anywhere
    run = subprocess.run([sys.executable, "-m", "chaosfix.stateful", "--replay", case_file], cwd=tmp_path.parent,
                         capture_output=True, text=True, env=workload.child_env(), timeout=120)
    assert run.returncode == 1, run.stderr
    assert "AssertionError: total" in run.stderr and "reproduced" in run.stderr, run.stderr
