"""The comparison plot: test accuracy against adapter parameters (docs/method.md §3).

matplotlib is imported here only, through its Agg canvas on a bare ``Figure``: no pyplot, no
global backend switch, nothing shown, so it runs the same headless in a Ray task or a notebook.
"""
from __future__ import annotations

import io

import pandas as pd

from .row_kinds import BASELINE, PARETO, WINNER


def comparison_png(frame: pd.DataFrame, title: str | None = None) -> bytes:
    """PNG bytes: each seed's tested front as a line, the winner and every baseline as labelled
    points (over several seeds: mean ± std, each seed's point faint beside it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (seed, rows) in enumerate(frame[frame["kind"] == PARETO].groupby("seed", sort=True)):
        rows = rows.sort_values("params")
        axes.plot(rows["params"], rows["test_acc"] * 100, "o-", color="tab:blue", alpha=0.5, markersize=3,
                  label="Pareto front (tested on the supernet's weights)" if i == 0 else None)
    colors = {WINNER: "tab:red", BASELINE: "tab:gray"}
    markers = {WINNER: ("*", 16), BASELINE: ("s", 7)}
    several = frame["seed"].nunique() > 1
    for (name, kind), rows in frame[frame["kind"] != PARETO].groupby(["name", "kind"], sort=False):
        marker, size = markers[kind]
        x, y = rows["params"].mean(), rows["test_acc"].mean() * 100
        if several:  # each seed faint, the mean ± std over seeds solid
            axes.scatter(rows["params"], rows["test_acc"] * 100, marker=marker, s=size**2 / 3, alpha=0.35,
                         color=colors[kind], zorder=2)
        axes.errorbar(x, y, yerr=rows["test_acc"].std() * 100 if several else None, fmt=marker, markersize=size,
                      color=colors[kind], capsize=3, zorder=3)
        weights = rows["weights"].iloc[0]  # NaN in tables stored before the column existed
        label = name if kind != WINNER else f"GLoRA (searched, {weights})" if isinstance(weights, str) else "GLoRA (searched)"
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(7, 4), fontsize=9)
    axes.set_xlabel("adapter parameters (classifier head not counted)")
    axes.set_ylabel("test accuracy (%)")
    seeds = sorted(frame["seed"].unique())
    datasets = ", ".join(sorted(frame["dataset"].unique()))
    axes.set_title(title or f"{datasets}: GLoRA vs fixed adapters (seeds {', '.join(map(str, seeds))})")
    axes.margins(x=0.1)  # room for the labels of the outermost points
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
