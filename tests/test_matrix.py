"""The tox leg really runs the chromadb it claims: a mis-installed leg must fail, not pass."""

from __future__ import annotations

import os

import pytest

from chaosfix.workload import chromadb_version


def test_leg_runs_expected_chromadb() -> None:
    want = os.environ.get("CHAOSFIX_EXPECT_CHROMADB")
    if want is None:
        pytest.skip("not under tox (CHAOSFIX_EXPECT_CHROMADB unset)")
    assert chromadb_version() == want
