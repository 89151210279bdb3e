"""GLoRA against fixed adapters at equal budget: one table and one plot per dataset.

Rows (``COMPARISON_COLUMNS``): the searched winner (kind ``glora``), every Pareto-front subnet
tested on test (kind ``pareto``, with ``--test-pareto``) and every baseline (kind ``baseline``),
each with the weights it was scored with (``weights``: the supernet's, the winner retrained, or
a baseline trained alone: front members keep the supernet's, so they are not a retrained
winner's peers), its adapter parameters (the search's counter, docs/method.md §1), val200 and test
accuracy, seed and training compute: ``train_images`` (images through a forward and backward
pass: epochs x images x subnets per step, the supernet's and any retraining's together) and
``train_seconds`` (their wall time), so that GLoRA is judged at equal compute as well as at equal
epochs.  Over several seeds, ``aggregate`` gives mean and std per configuration
(the winner and each baseline; front members differ from seed to seed and are not averaged).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import pandas as pd

from .. import storage
from .baselines import BaselineOutcome
from .plots import comparison_png
from .row_kinds import ALONE_WEIGHTS, BASELINE, PARETO, SUPERNET_WEIGHTS, WINNER

COMPARISON_FILE = "comparison.parquet"
COMPARISON_MEAN_FILE = "comparison_mean.parquet"
COMPARISON_PLOT = "comparison.png"

COMPARISON_COLUMNS = ["dataset", "seed", "name", "kind", "weights", "params", "val_acc", "test_acc", "key",
                      "train_images", "train_seconds"]
MEAN_COLUMNS = ["dataset", "name", "kind", "seeds", "params", "val_acc", "val_acc_std", "test_acc", "test_acc_std",
                "train_images", "train_seconds"]
COMPUTE_FIELDS = ("train_images", "train_seconds")


def comparison_rows(dataset: str, seed: int, winner: Mapping, front: pd.DataFrame | None,
                    baselines: Iterable[BaselineOutcome]) -> pd.DataFrame:
    """The table of one dataset and seed.  ``winner``: key, params, val_acc, test_acc, weights;
    ``front``: the tested front (key, params, val_acc, test_acc, on the supernet's weights), None
    when it was not tested."""
    rows = [{"name": WINNER, "kind": WINNER, "weights": winner.get("weights", SUPERNET_WEIGHTS),
             **{k: winner.get(k, math.nan) for k in ("key", "params", "val_acc", "test_acc", *COMPUTE_FIELDS)}}]
    if front is not None:
        for i, member in enumerate(front.sort_values("params", kind="stable").itertuples(index=False)):
            rows.append({"name": f"{PARETO}-{i}", "kind": PARETO, "weights": SUPERNET_WEIGHTS, "key": member.key,
                         "params": member.params, "val_acc": member.val_acc, "test_acc": member.test_acc})
    for outcome in baselines:
        rows.append({"name": outcome.name, "kind": BASELINE, "weights": ALONE_WEIGHTS, "key": outcome.key,
                     "params": outcome.params,
                     "val_acc": outcome.val_acc, "test_acc": outcome.test_acc,
                     "train_images": outcome.train_images, "train_seconds": outcome.train_seconds})
    frame = pd.DataFrame(rows).assign(dataset=dataset, seed=seed)
    return normalise(frame)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes of the stored table."""
    # reindex: tables stored before the compute columns existed read back with them empty (NaN)
    return frame.reindex(columns=COMPARISON_COLUMNS).astype(
        {"seed": "int64", "params": "int64", "val_acc": "float64", "test_acc": "float64", "train_images": "float64",
         "train_seconds": "float64"}).reset_index(drop=True)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds of the winner and each baseline (std NaN for one seed)."""
    kept = frame[frame["kind"] != PARETO]
    grouped = kept.groupby(["dataset", "name", "kind"], sort=False)
    out = grouped.agg(seeds=("seed", "nunique"), params=("params", "mean"), val_acc=("val_acc", "mean"),
                      val_acc_std=("val_acc", "std"), test_acc=("test_acc", "mean"),
                      test_acc_std=("test_acc", "std"), train_images=("train_images", "mean"),
                      train_seconds=("train_seconds", "mean")).reset_index()
    return out[MEAN_COLUMNS]


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 100:.2f}"


def format_comparison(frame: pd.DataFrame) -> str:
    """Fixed-width text: one line per row, then (for several seeds) mean ± std per configuration."""
    header = f"{'dataset':<16}{'seed':>5}  {'name':<12}{'params':>11}{'val acc':>9}{'test acc':>10}  weights"
    lines = [header, "-" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append(f"{row.dataset:<16}{row.seed:>5}  {row.name:<12}{row.params:>11,}{_pct(row.val_acc):>9}"
                     f"{_pct(row.test_acc):>10}  {row.weights if isinstance(row.weights, str) else '-'}")
    if frame["seed"].nunique() > 1:
        means = aggregate(frame)
        lines += ["", f"{'dataset':<16}{'seeds':>5}  {'name':<12}{'params':>11}{'val acc':>16}{'test acc':>16}",
                  "-" * len(header) + "-" * 14]
        for row in means.itertuples(index=False):
            lines.append(f"{row.dataset:<16}{row.seeds:>5}  {row.name:<12}{round(row.params):>11,}"
                         f"{_pct(row.val_acc) + ' ± ' + _pct(row.val_acc_std):>16}"
                         f"{_pct(row.test_acc) + ' ± ' + _pct(row.test_acc_std):>16}")
    return "\n".join(lines)


def write_comparison(dataset_uri: str, frame: pd.DataFrame) -> None:
    """``comparison.parquet`` (every row), ``comparison.png`` and, over several seeds,
    ``comparison_mean.parquet``, under ``dataset_uri``."""
    storage.write_parquet(storage.join(dataset_uri, COMPARISON_FILE), frame)
    if frame["seed"].nunique() > 1:
        storage.write_parquet(storage.join(dataset_uri, COMPARISON_MEAN_FILE), aggregate(frame))
    storage.write_bytes(storage.join(dataset_uri, COMPARISON_PLOT), comparison_png(frame))


def read_comparison(dataset_uri: str) -> pd.DataFrame:
    return storage.read_parquet(storage.join(dataset_uri, COMPARISON_FILE))


def read_comparisons(uris: Sequence[str]) -> pd.DataFrame:
    """The tables under ``uris`` (dataset folders) as one, in the given order."""
    return normalise(pd.concat([read_comparison(uri) for uri in uris], ignore_index=True))
