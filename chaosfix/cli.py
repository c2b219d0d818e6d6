"""The chaosfix command line: parses, calls the library, prints. No logic of its own.

Exit codes (DESIGN.md section 4): check 0 consistent / 4 findings / 8 operational error;
reconcile 0 nothing to do / 1 repaired / 4 left unrepaired / 8 operational error;
simulate 0 every expectation held / 4 an expectation failed / 8 operational error;
explore 0 no bad state / 4 bad states found / 8 operational error.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from chaosfix.errors import EXIT_FINDINGS, EXIT_OK, EXIT_OPERATIONAL, ChaosfixError


def _one_line_errors(fn: Callable[..., int]) -> Callable[..., None]:
    """Turn every failure into one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except ChaosfixError as exc:
            click.echo(f"chaosfix: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("chaosfix: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - never a traceback
            msg = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"chaosfix: internal error: {type(exc).__name__}: {msg}", err=True)
            sys.exit(EXIT_OPERATIONAL)
        sys.exit(code)

    return wrapper


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chaosfix")
def main() -> None:
    """Find, reproduce and repair ChromaDB palaces whose SQLite and HNSW index disagree."""


@main.command()
@click.argument("palace", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--collection", help="Only this collection.")
@click.option("--json", "as_json", is_flag=True, help="Print one chaosfix.check/1 JSON object.")
@_one_line_errors
def check(palace: str, collection: str | None, as_json: bool) -> int:
    """Read-only consistency check. Exit 0 consistent, 4 findings, 8 error."""
    from chaosfix.check import check_palace
    from chaosfix.report import render_check

    rep = check_palace(palace, collection)
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render_check(rep))
    return EXIT_OK if rep.consistent else EXIT_FINDINGS


@main.command()
@click.argument("palace", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--embedder", metavar="MODULE:ATTR", help="Embedding function to re-embed rows with no vector anywhere.")
@click.option("--collection", help="Only this collection.")
@click.option("--no-backup", is_flag=True, help="Do not keep the replaced files.")
@click.option("--strategy", type=click.Choice(["auto", "incremental", "rebuild"]), default="auto", show_default=True)
@click.option("--verify", "verify_mode", type=click.Choice(["sample", "full"]), default="sample", show_default=True,
              help="Self-query repaired rows plus a sample, or every row.")
@click.option("--no-chromadb-check", is_flag=True, help="Skip the final reopen with chromadb.")
@click.option("--apply-pending", is_flag=True, help="Also fold pending WAL rows into a healthy index.")
@click.option("--prune-orphan-dirs", is_flag=True, help="Move segment folders no segment owns into the backup.")
@click.option("--json", "as_json", is_flag=True, help="Print one chaosfix.reconcile/1 JSON object.")
@_one_line_errors
def reconcile(palace: str, dry_run: bool, embedder: str | None, collection: str | None, no_backup: bool,
              strategy: str, verify_mode: str, no_chromadb_check: bool, apply_pending: bool, prune_orphan_dirs: bool,
              as_json: bool) -> int:
    """Repair every fixable finding. Exit 0 nothing to do, 1 repaired, 4 left unrepaired, 8 error.

    With --dry-run the exit code says what a real run would return."""
    from chaosfix.reconcile import ReconcileOptions, reconcile_palace
    from chaosfix.report import Progress, render_reconcile

    opts = ReconcileOptions(collection=collection, dry_run=dry_run, backup=not no_backup, embedder=embedder,
                            strategy=strategy, verify_full=verify_mode == "full",
                            chromadb_check=not no_chromadb_check, apply_pending=apply_pending,
                            prune_orphan_dirs=prune_orphan_dirs)
    prog = Progress()
    rep = reconcile_palace(palace, opts, progress=prog.update, log=prog.say)
    prog.done()
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render_reconcile(rep))
    return rep.exit_code


@main.command()
@click.option("--scenarios", "extra", multiple=True, type=click.Path(), help="Also load scenarios from DIR.")
@_one_line_errors
def scenarios(extra: tuple[str, ...]) -> int:
    """List the scenario catalogue: name, chromadb versions, what it reproduces."""
    from chaosfix.scenario import catalogue

    for s in catalogue(list(extra)).values():
        click.echo(f"{s.name:<26} [{','.join(s.versions)}]  {s.summary}")
    return EXIT_OK


