"""The chaosfix command line: parses, calls the library, prints. No logic of its own.

Exit codes 0/1/4/8 follow fsck's: check 0 consistent / 4 findings / 8 operational error;
reconcile 0 nothing to do / 1 repaired / 4 left unrepaired / 8 operational error;
simulate 0 every expectation held / 4 an expectation failed / 8 operational error;
explore 0 no bad state / 4 bad states found / 8 operational error.
and 2 for every usage error (click's convention; fsck's is 16). With ``--json``, an error is
also printed on stdout as one ``chaosfix.error/1`` object.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from chaosfix.errors import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_OPERATIONAL,
    EXIT_USAGE,
    ChaosfixError,
    UsageProblem,
    os_error_line,
)
from chaosfix.progress import printable

ERROR_SCHEMA = "chaosfix.error/1"


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _one_line(msg: str, limit: int = 500) -> str:
    """Control characters escaped (messages may quote palace-supplied names), so an error
    is one line on any terminal; a long one loses its middle (a long path), never its
    end, which says what went wrong."""
    out = printable(msg)
    return out if len(out) <= limit else out[:150] + "..." + out[-(limit - 153):]


def _fail(msg: str, code: int, as_json: bool) -> None:
    """One line on stderr (and a JSON error object on stdout with --json), then exit."""
    msg = _one_line(msg)
    click.echo(f"chaosfix: {msg}", err=True)
    if as_json:
        _emit_json({"schema": ERROR_SCHEMA, "error": msg, "exit_code": code})
    sys.exit(code)


def _one_line_errors(fn: Callable[..., int]) -> Callable[..., None]:
    """Turn every failure into one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("as_json"))
        try:
            code = fn(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: exit 2, printed by ChaosfixGroup.main
        except UsageProblem as exc:  # a bad argument the library found: printed as click's are
            raise click.UsageError(str(exc), click.get_current_context(silent=True)) from None
        except ChaosfixError as exc:
            _fail(str(exc), exc.exit_code, as_json)
        except KeyboardInterrupt:
            _fail("interrupted", 130, as_json)
        except BrokenPipeError:  # `chaosfix scenarios | head`: the reader left, nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OPERATIONAL)
        except OSError as exc:  # the system refused: its words and the file, not "internal error"
            _fail(os_error_line(exc), EXIT_OPERATIONAL, as_json)
        except Exception as exc:  # noqa: BLE001 - never a traceback
            msg = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error: {type(exc).__name__}: {msg}", EXIT_OPERATIONAL, as_json)
        sys.exit(code)

    return wrapper


class ChaosfixGroup(click.Group):
    """click's group, with usage errors also printed as JSON when ``--json`` was given."""

    def main(self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        # numpy's OpenBLAS starts a thread per CPU that spins after import (0.1 s of a CPU
        # per process, this one and every child); chaosfix's matrix work is small and
        # hnswlib, chromadb and the embedders keep their own threads. A user's setting wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        for stream in (sys.stdout, sys.stderr):  # a palace's strings (a pickled id may hold a
            try:  # lone surrogate) are printed escaped, never fail the run
                stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
            except (AttributeError, ValueError):  # (not a text stream: a test's capture)
                pass
        try:
            # (named chaosfix also when run as ``python -m chaosfix``)
            return super().main(args=args, prog_name=prog_name or "chaosfix", standalone_mode=False, **extra)
        except click.UsageError as exc:
            # one line like every other error, with where to read more
            where = exc.ctx.command_path if exc.ctx is not None else "chaosfix"
            msg = _one_line(f"{exc.format_message()} (see '{where} --help')")
            click.echo(f"chaosfix: error: {msg}", err=True)
            if "--json" in args:
                _emit_json({"schema": ERROR_SCHEMA, "error": msg, "exit_code": EXIT_USAGE})
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):  # (a Ctrl-C before a command's own handler runs)
            click.echo("chaosfix: interrupted", err=True)
            if "--json" in args:
                _emit_json({"schema": ERROR_SCHEMA, "error": "interrupted", "exit_code": 130})
            sys.exit(130)


def _embedders(given: tuple[str, ...]) -> str | list[str] | None:
    """--embedder once: that one; repeated: candidates the guard chooses from."""
    return given[0] if len(given) == 1 else (list(given) or None)


def _keep_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--keep DIR: a new or empty folder, checked before any work (usage error otherwise)."""
    from chaosfix.scenario import check_keep_dir

    if value is not None:
        try:
            check_keep_dir(value)
        except ChaosfixError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1], ctx, param) from None
    return value


def _palace_given(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An empty PALACE is a usage error, not the current folder (``Path("")`` is ".")."""
    if not value:
        raise click.BadParameter("an empty path names no palace", ctx, param)
    return value


def _bar():  # noqa: ANN202 - chaosfix.progress.StderrBar
    from chaosfix.progress import StderrBar

    return StderrBar()


@click.group(cls=ChaosfixGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chaosfix")
def main() -> None:
    """Find, reproduce and repair ChromaDB palaces whose SQLite and HNSW index disagree.

    Exit codes: 0 ok, 1 repaired (reconcile), 2 usage error, 4 findings or work left,
    8 operational error."""


@main.command()
@click.argument("palace", metavar="PALACE", type=click.Path(), callback=_palace_given)
@click.option("--collection", metavar="NAME", help="Only this collection.")
@click.option("--deep", is_flag=True, help="Also re-embed every row and compare with its stored vector (STALE_VECTOR).")
@click.option("--embedder", metavar="MODULE:ATTR", multiple=True, help="With --deep: as for reconcile.")
@click.option("--json", "as_json", is_flag=True, help="Print one chaosfix.check/1 JSON object.")
@_one_line_errors
def check(palace: str, collection: str | None, deep: bool, embedder: tuple[str, ...], as_json: bool) -> int:
    """Read-only consistency check of PALACE. Exit 0 consistent, 4 findings, 8 error."""
    from chaosfix.palace import map_child

    map_child.prestart(palace)  # (a large 1.x map's helper starts while the rest imports)
    from chaosfix.check import check_palace
    from chaosfix.report import render_check

    if deep:
        from chaosfix.deep import deep_check

        rep = deep_check(palace, collection, _embedders(embedder))
    else:
        rep = check_palace(palace, collection)
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render_check(rep))
    return EXIT_OK if rep.consistent else EXIT_FINDINGS


@main.command()
@click.argument("palace", metavar="PALACE", type=click.Path(), callback=_palace_given)
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--embedder", metavar="MODULE:ATTR", multiple=True,
              help="Embedding function for rows with no vector anywhere (default: the palace's own record, "
                   "its collection config, or chromadb's default model when on disk; 'minilm' names that one). "
                   "Repeat it to let the guard pick the one that reproduces the palace.")
