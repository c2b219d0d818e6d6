"""Command-line conventions: usage errors exit 2 (with a JSON error object under --json),
numbers are validated by click, --keep is checked before any work, the README names only
commands, flags and metavars that exist (and every flag), tables fit the terminal, and
progress bars are drawn on a terminal only."""

from __future__ import annotations

import json
import os
import pty
import re
import select
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import kill_run, processes_with_tmpdir

from chaosfix.cli import main as cli_main
from chaosfix.errors import OperationalError
from chaosfix.progress import StderrBar, child_line, parse_child_line
from chaosfix.report import cut, render_chromadb_check, table
from chaosfix.scenario import get, run_scenario

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def invoke(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli_main, list(args), prog_name="chaosfix")
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.stdout + res.stderr
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def no_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A palace cache that must stay empty: proof that nothing was built."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHAOSFIX_CACHE", str(cache))
    yield cache
    assert not cache.exists(), "work started before the arguments were validated"


@pytest.mark.parametrize("args", [
    ["simulate"],  # neither SCENARIO nor --all
    ["simulate", "partial-flush", "--all"],
    ["simulate", "partial-flush", "--drawers", "0"],
    ["simulate", "partial-flush", "--seed", "-1"],
    ["simulate", "partial-flush", "--drawers", "many"],
    ["simulate", "no-such-scenario"],
    ["simulate", "partial-flush", "--scenarios", "/no/such/folder"],
    ["scenarios", "--scenarios", "/no/such/folder"],
    ["reconcile", "x", "--strategy", "fast"],
    ["check"],
    ["check", "x", "--no-such-flag"],
    ["check", ""],  # (it read the current folder: Path("") is ".")
    ["reconcile", "", "--dry-run"],
    ["no-such-command"],
    ["simulate", "partial-flush", "--drawers", "1000"],  # not resizable: its counts are a 300-drawer palace's
    ["simulate", "link-bloat", "--drawers", "150"],  # resizable, but to whole flushes (multiples of 100)
    ["explore", "--workload", "no-such-workload", "--profile", "ci"],
    ["explore", "--workload", "add", "--at", "garbage"],
    ["explore", "--at", "write:segment/data_level0.bin:27"],  # --at without one --workload
    ["explore", "--workload", "add", "--class", "no-such-class"],
    ["explore", "--workload", "add", "--at", "powerloss:lost:0"],
])
def test_usage_errors_exit_2(args: list[str], no_build: Path) -> None:
    code, out, err = invoke(*args)
    assert code == 2 and out == "" and err.startswith("chaosfix: error: "), (code, out, err)
    assert len(err.strip().splitlines()) == 1 and err.rstrip().endswith("--help')"), err
    code, out, err = invoke(*args, "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["schema"] == "chaosfix.error/1" and doc["exit_code"] == 2 and doc["error"]


def test_a_bad_scenario_file_is_a_usage_error_before_any_work(tmp_path: Path, no_build: Path) -> None:
    """An unknown step or a file that is not TOML: exit 2 from both commands that load it."""
    bad_step, not_toml = tmp_path / "steps", tmp_path / "toml"
    bad_step.mkdir()
    not_toml.mkdir()
    (bad_step / "x.toml").write_text('name = "x"\nsummary = "s"\n[[steps]]\ndo = "no_such_fault"\n')
    (not_toml / "x.toml").write_text("name = \n")
    bad_types = tmp_path / "types"
    bad_types.mkdir()
    (bad_types / "x.toml").write_text('name = "x"\nsummary = "s"\nversions = "1.x"\nresizable = "false"\n')
    kill_on_1x = tmp_path / "kill"  # (on 1.x it failed at its break stage, exit 4)
    kill_on_1x.mkdir()
    (kill_on_1x / "x.toml").write_text('name = "x"\nsummary = "s"\n[[steps]]\ndo = "write"\n'
                                       'ops = [{op = "add", start = 0, count = 10}]\nkill_point = "after-pickle"\n')
    bad_space, bad_key = tmp_path / "space", tmp_path / "key"  # (chromadb's own parse error at build, before)
    for folder, palace in ((bad_space, 'space = "euclid"'), (bad_key, "drawer = 10")):
        folder.mkdir()
        (folder / "x.toml").write_text(f'name = "x"\nsummary = "s"\n[palace]\n{palace}\n')
    # a step's file outside the throwaway palace (helper-41: one truncated /etc/passwd, exit 0)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    escapes = []
    for n, step in enumerate(('do = "truncate"\nfile = "../../victim.txt"\nfraction = 0.5',
                              f'do = "delete_file"\nfile = "{victim}"',
                              'do = "truncate"\nfile = "a/../../victim.txt"\nfraction = 0.5',
                              'do = "write"\nops = [{op = "add", start = 0, count = 10}]\n'
                              'strace = {file = "../victim.txt"}',
                              f'do = "truncate"\npath = "{victim}"\nsize = 0',  # (helper-43: path = skipped it)
                              'do = "unpack"\nfixture = "../../../victim.tar"')):  # (helper-43: any tar)
        folder = tmp_path / f"escape{n}"
        folder.mkdir()
        (folder / "x.toml").write_text(f'name = "x"\nsummary = "s"\n[[steps]]\n{step}\n')
        why = ("names its file with file =" if "path =" in step else "not a path" if "fixture" in step
               else "never a path out of it")
        escapes.append((folder, why))
    for folder, why in ((bad_step, "unknown step 'no_such_fault'"), (not_toml, "cannot read scenario"),
                        (bad_types, "versions must be a list; resizable must be a bool"),
                        (kill_on_1x, "a kill_point hooks chromadb 0.6's Python persist"),
                        (bad_space, "space must be one of cosine, l2, ip, not 'euclid'"),
                        (bad_key, "[palace] takes drawers, dim, space"), *escapes):
        for args in (["simulate", "x", "--scenarios", str(folder)], ["scenarios", "--scenarios", str(folder)]):
            code, out, err = invoke(*args)
            assert code == 2 and why in err and len(err.strip().splitlines()) == 1, (args, code, err)
    assert victim.read_text() == "keep me"


def test_check_names_the_palace_absolute_as_reconcile_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check --json gave the palace as typed ("p1"), reconcile --json its absolute path."""
    from chaosfix.workload import PalaceSpec, fresh_palace

    fresh_palace(tmp_path / "p1", PalaceSpec(drawers=20, dim=8, sync_threshold=10, batch_size=5))
    monkeypatch.chdir(tmp_path)
    checked = json.loads(invoke("check", "p1", "--json")[1])
    planned = json.loads(invoke("reconcile", "p1", "--dry-run", "--json")[1])
    assert checked["palace"] == planned["palace"] == str(tmp_path / "p1")


def test_operational_error_with_json_prints_an_error_object(tmp_path: Path) -> None:
    code, out, err = invoke("check", str(tmp_path / "nope"), "--json")
    assert code == 8 and len(err.strip().splitlines()) == 1
    doc = json.loads(out)
    assert doc == {"schema": "chaosfix.error/1", "error": err.strip().removeprefix("chaosfix: "), "exit_code": 8}
    code, out, err = invoke("check", str(tmp_path / "nope"))
    assert code == 8 and out == ""


def test_keep_is_validated_before_any_work(tmp_path: Path, no_build: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("mine")
    for bad, why in ((a_file, "is a file"), (full, "not empty")):
        code, out, err = invoke("simulate", "partial-flush", "--keep", str(bad))
        assert code == 2 and why in err, err
        with pytest.raises(OperationalError, match=why):  # the library checks first too
            run_scenario(get("partial-flush"), keep=bad)
    assert a_file.read_text() == "mine" and os.listdir(full) == ["mine.txt"]


def test_keep_prints_the_command_that_repairs_the_kept_palace(tmp_path: Path) -> None:
    """The kept broken palace's drawers come from chaosfix's hash embedder: the printed
    command names it, and run as printed it repairs the palace."""
    import shlex

    keep = tmp_path / "kept dir"  # (a space: the command quotes the path)
    code, out, err = invoke("simulate", "partial-flush", "--keep", str(keep))
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("repair the kept broken palace with: "))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:3] == ["chaosfix", "reconcile", str(keep / "broken")] and "--embedder" in argv
    code, out, err = invoke(*argv[1:], "--no-chromadb-check")
    assert code == 1, err


# ---- the README and the help texts agree --------------------------------------------


def commands() -> dict[str, click.Command]:
    return dict(cli_main.commands)


def options(cmd: click.Command) -> dict[str, click.Option]:
    return {name: p for p in cmd.get_params(click.Context(cmd)) if isinstance(p, click.Option) for name in p.opts}


def metavar(cmd: click.Command, param: click.Parameter) -> str:
    if isinstance(param.type, click.Choice):
        return "|".join(param.type.choices)
    return param.make_metavar(click.Context(cmd))


def plugin_options() -> set[str]:
    import chaosfix.pytest_plugin as plugin

    return set(re.findall(r'addoption\("(--[a-z-]+)"', Path(plugin.__file__).read_text()))


def readme_text_outside_python() -> str:
    return re.sub(r"```python\n.*?```", "", README, flags=re.S)


def test_readme_synopsis_matches_click() -> None:
    """Every `chaosfix CMD ...` line in the README names a real command, real options and
    click's own metavars; every option of every command appears in the README."""
    text = readme_text_outside_python()
    lines = re.findall(r"^ {4}(chaosfix [a-z]\S* .*(?:\n {20,}\[.*)*)", text, re.M)  # code lines + continuations
    seen: dict[str, set[str]] = {}
    assert len(lines) >= 4
    for line in lines:
        name = line.split()[1]
        assert name in commands(), f"README names `chaosfix {name}`, which does not exist"
        cmd = commands()[name]
        opts = options(cmd)
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        for a in args:
            assert re.search(rf"chaosfix {name} {re.escape(a.metavar or a.name.upper())}\b", line), \
                f"README `chaosfix {name}` does not name its argument {a.metavar}"
        for flag, arg in re.findall(r"(--[a-z][a-z-]*)(?: ([A-Z][A-Z:_]*|[a-z]+(?:\|[a-z]+)+))?", line):
            assert flag in opts, f"README: `chaosfix {name}` has no option {flag}"
            opt = opts[flag]
            if not opt.is_flag and arg:
                assert arg == metavar(cmd, opt), f"README: `{flag} {arg}`, help says `{flag} {metavar(cmd, opt)}`"
        seen.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", line))
    assert set(seen) == set(commands()), f"commands missing from the README: {set(commands()) - set(seen)}"
    for name, cmd in commands().items():
        documented = {o for o in options(cmd) if o.startswith("--") and o != "--help"}
        assert documented <= seen[name], f"`chaosfix {name}` options missing from the README: {documented - seen[name]}"


def test_every_command_and_flag_the_readme_mentions_exists() -> None:
    """Commands in code (`chaosfix NAME`, code lines) and every --flag anywhere: chaosfix's,
    the pytest plugin's, or the stateful replay's."""
    text = readme_text_outside_python()
    named = set(re.findall(r"(?:`|^ +)chaosfix ([a-z][a-z-]*)\b(?!:)", text, re.M))
    assert named >= {"check", "reconcile", "simulate", "scenarios"}
    for name in named:
        assert name in commands(), f"README names `chaosfix {name}`, which does not exist"
        code, out, _ = invoke(name, "--help")
        assert code == 0 and f"chaosfix {name}" in out
    import chaosfix.stateful as stateful

    known = {o for cmd in [cli_main, *commands().values()] for o in options(cmd)} | plugin_options()
    if "--replay" in Path(stateful.__file__).read_text():
        known.add("--replay")  # python -m chaosfix.stateful --replay FILE
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)):
        assert flag in known, f"README mentions {flag}, which nothing has"


