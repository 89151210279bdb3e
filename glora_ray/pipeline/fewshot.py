"""Few-shot learning (docs/method.md §8, the paper's §3.2 and Figure 2) as a Ray job.

Per (dataset, shots, seed): train the supernet on ``train_meta.list.num_shot_<K>.seed_<S>``,
search on ``val_meta.list``, test the winner once on ``test_meta.list``.  Output: ``fewshot.parquet``
(one row per unit) and ``figure2.png`` (test accuracy against shots, mean over seeds with a
band of one standard deviation, one panel per dataset plus their average).
"""
from __future__ import annotations

import logging

import argparse
import io
import os
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

import pandas as pd

from .. import storage
from ..data import DataConfig
from ..data.embedded import DIGITS, write_digits_fewshot
from ..data.fewshot import (
    FEWSHOT_DATASETS,
    SEEDS,
    SHOTS,
    TEST_LIST,
    VAL_LIST,
    fewshot_classes,
    fewshot_folder,
    require_list,
    resolve_fewshot_name,
    shot_list_name,
)
from ..options import option
from . import layout
from .baselines import BaselineOutcome, stored_outcomes
from .cli import build_parser, config_from_args, parse_with
from .config import ALL_DATASETS, PipelineConfig, PipelineConfigError, default_home, preset
from .protocol import fit_batches, start, text_table
from .row_kinds import WINNER
from .run import run_units
from .summary import SUMMARY_COLUMNS
from .unit import TestList, TrainingUnit

log = logging.getLogger(__name__)

RESULTS_FILE, FIGURE_FILE = layout.FEWSHOT_RESULTS_FILE, layout.FEWSHOT_FIGURE_FILE
TRAIN_SPLIT, SEARCH_SPLIT, TEST_SPLIT = "train", "val", "test"
FEWSHOT = "few-shot"  # the help group of the options below
# The seed is the K-shot list's (the training seed is the run's --seed); no VTAB group.
COLUMNS = ["method", "dataset", "shots", "seed", *(c for c in SUMMARY_COLUMNS if c not in ("dataset", "group", "seed"))]


