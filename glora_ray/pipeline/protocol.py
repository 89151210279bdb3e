"""What the few-shot and domain-generalization jobs share: checks before compute, the run record, tables.

Both build their training units (``unit.TrainingUnit``) first, from lists that must all exist, and
check them here before any training starts (docs/method.md §8); ``run.run_units`` then runs them
concurrently as the cluster allows, each resumable.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..backbone import BackboneError
from ..budget import Budget
from ..data.verify import check_images, sample_refs
from ..data.vtab import DataError
from ..train.loop import steps_per_epoch
from .config import PipelineConfig, PipelineConfigError
from .preflight import _check_backbone_weights, _check_model, _check_output, budget_warning
from .run import spec_for, start_run
from .unit import TrainingUnit, fitted_batch

log = logging.getLogger(__name__)


def check_units(cfg: PipelineConfig, units: Sequence[TrainingUnit]) -> dict[str, tuple[int, int]]:
    """Every check that needs no training and no Ray, in order of cost; returns each unit's parameter budget.

    Each distinct list file is read once: every line parsed, every label in range, every image present;
    last, every image they name is opened once.
    """
    _check_output(cfg)
    try:
        cfg.backbone.validate()
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    _check_model(cfg)
    checked: dict[Path, int] = {}
    for unit in units:
        for split in unit.splits:
            path = unit.data.list_path(split)
            if path not in checked:
                checked[path] = unit.data.validate((split,))[split]
        train, train_list = unit.train_config(cfg.train), unit.data.list_path(unit.train_split)
        if steps_per_epoch(checked[train_list], train, train.world_size) < 1:
            raise DataError(f"{train_list}: {checked[train_list]} image(s) give no full batch over "
                            f"{train.world_size} training worker(s); use fewer --train-workers")
    budgets: dict[str, tuple[int, int]] = {}
    by_classes: dict[int, tuple[int, int]] = {}
    for unit in units:
        classes = unit.data.num_classes
        if classes not in by_classes:
            supernet = spec_for(cfg, unit.data).build_empty()
            by_classes[classes] = Budget(cfg.search.min_params, cfg.search.max_params).resolve(supernet.counter)
            warning = budget_warning(supernet.counter, supernet.layer_names, by_classes[classes][1])
            if warning is not None:
                log.warning("%s: %s", unit.name, warning)
        budgets[unit.name] = by_classes[classes]
    try:
        _check_backbone_weights(cfg)
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    # Last: the costliest check, every image the units' lists name, opened once.
    lists = {unit.data.list_path(split): (unit, split) for unit in units for split in unit.splits}
    refs = [ref for unit, split in lists.values() for ref in sample_refs(unit.data.samples(split))]
    log.info("preflight: %d image(s) of %d unit(s) open", check_images(refs), len(units))
    return budgets


def start(cfg: PipelineConfig, units: Sequence[TrainingUnit]) -> None:
    """Check the units, join or start Ray and check its resources, then record the run: a recorded
    run passed every check."""
    start_run(cfg, check_units(cfg, units))


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
