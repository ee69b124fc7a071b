"""Errors raised by the algorithm package; the CLI reports them as one line (exit 2)."""

from __future__ import annotations


class QuantConfigError(ValueError):
    """A bit-width, recipe or target-profile setting that cannot be honoured."""