def test_ci_runs_the_readme_test_command() -> None:
    """The Quick start's two commands: a venv each, so they copy-paste on a fresh machine;
    the second is exactly what CI (.ci/run) runs."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install, tests = re.findall(r"^ {4}(\S.*)$", quick, re.M)
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/chaosfix simulate ")
    assert tests.startswith("python3 -m venv .venv-tox && ") and tests.endswith(".venv-tox/bin/tox")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests


# ---- honest, terminal-sized reports --------------------------------------------------


def test_table_fits_the_width_and_cuts_with_an_ellipsis() -> None:
    long = "word " * 60
    out = table(["stage", "ok", "detail"], [["observe", "yes", long], ["check", "yes", "short"]], max_width=60)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 60
    assert lines[2].endswith("\u2026") and lines[3].endswith("short")
    wide = table(["stage", "ok", "detail"], [["observe", "yes", long.strip()]], max_width=400)
    assert wide.splitlines()[2].endswith("word") and "\u2026" not in wide
    assert cut("a\nb  c", 10) == "a b c"
    assert cut("self-query misses in the sample", 20) == "self-query misses\u2026"  # at a word boundary


def test_chromadb_post_check_reads_as_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the lines below are cut to the terminal's width
    res = {"version": "1.5.9", "ok": False, "on": "copy", "errors": ["drawers: 1 rows without an embedding"],
           "collections": {"drawers": {"count": 450, "queried": 220, "repaired": 20, "missing_count": 1,
                                       "misses_at_k10": 3,
                                       "unreachable": [], "filtered_queried": 20, "filtered_misses": [],
                                       "probe_found": True, "errors": []}}}
    lines = render_chromadb_check(res)
    assert lines[0] == "chromadb 1.5.9 post-check: FAILED (on a copy)"
    assert lines[1] == ("  drawers: count 450, 19 of 20 repaired rows with their planned vector, 220 self-queried, "
                        "3 missed at k=10, 0 at k<=6400, 0 of 20 filtered queries missed, probe write found")
    assert lines[2].strip() == "error: drawers: 1 rows without an embedding"
    assert not any("{" in line for line in lines)
    broken = render_chromadb_check({"version": "1.5.9", "ok": False, "errors": ["drawers: InternalError: Error finding id"],
                                    "collections": {"drawers": {"count": 450, "errors": ["InternalError: Error finding id"]}}})
    assert broken[1:] == ["  drawers: count 450", "    error: drawers: InternalError: Error finding id"]
    assert render_chromadb_check({"ok": False, "error": "Segmentation fault"}) == \
        ["chromadb ? post-check: FAILED: Segmentation fault"]
    assert render_chromadb_check({"ok": True, "skipped": "why"}) == ["chromadb post-check: skipped (why)"]


# ---- progress ----------------------------------------------------------------------


def test_child_progress_lines_round_trip() -> None:
    assert parse_child_line(child_line("chromadb reads x y", 5, 10)) == ("chromadb reads x y", 5, 10)
    assert parse_child_line("some chromadb warning\n") is None


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = StderrBar(tty)
        assert bar.enabled
        for done in (1, 2, 3, 4):
            bar("building index", done, 4)
        bar.say("next stage")
        tty.flush()
        drawn = ""
        while "next stage" not in drawn and select.select([master], [], [], 5)[0]:
            drawn += os.read(master, 65536).decode()
    os.close(master)
    assert "chaosfix: building index" in drawn and "1/4" in drawn and "#" * 30 + "]  4/4" in drawn
    assert "chaosfix: next stage" in drawn
    with open(tmp_path / "log", "w") as f:
        bar = StderrBar(f)
        bar("building index", 1, 4)
        bar.say("a log line")
    assert not bar.enabled and (tmp_path / "log").read_text() == "chaosfix: a log line\n"


def _cmdlines() -> list[bytes]:
    """Every process's command line (the ones that can be read)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                out.append((d / "cmdline").read_bytes())
        except OSError:
            continue
    return out


