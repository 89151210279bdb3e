"""Stage-1 training settings (docs/method.md §2 defaults) and how the job is spread over Ray Train workers."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from ..errors import GLoRARayError, GLoRARayTypeError
from ..identity import EXECUTION_ONLY
from ..options import TRAINING, option
from ..precision import AUTO as AUTO_PRECISION, Precision, parse_precision, resolve_precision
from ..settings import from_known_fields
from ..splits import SPLITS


class SubnetSampling(str, enum.Enum):
    """How a supernet training step draws its subnets (docs/method.md §2.1)."""

    UNIFORM = "uniform"  # every gene uniformly from its forms (the paper)
    BUDGET = "budget"  # uniformly, then repaired into the search's budget window


SAMPLING_CHOICES = [s.value for s in SubnetSampling]


class TrainConfigError(GLoRARayError):
    """A training setting that cannot work, named with the values that would."""


class TrainConfigTypeError(TrainConfigError, GLoRARayTypeError):
    """A training setting of the wrong type."""


@dataclass
class TrainConfig:
    """Supernet training.  ``batch_size`` is the GLOBAL batch: each of the ``num_workers`` workers
    takes ``batch_size // num_workers`` images per step, so the learning rate and schedule hold for
    any number of workers (the results do not: see the fields below).  ``num_workers=0`` runs Ray
    Train's local mode (in this process).
    """

    epochs: int = field(default=500, metadata=option(TRAINING, argparse={"type": int}))
    batch_size: int = field(default=64, metadata=option(TRAINING, "global batch, split over the workers",
                                                        argparse={"type": int}))
    lr: float = 5e-4
    weight_decay: float = field(default=1e-4, metadata=option(TRAINING, argparse={"type": float}))
    warmup_epochs: int = field(default=10, metadata=option(TRAINING, argparse={"type": int}))
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    seed: int = 0
    split: str = "train800"
    # One subnet for every step (its string key, ``Supernet.subnet_key``) instead of a random one
    # per layer and step: trains a fixed adapter such as a LoRA or SSF baseline (docs/method.md §2).
    fixed_subnet: str | None = None
    # -- which subnets a supernet step trains (docs/method.md §2.1); ignored with fixed_subnet ------
    subnet_sampling: str = field(default=SubnetSampling.UNIFORM.value, metadata=option(
        TRAINING, "the subnets a step trains: 'uniform' (every form equally likely: the paper) or 'budget' (drawn "
        "within the search's --min-params/--max-params window, where the search reads)",
        argparse={"choices": SAMPLING_CHOICES}))
    # The search's budget window [min_params, max_params], resolved (the pipeline sets it): where
    # ``subnet_sampling="budget"`` draws and where the sandwich's largest and smallest subnets lie.
    budget: tuple[int, int] | None = None
    # > 0: the sandwich rule: each step trains the largest and the smallest subnet within the budget
    # and this many drawn ones, gradients accumulated (their mean loss).
    sandwich: int = field(default=0, metadata=option(
        TRAINING, "the sandwich rule: each step also trains the largest and the smallest subnet within the budget "
        "besides N drawn ones, gradients accumulated (0: off; costs N + 2 passes per step)",
        argparse={"type": int, "metavar": "N"}))
    # In-place distillation (needs a sandwich): the other subnets of a step learn the largest
    # subnet's soft labels instead of the true ones.
    distill: bool = field(default=False, metadata=option(
        TRAINING, "in-place distillation: a sandwich's subnets learn the largest one's soft labels",
        argparse={"action": "store_true"}, negation=("--no-distill", "true labels for every subnet")))
    # A finished training (a supernet checkpoint folder) whose adapters and head start this one,
    # e.g. the stage-3 retraining of the winner (docs/method.md §3.2).
    init_from: str | None = None
    # -- where it runs: these change results, so changing them is another run ----------------
    # The global batch keeps the optimisation's scale, but not its numbers: each worker draws its
    # own stochastic-depth masks, normalises by its own batch statistics and the gradients are
    # summed in another order, and a GPU computes with other kernels (and ``precision="auto"``
    # resolves to bf16 there).
    num_workers: int = field(default=1, metadata=option(
        TRAINING, "Ray Train workers (data-parallel); 0: train in the job's own process (Ray Train's local mode, "
        "no worker group to start)", flag="--train-workers", argparse={"type": int}))
    use_gpu: bool = False
    # -- how the job runs: changing these continues a run (glora_ray.identity) ---------------
    checkpoint_every: int = field(default=10, metadata={**EXECUTION_ONLY, **option(  # the last is always checkpointed
        TRAINING, "epochs between training checkpoints", argparse={"type": int})})
    keep_checkpoints: int = field(default=2, metadata=EXECUTION_ONLY)
    cpus_per_worker: int = field(default=1, metadata={**EXECUTION_ONLY, **option(
        TRAINING, "CPUs per training worker", flag="--train-cpus", argparse={"type": int})})
    # None: 1 when use_gpu; a fraction shares a GPU (the option --train-gpus also sets use_gpu)
    gpus_per_worker: float | None = field(default=None, metadata={**EXECUTION_ONLY, **option(
        TRAINING, "GPUs per training worker (0: CPU training)", flag="--train-gpus", argparse={"type": float},
        unset="1 if use_gpu, else 0")})
    max_failures: int = field(default=3, metadata=EXECUTION_ONLY)
    # True: let Ray wait for an autoscaler instead of refusing
    wait_for_resources: bool = field(default=False, metadata=EXECUTION_ONLY)
    # -- numerics (change results) --------------------------------------------------------------
    # Forward passes: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32", "tf32" (CUDA) or
    # "bf16" (autocast; on CPUs too); tf32 on a CPU is refused when training starts. The weights
    # and the optimizer stay float32 in every case.
    precision: str = field(default="auto", metadata=option(
        TRAINING, "forward passes of training: 'auto' is bf16 autocast on CUDA and fp32 elsewhere; 'fp32' turns "
        "mixed precision off; 'tf32' needs --train-gpus; weights and optimizer stay fp32", flag="--train-precision",
        argparse={"choices": [AUTO_PRECISION] + [p.value for p in Precision]}))
    # Channels-last activations and weights: None = on when the backbone is convolutional.
    channels_last: bool | None = field(default=None, metadata=option(
        TRAINING, "channels-last activations and weights in training", argparse={"action": "store_true"},
        negation=("--no-channels-last", "the contiguous (NCHW) layout in training, also for a CNN"),
        unset="automatic: on for a convolutional backbone"))

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints,
                    "cpus_per_worker": self.cpus_per_worker}
        for name, value in positive.items():
            if not value > 0:
                raise TrainConfigError(f"{name} must be > 0, got {value!r}")
        non_negative = {"weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                        "warmup_lr": self.warmup_lr, "min_lr": self.min_lr, "seed": self.seed,
                        "num_workers": self.num_workers, "max_failures": self.max_failures}
        for name, value in non_negative.items():
            if not value >= 0:
                raise TrainConfigError(f"{name} must be >= 0, got {value!r}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise TrainConfigError(f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        if self.min_lr > self.lr:
            raise TrainConfigError(f"min_lr={self.min_lr} is above lr={self.lr}")
        if self.batch_size % self.world_size:
            raise TrainConfigError(
                f"batch_size={self.batch_size} (global) must divide evenly over {self.world_size} worker(s)"
            )
        if not self.split:
            raise TrainConfigError(f"split must name a training list (VTAB-1k: one of {list(SPLITS)}), got {self.split!r}")
        if self.split == "test":
            raise TrainConfigError("never train on 'test' (docs/method.md §2); use 'train800' or 'train800val200'")
        if self.fixed_subnet is not None and not isinstance(self.fixed_subnet, str):
            raise TrainConfigTypeError(
                f"fixed_subnet must be a subnet key (a str, Supernet.subnet_key) or None, "
                f"got {type(self.fixed_subnet).__name__} {self.fixed_subnet!r}"
            )
        if self.fixed_subnet == "":
            raise TrainConfigError("fixed_subnet must be a subnet key (Supernet.subnet_key) or None, got ''")
        parse_precision(self.precision, "precision", allow_auto=True, error=TrainConfigError)
        self._validate_sampling()
        if self.channels_last not in (None, True, False):
            raise TrainConfigError(f"channels_last must be None (automatic), True or False, got {self.channels_last!r}")
        if self.gpus_per_worker is not None and (not self.use_gpu or self.gpus_per_worker <= 0):
            raise TrainConfigError(
                f"gpus_per_worker={self.gpus_per_worker} needs use_gpu=True and a value > 0"
            )

    def resolved_field(self, name: str, value: Any) -> Any:
        """A field as the run's identity records it (glora_ray.identity): ``precision="auto"`` as
        the precision it means where this training runs."""
        if name == "precision" and value == AUTO_PRECISION:
            return resolve_precision(value, "cuda" if self.use_gpu else "cpu").value
        return value

    def _validate_sampling(self) -> None:
        if self.subnet_sampling not in SAMPLING_CHOICES:
            raise TrainConfigError(f"subnet_sampling={self.subnet_sampling!r} is not one of {SAMPLING_CHOICES}")
        if isinstance(self.sandwich, bool) or not isinstance(self.sandwich, int) or self.sandwich < 0:
            raise TrainConfigError(f"sandwich must be an integer >= 0 (drawn subnets per step besides the "
                                   f"largest and the smallest; 0: off), got {self.sandwich!r}")
        if self.distill and self.sandwich == 0:
            raise TrainConfigError("distill=True needs a sandwich (sandwich >= 1): the largest subnet of a "
                                   "step is the teacher")
        if self.budget is not None:
            if len(self.budget) != 2 or not 0 <= self.budget[0] <= self.budget[1]:
                raise TrainConfigError(f"budget must be (min_params, max_params) with 0 <= min <= max, "
                                       f"got {self.budget!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise TrainConfigError(f"init_from must be a supernet checkpoint folder or None, got {self.init_from!r}")

    @property
    def needs_budget(self) -> bool:
        """Whether a supernet trained with these settings draws within the budget window."""
        return self.fixed_subnet is None and (self.sandwich > 0 or self.subnet_sampling != SubnetSampling.UNIFORM.value)

    def for_fixed_subnet(self, key: str, **changes: Any) -> "TrainConfig":
        """The same training for one fixed subnet (a baseline, a retrained winner): the supernet's
        own sampling settings do not apply to it, so they are reset and never make it differ."""
        return replace(self, fixed_subnet=key, subnet_sampling=SubnetSampling.UNIFORM.value, budget=None,
                       sandwich=0, distill=False, **changes)

    @property
    def world_size(self) -> int:
        """Training processes: local mode (num_workers=0) is one process."""
        return max(self.num_workers, 1)

    def per_worker_batch(self, world_size: int) -> int:
        if self.batch_size % world_size:
            raise TrainConfigError(f"batch_size={self.batch_size} does not divide over {world_size} workers")
        return self.batch_size // world_size

    def resources_per_worker(self) -> dict[str, float]:
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1 if self.gpus_per_worker is None else self.gpus_per_worker
        return resources

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        cfg = from_known_fields(cls, data, TrainConfigError, "training")
        if cfg.budget is not None:  # JSON gives a list
            cfg.budget = tuple(cfg.budget)
        return cfg
