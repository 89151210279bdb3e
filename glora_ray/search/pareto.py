"""The Pareto front of (validation accuracy up, parameters down) over everything evaluated.

One search then answers every budget below its maximum: the best subnet under a budget B is
the front's member with the most parameters <= B (the front is sorted by params, and accuracy
rises strictly along it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

FRONT_COLUMNS = ("key", "params", "val_acc", "candidate_id", "generation", "origin")


def pareto_mask(params, accuracy, keys) -> np.ndarray:
    """True for the non-dominated points.

    A point is dominated when another has no more params and no less accuracy, and is strictly
    better in one of them.  Of exact ties (same params and accuracy) the smallest key is kept,
    so the front is a function of the evaluated set, never of the order it arrived in.
    """
    params = np.asarray(params, dtype=np.int64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    keys = np.asarray(keys, dtype=object)
    if not (params.shape == accuracy.shape == keys.shape):
        raise ValueError(f"params, accuracy and keys must have one shape, got {params.shape}, {accuracy.shape}, {keys.shape}")
    order = sorted(range(len(params)), key=lambda i: (params[i], -accuracy[i], keys[i]))
    mask = np.zeros(len(params), dtype=bool)
    best = -np.inf
    for i in order:  # params ascending: a point survives only if it beats every smaller one
        if accuracy[i] > best:
            mask[i] = True
            best = accuracy[i]
    return mask


def pareto_front(evaluated: pd.DataFrame, key_column: str = "key") -> pd.DataFrame:
    """The front of a table of evaluations, sorted by params ascending (accuracy ascending too)."""
    if evaluated.empty:
        return evaluated.iloc[0:0].reset_index(drop=True)
    mask = pareto_mask(evaluated["params"].to_numpy(), evaluated["val_acc"].to_numpy(),
                       evaluated[key_column].to_numpy(dtype=object))
    return evaluated[mask].sort_values(["params", key_column], kind="stable").reset_index(drop=True)


def best_under(front: pd.DataFrame, max_params: int) -> pd.Series | None:
    """The best front member with at most ``max_params`` parameters; None when none fits."""
    fits = front[front["params"] <= max_params]
    if fits.empty:
        return None
    return fits.sort_values(["val_acc", "params"], ascending=[False, True], kind="stable").iloc[0]