def test_a_chromadb_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """chromadb children run in sessions of their own (a terminal's Ctrl-C must not reach
    them), so a SIGKILL of the chaosfix that started one left it writing for as long as
    its step lasted (here: 100,000 adds, minutes). It now dies with its starter, also
    when the kill lands before the child got to ask for that."""
    import signal
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "ANONYMIZED_TELEMETRY": "False"}
    starter = ("import sys; from chaosfix.workload import PalaceSpec, apply_ops; "
               "apply_ops(sys.argv[1], PalaceSpec(), [{'op': 'add', 'start': 0, 'count': 100000}])")
    for delay in (0.0, 3.0):  # at its fork, and once it is adding
        proc = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / f"palace-{delay}")], env=env)
        try:
            assert kill_run(proc, tmp, settle=delay) == []
        finally:
            for pid in processes_with_tmpdir(tmp):  # (the old code's child: not left running)
                os.kill(pid, signal.SIGKILL)


def test_a_chromadb_child_under_wrappers_runs_and_dies_with_its_starter(tmp_path: Path) -> None:
    """A child under two forking wrappers (``prefix``: strace, timeout) has neither its
    starter as parent nor as grandparent: it took the starter for dead and exited 1
    without a word (helper-39). It now runs, and it dies with its starter through the
    wrappers (a pidfd), as a direct child does."""
    import signal
    import subprocess
    import sys

    from chaosfix.workload import PalaceSpec, apply_ops, fresh_palace

    spec = PalaceSpec(drawers=0)
    p = fresh_palace(tmp_path / "palace", spec)
    res = apply_ops(p, spec, [{"op": "add", "start": 0, "count": 10}], prefix=["timeout", "300", "timeout", "300"])
    assert res.ok and res.returncode == 0, (res.returncode, res.stderr[-2000:])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "ANONYMIZED_TELEMETRY": "False"}
    starter = ("import sys; from chaosfix.workload import PalaceSpec, apply_ops; "
               "apply_ops(sys.argv[1], PalaceSpec(), [{'op': 'add', 'start': 0, 'count': 100000}], "
               "prefix=['timeout', '300', 'timeout', '300'])")
    proc = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "big")], env=env)
    try:
        assert kill_run(proc, tmp, settle=3.0) == []
    finally:
        for pid in processes_with_tmpdir(tmp):  # (the old code's child: not left running)
            os.kill(pid, signal.SIGKILL)