@main.command()
@click.argument("name", required=False)
@click.option("--all", "run_all", is_flag=True, help="Run every scenario that applies to the installed chromadb.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--drawers", type=int, help="Override the scenario's palace size.")
@click.option("--keep", type=click.Path(), help="Keep the palace and scratch files in DIR.")
@click.option("--scenarios", "extra", multiple=True, type=click.Path(), help="Also load scenarios from DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print chaosfix.simulate/1 JSON.")
@_one_line_errors
def simulate(name: str | None, run_all: bool, seed: int, drawers: int | None, keep: str | None,
             extra: tuple[str, ...], as_json: bool) -> int:
    """Build a throwaway palace with the installed chromadb, break it as SCENARIO says,
    check, reconcile, verify. Exit 0 when every expectation held, 4 otherwise."""
    from chaosfix.errors import ChaosfixError
    from chaosfix.report import render_matrix, render_simulation
    from chaosfix.scenario import catalogue, get, run_scenario
    from chaosfix.workload import chroma_major

    if run_all == bool(name):
        raise ChaosfixError("give one SCENARIO or --all (`chaosfix scenarios` lists them)")

    def log(msg: str) -> None:
        click.echo(f"chaosfix: {msg}", err=True)

    if name:
        results = [run_scenario(get(name, list(extra)), seed=seed, drawers=drawers, keep=keep, log=log)]
    else:
        todo = [s for s in catalogue(list(extra)).values() if s.applies(chroma_major())]
        results = []
        for s in todo:
            k = f"{keep}/{s.name}" if keep else None
            results.append(run_scenario(s, seed=seed, drawers=drawers, keep=k, log=log))
    if as_json:
        _emit_json(results[0].to_json() if name else {"schema": "chaosfix.simulate-all/1",
                                                       "results": [r.to_json() for r in results]})
    else:
        click.echo(render_simulation(results[0]) if name else render_matrix(results))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FINDINGS


@main.command()
@click.option("--workload", "workloads", multiple=True, metavar="NAME|FILE",
              help="add, delete, upsert, update, mixed, or a workload .toml (repeatable; default: all built-ins).")
@click.option("--profile", type=click.Choice(["ci", "dev", "nightly", "full"]), default="nightly",
              show_default=True, help="ci: 2 seeded states per workload; dev: 1 point per class and file; "
              "nightly: 8 per class and file; full: every point. Power-loss states: all but in ci.")
@click.option("--sample", type=int, metavar="N", help="N seeded states per syscall class (overrides --profile).")
@click.option("--class", "classes", multiple=True, help="Only these classes (openat, write, pwrite64, fsync, "
              "unlink, ..., powerloss).")
@click.option("--no-power-loss", is_flag=True, help="Only SIGKILL states.")
@click.option("--at", metavar="POINT", help="Replay one state: CLASS:FILE:N or powerloss:lost|torn:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep", type=click.Path(), help="Copy the palace of every bad state into DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print one chaosfix.explore/1 JSON object.")
@_one_line_errors
def explore(workloads: tuple[str, ...], profile: str, sample: int | None, classes: tuple[str, ...],
            no_power_loss: bool, at: str | None, seed: int, keep: str | None, as_json: bool) -> int:
    """Run a workload with the installed chromadb, crash it at every persistence point
    (SIGKILL at the k-th call of each syscall class on each palace file, counted across
    threads) and by power loss, and judge every state before and after chaosfix.
    Exit 0 when no state is missed, a false alarm, a failed repair or data lost, else 4."""
    from chaosfix.explore.report import render
    from chaosfix.explore.run import PROFILES, Profile
    from chaosfix.explore.run import explore as run_explore
    from chaosfix.explore.workloads import BUILTIN, load

    if at and len(workloads) != 1:
        raise ChaosfixError("--at replays one state: give exactly one --workload")
    prof = Profile(sample=sample) if sample is not None else PROFILES[profile]
    rep = run_explore([load(w, seed) for w in (workloads or BUILTIN)], prof, seed=seed,
                      power_loss=not no_power_loss, classes=tuple(classes) or None, at=at, keep=keep,
                      log=lambda m: click.echo(f"chaosfix: {m}", err=True))
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render(rep))
    return EXIT_FINDINGS if rep.bad else EXIT_OK
