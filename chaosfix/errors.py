"""Errors that map to the documented exit codes (README "Exit codes"): fsck-like values,
so scripts can test bits: 1 repaired, 4 findings or work left, 8 operational error;
2 is click's usage error."""

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
