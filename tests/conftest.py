"""Shared fixtures: small palaces built by the installed chromadb (in a child process),
built once per spec and copied per test. Built on the chaosfix pytest plugin's own
fixtures (``palace_factory``; its report header names chromadb, pickle format and seed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaosfix.workload import PalaceSpec, chroma_major


@pytest.fixture(autouse=True)
def _no_spare_map_helper():
    """A map helper the ``check`` command started early (``map_child.prestart``) and a
    test left untaken is not handed to the next test's reader."""
    yield
    from chaosfix.palace import map_child

    map_child.drop_spare()


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


# What each extra chromadb release leg runs (tox: ``pytest -m releases``): check,
# reconcile and the scenario catalogue's core, judged by that release's own chromadb.
RELEASE_TESTS = (
    "test_matrix.py::",
    "test_check.py::test_template_palace_is_consistent",
    "test_check.py::test_pending_wal_rows_are_healthy",
    "test_check.py::test_after_deletes_is_healthy",
    "test_check.py::test_lost_hnsw_writes_after_committed_persist",
    "test_check.py::test_older_sqlite_beside_newer_index",
    "test_check.py::test_poisoned_max_seq_id",
    "test_check.py::test_cli_contract_exit_codes_json_and_read_only",
    "test_check.py::test_an_add_sql_refused_gives_its_vector_to_no_row",
    "test_check.py::test_an_add_followed_by_a_metadata_update_keeps_its_vector",
    "test_reconcile.py::test_damage_is_repaired[lost-hnsw-writes]",
    "test_reconcile.py::test_damage_is_repaired[stale-sqlite]",
    "test_reconcile.py::test_damage_is_repaired[pickle-deleted]",
    "test_reconcile.py::test_damage_is_repaired[off-by-one]",
    "test_reconcile.py::test_damage_is_repaired[emptied-queue]",
    "test_reconcile.py::test_damage_is_repaired[poisoned-seq-vector]",
    "test_reconcile.py::test_nothing_to_do_is_byte_identical",
    "test_reconcile.py::test_chromadb_post_check_can_fail",
    "test_replay0x.py::test_replay0x_predicts_what_chromadb_06_persists",
    "test_scenarios.py::test_catalogue_covers_the_issue_list",
    "test_scenarios.py::test_scenario[partial-flush]",
    "test_scenarios.py::test_scenario[phantom-rows]",
    "test_scenarios.py::test_scenario[healthy-pending]",
    "test_scenarios.py::test_scenario[healthy-deletes]",
    "test_scenarios.py::test_scenario[poisoned-seq]",
    "test_scenarios.py::test_scenario[truncated-pickle]",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(key in item.nodeid for key in RELEASE_TESTS):
            item.add_marker(pytest.mark.releases)
