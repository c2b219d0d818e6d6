"""What users install is what runs: the scenario catalogue and its fixtures ship inside
the package (the tox legs install the built wheel, not the checkout), and the installed
``chaosfix`` command runs the README's main job from any folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import chaosfix
from chaosfix.check import check_palace
from chaosfix.scenario import builtin_dir, catalogue, fixture

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the source of truth
SCRIPT = Path(sys.executable).parent / "chaosfix"


def under_tox() -> bool:
    return os.environ.get("CHAOSFIX_EXPECT_CHROMADB") is not None


def test_every_subpackage_ships() -> None:
    """pyproject lists packages by hand (the scenarios mapping needs it): a new
    subpackage missing from the list would be missing from the wheel."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "chaosfix").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk | {"chaosfix.scenarios"} == set(cfg["packages"])
    assert cfg["package-dir"] == {"chaosfix.scenarios": "scenarios"}


def test_installed_package_carries_the_catalogue() -> None:
    """Every scenario and fixture of scenarios/ is in the imported package, byte for byte;
    under tox that package is the installed wheel, not the checkout."""
    if under_tox():
        assert Path(chaosfix.__file__).resolve().parent != ROOT / "chaosfix", \
            f"tox leg imports chaosfix from the checkout ({chaosfix.__file__}), not from the wheel"
        assert Path(str(builtin_dir())).resolve() != ROOT / "scenarios"
    src = sorted((ROOT / "scenarios").glob("*.toml"))
    shipped = {f.name: f for f in builtin_dir().iterdir() if f.name.endswith(".toml")}
    assert len(src) >= 18 and sorted(shipped) == [f.name for f in src]
    for f in src:
        assert shipped[f.name].read_bytes() == f.read_bytes(), f"{f.name} differs from the shipped copy"
    for f in (ROOT / "scenarios" / "fixtures").iterdir():
        assert fixture(f.name).read_bytes() == f.read_bytes()
    assert {s.name for s in catalogue().values()} >= {"partial-flush", "migrated-06"}


def test_children_started_from_the_checkout_import_the_wheel() -> None:
    """Tests start ``python -c`` and ``-m`` children in the working folder, which tox sets to
    the checkout, and Python puts that folder first on sys.path: without tox's
    ``PYTHONSAFEPATH=1`` every such child ran the source tree instead of the wheel."""
    if not under_tox():
        pytest.skip("outside tox the checkout may be what is installed (pip install -e .)")
    r = subprocess.run([sys.executable, "-c", "import chaosfix; print(chaosfix.__file__)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent != ROOT / "chaosfix", r.stdout


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"no installed chaosfix script beside {sys.executable}"
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_installed_command_lists_and_simulates(tmp_path: Path) -> None:
    """The README's main job from the installed script, in a folder with no checkout:
    `chaosfix scenarios`, then `chaosfix simulate partial-flush` with --keep, which keeps
    the broken palace (as the scenario left it) beside the repaired one."""
    r = run("scenarios", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert "partial-flush" in names and len(names) == len(catalogue())

    keep = tmp_path / "kept"
    r = run("simulate", "partial-flush", "--keep", str(keep), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: every expectation held" in r.stdout and "Traceback" not in r.stderr
    assert re.search(r"^observe\s+yes\s+\S+\s+expected symptom", r.stdout, re.M), r.stdout
    assert f"kept broken palace: {keep / 'broken'}" in r.stdout
    assert f"kept repaired palace: {keep / 'repaired'}" in r.stdout
    assert sorted(os.listdir(keep)) == ["broken", "repaired"]
    broken, repaired = check_palace(keep / "broken"), check_palace(keep / "repaired")
    assert "SQL_ONLY" in broken.codes() and repaired.consistent
    rows = {c["name"]: c["rows"] for c in broken.collections}
    assert rows == {c["name"]: c["rows"] for c in repaired.collections}


@pytest.mark.parametrize("args", [["check", "--help"], ["scenarios"]])
def test_python_dash_m_is_the_same_command(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "chaosfix", *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == run(*args, cwd=tmp_path).stdout
