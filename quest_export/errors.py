"""One error model for every command.

User errors (bad flags, missing files, mismatched artifacts) exit 2 with one line that says what is
wrong and how to fix it; runtime failures exit 1. The CLI prints a traceback only with ``--debug``.
"""

from __future__ import annotations


class QuestError(Exception):
    """Base class for errors that the CLI reports as one line."""

    exit_code: int = 1


class UserError(QuestError):
    """Something the user can fix: a flag, a path, an artifact from another run."""

    exit_code = 2


class RuntimeFailure(QuestError):
    """The command was well-formed but could not complete (out of disk, backend failure)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. Every ``except KeyboardInterrupt`` (and ``finally``) cleanup runs as
    for Ctrl-C; being a subclass, it also keeps CPython from turning the CLI's exit status 130 into
    death-by-SIGINT when the signal lands inside ``exec`` of a string (dataclass creation, imports)."""
