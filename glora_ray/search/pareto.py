"""The Pareto front of (the search's fitness, parameters) over everything evaluated.

A subnet is on the front when no subnet ranked above it (``ranking``, the search's own order)
has as few parameters or fewer: the front is the best-ranked subnet at each size, so the winner
(ranked first) is always on it.  One search then answers every budget below its maximum: the
best subnet under a budget B is the front's member with the most parameters <= B (the front is
sorted by params, and the ranking improves strictly along it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .config import Fitness
from .ranking import rank_key

FRONT_COLUMNS = ("key", "params", "val_acc", "val_loss", "candidate_id", "generation", "origin")


def pareto_mask(params: Sequence[int], rank_keys: Sequence[tuple]) -> np.ndarray:
    """True for the points no better-ranked point matches or beats in parameters.

    ``rank_keys``: each point's ``ranking.rank_key`` (a total order: exact ties cannot occur).
    """
    params = np.asarray(params, dtype=np.int64)
    if len(rank_keys) != len(params):
        raise ValueError(f"params and rank_keys must have one length, got {len(params)} and {len(rank_keys)}")
    mask = np.zeros(len(params), dtype=bool)
    fewest = np.iinfo(np.int64).max
    for i in sorted(range(len(params)), key=lambda i: rank_keys[i]):  # best first
        if params[i] < fewest:
            mask[i] = True
            fewest = params[i]
    return mask


def pareto_front(evaluated: pd.DataFrame, fitness: Fitness) -> pd.DataFrame:
    """The front of a table of evaluations (columns key, params, val_acc, val_loss), ranked by
    ``fitness``; sorted by params ascending, so its ranking improves along it."""
    if evaluated.empty:
        return evaluated.iloc[0:0].reset_index(drop=True)
    keys = [rank_key(fitness, row.val_acc, row.val_loss, row.params, row.key)
            for row in evaluated[["val_acc", "val_loss", "params", "key"]].itertuples(index=False)]
    mask = pareto_mask(evaluated["params"].to_numpy(), keys)
    return evaluated[mask].sort_values(["params", "key"], kind="stable").reset_index(drop=True)


def best_under(front: pd.DataFrame, max_params: int) -> pd.Series | None:
    """The best front member with at most ``max_params`` parameters; None when none fits."""
    fits = front[front["params"] <= max_params]
    return None if fits.empty else fits.sort_values("params", kind="stable").iloc[-1]
