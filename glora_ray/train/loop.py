"""The stage-1 training loop, free of Ray (docs/method.md §2).

Every step every adapted layer gets its own random choice, drawn from a numpy Generator seeded
by ``(seed, step)`` (``streams.Stream.TRAIN_STEP``): every data-parallel worker draws the same subnet in the same step without
talking to the others, and a resumed run draws exactly what the interrupted one would have.
With ``TrainConfig.fixed_subnet`` set, every step uses that one subnet instead (a fixed
adapter trained with the same job, data and schedule, e.g. a LoRA baseline).  Which subnets a
supernet step trains (one uniform draw, one draw within the budget, or a sandwich of several with
their gradients accumulated, optionally distilled from the largest) is ``sampling.StepSubnets``.

Randomness, all of it reproducible from ``(seed, epoch, step, rank)``:
  * subnets: ``streams.rng(Stream.TRAIN_STEP, seed, step)``;
  * data order: a ``DistributedSampler(seed=seed)`` with ``set_epoch(epoch)``;
  * stochastic depth (timm draws from torch's global RNG): reseeded at the start of every epoch
    from ``(seed, epoch, rank)`` (``Stream.STOCHASTIC_DEPTH``).  Checkpoints are taken at epoch ends, so a resumed run needs no
    saved RNG state, whatever the number of workers (rank 0 alone could not save theirs).

``glora_ray.train.job`` runs ``SupernetTraining`` inside Ray Train workers; called directly it
runs in one process (e.g. to profile the step on a GPU).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import storage
from ..checkpoint import MissingCheckpointError, SupernetSpec, describe_names, load_adapters_into, nonfinite_tensors
from ..errors import DamagedFileError, TrainingDiverged, one_line
from ..precision import Precision, autocast, matmul_precision, memory_format, resolve_precision
from ..streams import Stream, entropy, rng
from ..supernet import Supernet
from .config import TrainConfig, TrainConfigError
from .sampling import StepSubnets

STATE_FILE = "state.pt"
_FORMAT_VERSION = 1

StepHook = Callable[[int], None]


# -- subnets ---------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> Supernet:
    """The ``Supernet`` inside a DDP (or other ``.module``) wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, Supernet):
        raise TypeError(f"expected a Supernet (optionally DDP-wrapped), got {type(inner).__name__}")
    return inner


def subnet_for_step(seed: int, step: int, supernet: Supernet) -> np.ndarray:
    """The genes every worker uses at ``step``: one independent choice per layer and tensor."""
    return supernet.sample_genes(rng(Stream.TRAIN_STEP, seed, step))


def subnet_digest(keys: Iterable[str]) -> str:
    """A short fingerprint of a sequence of subnet keys (one per step)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def expected_epoch_digest(seed: int, first_step: int, steps: int, supernet: Supernet) -> str:
    """The digest an epoch of ``steps`` steps starting at ``first_step`` must report."""
    return subnet_digest(
        supernet.subnet_key(subnet_for_step(seed, s, supernet)) for s in range(first_step, first_step + steps)
    )


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed torch's global RNG (stochastic depth) for one epoch of one worker."""
    state = np.random.SeedSequence(entropy(Stream.STOCHASTIC_DEPTH, seed, epoch, rank)).generate_state(1, np.uint64)[0]
    torch.manual_seed(int(state) % (2**63))