@click.option("--deep", is_flag=True, help="Re-embed every row and replace stale vectors (see check --deep).")
@click.option("--trust-embedder", is_flag=True, help="Use the embedder even if it does not reproduce the palace's vectors.")
@click.option("--collection", metavar="NAME", help="Only this collection.")
@click.option("--no-backup", is_flag=True, help="Do not keep the replaced files.")
@click.option("--strategy", type=click.Choice(["auto", "incremental", "rebuild"]), default="auto", show_default=True,
              help="Patch the index in place (incremental) or build it anew (rebuild).")
@click.option("--verify", "verify_mode", type=click.Choice(["sample", "full"]), default="sample", show_default=True,
              help="Self-query repaired rows plus a sample, or every row.")
@click.option("--no-chromadb-check", is_flag=True, help="Skip the final reopen with chromadb.")
@click.option("--chromadb-python", metavar="PATH", help="Interpreter of the application's own chromadb, for the post-check.")
@click.option("--apply-pending", is_flag=True, help="Also fold pending WAL rows into a healthy index.")
@click.option("--prune-orphan-dirs", is_flag=True, help="Move segment folders no segment owns into the backup.")
@click.option("--drop-foreign-sql", is_flag=True,
              help="Drop triggers/views chromadb never creates (their SQL is saved in the backup) instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print one chaosfix.reconcile/1 JSON object.")
@_one_line_errors
def reconcile(palace: str, dry_run: bool, embedder: tuple[str, ...], deep: bool, trust_embedder: bool,
              collection: str | None, no_backup: bool, strategy: str, verify_mode: str, no_chromadb_check: bool,
              chromadb_python: str | None, apply_pending: bool, prune_orphan_dirs: bool, drop_foreign_sql: bool,
              as_json: bool) -> int:
    """Repair every fixable finding in PALACE. Exit 0 nothing to do, 1 repaired, 4 left
    unrepaired, 8 error.

    With --dry-run the exit code says what a real run would return."""
    from chaosfix.reconcile import ReconcileOptions, reconcile_palace
    from chaosfix.report import render_reconcile

    opts = ReconcileOptions(collection=collection, dry_run=dry_run, backup=not no_backup, embedder=_embedders(embedder),
                            trust_embedder=trust_embedder, deep=deep,
                            strategy=strategy, verify_full=verify_mode == "full",
                            chromadb_check=not no_chromadb_check, chromadb_python=chromadb_python,
                            apply_pending=apply_pending,
                            prune_orphan_dirs=prune_orphan_dirs, drop_foreign_sql=drop_foreign_sql)
    bar = _bar()
    rep = reconcile_palace(palace, opts, progress=bar, log=bar.say)
    bar.close()
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render_reconcile(rep))
    return rep.exit_code


