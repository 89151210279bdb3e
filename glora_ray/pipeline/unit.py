"""One training unit: the data, lists and output path of one supernet trained, searched and tested.

VTAB-1k builds one unit per dataset (docs/method.md §4), few-shot one per (dataset, shots, seed)
and domain generalization one per training seed (docs/method.md §8); ``run.run_unit`` runs any of
them through stages 1-3.
"""
from __future__ import annotations

import os
from pathlib import PurePosixPath
from dataclasses import dataclass, field, replace
from typing import Any

from ..checkpoint import SupernetSpec
from ..data import DataConfig, dataset_info
from ..data.custom import CUSTOM_GROUP, own_dataset_classes
from ..data.vtab import check_plain_name, is_registered
from ..train import TrainConfig
from .config import PipelineConfig, PipelineConfigError

VTAB_SEARCH_SPLIT, VTAB_TEST_SPLIT = "val200", "test"


@dataclass(frozen=True)
class TestList:
    """One list the winner is tested on, once."""

    name: str  # the result's name: "test", or a target set such as "imagenet-sketch"
    split: str  # the split of the unit's DataConfig
    # Classes the prediction is restricted to (ImageNet-A/-R cover 200 of 1000); None: all.
    classes: tuple[int, ...] | None = None


@dataclass
class TrainingUnit:
    name: str  # shown in progress lines and stored with the search results
    path: str  # output sub-path under --out
    data: DataConfig
    train_split: str
    search_split: str
    tests: tuple[TestList, ...]
    group: str | None  # the summary's group (VTAB group, "custom", or None)
    lr: float
    batch_size: int | None = None  # None: the configured batch; set when the training list is smaller
    extra: dict[str, Any] = field(default_factory=dict)  # columns of the unit's row, e.g. shots and seed
    label: str | None = None  # the progress lines' prefix; None: the name

    def __post_init__(self) -> None:
        for part in PurePosixPath(self.path).parts:  # every folder of the unit stays inside --out
            check_plain_name(part, f"unit {self.name!r}: output path component")
        if not self.tests:
            raise PipelineConfigError(f"unit {self.name!r}: name at least one test list")
        names = [t.name for t in self.tests]
        if len(set(names)) != len(names):
            raise PipelineConfigError(f"unit {self.name!r}: test list names repeat: {names}")

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split the unit reads, training first."""
        return tuple(dict.fromkeys((self.train_split, self.search_split, *(t.split for t in self.tests))))

    def train_config(self, train: TrainConfig, lr: float | None = None,
                     window: tuple[int, int] | None = None) -> TrainConfig:
        """``train`` for this unit: its list, lr and batch; ``window`` (the search's resolved budget)
        is recorded where the supernet's subnets are drawn within it (``TrainConfig.needs_budget``)."""
        changes: dict[str, Any] = {"split": self.train_split, "lr": self.lr if lr is None else lr}
        if self.batch_size is not None:
            changes["batch_size"] = self.batch_size
        if window is not None and train.needs_budget:
            changes["budget"] = (int(window[0]), int(window[1]))
        return replace(train, **changes)


def vtab_data(cfg: PipelineConfig, dataset: str) -> DataConfig:
    """``<data root>/<dataset>`` in the VTAB-1k layout; an own dataset's classes counted from its labels."""
    data = DataConfig(root=os.path.abspath(cfg.data_root), dataset=dataset, img_size=cfg.backbone.img_size,
                      **cfg.preprocessing_values())
    if is_registered(dataset):
        return data
    return replace(data, class_count=own_dataset_classes(data.root, dataset, cfg.train.split, cfg.num_classes))


def vtab_unit(cfg: PipelineConfig, dataset: str) -> TrainingUnit:
    """A VTAB-1k dataset (or an own one in its layout): train800 / val200 / test."""
    data = vtab_data(cfg, dataset)
    group = dataset_info(dataset).group if is_registered(dataset) else CUSTOM_GROUP
    return TrainingUnit(name=dataset, path=dataset, data=data, train_split=cfg.train.split,
                        search_split=VTAB_SEARCH_SPLIT, tests=(TestList(VTAB_TEST_SPLIT, VTAB_TEST_SPLIT),),
                        group=group, lr=cfg.lr_for(dataset))


def fitted_batch(train: TrainConfig, samples: int) -> int | None:
    """A batch no larger than the training list (rounded down to the workers), or None if it fits.

    A K-shot list can hold fewer samples than a batch; with drop_last it would give no step.
    """
    if samples >= train.batch_size:
        return None
    fitted = samples - samples % train.world_size
    if fitted < train.world_size:
        return None  # not even one sample per worker: training's own check names the list
    return fitted


def spec_for(cfg: PipelineConfig, dataset: str | DataConfig) -> SupernetSpec:
    """The supernet a job builds for ``dataset`` (its classes, the job's space and adapter seed)."""
    data = vtab_data(cfg, dataset) if isinstance(dataset, str) else dataset
    return SupernetSpec(backbone=cfg.backbone, num_classes=data.num_classes, ranks=cfg.ranks, forms=cfg.forms,
                        targets=cfg.targets, layer_types=cfg.layer_types, dataset=data.name,
                        adapter_seed=cfg.train.seed)
