"""The loss curve of a run as a PNG, the picture users check first.

Drawn with matplotlib's object API on the Agg canvas: no display, and no pyplot global state that
two runs in one process could share. Written to a temporary name and renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from backpropagate_services.common.atomic import staged


def write_loss_curve(loss_history: Sequence[float], path: Path) -> Path:
    """Plot loss per optimizer step (1-based) into the PNG at `path`; return `path`."""
    figure = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(range(1, len(loss_history) + 1), loss_history, color="tab:blue", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    with staged(path) as staging:
        figure.savefig(staging, format="png")
    return path
