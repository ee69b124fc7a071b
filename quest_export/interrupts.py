"""The signal that asked this process to stop, kept where every artifact commit can see it.

The CLI's handler raises :class:`~quest_export.errors.Interrupted` at once, but Python drops an
exception raised while a finaliser runs (a ``__del__`` during garbage collection prints
"Exception ignored in ..." and carries on), so the raise alone can be lost and the command would
finish and commit its output. The handler therefore also records the signal here, and every atomic
rename (:mod:`quest_export.artifacts`) refuses to commit while one is pending.
"""

from __future__ import annotations

from quest_export.errors import Interrupted

_pending: list[str] = []


def record(signal_name: str) -> None:
    """Remember that ``signal_name`` arrived (called from the signal handler)."""
    _pending.append(signal_name)


def pending() -> str | None:
    """The first signal that arrived in this process, or None."""
    return _pending[0] if _pending else None


def stop_if_requested() -> None:
    """Raise Interrupted when a signal arrived, even if its first raise was swallowed."""
    if _pending:
        raise Interrupted


def clear() -> None:
    """Forget recorded signals (in-process test runs of the CLI)."""
    _pending.clear()
