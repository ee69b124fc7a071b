"""The project's one error model, defined here so that the algorithm package needs nothing from
``quest_export`` (which re-exports these names).

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


class QuantConfigError(UserError, ValueError):
    """A bit-width, recipe, target-profile or checkpoint setting that cannot be honoured."""


class RuntimeFailure(QuestError):
    """The command was well-formed but could not complete (out of disk, backend failure)."""

    exit_code = 1