@main.command()
@click.option("--scenarios", "extra", metavar="DIR", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also load scenarios from DIR (repeatable).")
@_one_line_errors
def scenarios(extra: tuple[str, ...]) -> int:
    """List the scenario catalogue: name, chromadb versions, what it reproduces."""
    from chaosfix.scenario import catalogue

    for s in catalogue(list(extra)).values():
        click.echo(f"{s.name:<26} [{','.join(s.versions)}]  {s.summary}")
    return EXIT_OK


@main.command()
@click.argument("name", metavar="SCENARIO", required=False)
@click.option("--all", "run_all", is_flag=True, help="Run every scenario that applies to the installed chromadb.")
@click.option("--seed", metavar="N", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the palace's drawers and seeded faults.")
@click.option("--drawers", metavar="N", type=click.IntRange(min=1),
              help="Palace size, for scenarios marked resizable (with --all the others keep theirs).")
@click.option("--keep", metavar="DIR", type=click.Path(), callback=_keep_dir,
              help="Keep the broken and the repaired palace in DIR/broken and DIR/repaired (DIR new or empty).")
@click.option("--scenarios", "extra", metavar="DIR", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also load scenarios from DIR (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print chaosfix.simulate/1 JSON.")
@click.pass_context
@_one_line_errors
def simulate(ctx: click.Context, name: str | None, run_all: bool, seed: int, drawers: int | None, keep: str | None,
             extra: tuple[str, ...], as_json: bool) -> int:
    """Build a throwaway palace with the installed chromadb, break it as SCENARIO says,
    check, reconcile, verify. Exit 0 when every expectation held, 4 otherwise."""
    from chaosfix.report import render_matrix, render_simulation
    from chaosfix.scenario import catalogue, get, run_scenario
    from chaosfix.workload import chroma_major

    if run_all and name:
        raise click.UsageError("give SCENARIO or --all, not both", ctx)
    if not run_all and not name:
        raise click.UsageError("give one SCENARIO or --all (`chaosfix scenarios` lists them)", ctx)
    bar = _bar()
    if name:
        try:
            chosen = get(name, list(extra))
        except ChaosfixError as exc:  # an unknown name is a bad argument
            raise click.BadParameter(str(exc), ctx, param_hint="SCENARIO") from None
        results = [run_scenario(chosen, seed=seed, drawers=drawers, keep=keep, log=bar.say, progress=bar)]
    else:
        todo = [s for s in catalogue(list(extra)).values() if s.applies(chroma_major())]
        if drawers is not None and not all(s.resizable for s in todo):
            bar.say(f"--drawers {drawers}: " + ", ".join(s.name for s in todo if not s.resizable)
                    + " keep their own palace size (not resizable)")
        results = [run_scenario(s, seed=seed, drawers=drawers if s.resizable else None,
                                keep=f"{keep}/{s.name}" if keep else None, log=bar.say, progress=bar) for s in todo]
    bar.close()
    if as_json:
        _emit_json(results[0].to_json() if name else {"schema": "chaosfix.simulate-all/1",
                                                       "results": [r.to_json() for r in results]})
    else:
        click.echo(render_simulation(results[0]) if name else render_matrix(results))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FINDINGS


@main.command()
@click.option("--workload", "workloads", multiple=True, metavar="WORKLOAD",
              help="A built-in name (add, delete, upsert, update, mixed) or a workload .toml (repeatable; default: all built-ins).")
@click.option("--profile", type=click.Choice(["ci", "dev", "nightly", "full"]), default="nightly",
              show_default=True, help="ci: 2 seeded states per workload; dev: 1 point per class and file; "
              "nightly: 8 per class and file; full: every point. Power-loss states: all but in ci.")
@click.option("--sample", type=click.IntRange(min=1), metavar="N", help="N seeded states per syscall class (overrides --profile).")
@click.option("--class", "classes", multiple=True, metavar="CLASS", help="Only these classes (openat, write, pwrite64, fsync, "
              "unlink, ..., powerloss).")
@click.option("--no-power-loss", is_flag=True, help="Only SIGKILL states.")
@click.option("--at", metavar="POINT", help="Replay one state: CLASS:FILE:N or powerloss:lost|torn:N.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, metavar="N")
@click.option("--keep", type=click.Path(), metavar="DIR", help="Copy the palace of every bad state into DIR.")
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
        raise click.UsageError("--at replays one state: give exactly one --workload")
    prof = Profile(sample=sample) if sample is not None else PROFILES[profile]
    rep = run_explore([load(w, seed) for w in (workloads or BUILTIN)], prof, seed=seed,
                      power_loss=not no_power_loss, classes=tuple(classes) or None, at=at, keep=keep,
                      log=lambda m: click.echo(f"chaosfix: {m}", err=True))
    if as_json:
        _emit_json(rep.to_json())
    else:
        click.echo(render(rep))
    return EXIT_FINDINGS if rep.bad else EXIT_OK