# -- optimisation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine down to ``min_lr``; per step."""

    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "WarmupCosine":
        return cls(cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(supernet: Supernet, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable tensors only (adapters and head); like timm, no decay on 1-d ones (D, E, biases)."""
    decay, no_decay = [], []
    for param in supernet.trainable_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_optimizer(supernet: Supernet) -> bool:
    """Fused AdamW (one kernel for all tensors) when the trainable tensors are on CUDA; the CPU
    keeps the default implementation, whose results earlier runs were checked against."""
    params = supernet.trainable_parameters()
    return bool(params) and all(p.is_cuda for p in params)


def build_optimizer(supernet: Supernet, cfg: TrainConfig) -> torch.optim.AdamW:
    fused = fused_optimizer(supernet)
    return torch.optim.AdamW(param_groups(supernet, cfg.weight_decay), lr=cfg.lr, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function (not a callable object) so the scheduler's state holds only its step:
    # the schedule itself always comes from the current config.
    def factor(step: int) -> float:
        return schedule.lr_at(step) / schedule.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- data --------------------------------------------------------------------------------------
def steps_per_epoch(num_samples: int, cfg: TrainConfig, world_size: int) -> int:
    """Full batches per worker and epoch (docs/method.md §2: drop_last), after DistributedSampler's split."""
    return (num_samples // world_size) // cfg.per_worker_batch(world_size)


def make_loader(
    dataset: Dataset,
    cfg: TrainConfig,
    world_size: int = 1,
    rank: int = 0,
    loader_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DistributedSampler]:
    """A loader over this worker's shard, reshuffled per epoch by ``sampler.set_epoch``."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.per_worker_batch(world_size),
        sampler=sampler,
        drop_last=True,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(cfg.seed),  # DataLoader draws a base seed per epoch
    )
    return loader, sampler


# -- one epoch ---------------------------------------------------------------------------------
@dataclass
class EpochStats:
    epoch: int
    step: int  # global step after the epoch
    steps: int
    loss: float
    train_acc: float
    lr: float  # learning rate of the epoch's last step
    images: int  # over all workers
    seconds: float
    images_per_s: float
    world_size: int
    subnet_digests: list[str] = field(default_factory=list)  # one per worker
    passes: int = 1  # forward and backward passes per step (a sandwich's subnets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


@dataclass
class _Tally:
    """An epoch's running sums on the device (no host sync per step) and its steps' subnet keys."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    pass_images: int = 0  # images through a forward and backward pass: a sandwich counts each subnet
    seen: int = 0  # images of the epoch
    keys: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, device: torch.device) -> "_Tally":
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero())


def _train_step(model: nn.Module, supernet: Supernet, images: torch.Tensor, labels: torch.Tensor,
                step_subnets: list[np.ndarray], tally: _Tally, precision: Precision, device: torch.device,
                distill: bool, epoch: int, step: int, world_size: int) -> None:
    """Forward and backward of every subnet of one step, gradients accumulated (a sandwich averages
    its subnets' losses) and tallied; stops before the update when a loss is not finite."""
    teacher = None
    finite = torch.ones((), dtype=torch.bool, device=device)
    for genes in step_subnets:  # gradients accumulate over a sandwich's subnets
        supernet.set_subnet(genes)
        with autocast(precision, device):  # the backward pass runs outside, as autocast wants
            logits = model(images)
            loss = F.cross_entropy(logits, labels) if teacher is None else soft_cross_entropy(logits, teacher)
        if distill and teacher is None and len(step_subnets) > 1:
            teacher = logits.detach().float().softmax(dim=1)
        (loss / len(step_subnets)).backward()
        # Accumulate on the device: no host sync per step.
        tally.loss_sum += loss.detach().double() * labels.numel()
        tally.correct += (logits.detach().argmax(dim=1) == labels).sum()
        tally.pass_images += labels.numel()
        finite &= torch.isfinite(loss.detach())
    # Before the update, so a non-finite gradient never reaches the weights.
    check_finite_loss(finite, loss, epoch, step, world_size)


def _epoch_stats(tally: _Tally, supernet: Supernet, epoch: int, step: int, lr: float, seconds: float,
                 device: torch.device, world_size: int) -> EpochStats:
    """The epoch's metrics summed over every worker, after checking they all drew the same subnets."""
    totals = torch.stack([tally.loss_sum, tally.correct,
                          torch.tensor(float(tally.pass_images), dtype=torch.float64, device=device),
                          torch.tensor(float(tally.seen), dtype=torch.float64, device=device)])
    digests = [subnet_digest(tally.keys)]
    if _distributed(world_size):
        dist.all_reduce(totals)
        digests = [None] * world_size
        dist.all_gather_object(digests, subnet_digest(tally.keys))
        if len(set(digests)) != 1:
            # Different subnets on different workers make the averaged gradient meaningless.
            raise RuntimeError(f"epoch {epoch}: workers drew different subnets (digests {digests})")
    check_finite_adapters(supernet, epoch, step)
    loss_total, correct_total, pass_images_total, images_total = totals.tolist()
    return EpochStats(
        epoch=epoch, step=step, steps=len(tally.keys), loss=loss_total / max(pass_images_total, 1.0),
        train_acc=correct_total / max(pass_images_total, 1.0), lr=lr, images=int(images_total), seconds=seconds,
        images_per_s=images_total / seconds if seconds > 0 else float("nan"), world_size=world_size,
        subnet_digests=digests, passes=round(pass_images_total / max(images_total, 1.0)),
    )


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    seed: int,
    device: torch.device | str,
    *,
    epoch: int = 0,
    on_step: StepHook | None = None,
    precision: Precision = Precision.FP32,
    layout: torch.memory_format = torch.contiguous_format,
    fixed_genes: np.ndarray | None = None,
    subnets: StepSubnets | None = None,
    distill: bool = False,
) -> EpochStats:
    """One pass over ``loader``, fresh subnets every step (``subnets``; None: one uniform draw, the
    paper's rule) or ``fixed_genes`` in every step; metrics summed over all workers and, in a
    sandwich, averaged over its subnets.

    ``distill``: in a sandwich step the subnets after the first (the largest) learn its soft
    labels (in-place distillation) instead of the true labels.  ``precision``: of the forward pass
    (bf16 autocast) and the matmuls (TF32); the weights, the gradients and the optimizer stay
    float32.  ``layout``: the images' memory format (channels-last for a CNN, matching the model's)."""
    supernet = unwrap(model)
    device = torch.device(device)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    model.train()
    tally, lr = _Tally.on(device), float("nan")
    start = time.perf_counter()
    with matmul_precision(precision, device):
        for images, labels in loader:
            if on_step is not None:
                on_step(step)
            if fixed_genes is not None:
                step_subnets = [fixed_genes]
            elif subnets is not None:
                step_subnets = subnets.for_step(step)
            else:
                step_subnets = [subnet_for_step(seed, step, supernet)]
            tally.keys.append(" ".join(supernet.space.genes_to_string(genes) for genes in step_subnets))
            images = images.to(device, non_blocking=True, memory_format=layout)
            labels = labels.to(device, non_blocking=True)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            _train_step(model, supernet, images, labels, step_subnets, tally, precision, device, distill, epoch, step,
                        world_size)
            optimizer.step()
            scheduler.step()
            step += 1
            tally.seen += labels.numel()
    return _epoch_stats(tally, supernet, epoch, step, lr, time.perf_counter() - start, device, world_size)


