"""The one ranking of a search (docs/method.md §3.1): what "better" means, for the planner's
records and for stored tables alike.

``accuracy`` (the paper): validation accuracy down, then fewer parameters, then the key.
``loss``: mean validation cross-entropy up (a missing loss last), then accuracy down, then fewer
parameters, then the key.  A total order either way, so no tie depends on arrival order.  The
planner's elite, the winner, the Pareto front (``pareto``), the notebook's "best" and the
comparison all rank by it.
"""
from __future__ import annotations

import math

import pandas as pd

from .config import Fitness

# The table columns and directions of each fitness, most significant first.
_COLUMNS: dict[Fitness, tuple[tuple[str, bool], ...]] = {
    Fitness.ACCURACY: (("val_acc", False), ("params", True), ("key", True)),
    Fitness.LOSS: (("val_loss", True), ("val_acc", False), ("params", True), ("key", True)),
}
# What each fitness scores a subnet by (the column plotted and reported as the search's score).
SCORE_COLUMN = {Fitness.ACCURACY: "val_acc", Fitness.LOSS: "val_loss"}


def rank_key(fitness: Fitness, val_acc: float, val_loss: float, params: int, key: str) -> tuple:
    """Smaller first: the position of one evaluation in the ranking of ``fitness``."""
    values = {"val_acc": val_acc, "val_loss": math.inf if math.isnan(val_loss) else val_loss,
              "params": params, "key": key}
    return tuple(values[name] if ascending else -values[name] for name, ascending in _COLUMNS[Fitness(fitness)])


def ranked(frame: pd.DataFrame, fitness: Fitness) -> pd.DataFrame:
    """The rows of ``frame`` (columns val_acc, val_loss, params, key), best first."""
    columns = _COLUMNS[Fitness(fitness)]
    return frame.sort_values([name for name, _ in columns], ascending=[up for _, up in columns],
                             kind="stable", na_position="last")
