"""The chaosfix pytest plugin, tested the way users meet it: inner pytest runs (pytester)
with real palaces built by the installed chromadb. Also the plain assertion helpers and
the README's "Write your own crash test" example, run as-is."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chaosfix import workload
from chaosfix.assertions import assert_chromadb_consistent, assert_self_query, assert_zero_diff

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
CACHE = workload.cache_dir().parent  # pytester changes HOME: keep using this run's template cache
TINY = "drawers=40, dim=16, sync_threshold=20, batch_size=10"


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("CHAOSFIX_CACHE", str(CACHE))
    monkeypatch.delenv("CHAOSFIX_SEED", raising=False)
    monkeypatch.delenv("CHAOSFIX_SCENARIOS", raising=False)
    return pytester


def _out(res: pytest.RunResult) -> str:
    return res.stdout.str() + res.stderr.str()


# ---------------------------------------------------------------------------------------
# loading


def test_importing_the_plugin_and_helpers_does_not_import_chromadb():
    code = ("import sys, chaosfix.pytest_plugin, chaosfix.assertions, chaosfix.strategies, chaosfix.stateful; "
            "assert 'chromadb' not in sys.modules, sorted(m for m in sys.modules if 'chroma' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, env=workload.child_env(), timeout=120)


def test_plugin_is_registered_by_entry_point_and_header_names_version_format_seed(inner):
    inner.makepyfile(test_x="def test_x(chaos_seed):\n    assert chaos_seed == 7\n")
    res = inner.runpytest("--chaos-seed", "7")
    res.assert_outcomes(passed=1)
    fmt = "object" if workload.chroma_major() == "0.6" else "dict"
    res.stdout.fnmatch_lines([f"chaosfix: chromadb {workload.chromadb_version()} (*), pickle format {fmt}, seed 7, *"])
    res.stdout.fnmatch_lines(["plugins:*chaosfix*"])


def test_fixtures_and_no_chromadb_in_the_test_process(inner):
    """palace_factory/palace/crash/chroma_child/reconciler on real palaces, in a subprocess
    whose test process must never import chromadb."""
    inner.makepyfile(test_fixtures=f"""
        import sys
        from chaosfix.assertions import assert_zero_diff

        def test_factory_copies_one_template(palace_factory):
            a = palace_factory({TINY})
            b = palace_factory({TINY})
            assert a != b and a.parent == b.parent
            assert (a / "chroma.sqlite3").read_bytes() == (b / "chroma.sqlite3").read_bytes()
            assert palace_factory.spec_of(a).drawers == 40
            assert_zero_diff(a)

        def test_palace_is_the_default_spec(palace, palace_spec):
            assert palace_spec.drawers == 300 and (palace / "chroma.sqlite3").is_file()

        def test_crash_by_name_then_reconcile(palace_factory, crash, reconciler):
            p = palace_factory({TINY})
            res = crash("truncate", file="index_metadata.pickle", fraction=0.5)
            assert res.palace == p and not res.consistent
            assert "PICKLE_UNREADABLE" in res.codes, res.codes
            rep = reconciler(p)
            assert rep.exit_code == 1
            assert_zero_diff(p)

        def test_crash_with_own_function(palace_factory, crash):
            p = palace_factory({TINY})
            def wipe_pickle(palace, spec):
                from chaosfix.faults import pickle_path
                pickle_path(palace).unlink()
                return spec.drawers
            res = crash(wipe_pickle)
            assert res.steps == [{{"result": 40}}] and "PICKLE_MISSING" in res.codes

        def test_chroma_child_writes_and_can_be_killed(palace_factory, chroma_child):
            p = palace_factory({TINY})
            assert chroma_child.add(p, start=40, count=5).result["count"] == 45
            h = chroma_child.spawn(p, [{{"op": "add", "start": 45, "count": 3000}}])
            h.kill()
            assert h.wait().killed
            obs = chroma_child.observe(p)
            assert obs["count"] in (45, 3045) and not obs["errors"]

        def test_no_chromadb_here():
            assert "chromadb" not in sys.modules
    """)
    res = inner.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    assert res.ret == 0, _out(res)
    res.assert_outcomes(passed=6)


# ---------------------------------------------------------------------------------------
# scenarios: marker, parametrization, --chaos-scenarios


MY_SCENARIO = """
    name = "my-truncated-pickle"
    summary = "a user's own scenario: half the id map gone"
    versions = ["0.6", "1.x"]

    [palace]
    drawers = 40
    dim = 16
    sync_threshold = 20
    batch_size = 10

    [[steps]]
    do = "truncate"
    file = "index_metadata.pickle"
    fraction = 0.5

    [expect]
    codes = { PICKLE_UNREADABLE = "*" }
    repair = 1
    embedder = "chaosfix.embedder:HashEmbedder"
