"""Long stages report progress through the library hook (chaosfix.progress): building a
palace with chromadb (in a child process), building and verifying the repaired index,
and chromadb's post-check (in a child process). Each stage runs to done == total."""

from __future__ import annotations

from pathlib import Path

from helpers import HASH_EMBEDDER, damaged_palace

from chaosfix.reconcile import ReconcileOptions, reconcile_palace
from chaosfix.workload import PalaceSpec, apply_ops


class Recorder:
    """A ProgressFn that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))

    def finished(self) -> dict[str, tuple[int, int]]:
        """stage -> (last done, total); asserts done never goes backwards within a stage."""
        last: dict[str, tuple[int, int]] = {}
        for stage, done, total in self.calls:
            assert done >= last.get(stage, (0, 0))[0], f"{stage}: progress went backwards"
            last[stage] = (done, total)
        return last


def test_palace_build_reports_chromadb_writes(tmp_path: Path) -> None:
    """The chromadb child reports after each add call, through its stderr."""
    rec = Recorder()
    spec = PalaceSpec(drawers=120, dim=16, sync_threshold=50, batch_size=10)
    res = apply_ops(tmp_path / "p", spec, [{"op": "add", "start": 0, "count": 120, "chunk": 50}], progress=rec)
    assert res.ok and "chaosfix-progress" not in res.stderr
    assert rec.calls == [("chromadb writes", 50, 120), ("chromadb writes", 100, 120), ("chromadb writes", 120, 120)]


def test_reconcile_reports_build_verify_and_chromadb_check(tmp_path: Path, damage_cache: Path) -> None:
    p = damaged_palace("lost-hnsw-writes", tmp_path / "palace", damage_cache)
    rec = Recorder()
    rep = reconcile_palace(p, ReconcileOptions(embedder=HASH_EMBEDDER), progress=rec)
    assert rep.exit_code == 1 and rep.chromadb and rep.chromadb["ok"], rep.chromadb
    done = rec.finished()
    stages = list(done)
    assert any(s.startswith("building mempalace_drawers") for s in stages), stages
    assert any(s.startswith("self-queries") for s in stages), stages
    assert "chromadb post-check mempalace_drawers" in stages, stages
    assert all(d == t for d, t in done.values()), done
    v = next(iter(rep.verifications.values()))
    assert done[next(s for s in stages if s.startswith("self-queries"))] == (v.queried, v.queried)


def test_log_lines_and_bar_labels_escape_control_characters():
    """A stage or log line names a palace's collection: its newline or terminal escape
    is printed escaped, never as a line or an escape of its own."""
    import io

    from chaosfix.progress import StderrBar

    out = io.StringIO()
    bar = StderrBar(stream=out)
    bar.say("building evil\n\x1b[31mverdict: consistent\r")
    assert out.getvalue() == "chaosfix: building evil\\n\\x1b[31mverdict: consistent\\r\n"
