"""The documented benchmark commands run where users run them: from any folder, with the
installed chaosfix and chromadb, and with ``PYTHONSAFEPATH=1`` (tox sets it; so may a
user), which leaves the script's own folder, and so ``_common``, off ``sys.path``. Tiny
palaces: these prove the scripts work end to end, not the figures (the figures are the
benchmarks' own job, see benchmarks/README.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "CHAOSFIX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} exited {r.returncode}: {r.stderr[-1500:]}"
    return r.stdout


@pytest.mark.slow
def test_bench_reconcile_repairs_the_orphans_and_prints_the_ratio(tmp_path: Path) -> None:
    """1,000 SQL-only orphans (chromadb's sync_threshold: the add persists and purges the
    WAL) on 3,000 drawers: the default command repairs them, chromadb's verdict is ok and
    the ratio against the field's rebuild is printed."""
    out = _run("bench_reconcile.py", "--drawers", "3000", "--orphans", "1000", "--runs", "1", tmp_path=tmp_path)
    assert "findings {'SQL_ONLY': 1000}" in out, out
    assert re.search(r"\[default\] wall\s+[\d.]+ s -> [\d.]+x the field", out), out
    assert re.search(r"exit / strategy\s+1 / incremental \(after_consistent True\)", out), out
    assert re.search(r"chromadb verdict\s+ok True", out), out
    assert re.search(r"peak RSS chromadb child\s+[\d.]+ MB", out), out


@pytest.mark.slow
def test_bench_check_prints_its_targets(tmp_path: Path) -> None:
    out = _run("bench_check.py", "--drawers", "2000", "--runs", "1", "--cold", "0", tmp_path=tmp_path)
    assert re.search(r"target warm <= 1.5 s\s+(met|MISSED)", out), out
    assert "target cold <= 3 s         not measured (--cold 0)" in out, out
    assert re.search(r"RSS / data_level0.bin\s+[\d.]+x", out), out