"""


def test_scenario_marker_and_parametrization(inner):
    other = "torn-hnsw" if workload.chroma_major() == "0.6" else "phantom-rows"
    (inner.path / "mine").mkdir()
    (inner.path / "mine" / "my.toml").write_text(textwrap.dedent(MY_SCENARIO))
    inner.makepyfile(test_sc=f"""
        import pytest

        @pytest.mark.scenario("my-truncated-pickle")
        def test_marker_breaks_palace(palace, scenario):
            assert scenario.name == "my-truncated-pickle"
            assert scenario.palace == palace and scenario.spec.drawers == 40
            assert "PICKLE_UNREADABLE" in scenario.check().codes()

        @pytest.mark.scenario("{other}")
        def test_other_family_is_skipped(scenario):
            raise AssertionError("must not run")

        def test_catalogue(scenario):
            assert scenario.expected is not None
    """)
    res = inner.runpytest("--chaos-scenarios", "mine", "--collect-only", "-q")
    ids = re.findall(r"test_catalogue\[([\w.-]+)\]", res.stdout.str())
    assert "my-truncated-pickle" in ids and "partial-flush" in ids and len(ids) >= 17, res.stdout.str()
    res = inner.runpytest("--chaos-scenarios", "mine", "-k", "marker or other", "-rs")
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines([f"*scenario {other} applies to chromadb*"])


def test_unknown_scenario_in_marker_is_a_clear_error(inner):
    inner.makepyfile(test_bad="""
        import pytest

        @pytest.mark.scenario("no-such-scenario")
        def test_x(palace):
            pass
    """)
    res = inner.runpytest()
    assert res.ret != 0
    assert "unknown scenario 'no-such-scenario'" in _out(res)


@pytest.mark.parametrize(("marker", "said"), [
    ("123", "scenario names are strings (or a list of them), not 123"),
    ("", "needs at least one name"),
    ('"partial-flush", drawrs=200', "unknown keyword drawrs (it takes seed, drawers)"),
    ('"partial-flush", drawers="lots"', "drawers must be a whole number of 1 or more, not 'lots'"),
    ('"partial-flush", drawers=250', "is written for its own"),
    ('"healthy-deletes", drawers=250', "a multiple of its sync_threshold"),
    ('"partial-flush", seed=-1', "seed must be a whole number of 0 or more, not -1"),
])
def test_a_misused_scenario_marker_is_one_line_at_collection(inner, marker, said):
    """A wrong type was a TypeError traceback at collection, a misspelled keyword was
    ignored, a size the scenario cannot take built a palace anyway (or failed in run()
    with a traceback)."""
    inner.makepyfile(test_m=f"""
        import pytest

        @pytest.mark.scenario({marker})
        def test_x(scenario):
            pass
    """)
    res = inner.runpytest()
    out = _out(res)
    assert res.ret == pytest.ExitCode.INTERRUPTED and said in out, out
    assert "Traceback" not in out and "_hooks.py" not in out, out


def test_an_unknown_profile_is_a_usage_error_naming_the_choices(inner):
    """--chaos-profile bogus failed at collection with hypothesis's InvalidArgument traceback."""
    inner.makepyfile(test_x="def test_x():\n    pass\n")
    res = inner.runpytest("--chaos-profile", "bogus")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid choice: 'bogus'" in _out(res) and "'nightly'" in _out(res) and "Traceback" not in _out(res)


