"""Domain generalization (docs/method.md §8, the paper's §3.3 and Table 2) as a Ray job.

Per training seed: train the supernet on ImageNet 16-shot, search on a held-out ImageNet list,
test the winner once on ImageNet's validation list (the source) and on each target set's
``val_meta.list``, whose labels are in ImageNet's class index.  ImageNet-A and -R hold 200 of the
classes: their predictions are restricted to the classes present in their list (the standard
protocol), and ``classes.json`` records which.  Output: ``table2.parquet`` (one row per seed),
printed with the mean over seeds.
"""
from __future__ import annotations

import logging

import argparse
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import pandas as pd

from .. import storage
from ..data import DataConfig, DataError
from ..identity import EXECUTION_ONLY
from ..data.embedded import DIGITS, write_digits_domain
from ..data.fewshot import (
    DEFAULT_SEARCH_LIST,
    DOMAIN_SHOTS,
    DOMAIN_TARGETS,
    IMAGENET,
    IMAGENET_CLASSES,
    IMAGENET_TEST_LIST,
    SUBSET_TARGETS,
    VAL_LIST,
    classes_present,
    domain_folder,
    fewshot_folder,
    require_list,
    shot_list_name,
)
from ..options import option
from . import layout
from .baselines import BaselineOutcome, stored_outcomes
from .cli import build_parser, config_from_args, parse_with
from .config import PipelineConfig, PipelineConfigError, default_home, preset
from .protocol import fit_batches, start, text_table
from .row_kinds import WINNER
from .run import run_units
from .unit import TestList, TrainingUnit

log = logging.getLogger(__name__)

TABLE_FILE = layout.DOMAIN_TABLE_FILE
DOMAIN = "domain generalization"  # the help group of DomainConfig's own options
CLASSES_FILE = "classes.json"
TRAIN_SPLIT, SEARCH_SPLIT = "train", "search"
DEFAULT_SEEDS: tuple[int, ...] = (0,)


def test_list_split(test_set: str) -> str:
    return f"test:{test_set}"


@dataclass
class DomainConfig(PipelineConfig):
    """The VTAB job's settings for ImageNet 16-shot, plus the seeds, the search list and the target sets.

    ``seeds`` here names the 16-shot lists' seeds, one unit each; it replaces VTAB's repeat-per-seed
    ``seeds``, and the training seed stays ``--seed``.
    """

    seeds: tuple[int, ...] = field(default=DEFAULT_SEEDS, metadata=option(
        DOMAIN, f"seeds of the {DOMAIN_SHOTS}-shot training lists, one run each", argparse={"type": int, "nargs": "+"}))
    search_list: str = field(default=DEFAULT_SEARCH_LIST, metadata=option(
        DOMAIN, f"held-out list under few-shot/{IMAGENET}/annotations to search on"))
    target_sets: tuple[str, ...] = field(default=DOMAIN_TARGETS, metadata=option(
        DOMAIN, "target sets to test on", argparse={"nargs": "+", "choices": DOMAIN_TARGETS}))
    # Write the digits stand-in under data_root first
    write_embedded_domain: bool = field(default=False, metadata=EXECUTION_ONLY)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.target_sets = tuple(self.target_sets)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise PipelineConfigError(f"seeds: give distinct integers >= 0, got {list(self.seeds)}")
        unknown = sorted(set(self.target_sets) - set(DOMAIN_TARGETS))
        if unknown or len(set(self.target_sets)) != len(self.target_sets):
            raise PipelineConfigError(f"target_sets: {list(self.target_sets)}; choose distinct names among "
                                      f"{list(DOMAIN_TARGETS)}")
        if not self.search_list or os.path.basename(self.search_list) != self.search_list:
            raise PipelineConfigError(f"search_list: a file name under few-shot/{IMAGENET}/annotations, "
                                      f"got {self.search_list!r}")
        super().__post_init__()

    def resolve_dataset(self, name: str) -> str:
        if name != IMAGENET:
            raise PipelineConfigError(f"domain generalization trains on {IMAGENET!r}, got {name!r}")
        return name

    @property
    def class_count(self) -> int:
        return IMAGENET_CLASSES if self.num_classes is None else self.num_classes


def domain_preset(name: str) -> dict[str, Any]:
    """The VTAB preset of that name for ImageNet 16-shot and the four target sets."""
    values = preset(name)
    embedded = values["datasets"] == (DIGITS,)  # an embedded preset ('default', 'tiny')
    values["datasets"] = (IMAGENET,)
    if embedded:
        # A 10-class stand-in made of the bundled digits (see glora_ray.data.embedded).
        values.update(data_root=os.path.join(default_home(), "data", "digits-domain"), num_classes=10,
                      out=os.path.join(default_home(), "results", f"domain-{name}"), write_embedded_domain=True,
                      train=replace(values["train"], batch_size=32, epochs=20, warmup_epochs=2, checkpoint_every=10))
    else:
        values.update(data_root=os.path.join(default_home(), "data"),
                      out=os.path.join(default_home(), "results", f"domain-{name}"), write_embedded_domain=False)
    return values


