"""Bar chart of a layer-group sensitivity ranking (see ``quest.sensitivity``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest_export.artifacts import atomic_path

SPATIAL_COLOUR = "#4c72b0"
TEMPORAL_COLOUR = "#dd8452"


def _bar_values(results: list[dict[str, Any]]) -> list[float]:
    """MSEs made drawable on a log axis: zeros sit a decade below the smallest positive value."""
    positive = [r["mse"] for r in results if r["mse"] > 0]
    floor = min(positive) / 10 if positive else 1e-12
    return [max(float(r["mse"]), floor) for r in results]


def plot_sensitivity(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Draw worst group on top, temporal groups highlighted; written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranked = sorted(results, key=lambda r: r["mse"])  # barh draws bottom-up
    fig = Figure(figsize=(7.0, 0.6 + 0.35 * max(len(ranked), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [TEMPORAL_COLOUR if r["temporal"] else SPATIAL_COLOUR for r in ranked]
    ax.barh([r["group"] for r in ranked], _bar_values(ranked), color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("output MSE vs FP (only this group quantized)")
    ax.set_title(title)
    ax.legend(
        handles=[Patch(color=TEMPORAL_COLOUR, label="temporal"), Patch(color=SPATIAL_COLOUR, label="other")],
        loc="lower right",
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
