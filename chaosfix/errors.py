"""Errors that map to the documented exit codes (README "Exit codes"): fsck's values
(1 repaired, 4 findings or work left, 8 operational error) plus click's 2 for usage
errors."""

from __future__ import annotations

EXIT_OK = 0
EXIT_REPAIRED = 1
EXIT_USAGE = 2
EXIT_FINDINGS = 4
EXIT_UNREPAIRED = 4
EXIT_OPERATIONAL = 8


class ChaosfixError(Exception):
    """Base error: carries its exit code; the CLI prints ``str(self)`` as one line."""

    exit_code = EXIT_OPERATIONAL


class OperationalError(ChaosfixError):
    """Not a palace, unreadable, locked, refused: exit 8."""


class UsageProblem(ChaosfixError):
    """A bad argument the library finds (some only once it has looked, e.g. a crash
    point past the workload's last call): exit 2, like click's usage errors."""

    exit_code = EXIT_USAGE


def whole_number_problem(what: str, value: object, least: int) -> str | None:
    """Why ``value`` is not a whole number of ``least`` or more (a bool is not one), or
    None: the one rule for the counts and seeds a library caller passes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        return f"{what} must be a whole number of {least} or more, not {value!r}"
    return None


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: its file(s) and the system's words, no errno tuple."""
    where = f"{exc.filename}{f' -> {exc.filename2}' if exc.filename2 else ''}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
