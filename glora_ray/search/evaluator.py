"""Evaluating candidates: accuracy and mean cross-entropy of the supernet with one subnet fixed,
on resident data (docs/method.md §3, fitness).

Free of Ray: ``Evaluator`` is a plain class that a Ray actor wraps (pool.py), and the tests use
it in-process.  It holds the supernet as zero-copy views of shared numpy arrays (never written),
builds its plain backbone once, keeps the validation data resident on its device, and runs
every candidate under ``torch.inference_mode`` in eval mode.

Merged evaluation (the default): the plain backbone's non-adapted tensors are assigned once
(views of the shared weights); only the adapted layers compute the merged ``W0 + W0*A + B`` and
``b0 + b0*D + E + W0@C``, built out of place (the shared weights are never written): just before
each layer runs on the CPU, for all layers of one shape at once on CUDA (merge.py).  The forward
pass then costs the backbone's plus the merge.  Replacing those few parameters is cheaper than
``load_state_dict(assign=True)`` or ``torch.func.functional_call`` of a whole merged state dict,
which pay a Python walk over every module per candidate (or per batch).

``precision`` (docs/method.md §3): the forward passes run in fp32, TF32 (CUDA) or bf16 autocast;
the merge itself always runs in fp32.

Evaluation batch: ``batch_size`` is the smallest batch; the evaluator measures one image's
activations in its warm-up (the largest input plus output of any leaf module) and evaluates in
batches as large as fit ``activation_budget`` bytes, up to the whole validation split.  The
just-in-time merge runs once per batch (merge.py), so at small inputs, where the merge costs as
much as a batch's forward, fewer batches are what keeps a candidate's cost near the backbone's;
the activations are transient (freed after each batch), unlike merged weights held across batches.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..backbone import empty_backbone
from ..checkpoint import SupernetSpec, supernet_from_numpy
from ..errors import GLoRARayError
from ..supernet import Supernet, SubnetLike
from ..precision import Precision, compute_precision, matmul_precision, resolve_precision
from .config import EvalMode
from .merge import AUTO, BatchedMerge, JustInTimeMerge, MergeStrategy, Merger, PerCandidateMerge, resolve_merge_strategy

log = logging.getLogger(__name__)

# Activations one evaluation batch may take (module docstring): at ViT-B/16 224 px the default
# batch of 64 already exceeds it (about 5 MiB per image), at 64 px ViT-Ti's 200 images fit it.
ACTIVATION_BUDGET = 64 * 2**20


@dataclass(frozen=True)
class EvalResult:
    """One candidate's validation results: top-1 accuracy ``correct / total`` and ``val_loss``,
    the mean cross-entropy over the ``total`` images (float32 from the logits)."""

    key: str
    val_acc: float
    seconds: float
    actor: str
    correct: int
    total: int
    val_loss: float


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(array: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    array = np.asarray(array, dtype=dtype)
    with warnings.catch_warnings():
        # Object-store arrays are read-only; they are only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.to(device)


def check_val_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Cheap checks on the validation arrays, before any expensive work."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise GLoRARayError(f"val_images must be a numpy array (N, C, H, W), got {type(images).__name__} "
                         f"with shape {getattr(images, 'shape', None)}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise GLoRARayError(f"val_labels must be a 1-D integer numpy array, got {getattr(labels, 'dtype', None)} "
                         f"with shape {getattr(labels, 'shape', None)}")
    if len(images) != len(labels) or len(labels) == 0:
        raise GLoRARayError(f"val_images ({len(images)}) and val_labels ({len(labels)}) must be equally long and non-empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise GLoRARayError(f"val_labels span {int(labels.min())}..{int(labels.max())}, outside the model's "
                         f"{num_classes} classes")


class MergedModel:
    """A plain backbone whose adapted layers compute one subnet's merged weights at a time.

    ``plain`` must have the supernet's architecture without GLoRA (``empty_backbone`` on meta,
    or a deep copy).  Its non-adapted tensors are bound once to the supernet's own tensors; how
    the adapted layers get their merged weights is the ``strategy`` (merge.py).
    """

    def __init__(self, supernet: Supernet, plain: nn.Module,
                 strategy: MergeStrategy | str = MergeStrategy.PER_CANDIDATE):
        self.supernet = supernet
        self.strategy = MergeStrategy(strategy)
        self.plain = plain.eval().requires_grad_(False)
        prefixes = tuple(f"{n}." for n in supernet.layer_names)
        fixed = {k: v for k, v in supernet.model.state_dict().items() if not k.startswith(prefixes)}
        # assign=True binds the supernet's tensors (shared views) instead of copying into them.
        result = self.plain.load_state_dict(fixed, strict=False, assign=True)
        expected_missing = {f"{n}.{p}" for n in supernet.layer_names for p in ("weight", "bias")}
        unexpected_missing = set(result.missing_keys) - expected_missing
        if result.unexpected_keys or unexpected_missing:
            raise ValueError(
                f"the plain backbone does not match the supernet: missing {sorted(unexpected_missing)[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        targets: list[nn.Module] = []
        for name, layer in zip(supernet.layer_names, supernet.layers()):
            module = self.plain.get_submodule(name)
            if type(module) is not type(layer.base):
                raise ValueError(f"plain backbone layer {name!r} is {type(module).__name__}, expected "
                                 f"{type(layer.base).__name__}")
            targets.append(module)
        if self.strategy is MergeStrategy.JUST_IN_TIME:
            self.merger: Merger = JustInTimeMerge(supernet, targets)
        elif self.strategy is MergeStrategy.BATCHED:
            self.merger = BatchedMerge(supernet, targets)
        else:
            self.merger = PerCandidateMerge(supernet, targets)

    def load(self, genes: np.ndarray) -> None:
        """Make the adapted layers compute the merged weights of ``genes``."""
        self.merger.load(genes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(x)


@torch.inference_mode()
def _correct_and_loss(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[int, float]:
    """(top-1 correct, summed cross-entropy) over the images, in batches; one device sync at the end.

    The cross-entropy is computed in float32 from each batch's logits (whatever the forward
    precision) and summed over batches in float64.
    """
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    loss = torch.zeros((), dtype=torch.float64, device=labels.device)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size]
        y = labels[start:start + batch_size]
        logits = model(x.to(labels.device, non_blocking=True)).float()
        correct += (logits.argmax(dim=-1) == y).sum()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
    return int(correct.item()), float(loss.item())  # .item() also synchronises the device, so timings are real


def _count_correct(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> int:
    """Top-1 correct; computes the loss too, so it costs what an evaluation's forward passes cost."""
    return _correct_and_loss(model, images, labels, batch_size)[0]