def test_a_scratch_folder_is_never_swept_before_its_lock_is_held(tmp_path: Path, monkeypatch) -> None:
    """Another run's sweep between the lock file's creation and its flock found it
    unheld and removed a live folder (helper-39, a gap of microseconds widened here by
    sweeping right there): the lock is now taken under another name, then renamed."""
    import fcntl
    import tempfile

    from chaosfix import scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real = fcntl.flock

    def sweep_first(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX:
            scratch._sweep_scratch()
        real(fd, op)

    monkeypatch.setattr(scratch.fcntl, "flock", sweep_first)
    held = scratch.Scratch(scratch.EXPLORE_SCRATCH)
    try:
        assert held.path.is_dir() and (held.path / scratch.SCRATCH_LOCK).is_file()
    finally:
        held.remove()


def test_a_chromadb_child_a_worker_thread_started_outlives_that_thread(tmp_path: Path) -> None:
    """The kernel's parent-death signal follows the thread that forked: a child that a
    pytest user's worker thread started must not die when that thread ends (only a child
    of the main thread dies with its starter)."""
    import json
    import threading
    import time

    from chaosfix import workload

    spec = workload._base(workload.PalaceSpec(), tmp_path / "palace") | {
        "mode": "build", "ops": [{"op": "add", "start": 0, "count": 100000}], "kill": None}
    box: dict = {}

    def start() -> None:
        box["proc"] = workload.start_child(workload.child_command(json.loads(json.dumps(spec))))
        time.sleep(2)  # (the child has asked for its parent's death signal by now)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    proc = box["proc"]
    try:
        time.sleep(1)
        assert proc.poll() is None
    finally:
        workload._kill_group(proc)


def test_a_killed_simulates_children_die_and_its_palaces_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL left simulate's chromadb child running (a session of its own) and its
    throwaway palaces in TMPDIR (a few MB at the default size, a GB at --drawers 500000),
    where nothing looked again. The child dies with it; the next run removes a folder
    whose lock no process holds, and keeps one whose lock is held."""
    import fcntl
    import subprocess
    import sys
    import time

    from chaosfix.scratch import SCRATCH_LOCK, SIMULATE_SCRATCH

    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "CHAOSFIX_CACHE": str(cache), "TMPDIR": str(tmp), "ANONYMIZED_TELEMETRY": "False"}
    run = [sys.executable, "-c", "from chaosfix.cli import main; main()", "simulate", "partial-flush"]
    proc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(tmp.glob(f"{SIMULATE_SCRATCH}*/palace")):
        time.sleep(0.01)
    assert kill_run(proc, tmp) == []  # its chromadb child (a session of its own) died with it
    (killed,) = tmp.glob(f"{SIMULATE_SCRATCH}*")
    live = tmp / f"{SIMULATE_SCRATCH}1-live"  # another run's, alive (whatever its pid says)
    live.mkdir()
    fd = os.open(live / SCRATCH_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert not killed.exists() and live.is_dir()
        assert [p.name for p in tmp.iterdir()] == [live.name]  # (the second run's own folder gone too)
    finally:
        os.close(fd)


@pytest.mark.parametrize("stage", ["build", "observe"])
def test_ctrl_c_in_simulate_leaves_nothing_behind(stage: str, tmp_path: Path) -> None:
    """A real SIGINT while simulate's chromadb child builds the cached palace, or observes
    the broken one: exit 130 and no half-built palace in the cache, no scratch folder in
    TMPDIR. The child runs in a session of its own (the terminal's Ctrl-C never reaches
    it); it kept writing into the folder being removed, and the build's folder stayed."""
    import signal
    import subprocess
    import sys
    import time

    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "CHAOSFIX_CACHE": str(cache), "TMPDIR": str(tmp), "ANONYMIZED_TELEMETRY": "False"}
    # (SIGINT as a terminal delivers it: xdist's workers ignore it, and a child inherits that)
    proc = subprocess.Popen([sys.executable, "-c", "from chaosfix.cli import main; main()", "simulate",
                             "partial-flush"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        seen = (list((cache / "palaces").glob(".build-*/p/chroma.sqlite3")) if stage == "build"
                else list(tmp.glob("chaosfix-simulate-*/observe/chroma.sqlite3")))
        if seen:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "chaosfix: interrupted", (proc.returncode, err)
    time.sleep(0.5)  # (a surviving child would still be writing)
    assert not list((cache / "palaces").glob(".build-*")) if (cache / "palaces").exists() else True
    assert not list(tmp.glob("chaosfix-*")), list(tmp.rglob("*"))[:10]
    # no chromadb child of the run lives on (it has a session of its own)
    assert not [c for c in _cmdlines() if str(tmp).encode() in c]


def test_simulate_leaves_no_telemetry_behind(tmp_path: Path) -> None:
    """onnxruntime 1.29+, which chromadb imports in every chromadb child, uploads telemetry
    from Linux, writes a device id and a database under ~/.cache/Microsoft and a .ses file
    in TMPDIR, unless ORT_DISABLE_TELEMETRY is set (or a CI variable is: so they are
    removed here, as a user's shell has none)."""
    import subprocess
    import sys

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    quiet = {"ORT_DISABLE_TELEMETRY", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TF_BUILD"}
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    env.update(CHAOSFIX_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp), HOME=str(home))
    res = subprocess.run([sys.executable, "-c", "from chaosfix.cli import main; main()", "simulate",
                          "partial-flush"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(tmp.iterdir()), list(tmp.iterdir())
    assert not (home / ".cache" / "Microsoft").exists(), list((home / ".cache").rglob("*"))[:10]