def test_profile_names_mean_the_same_everywhere(inner, monkeypatch):
    """CHAOSFIX_PROFILE=full (chaos_explore's exhaustive profile) failed every module that
    called profile_settings() at collection; a misspelled profile ran chaos_explore's ci
    profile silently, and chaos_explore() with no workload passed having explored nothing."""
    from chaosfix.stateful import PROFILES, profile_settings

    assert profile_settings("full") is profile_settings("nightly")
    assert profile_settings("full").max_examples == 200 and PROFILES["nightly"] == "chaosfix-nightly"
    with pytest.raises(ValueError, match="chaosfix profile 'nightley': one of dev, ci, nightly, full"):
        profile_settings("nightley")
    inner.makepyfile(test_x="""
        import pytest

        def test_x(chaos_explore):
            with pytest.raises(ValueError, match="profile 'nightley': one of ci, dev, nightly, full"):
                chaos_explore("add", profile="nightley")
            with pytest.raises(ValueError, match="needs a workload"):
                chaos_explore()
    """)
    inner.runpytest("--chaos-profile", "full").assert_outcomes(passed=1)


def test_missing_scenario_folder_is_a_usage_error(inner):
    inner.makepyfile(test_x="def test_x():\n    pass\n")
    res = inner.runpytest("--chaos-scenarios", "nowhere")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--chaos-scenarios" in _out(res) and "no such folder" in _out(res)