def check_finite_loss(finite: torch.Tensor, loss: torch.Tensor, epoch: int, step: int, world_size: int) -> None:
    """Stop at a step whose loss is not finite on any worker (``finite``: this worker's verdict).

    One host sync per step (and, over several workers, one tiny all-reduce, so every worker stops
    at the same step instead of waiting for the others in the next gradient all-reduce)."""
    bad = (~finite).to(torch.int32)
    if _distributed(world_size):
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        value = loss.detach().float().item()
        what = f"loss {value}" if not math.isfinite(value) else "a non-finite loss (another subnet or worker)"
        raise TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {step + 1} of the run: {what}",
                               epoch=epoch + 1, step=step + 1, what=what)


def check_finite_adapters(supernet: Supernet, epoch: int, step: int) -> None:
    """At an epoch's end, before any checkpoint: every trainable tensor (adapters and head) finite.
    The tensors are the same on every worker (data-parallel), so every worker decides alike."""
    params = supernet.trainable_parameters()
    if not params or bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
        return
    names = nonfinite_tensors({name: p.detach() for name, p in supernet.named_parameters() if p.requires_grad})
    what = f"non-finite adapter weights ({describe_names(names)})"
    raise TrainingDiverged(f"training diverged in epoch {epoch + 1} (at step {step} of the run): {what}",
                           epoch=epoch + 1, step=step, what=what)


