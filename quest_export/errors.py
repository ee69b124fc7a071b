"""One error model for every command (defined in :mod:`quest.errors`, re-exported here), plus the
CLI's interruption signal."""

from __future__ import annotations

from quest.errors import QuantConfigError, QuestError, RuntimeFailure, UserError

__all__ = ["Interrupted", "QuantConfigError", "QuestError", "RuntimeFailure", "UserError"]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. Every ``except KeyboardInterrupt`` (and ``finally``) cleanup runs as
    for Ctrl-C; being a subclass, it also keeps CPython from turning the CLI's exit status 130 into
    death-by-SIGINT when the signal lands inside ``exec`` of a string (dataclass creation, imports)."""
