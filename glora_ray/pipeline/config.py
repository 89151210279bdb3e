"""The pipeline's configuration: presets, per-dataset resolution, and the stored run identity."""
from __future__ import annotations

from ..errors import GLoRARayError

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from ..backbone import BackboneConfig
from ..data import VTAB_DATASETS, canonical_dataset_name
from ..data.custom import resolve_dataset_name
from ..data.vtab import is_registered
from ..space import SearchSpace
from ..search import SearchConfig
from ..train import TrainConfig
from .paper import DEFAULT_LR, PAPER_LR

ALL_DATASETS = "all"  # the CLI word for the 19 VTAB-1k datasets


class PipelineConfigError(GLoRARayError):
    """A pipeline option that cannot work; the message names the option and what would be valid."""


def default_home() -> str:
    """Where the embedded default keeps data and results: outside any Ray working_dir upload."""
    return os.path.expanduser(os.environ.get("GLORA_RAY_HOME", "~/glora-ray"))


@dataclass
class PipelineConfig:
    """One job: for each dataset train a supernet, search it, test, merge and export the winner."""

    datasets: tuple[str, ...]
    data_root: str
    out: str
    backbone: BackboneConfig
    train: TrainConfig
    search: SearchConfig
    ranks: tuple[int, ...] = (8, 4)
    targets: list[str] | None = None
    lr: float | None = None  # None: the paper's Table 4 value for each dataset
    lr_sweep: tuple[float, ...] = ()  # non-empty: Ray Tune picks the supernet lr among these
    lr_sweep_subnets: int = 8  # random in-budget subnets that score a trial on val200
    test_pareto: bool = False  # also test every subnet of the Pareto front
    resume: bool = True  # False: refuse an output that already holds results
    max_concurrent_datasets: int | None = None  # None: as many as the cluster's CPUs allow
    write_embedded_data: bool = True  # write the bundled digits dataset when it is missing
    num_classes: int | None = None  # datasets outside the registry: None counts them from the labels

    def __post_init__(self) -> None:
        self.datasets = tuple(self.resolve_dataset(d) for d in self.datasets)
        if self.num_classes is not None and self.num_classes < 1:
            raise PipelineConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        self.ranks = SearchSpace(self.ranks).ranks  # validates: distinct positive integers
        self.lr_sweep = tuple(float(x) for x in self.lr_sweep)
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
        self.train.validate()

    def resolve_dataset(self, name: str) -> str:
        """A registry name in its canonical spelling, or an own dataset's folder under data_root."""
        return resolve_dataset_name(name, self.data_root)

    def lr_for(self, dataset: str) -> float:
        if self.lr is not None:
            return self.lr
        return PAPER_LR.get(dataset, DEFAULT_LR)

    def train_for(self, dataset: str, lr: float | None = None) -> TrainConfig:
        return replace(self.train, lr=self.lr_for(dataset) if lr is None else lr)

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
        """What makes two runs the same run: everything but resources and resume settings."""
        data = self.to_dict()
        for key in ("resume", "max_concurrent_datasets", "write_embedded_data", "test_pareto"):
            data.pop(key)
        for key in ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures",
                    "inject_failure_at_step", "keep_checkpoints"):
            data["train"].pop(key, None)
        data["search"] = self.search.result_identity()
        data["search"]["generations"] = self.search.generations
        return data


def _embedded_backbone() -> BackboneConfig:
    # A 4-block ViT-Tiny with random frozen weights (nothing to download): 8x8 digits scaled to
    # 32 px in four 16 px patches, average-pooled (a random CLS token learns far slower).
    return BackboneConfig(
        name="vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.1,
        model_kwargs={"patch_size": 16, "depth": 4, "global_pool": "avg"},
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Runs offline in a few minutes on 2 CPU cores: the bundled digits and a small ViT.
    "default": {
        "datasets": ("digits",),
        "data_root": os.path.join(default_home(), "data"),
        "out": os.path.join(default_home(), "results", "default"),
        "backbone": _embedded_backbone(),
        "ranks": (4, 2),
        "lr": 2e-3,
        "train": TrainConfig(epochs=10, batch_size=64, lr=2e-3, warmup_epochs=1, checkpoint_every=5,
                             num_workers=1, cpus_per_worker=2),
        "search": SearchConfig(population=16, parents=4, mutants=6, crossovers=6, generations=5,
                               max_params="20k", eval_batch_size=100),
    },
    # The paper's protocol (SPEC §2, §3, §5): ViT-B/16 in21k, 500 epochs, population 50, 20 generations.
    "paper": {
        "datasets": tuple(VTAB_DATASETS),
        "data_root": os.path.join(default_home(), "data", "vtab-1k"),
        "out": os.path.join(default_home(), "results", "paper"),
        "backbone": BackboneConfig(name="vit_base_patch16_224.orig_in21k", pretrained=True, img_size=224),
        "ranks": (8, 4),
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
        "train": replace(values["train"]),
        "search": replace(values["search"]),
    }


def expand_datasets(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Dataset names as given on the command line; 'all' stands for the 19 VTAB-1k datasets."""
    out: list[str] = []
    for name in names:
        for item in (tuple(VTAB_DATASETS) if name == ALL_DATASETS else (name,)):
            canonical = canonical_dataset_name(item) if is_registered(item) else item  # own: checked later
            if canonical not in out:
                out.append(canonical)
    return tuple(out)


@dataclass
class DatasetOutcome:
    """One dataset's row of the summary."""

    dataset: str
    group: str | None
    lr: float
    params: int
    head_params: int
    val_acc: float
    test_acc: float
    wall_seconds: float
    subnet: str
    extra: dict[str, Any] = field(default_factory=dict)