def training_compute(history: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """A run's compute from its per-epoch history (``EpochStats`` dicts): ``train_images``, the images
    through a forward and backward pass (a sandwich's subnets each count), and ``train_seconds``."""
    history = list(history)
    return {"train_images": float(sum(h["images"] * h.get("passes", 1) for h in history)),
            "train_seconds": float(sum(h["seconds"] for h in history))}


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels (in-place distillation's loss), mean over the batch."""
    return -(target_probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


# -- a whole run -------------------------------------------------------------------------------
@dataclass
class TrainingState:
    step: int = 0
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The payload ``SupernetTraining.save`` wrote into ``directory`` (a path or URI)."""
    uri = storage.join(os.fspath(directory), STATE_FILE)
    if not storage.exists(uri):
        raise MissingCheckpointError(f"{uri}: no training state here")
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch raises on a cut or foreign file
        raise DamagedFileError(f"{uri} is damaged ({one_line(err)})") from None


class SupernetTraining:
    """Supernet, data, optimizer, schedule and progress of one training process.

    ``prepare_model`` / ``prepare_loader`` let Ray Train move the model to its device and wrap it
    in DDP; without them the model goes to ``device`` as it is.  ``meta`` is stored in every
    checkpoint (the job records the spec, data and config there).  ``nodes``: where each rank runs
    (the job passes Ray node ids), recorded in every epoch's history entry of this attempt.
    """

    def __init__(
        self,
        supernet: Supernet,
        dataset: Dataset,
        cfg: TrainConfig,
        device: torch.device | str,
        *,
        world_size: int = 1,
        rank: int = 0,
        loader_workers: int = 0,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None,
        prepare_loader: Callable[[DataLoader], Iterable] | None = None,
        meta: Mapping[str, Any] | None = None,
        init_spec: SupernetSpec | None = None,
        nodes: Sequence[str] = (),
    ):
        self.supernet, self.cfg, self.rank, self.world_size = supernet, cfg, rank, world_size
        self.device = torch.device(device)
        # Refused here (tf32 on a CPU), before any training: a clear error, not a late failure.
        self.precision = resolve_precision(cfg.precision, self.device, error=TrainConfigError)
        self.layout = memory_format(supernet, cfg.channels_last)
        self.meta = dict(meta or {})
        self.nodes = list(nodes)
        self.steps_per_epoch = steps_per_epoch(len(dataset), cfg, world_size)
        if self.steps_per_epoch < 1:
            raise TrainConfigError(
                f"{len(dataset)} training images give no full batch of {cfg.per_worker_batch(world_size)} "
                f"per worker over {world_size} worker(s); lower batch_size (now {cfg.batch_size}, global)"
            )
        self.loader, self.sampler = make_loader(
            dataset, cfg, world_size, rank, loader_workers, pin_memory=self.device.type == "cuda"
        )
        self._prepare_model = prepare_model
        self._prepare_loader = prepare_loader
        self.schedule = WarmupCosine.from_config(cfg, self.steps_per_epoch)
        self.state = TrainingState()
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.resumed_from_step: int | None = None
        # Validated against this supernet's space and layers now, not at the first step.
        self.fixed_genes = None if cfg.fixed_subnet is None else supernet.to_genes(cfg.fixed_subnet)
        self.subnets = None if self.fixed_genes is not None else StepSubnets.from_config(supernet.counter, cfg)
        self.init_spec = init_spec

    def setup(self, resume: Mapping[str, Any] | None = None) -> "SupernetTraining":
        """Restore ``resume`` (a payload of ``save``), then build model wrapper, optimizer, scheduler."""
        if resume is not None:
            # Before the DDP wrap, so its initial broadcast already carries the restored weights.
            self.supernet.load_adapter_state_dict(resume["adapters"])
        elif self.cfg.init_from is not None:
            if self.init_spec is None:
                raise TrainConfigError("init_from needs the spec the checkpoint must match (init_spec)")
            load_adapters_into(self.supernet, self.cfg.init_from, self.init_spec)
        if self.layout is torch.channels_last:  # before the device move and the DDP wrap, which keep it
            self.supernet.to(memory_format=self.layout)
        self.model = self._prepare_model(self.supernet) if self._prepare_model else self.supernet.to(self.device)
        if self._prepare_loader is not None:
            self.loader = self._prepare_loader(self.loader)
        self.optimizer = build_optimizer(self.supernet, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self._apply_config_hyperparameters()
            self.state = TrainingState(int(resume["step"]), int(resume["epoch"]), list(resume["history"]))
            self.resumed_from_step = self.state.step
            if self.state.epoch > self.cfg.epochs:
                raise TrainConfigError(
                    f"the checkpoint is at epoch {self.state.epoch}, past epochs={self.cfg.epochs}; "
                    f"raise epochs or use a new run name"
                )
        return self

    def _apply_config_hyperparameters(self) -> None:
        # A resumed optimizer carries the saved run's lr and weight decay; the current config wins.
        fresh = param_groups(self.supernet, self.cfg.weight_decay)
        lr = self.schedule.lr_at(self.scheduler.last_epoch)
        fused = fused_optimizer(self.supernet)  # the saved run may have trained on another device
        self.scheduler.base_lrs = [self.schedule.lr] * len(self.optimizer.param_groups)
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group["weight_decay"] = settings["weight_decay"]
            group["fused"] = fused or None
            group["initial_lr"] = self.schedule.lr
            group["lr"] = lr

    def run_epoch(self, on_step: StepHook | None = None) -> EpochStats:
        epoch = self.state.epoch
        self.sampler.set_epoch(epoch)
        seed_epoch(self.cfg.seed, epoch, self.rank)
        stats = train_epoch(
            self.model, self.loader, self.optimizer, self.scheduler, self.state.step, self.cfg.seed,
            self.device, epoch=epoch, on_step=on_step, precision=self.precision, layout=self.layout,
            fixed_genes=self.fixed_genes, subnets=self.subnets, distill=self.cfg.distill,
        )
        self.state.step, self.state.epoch = stats.step, epoch + 1
        self.state.history.append({**stats.to_dict(), **({"nodes": self.nodes} if self.nodes else {})})
        return stats

    def run(
        self,
        on_epoch_end: Callable[["SupernetTraining", EpochStats], None] | None = None,
        on_step: StepHook | None = None,
    ) -> TrainingState:
        """Train from the current epoch up to ``cfg.epochs``."""
        if self.model is None:
            self.setup()
        while self.state.epoch < self.cfg.epochs:
            stats = self.run_epoch(on_step)
            if on_epoch_end is not None:
                on_epoch_end(self, stats)
        return self.state

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.cfg.epochs

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; adapters copied to the CPU, the live model stays put."""
        return {
            "format_version": _FORMAT_VERSION,
            "adapters": {k: v.detach().cpu() for k, v in self.supernet.adapter_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "history": list(self.state.history),
            "seed": self.cfg.seed,
            "meta": self.meta,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``state.pt`` into ``directory`` (a path or URI) atomically, through ``storage``."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        uri = storage.join(os.fspath(directory), STATE_FILE)
        storage.write_bytes(uri, buffer.getvalue())
        return uri