class Evaluator:
    """Evaluates candidates of one supernet on resident validation data.

    ``state`` is the supernet's whole state as numpy arrays (``checkpoint.numpy_state``),
    typically shared zero-copy from Ray's object store: it is only read, never written.
    """

    def __init__(
        self,
        spec: SupernetSpec,
        state: Mapping[str, np.ndarray],
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int = 64,
        mode: EvalMode | str = EvalMode.MERGED,
        device: torch.device | str | None = None,
        threads: int | None = None,
        actor_id: str = "local",
        precision: Precision | str = Precision.FP32,
        merge: MergeStrategy | str = AUTO,
        activation_budget: int = ACTIVATION_BUDGET,
    ):
        check_val_arrays(images, labels, spec.num_classes)
        if batch_size < 1:
            raise GLoRARayError(f"batch_size must be >= 1, got {batch_size}")
        if activation_budget < 0:
            raise GLoRARayError(f"activation_budget must be >= 0 bytes, got {activation_budget}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.mode = EvalMode(mode)
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = resolve_precision(precision, self.device)
        self.merge_strategy = resolve_merge_strategy(merge, self.device)
        self.batch_size = batch_size
        self.actor_id = actor_id
        supernet = supernet_from_numpy(spec, dict(state))
        if self.device.type != "cpu":
            supernet = supernet.to(self.device)  # a device copy; the shared host arrays stay as they are
        self.supernet = supernet.eval()
        # Images stay on the host when evaluating on the CPU (a zero-copy view); on a GPU they
        # are copied there once and stay resident.
        self.images = _as_tensor(images, np.float32, self.device)
        self.labels = _as_tensor(labels, np.int64, self.device)
        if self.mode is EvalMode.MERGED:
            plain = empty_backbone(spec.backbone, spec.num_classes)
            # Bound to the supernet's tensors, already on the device; merged weights follow them.
            self.model = MergedModel(self.supernet, plain, self.merge_strategy)
        else:
            self.model = self.supernet
        self.calls = 0
        self.image_activation_bytes = self._warm_up()
        fits = activation_budget // max(self.image_activation_bytes, 1)
        # The batch the forward passes run in: at least batch_size, at most the whole split.
        self.eval_batch = max(batch_size, min(len(self.labels), fits))
        if self.eval_batch != batch_size:
            log.debug("%s: evaluation batch %d instead of %d (%d bytes of activations per image)",
                      actor_id, self.eval_batch, batch_size, self.image_activation_bytes)

    @property
    def batches(self) -> int:
        """Forward batches per candidate (the just-in-time merge runs once per batch)."""
        return -(-len(self.labels) // self.eval_batch)

    def _warm_up(self) -> int:
        """One image through the largest subnet: shape errors surface at start, kernels load.
        Returns that image's activation bytes: the largest input plus output of a leaf module."""
        genes = self.supernet.largest_subnet()
        self._select(genes)
        model = self.model.plain if isinstance(self.model, MergedModel) else self.model
        peak = 0

        def measure(module: nn.Module, args: tuple, output) -> None:
            nonlocal peak
            tensors = [t for t in (*args, output) if isinstance(t, torch.Tensor)]
            peak = max(peak, sum(t.numel() * t.element_size() for t in tensors))

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(measure) for m in leaves]
        try:
            self._count_correct(self.images[:1], self.labels[:1], 1)
        finally:
            for handle in handles:
                handle.remove()
        return peak

    def _count_correct(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[int, float]:
        """(correct, summed cross-entropy) of the selected subnet."""
        # The merge above runs in full fp32; only the forward passes take the precision.
        with compute_precision(self.precision, self.device):
            return _correct_and_loss(self.model, images, labels, batch_size)

    def _select(self, genes: np.ndarray) -> None:
        if self.mode is EvalMode.MERGED:
            with matmul_precision(Precision.FP32, self.device):  # the merge in full fp32, whatever the forward's
                self.model.load(genes)
        else:
            self.supernet.set_subnet(genes)

    def evaluate(self, batch: Sequence[SubnetLike]) -> list[EvalResult]:
        """Accuracy and mean validation loss of each subnet (gene array, key or mapping), in the order given."""
        self.calls += 1
        results = []
        total = len(self.labels)
        for subnet in batch:
            genes = self.supernet.to_genes(subnet)
            start = time.perf_counter()
            self._select(genes)
            correct, loss_sum = self._count_correct(self.images, self.labels, self.eval_batch)
            seconds = time.perf_counter() - start
            results.append(EvalResult(self.supernet.space.genes_to_string(genes), correct / total, seconds,
                                      self.actor_id, correct, total, val_loss=loss_sum / total))
        return results


def evaluate_subnet(supernet: Supernet, genes: SubnetLike, images: np.ndarray, labels: np.ndarray,
                    batch_size: int = 64) -> float:
    """Top-1 accuracy of ``supernet`` with ``genes`` merged into a plain model (a one-off, e.g. on test).

    Runs on the supernet's device, in inference mode; the supernet itself is left unchanged.
    """
    head = supernet.head
    num_classes = head.out_features if isinstance(head, nn.Linear) else int(np.max(labels)) + 1
    check_val_arrays(images, labels, num_classes)
    if batch_size < 1:
        raise GLoRARayError(f"batch_size must be >= 1, got {batch_size}")
    device = next(supernet.parameters()).device
    plain = supernet.merged(genes).eval().requires_grad_(False)
    correct = _count_correct(plain, _as_tensor(images, np.float32, "cpu"),
                             _as_tensor(labels, np.int64, device), batch_size)
    return correct / len(labels)