def _distinct_positive(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or len(set(values)) != len(values) or min(values) < minimum:
        raise PipelineConfigError(f"{name}: give distinct integers >= {minimum}, got {list(values)}")
    return values


@dataclass
class FewShotConfig(PipelineConfig):
    """The VTAB job's settings, plus the shots and seeds of the few-shot lists to run.

    ``seeds`` here names the K-shot lists' seeds (NOAH's ``seed_<S>``), each (shots, seed) one unit
    of this run; it replaces VTAB's repeat-per-seed ``seeds``, and the training seed stays ``--seed``.
    """

    all_datasets: ClassVar[tuple[str, ...]] = tuple(FEWSHOT_DATASETS)
    shots: tuple[int, ...] = field(default=SHOTS, metadata=option(
        FEWSHOT, "shots per class to run", argparse={"type": int, "nargs": "+"}))
    seeds: tuple[int, ...] = field(default=SEEDS, metadata=option(
        FEWSHOT, "seeds of the K-shot lists to run", argparse={"type": int, "nargs": "+"}))

    def __post_init__(self) -> None:
        self.shots = _distinct_positive("shots", self.shots, 1)
        self.seeds = _distinct_positive("seeds", self.seeds, 0)
        super().__post_init__()

    def resolve_dataset(self, name: str) -> str:
        return name if name == DIGITS else resolve_fewshot_name(name, self.data_root)


def fewshot_preset(name: str) -> dict[str, Any]:
    """The VTAB preset of that name with the few-shot datasets, data and output."""
    values = preset(name)
    if values["datasets"] == (DIGITS,):  # an embedded preset ('default', 'tiny')
        # The embedded digits in NOAH's layout; a 1-shot list holds 10 images: batch 10.  Sized for a
        # few minutes in all on 2 cores, two of the 15 units at a time: 10 epochs (a K-shot list is
        # fitted by then) trained in the unit's own process (Ray Train's local mode: a worker group
        # took longer to start than a unit takes to train), one evaluator actor per unit and a
        # search of 16 candidates.
        values.update(out=os.path.join(default_home(), "results", f"fewshot-{name}"),
                      train=replace(values["train"], batch_size=10, epochs=10, warmup_epochs=1, checkpoint_every=5,
                                    num_workers=0, cpus_per_worker=1),
                      search=replace(values["search"], population=8, parents=2, mutants=3, crossovers=3,
                                     generations=2, num_actors=1))
    else:
        values.update(datasets=tuple(FEWSHOT_DATASETS), data_root=os.path.join(default_home(), "data"),
                      out=os.path.join(default_home(), "results", f"fewshot-{name}"))
    return values


def fewshot_units(cfg: FewShotConfig) -> list[TrainingUnit]:
    """One unit per (dataset, shots, seed); every list it names must exist."""
    root = os.path.abspath(cfg.data_root)
    units = []
    for dataset in cfg.datasets:
        folder = fewshot_folder(root, dataset).require(f"few-shot dataset {dataset!r}")
        classes = fewshot_classes(root, dataset, cfg.shots, cfg.seeds, cfg.num_classes)
        val = require_list(folder.list_file(VAL_LIST), f"{dataset}: the list to search on")
        test = require_list(folder.list_file(TEST_LIST), f"{dataset}: the test list")
        for shots in cfg.shots:
            for seed in cfg.seeds:
                train = require_list(folder.list_file(shot_list_name(shots, seed)),
                                     f"{dataset}: {shots}-shot seed {seed} (--shots, --seeds)")
                data = DataConfig(root=root, dataset=dataset, img_size=cfg.backbone.img_size, class_count=classes,
                                  lists={TRAIN_SPLIT: train, SEARCH_SPLIT: val, TEST_SPLIT: test},
                                  **cfg.preprocessing_values())
                units.append(TrainingUnit(
                    name=f"{dataset} {shots}-shot seed {seed}", path=f"{dataset}/shots-{shots}/seed-{seed}", data=data,
                    train_split=TRAIN_SPLIT, search_split=SEARCH_SPLIT, tests=(TestList(TEST_SPLIT, TEST_SPLIT),),
                    group=None, lr=cfg.lr_for(dataset), extra={"shots": shots, "seed": seed},
                ))
    return fit_batches(cfg, units)


def results_frame(rows: Sequence[dict[str, Any]], baselines: Sequence[tuple[dict[str, Any], BaselineOutcome]] = ()
                  ) -> pd.DataFrame:
    """One row per unit and method: GLoRA's winner (``rows``), then each baseline that ran, given
    with its unit's row."""
    flat = [{"method": WINNER, **row, **row.get("extra", {})} for row in rows]
    flat += [{"method": outcome.name, "dataset": row["dataset"], **row.get("extra", {}), "lr": outcome.lr,
              "params": outcome.params, "head_params": outcome.head_params, "val_acc": outcome.val_acc,
              "test_acc": outcome.test_acc, "key": outcome.key} for row, outcome in baselines]
    frame = pd.DataFrame(flat, columns=COLUMNS)
    return frame.astype({"shots": "int64", "seed": "int64", "params": "int64", "head_params": "int64"})


def curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per (panel, method, shots): mean and standard deviation over seeds; panel
    "average" first.  The average panel averages the datasets per (method, shots, seed) first,
    then over seeds.  A frame without a method column is GLoRA's alone."""
    frame = frame if "method" in frame else frame.assign(method=WINNER)
    average = frame.groupby(["method", "shots", "seed"], as_index=False)["test_acc"].mean().assign(dataset="average")
    both = pd.concat([average, frame[["method", "dataset", "shots", "seed", "test_acc"]]], ignore_index=True)
    stats = both.groupby(["dataset", "method", "shots"], sort=False)["test_acc"].agg(["mean", "std", "count"])
    return stats.reset_index().fillna({"std": 0.0})


def figure_png(frame: pd.DataFrame) -> bytes:
    """The paper's Figure 2 as PNG bytes (matplotlib's Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = curves(frame)
    panels = list(dict.fromkeys(stats["dataset"]))
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method, curve in stats[stats["dataset"] == panel].groupby("method", sort=False):
            curve = curve.sort_values("shots")
            mean, std = 100 * curve["mean"], 100 * curve["std"]
            axes.plot(curve["shots"], mean, marker="o", label="GLoRA (searched)" if method == WINNER else method)
            axes.fill_between(curve["shots"], mean - std, mean + std, alpha=0.2)
        axes.set_xscale("log", base=2)
        shots = sorted(stats.loc[stats["dataset"] == panel, "shots"].unique())
        axes.set_xticks(shots, [str(k) for k in shots])
        if index == 0:
            axes.legend(fontsize=8)
        axes.set_title(panel)
        axes.set_xlabel("shots per class")
        axes.set_ylabel("top-1 test accuracy (%)")
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def run_fewshot(cfg: FewShotConfig) -> pd.DataFrame:
    """Check every list first, then run every (dataset, shots, seed) unit, concurrently where there is room."""
    if DIGITS in cfg.datasets and cfg.write_embedded_data:
        write_digits_fewshot(cfg.data_root)
    units = fewshot_units(cfg)
    start(cfg, units)
    rows = run_units(cfg, units)
    baselines = [(row, outcome) for unit, row in zip(units, rows)
                 for outcome in stored_outcomes(layout.dataset_uri(cfg.out, unit.path), cfg.baselines)]
    frame = results_frame(rows, baselines)
    storage.write_parquet(storage.join(cfg.out, RESULTS_FILE), frame)
    storage.write_bytes(storage.join(cfg.out, FIGURE_FILE), figure_png(frame))
    stats = curves(frame).rename(columns={"mean": "test_acc", "std": "std_over_seeds", "count": "seeds"})
    log.info("\n" + text_table(stats, ["dataset", "method", "shots", "test_acc", "std_over_seeds", "seeds"],
                                ["test_acc", "std_over_seeds"]))
    log.info(f"results: {storage.join(cfg.out, RESULTS_FILE)}, figure: {storage.join(cfg.out, FIGURE_FILE)}; "
             f"per unit: <dataset>/shots-<K>/seed-<S>/export/")
    return frame


# -- command line -------------------------------------------------------------------------------
def build_fewshot_parser(preset_name: str = "default") -> argparse.ArgumentParser:
    return build_parser(
        FewShotConfig, preset_name, prog="pipelines/fewshot.py", presets=fewshot_preset,
        description=("GLoRA few-shot learning (the paper's Figure 2): per dataset, shots and seed train a supernet "
                     "on the K-shot list, search on val_meta.list, test the winner once on test_meta.list. With "
                     "no arguments: the embedded default (the bundled digits in NOAH's layout, local Ray, offline)."),
        help_overrides={"datasets": f"few-shot datasets ({', '.join(FEWSHOT_DATASETS)}), '{ALL_DATASETS}' for those "
                                    f"five, or the folder name of an own dataset under <data root>/few-shot",
                        "data_root": "folder holding few-shot/<dataset>/{images,annotations}/ (NOAH's layout)"},
    )


def parse_fewshot_config(argv: Sequence[str] | None = None) -> FewShotConfig:
    return parse_with(build_fewshot_parser, lambda args: config_from_args(args, FewShotConfig, fewshot_preset), argv)
