"""Every catalogue scenario that applies to the installed chromadb holds all its
expectations: the damage is reproduced, chromadb's reaction on reopen is the recorded
one, check names it exactly, reconcile repairs it, and chromadb then reads every row."""

from __future__ import annotations

from chaosfix.scenario import catalogue
from chaosfix.workload import chroma_major

CATALOGUE = catalogue()
APPLICABLE = sorted(n for n, s in CATALOGUE.items() if s.applies(chroma_major()))


def test_catalogue_covers_the_issue_list():
    need = {"partial-flush", "off-by-one-pickle", "phantom-rows", "ghost-labels", "stale-sqlite", "torn-hnsw",
            "truncated-pickle", "lost-pickle-wal-purged", "link-bloat", "poisoned-seq", "queue-reset",
            "sector-garbage", "torn-pages", "dimension-lost", "healthy-deletes", "healthy-pending", "healthy-never-persisted", "migrated-06"}
    assert need <= set(CATALOGUE)
    assert len(APPLICABLE) >= 13  # a leg that silently runs nothing must fail


def test_scenario(scenario):
    """Parametrized over the catalogue by the chaosfix plugin (dogfood); scenarios for the
    other chromadb family are skipped."""
    res = scenario.assert_expected()
    assert [s.name for s in res.stages] == ["build", "break", "observe", "check", "reconcile", "verify"]
