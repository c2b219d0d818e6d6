"""Shared fixtures: small palaces built by the installed chromadb (in a child process),
built once per spec and copied per test. Built on the chaosfix pytest plugin's own
fixtures (``palace_factory``; its report header names chromadb, pickle format and seed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaosfix.workload import PalaceSpec, chroma_major


@pytest.fixture(scope="session")
def major() -> str:
    """'0.6' or '1.x': the installed chromadb's family."""
    return chroma_major()


@pytest.fixture
def small_spec() -> PalaceSpec:
    """300 drawers, sync_threshold 100: three persists, WAL purged to its last row."""
    return PalaceSpec()


@pytest.fixture
def small_palace(palace_factory, small_spec):
    return palace_factory(small_spec)


def expected_chromadb() -> str | None:
    return os.environ.get("CHAOSFIX_EXPECT_CHROMADB")


@pytest.fixture(scope="session")
def damage_cache(tmp_path_factory) -> Path:
    """A folder shared by every xdist worker of this run, for damaged palaces that take a
    chromadb write to make (tests/helpers.py damaged_palace builds each once, locked)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "damage-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root