@pytest.mark.parametrize(("env", "args", "said"), [
    ({"CHAOSFIX_SEED": "abc"}, (), "$CHAOSFIX_SEED 'abc' is not an integer"),
    ({}, ("--chaos-seed", "-3"), "chaosfix seed -3 is negative"),
    ({"CHAOSFIX_SEED": "-1"}, (), "chaosfix seed -1 is negative"),
    ({}, ("--chaos-keep", "--chaos-keep-dir", "afile"), "afile is not a folder"),
    ({}, ("--chaos-keep", "--chaos-keep-dir", "afile/sub"), "afile is not a folder"),
])
def test_bad_settings_are_one_usage_error_line(inner, monkeypatch, env, args, said):
    """A bad $CHAOSFIX_SEED was an INTERNALERROR traceback in every project with the plugin
    installed; a negative seed crashed deep in reconcile; a --chaos-keep-dir that is a file
    ended the session at the first failure (INTERNALERROR, the other tests never ran)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (inner.path / "afile").write_text("")
    inner.makepyfile(test_x="def test_x():\n    assert False\n")
    res = inner.runpytest(*args)
    assert res.ret == pytest.ExitCode.USAGE_ERROR, _out(res)
    assert said in _out(res) and "Traceback" not in _out(res) and "INTERNALERROR" not in _out(res), _out(res)


def test_reconciler_options_are_checked(palace_factory, reconciler):
    """strategy="fast" ran as auto, verify="full" (the CLI's word) was a dataclass
    TypeError, a negative seed a numpy traceback in the plan (helper-31)."""
    from chaosfix.errors import UsageProblem

    p = palace_factory(drawers=40, dim=16, sync_threshold=20, batch_size=10)
    with pytest.raises(UsageProblem, match="strategy 'fast': one of auto, incremental, rebuild"):
        reconciler(p, strategy="fast")
    with pytest.raises(UsageProblem, match="seed must be a whole number of 0 or more, not -3"):
        reconciler(p, seed=-3)
    with pytest.raises(TypeError, match="unknown option verify; the options are .*verify_full"):
        reconciler(p, verify="full")
    assert reconciler(p, strategy="rebuild").exit_code == 1


def test_a_kill_point_on_chromadb_1x_is_refused(palace_factory):
    """Kill points hook chromadb 0.6's Python persist: on 1.x the child wrote every row and
    the crash test passed without a crash (killed=False, ok=True)."""
    from chaosfix import faults
    from chaosfix.errors import UsageProblem

    p = palace_factory(drawers=40, dim=16, sync_threshold=20, batch_size=10)
    spec = palace_factory.spec_of(p)
    ops = [{"op": "add", "start": 40, "count": 40}]
    if workload.chroma_major() == "0.6":
        assert workload.apply_ops(p, spec, ops, kill=faults.kill_point("after-pickle")).killed
    else:
        with pytest.raises(UsageProblem, match="needs chromadb 0.6"):
            workload.apply_ops(p, spec, ops, kill=faults.kill_point("after-pickle"))


def test_power_loss_steps_follow_the_palace_spec_collection(palace_factory, crash):
    """snapshot_segment / restore_segment / torn_mix looked for 'mempalace_drawers' whatever
    the spec's collection was ("expected one collection named ..., found 0")."""
    p = palace_factory(drawers=40, dim=16, sync_threshold=20, batch_size=10, collection="notes")
    res = crash(["snapshot_segment", {"do": "write", "ops": [{"op": "add", "start": 40, "count": 45}]},
                 "restore_segment"], p)
    assert res.codes.get("SQL_ONLY", 0) > 0, res


# ---------------------------------------------------------------------------------------
# failures: messages, rerun line, --chaos-keep


def test_the_rerun_line_runs_where_it_is_printed(inner, monkeypatch):
    """Node ids are relative to the rootdir: run from a subfolder, the printed line named
    a file pytest could not find there."""
    inner.makeini("[pytest]\n")
    sub = inner.mkdir("tests")
    (sub / "test_sub.py").write_text("import pytest\n\n@pytest.mark.parametrize('n', [1])\n"
                                     "def test_x(palace_factory, n):\n    assert False\n")
    monkeypatch.chdir(sub)
    res = inner.runpytest("--chaos-seed", "2")
    res.assert_outcomes(failed=1)
    line = next(x for x in res.stdout.lines if x.startswith("rerun: "))
    assert line == "rerun: pytest 'test_sub.py::test_x[1]' --chaos-seed 2", line
    again = inner.runpytest(*shlex.split(line)[2:])
    again.assert_outcomes(failed=1)
    # a test file outside the rootdir (its node id has no path: the line said '..::test_x')
    monkeypatch.chdir(inner.path)
    (inner.path / "proj").mkdir()
    res = inner.runpytest("--rootdir=proj", "tests/test_sub.py")
    line = next(x for x in res.stdout.lines if x.startswith("rerun: "))
    assert line.startswith("rerun: pytest 'tests/test_sub.py::test_x[1]'"), line


def test_failure_output_and_chaos_keep(inner):
    """A power cut leaves orphans; assert_zero_diff says which and how many; the report
    names chromadb, seed and the rerun line; --chaos-keep keeps the palace and says where."""
    inner.makepyfile(test_fail=f"""
        from chaosfix.assertions import assert_zero_diff

        def test_lost_flush(palace_factory, crash):
            p = palace_factory({TINY})
            crash(["snapshot_segment", {{"do": "write", "ops": [{{"op": "add", "start": 40, "count": 45}}]}},
                   "restore_segment"])
            assert_zero_diff(p)
    """)
    res = inner.runpytest("--chaos-keep", "--chaos-keep-dir", "kept", "--chaos-seed", "3")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert re.search(r"SQL_ONLY x\d+ in mempalace_drawers: .*e\.g\. drawer_", out), out
    assert f"chromadb {workload.chromadb_version()}" in out and "seed 3" in out
    assert "rerun: pytest test_fail.py::test_lost_flush --chaos-seed 3" in out
    m = re.search(r"kept palace: (\S+)", out)
    assert m, out
    kept = Path(m.group(1))
    assert kept.is_relative_to(inner.path / "kept") and (kept / "palace" / "chroma.sqlite3").is_file()
    res.stdout.fnmatch_lines(["*chaosfix kept palaces*", f"test_fail.py::test_lost_flush: {kept}"])
    assert "CHAOSFIX_KEEP_DIR" not in os.environ  # the inner run restored the environment


def test_passing_tests_keep_nothing(inner):
    inner.makepyfile(test_ok=f"def test_ok(palace_factory):\n    palace_factory({TINY})\n")
    res = inner.runpytest("--chaos-keep")
    res.assert_outcomes(passed=1)
    assert not (inner.path / ".chaosfix-keep").exists()


# ---------------------------------------------------------------------------------------
# xdist


def test_xdist_workers_never_share_a_palace(inner, tmp_path, monkeypatch):
    """Two workers race to build the same new template (fresh cache) and each test gets
    its own copy."""
    monkeypatch.setenv("CHAOSFIX_CACHE", str(tmp_path / "fresh-cache"))
    inner.makepyfile(test_x="""
        import os
        import pytest
        from chaosfix.assertions import assert_zero_diff

        @pytest.mark.parametrize("i", range(4))
        def test_private(palace_factory, i):
            p = palace_factory(drawers=12, dim=8, sync_threshold=10, batch_size=5)
            (p / "mine").write_text(os.environ.get("PYTEST_XDIST_WORKER", "-"))
            assert sorted(x.name for x in p.iterdir() if not x.is_dir()) == ["chroma.sqlite3", "mine"]
            assert_zero_diff(p)
            with open(os.environ["PALACE_LOG"], "a") as f:
                f.write(f"{p}\\n")
    """)
    log = tmp_path / "palaces.txt"
    monkeypatch.setenv("PALACE_LOG", str(log))
    res = inner.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    assert res.ret == 0, _out(res)
    res.assert_outcomes(passed=4)
    paths = log.read_text().split()
    assert len(paths) == 4 and len(set(paths)) == 4
    built = [d.name for d in (tmp_path / "fresh-cache" / "palaces").iterdir()]
    assert len(built) == 1 and not built[0].startswith(".build-"), built  # one template, no leftovers


# ---------------------------------------------------------------------------------------
# the assertion helpers, without pytest fixtures


APP_PALACE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    col = chromadb.PersistentClient(path=sys.argv[1]).create_collection(
        "notes", embedding_function=None, metadata={"hnsw:space": sys.argv[2]})
    v = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    col.add(ids=[f"n{i}" for i in range(300)], embeddings=v, documents=[f"note {i}" for i in range(300)],
            metadatas=[{"kind": "ab"[i % 2]} if i % 3 else None for i in range(300)])
""")


@pytest.mark.parametrize("space", ["l2", "ip"])
def test_assert_chromadb_consistent_on_a_palace_chaosfix_did_not_build(tmp_path, space):
    """Another application's palace (its own vectors, no wing): the helper failed with
    KeyError: 'wing' even with check_vectors=False. Its sample is queried by the embeddings
    chromadb returns (query_by="embedding"), filtered on a metadata value a row has."""
    from helpers import chromadb_script

    p = tmp_path / "app"
    chromadb_script(APP_PALACE, str(p), space)
    obs = assert_chromadb_consistent(p, check_vectors=False, query_by="embedding", write_probe=True)
    # (ip: rows of larger norms outrank a row for its own vector, so no self-query proves anything)
    assert obs["count"] == 300 and obs["sampled"] >= (50 if space == "l2" else 0) and obs["errors"] == []
    with pytest.raises(AssertionError, match="wrong embedding"):  # they are not HashEmbedder vectors
        assert_chromadb_consistent(p, write_probe=False)


def test_assertion_helpers_pass_on_a_healthy_palace(small_palace):
    assert assert_zero_diff(small_palace).consistent
    v = assert_self_query(small_palace, k=10, ef=200)
    assert v["mempalace_drawers"].queried == 300
    obs = assert_chromadb_consistent(small_palace)  # spec inferred from the palace
    assert obs["count"] == 300 and obs["probe_found"]


def test_assertion_helpers_say_what_differs(palace_factory, crash, small_spec):
    p = palace_factory(small_spec)
    crash("off_by_one")
    with pytest.raises(AssertionError) as e:
        assert_zero_diff(p)
    msg = str(e.value)
    assert "zero-diff failed" in msg and "OFF_BY_ONE x" in msg, msg
    q = palace_factory(small_spec)
    crash("truncate", palace=q, file="data_level0.bin", size=4096)
    with pytest.raises(AssertionError, match=r"cannot self-query: .*header counts 300 elements"):
        assert_self_query(q)


def test_chromadb_self_query_misses_are_rows_no_search_finds_where_they_belong(tmp_path):
    """The observer asks a k=10 miss again deeper (a healthy graph built by two threads
    misses a few at chromadb's ef 10): a row returned no farther than the first answer's
    last is search depth, but a stale vector (a power cut lost an upsert's flush: the
    index holds the old vectors under the same labels) stays a miss at every depth."""
    from helpers import SPEC

    from chaosfix import faults
    from chaosfix.drawers import drawer

    p = workload.fresh_palace(tmp_path / "palace", SPEC)
    snap = faults.snapshot_segment(p, dst=tmp_path / "snap")  # (its own folder: none left in $TMPDIR)
    assert workload.apply_ops(p, SPEC, [{"op": "upsert", "start": 0, "count": 150, "version": 1}]).ok
    faults.restore_segment(p, snap)
    obs = workload.observe(p, SPEC, sample=SPEC.drawers)  # every row
    assert obs["sampled"] == SPEC.drawers and not obs["errors"], obs.get("errors")
    stale = {drawer(i)[0] for i in range(150)}
    missed = set(obs["query_misses"])
    assert len(missed) >= 50 and missed <= stale, sorted(missed - stale)[:5]  # (0.6 replays its pending rows)
    assert set(obs["filtered_misses"]) <= stale and not set(obs["found_deeper"]) & missed
    with pytest.raises(AssertionError, match=rf"{len(missed)} of {SPEC.drawers} sampled rows not in their own top-10"):
        assert_chromadb_consistent(p, SPEC, write_probe=False, sample=SPEC.drawers, check_vectors=False)


@pytest.mark.parametrize("damage", ["one-cycle", "one-row-cut-off"])
def test_chromadb_self_query_misses_of_a_graph_search_cannot_use(tmp_path, damage):
    """Excusing depth misses must not turn the self-query into a reachability check: a
    level 0 rewritten as one cycle keeps every row reachable (a search over the whole
    graph finds each) yet chromadb's top 10 misses most, and they are all misses; a row
    whose every in-link is cut is a named miss, not a query error (0.6.3's hnswlib
    refuses a k its search cannot fill)."""
    import numpy as np
    from helpers import SPEC
    from test_reach import _cut_in_links, _level0_only

    from chaosfix import faults
    from chaosfix.palace.hnsw import HnswFiles

    p = workload.fresh_palace(tmp_path / "palace", SPEC)
    seg = faults.segment_dir(p)
    if damage == "one-cycle":
        h = HnswFiles.open(seg).header
        mm = np.memmap(seg / "data_level0.bin", dtype=np.uint8, mode="r+",
                       shape=(h.cur_element_count, h.size_data_per_element))
        perm = np.random.default_rng(1).permutation(h.cur_element_count)
        nxt = np.empty(h.cur_element_count, dtype=np.uint32)
        nxt[perm] = np.roll(perm, -1)
        mm[:, 0:2] = np.frombuffer(np.uint16(1).tobytes(), dtype=np.uint8)
        mm[:, 4:8] = nxt.view(np.uint8).reshape(-1, 4)
        mm.flush()
        del mm
    else:
        _cut_in_links(seg, _level0_only(seg)[5:6])
    obs = workload.observe(p, SPEC, sample=SPEC.drawers)
    assert not obs["errors"], obs["errors"]
    if damage == "one-cycle":
        assert len(obs["query_misses"]) > SPEC.drawers // 4 and not obs["found_deeper"], len(obs["query_misses"])
        with pytest.raises(AssertionError, match="sampled rows not in their own top-10"):
            assert_chromadb_consistent(p, SPEC, write_probe=False, sample=SPEC.drawers)
    else:
        assert len(obs["query_misses"]) == 1, obs["query_misses"]


def test_pending_rows_are_healthy_unless_strict(palace_factory, chroma_child):
    p = palace_factory(drawers=40, dim=16, sync_threshold=20, batch_size=10)
    assert chroma_child.add(p, start=40, count=7).ok
    assert_zero_diff(p)
    with pytest.raises(AssertionError, match=r"7 WAL rows pending .*e\.g\. drawer_"):
        assert_zero_diff(p, pending_ok=False)


# ---------------------------------------------------------------------------------------
# README


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Write your own crash test", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python example under 'Write your own crash test'"
    return m.group(1)


def test_a_spec_chromadb_cannot_build_is_named_before_any_build(palace_factory):
    """palace_factory(space="euclid") surfaced chromadb's own parse error from its child."""
    for fields, why in (({"space": "euclid"}, "space must be one of cosine, l2, ip, not 'euclid'"),
                        ({"drawers": -1}, "drawers must be a whole number of 0 or more, not -1"),
                        ({"dim": 1.5}, "dim must be a whole number of 1 or more, not 1.5")):
        with pytest.raises(ValueError, match=re.escape(f"palace spec: {why}")):
            palace_factory(**fields)
    assert palace_factory.last is None  # nothing was built


def test_readme_property_example_runs_as_is(inner):
    """The README's example of a drawn palace spec made a palace inside ``@given``."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "palace_specs(" in b]
    inner.makepyfile(test_property=block)
    res = inner.runpytest("-p", "no:randomly")
    assert res.ret == 0, _out(res)
    res.assert_outcomes(passed=1)


def test_readme_example_runs_as_is(inner):
    inner.makepyfile(test_crash=readme_example())
    res = inner.runpytest("-p", "no:randomly")
    assert res.ret == 0, _out(res)
    res.assert_outcomes(passed=3)
