"""What the few-shot and domain-generalization jobs share: checks before compute, the run record, tables.

Both build their training units (``unit.TrainingUnit``) first, from lists that must all exist, and
check them with ``preflight.check_units`` (the VTAB job's check too) before any training starts
(docs/method.md §8); ``run.run_units`` then runs them concurrently as the cluster allows, each resumable.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

import pandas as pd

from .config import PipelineConfig
from .preflight import check_units  # the one check of a run's units, the VTAB job's too
from .run import start_run
from .unit import TrainingUnit, fitted_batch

log = logging.getLogger(__name__)


def start(cfg: PipelineConfig, units: Sequence[TrainingUnit]) -> None:
    """Check the units, join or start Ray and check its resources, then record the run: a recorded
    run passed every check."""
    start_run(cfg, check_units(cfg, units), units)


def fit_batches(cfg: PipelineConfig, units: list[TrainingUnit]) -> list[TrainingUnit]:
    """Units whose training list is smaller than the batch train on one batch of all of it."""
    fitted = []
    for unit in units:
        samples = len(unit.data.samples(unit.train_split, check_exists=False))
        batch = fitted_batch(cfg.train, samples)
        if batch is not None:
            log.info("%s: %d training images, fewer than the batch of %d: batch %d", unit.name, samples,
                     cfg.train.batch_size, batch)
            unit = replace(unit, batch_size=batch)
        fitted.append(unit)
    return fitted


def percent(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * value:.2f}"


def text_table(frame: pd.DataFrame, columns: Sequence[str], percent_columns: Sequence[str]) -> str:
    """A fixed-width table of ``columns``; accuracies in percent."""
    shown = frame[list(columns)].copy()
    for column in percent_columns:
        shown[column] = shown[column].map(percent)
    return shown.to_string(index=False)