def domain_units(cfg: DomainConfig) -> tuple[list[TrainingUnit], dict[str, list[int] | None]]:
    """One unit per seed, and the classes each target set's predictions are restricted to (None: all)."""
    root = os.path.abspath(cfg.data_root)
    source = fewshot_folder(root, IMAGENET).require("ImageNet (the source)")
    lists = {
        SEARCH_SPLIT: require_list(source.list_file(cfg.search_list), "ImageNet's held-out list to search on (--search-list)"),
        test_list_split(IMAGENET): require_list(source.list_file(IMAGENET_TEST_LIST), "ImageNet's validation list"),
    }
    tests = [TestList(IMAGENET, test_list_split(IMAGENET))]
    restricted: dict[str, list[int] | None] = {}
    for target in cfg.target_sets:
        entry = require_list(domain_folder(root, target).require(f"target set {target!r}").list_file(VAL_LIST),
                             f"target set {target!r}")
        lists[test_list_split(target)] = entry
        classes = classes_present(entry, cfg.class_count) if target in SUBSET_TARGETS else None
        if classes is not None and len(classes) < 2:  # restricted to one class, every prediction is right
            raise DataError(f"target set {target!r}: {entry} holds images of class {list(classes)} only; its "
                            f"predictions are restricted to the classes present, so every one would be right: give "
                            f"a list with at least two classes")
        restricted[target] = None if classes is None else list(classes)
        tests.append(TestList(target, test_list_split(target), classes))
    units = []
    for seed in cfg.seeds:
        train = require_list(source.list_file(shot_list_name(DOMAIN_SHOTS, seed)),
                             f"ImageNet {DOMAIN_SHOTS}-shot seed {seed} (--seeds)")
        data = DataConfig(root=root, dataset=IMAGENET, img_size=cfg.backbone.img_size, class_count=cfg.class_count,
                          lists={TRAIN_SPLIT: train, **lists}, **cfg.preprocessing_values())
        units.append(TrainingUnit(
            name=f"{IMAGENET} {DOMAIN_SHOTS}-shot seed {seed}", path=f"{IMAGENET}/seed-{seed}", data=data,
            train_split=TRAIN_SPLIT, search_split=SEARCH_SPLIT, tests=tuple(tests), group=None,
            lr=cfg.lr_for(IMAGENET), extra={"seed": seed},
        ))
    return fit_batches(cfg, units), restricted


def table_frame(rows: Sequence[dict[str, Any]], test_sets: Sequence[str],
                baselines: Sequence[tuple[int, BaselineOutcome]] = ()) -> pd.DataFrame:
    """The paper's Table 2: per method (GLoRA, then each baseline that ran) and seed, the source's
    and each target's test accuracy."""
    records = [{"method": WINNER, "seed": row["extra"]["seed"], "params": row["params"], "val_acc": row["val_acc"],
                **{name: row["extra"]["tests"][name] for name in test_sets}, "key": row["key"]} for row in rows]
    records += [{"method": outcome.name, "seed": seed, "params": outcome.params, "val_acc": outcome.val_acc,
                 **{name: outcome.tests.get(name, float("nan")) for name in test_sets}, "key": outcome.key}
                for seed, outcome in baselines]
    return pd.DataFrame(records, columns=["method", "seed", "params", "val_acc", *test_sets, "key"])


def format_table(frame: pd.DataFrame, test_sets: Sequence[str], restricted: dict[str, list[int] | None]) -> str:
    means = frame.groupby("method", sort=False)[["params", "val_acc", *test_sets]].mean().reset_index().assign(seed="mean")
    shown = pd.concat([frame.astype({"seed": "object"}), means], ignore_index=True)
    table = text_table(shown, ["method", "seed", "val_acc", *test_sets], ["val_acc", *test_sets])
    notes = [f"{name}: predictions restricted to the {len(classes)} classes present"
             for name, classes in restricted.items() if classes is not None]
    return "\n".join([f"source: {IMAGENET} (test once on its validation list); targets: {', '.join(test_sets[1:])}",
                      table, *notes])


def run_domain(cfg: DomainConfig) -> pd.DataFrame:
    """Check every list first, then train, search and test one unit per seed."""
    if cfg.write_embedded_domain:
        write_digits_domain(cfg.data_root)
    units, restricted = domain_units(cfg)
    start(cfg, units)
    storage.write_json(storage.join(cfg.out, CLASSES_FILE), {"restricted_to_classes_present": restricted})
    test_sets = [IMAGENET, *cfg.target_sets]
    rows = run_units(cfg, units)
    baselines = [(unit.extra["seed"], outcome) for unit in units
                 for outcome in stored_outcomes(layout.dataset_uri(cfg.out, unit.path), cfg.baselines)]
    frame = table_frame(rows, test_sets, baselines)
    storage.write_parquet(storage.join(cfg.out, TABLE_FILE), frame)
    log.info("\n" + format_table(frame, test_sets, restricted))
    log.info(f"results: {storage.join(cfg.out, TABLE_FILE)}, restricted classes: {storage.join(cfg.out, CLASSES_FILE)}; "
             f"per seed: {IMAGENET}/seed-<S>/export/")
    return frame


# -- command line -------------------------------------------------------------------------------
def build_domain_parser(preset_name: str = "default") -> argparse.ArgumentParser:
    return build_parser(
        DomainConfig, preset_name, prog="pipelines/domain.py", presets=domain_preset,
        description=("GLoRA domain generalization (the paper's Table 2): train on ImageNet 16-shot, search on a "
                     "held-out ImageNet list, test the winner once on ImageNet's validation list and on ImageNet-V2, "
                     "-Sketch, -A and -R. With no arguments: the embedded default (a 10-class stand-in made of the "
                     "bundled digits and four real shifts of them, local Ray, offline)."),
        help_overrides={"datasets": None,  # always ImageNet
                        "data_root": "folder holding few-shot/imagenet/ and domain-generalization/<target>/ "
                                     "(NOAH's layout)"},
    )


def domain_config_from_args(args: argparse.Namespace) -> DomainConfig:
    config = config_from_args(args, DomainConfig, domain_preset)
    if args.data_root is not None:  # data of the user's own is never overwritten by the stand-in
        config = replace(config, write_embedded_domain=False)
    return config


def parse_domain_config(argv: Sequence[str] | None = None) -> DomainConfig:
    return parse_with(build_domain_parser, domain_config_from_args, argv)
