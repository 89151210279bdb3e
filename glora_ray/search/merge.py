"""How an evaluator puts one subnet's merged weights into the plain backbone (docs/method.md §3).

Three strategies, one result (``W0 + W0*A + B`` and ``b0 + b0*D + E + W0@C`` per adapted layer,
docs/method.md §1), different costs:

``just_in_time`` (the default on the CPU)
    Each adapted layer is merged just before it runs, by the layer's own
    ``merged_weight_and_bias``, and dropped right after: an actor holds one layer's merged
    weights at a time instead of a private merged copy of every adapted layer, so actors that
    share the weights zero-copy stay small.  The merge runs once per batch instead of once per
    candidate.  Bit for bit the same logits as ``per_candidate`` (same function, same
    ``F.linear``).
``per_candidate``
    Every adapted layer merged once per candidate into new tensors (the path before issue 14):
    the least merging, but a private copy of the adapted weights per actor.
``batched`` (the default on CUDA)
    All adapted layers of one weight shape merged together by a few stacked ops (``baddbmm``,
    ``bmm``, ``addcmul``) into persistent stacked buffers that the plain layers view: a few
    dozen kernels per candidate instead of a dozen per layer, so the merge is not bound by
    kernel launches.  The layers' frozen weights are re-pointed into one stacked tensor per
    shape (no second copy).  Float results equal the per-layer merge up to summation order.
"""
from __future__ import annotations

import enum
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GLoRARayError
from ..precision import Precision, matmul_precision
from ..space import TENSORS, Kind
from ..supernet import Supernet


class MergeStrategy(str, enum.Enum):
    JUST_IN_TIME = "just_in_time"
    PER_CANDIDATE = "per_candidate"
    BATCHED = "batched"


AUTO = "auto"


def resolve_merge_strategy(value: MergeStrategy | str, device: torch.device) -> MergeStrategy:
    """``auto``: ``batched`` on CUDA (device memory is per actor anyway; launches are what cost),
    ``just_in_time`` elsewhere (host weights are shared between actors; private memory is what costs)."""
    if value == AUTO:
        return MergeStrategy.BATCHED if device.type == "cuda" else MergeStrategy.JUST_IN_TIME
    try:
        return MergeStrategy(value)
    except ValueError:
        raise GLoRARayError(f"merge strategy {value!r} is not one of "
                            f"{[AUTO] + [s.value for s in MergeStrategy]}") from None


class Merger(Protocol):
    def load(self, genes: np.ndarray) -> None:
        """Make the plain backbone compute the subnet ``genes``."""


def _zero_bias(weight: torch.Tensor) -> torch.Tensor:
    # No base bias and no D / E / C term: a zero bias keeps one code path (and equal bits).
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


class PerCandidateMerge:
    """Every adapted layer merged once per candidate into new tensors, set on the plain layers."""

    def __init__(self, supernet: Supernet, targets: Sequence[nn.Linear]):
        self.supernet, self.targets = supernet, list(targets)
        self._zero_bias: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def load(self, genes: np.ndarray) -> None:
        space = self.supernet.space
        per_layer = np.asarray(genes).reshape(self.supernet.num_layers, -1)
        for i, (name, layer, target) in enumerate(zip(self.supernet.layer_names, self.supernet.layers(), self.targets)):
            weight, bias = layer.merged_weight_and_bias(space.decode_layer(per_layer[i], name))
            if bias is None:
                bias = self._zero_bias.get(i)
                if bias is None:
                    bias = self._zero_bias[i] = _zero_bias(weight)
            target.weight = nn.Parameter(weight, requires_grad=False)
            target.bias = nn.Parameter(bias, requires_grad=False)


class JustInTimeLinear(nn.Module):
    """Stands in for one adapted ``nn.Linear``: merges its GLoRA layer's weight when called.

    The bias (``b0 + b0*D + E + W0@C``, a vector, but half the merge's work through ``W0@C``)
    is computed once per candidate by ``JustInTimeMerge.load`` and kept; the weight
    ``W0 + W0*A + B`` (a matrix) is merged on every call and dropped after it.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        # Not a submodule: the plain model must not own (or list) the supernet's tensors.
        object.__setattr__(self, "layer", layer)
        self.bias: torch.Tensor | None = None
        self.zero_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.is_cuda:
            # The merge in full fp32 (no autocast, no TF32); only F.linear takes the precision.
            with torch.autocast(x.device.type, enabled=False), matmul_precision(Precision.FP32, x.device):
                weight, _ = self.layer.merged_weight_and_bias()
        else:
            weight, _ = self.layer.merged_weight_and_bias()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"merges {type(self.layer).__name__} just in time"


class JustInTimeMerge:
    """Replaces the plain backbone's adapted layers by ``JustInTimeLinear``.

    ``load`` computes each layer's bias and leaves the layer set to a choice with the same A
    and B (all the weight depends on) and no C, D, E, so that the per-call merge builds the
    weight and only copies ``b0``.
    """

    def __init__(self, supernet: Supernet, plain: nn.Module):
        self.supernet = supernet
        self.modules: list[JustInTimeLinear] = []
        for name, layer in zip(supernet.layer_names, supernet.layers()):
            parent_name, _, child = name.rpartition(".")
            module = JustInTimeLinear(layer)
            setattr(plain.get_submodule(parent_name), child, module)
            self.modules.append(module)
        space = supernet.space
        # Gene columns of the bias-only tensors, and the gene of their ``none`` choice.
        self._bias_only = [TENSORS.index(t) for t in ("C", "D", "E")]
        self._none = [space.choices(t).index(Kind.NONE.value) for t in ("C", "D", "E")]

    @torch.inference_mode()
    def load(self, genes: np.ndarray) -> None:
        space = self.supernet.space
        per_layer = np.asarray(genes).reshape(self.supernet.num_layers, -1)
        weight_genes = per_layer.copy()
        weight_genes[:, self._bias_only] = self._none
        for layer, module, full, weight_only in zip(self.supernet.layers(), self.modules, per_layer, weight_genes):
            bias = layer.effective_bias(space.layer_choice_objects(full))
            if bias is None:  # as ``PerCandidateMerge``: a zero bias keeps one code path
                if module.zero_bias is None:
                    module.zero_bias = _zero_bias(layer.base.weight)
                bias = module.zero_bias
            module.bias = bias.detach()
            layer.set_choice_genes(weight_only)


# -- batched -----------------------------------------------------------------------------------
def _choice_tables(space, max_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor, indexed by gene: ``columns[t, g, k]`` 1 where component k of the down factor is
    used (k < rank for LoRA, k == 0 for vector and scalar, none for ``none``); ``flags[t, g]``:
    (LoRA: the up factor is used, else a row of ones spreads the vector / scalar along d_in;
    scalar: element [0, 0] stands for the whole down column)."""
    most = max(len(space.choice_objects(t)) for t in TENSORS)
    columns = np.zeros((len(TENSORS), most, max_rank), dtype=np.float32)
    flags = np.zeros((len(TENSORS), most, 2), dtype=bool)
    for t, tensor in enumerate(TENSORS):
        for g, choice in enumerate(space.choice_objects(tensor)):
            used = choice.rank if choice.kind is Kind.LORA else (0 if choice.kind is Kind.NONE else 1)
            columns[t, g, :used] = 1.0
            flags[t, g] = (choice.kind is Kind.LORA, choice.kind is Kind.SCALAR)
    return columns, flags


class _ShapeGroup:
    """The adapted layers of one (d_out, d_in): stacked frozen weights, stacked support tensors,
    and the stacked merged buffers their plain layers view."""

    def __init__(self, indices: list[int], layers: list[nn.Module], targets: list[nn.Linear]):
        w0 = torch.stack([l.base.weight.detach() for l in layers])
        for i, layer in enumerate(layers):  # the stack becomes the weights' storage: no second copy
            layer.base.weight = nn.Parameter(w0[i], requires_grad=False)
        self.w0 = w0
        self.index = torch.tensor(indices, device=w0.device)
        self.b0 = torch.stack([l.base.bias.detach() if l.base.bias is not None else torch.zeros_like(w0[0, :, 0])
                               for l in layers])
        stack = lambda name: torch.stack([getattr(l.glora, name).detach() for l in layers])  # noqa: E731
        self.down = {t: stack(f"{t}_down") for t in ("A", "B", "C")}
        self.up = {t: stack(f"{t}_up") for t in ("A", "B", "C")}
        # Row 0 of ones: ``down @ ones_row`` spreads a vector or scalar along d_in.
        self.ones_row = {t: torch.zeros_like(up[0]).index_fill_(0, torch.tensor([0], device=w0.device), 1.0)
                         for t, up in self.up.items()}
        self.vectors = {t: stack(t) for t in ("D", "E")}
        self.weight = torch.empty_like(w0)
        self.bias = torch.empty_like(self.b0)
        for i, target in enumerate(targets):
            target.weight = nn.Parameter(self.weight[i], requires_grad=False)
            target.bias = nn.Parameter(self.bias[i], requires_grad=False)

    def _low_rank(self, t: int, name: str, columns: torch.Tensor, flags: torch.Tensor):
        """(down, up) whose product is the tensor's dense value (docs/method.md §1) in every layer."""
        down, up = self.down[name], self.up[name]
        lora, scalar = flags[:, t, 0, None, None], flags[:, t, 1, None, None]
        down = torch.where(scalar, down[:, :1, :1], down) * columns[:, t, None, :]
        return down, torch.where(lora, up, self.ones_row[name])

    def _vector(self, t: int, name: str, columns: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        vec = self.vectors[name]
        return torch.where(flags[:, t, 1, None], vec[:, :1], vec) * columns[:, t, :1]

    def merge(self, columns: torch.Tensor, flags: torch.Tensor) -> None:
        columns, flags = columns.index_select(0, self.index), flags.index_select(0, self.index)
        a_down, a_up = self._low_rank(0, "A", columns, flags)
        b_down, b_up = self._low_rank(1, "B", columns, flags)
        c_down, c_up = self._low_rank(2, "C", columns, flags)
        torch.baddbmm(self.w0, b_down, b_up, out=self.weight)  # W0 + B
        self.weight.addcmul_(self.w0, torch.bmm(a_down, a_up))  # + W0 * A
        prompt = torch.bmm(self.w0, torch.bmm(c_down, c_up))[..., 0]  # W0 @ C
        d, e = self._vector(3, "D", columns, flags), self._vector(4, "E", columns, flags)
        torch.addcmul(self.b0, self.b0, d, out=self.bias)  # b0 + b0 * D
        self.bias.add_(e).add_(prompt)


class BatchedMerge:
    """All adapted layers of one shape merged by a few stacked ops into buffers the plain layers view."""

    def __init__(self, supernet: Supernet, targets: Sequence[nn.Linear]):
        self.supernet = supernet
        self.columns, self.flags = _choice_tables(supernet.space, supernet.space.max_rank)
        layers = list(supernet.layers())
        self.device = layers[0].base.weight.device
        by_shape: dict[tuple, list[int]] = {}
        for i, layer in enumerate(layers):
            by_shape.setdefault(tuple(layer.base.weight.shape), []).append(i)
        with torch.no_grad():
            self.groups = [_ShapeGroup(idx, [layers[i] for i in idx], [targets[i] for i in idx])
                           for idx in by_shape.values()]

    def selectors(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(columns [L, 5, max_rank], flags [L, 5, 2]) of ``genes``, see ``_choice_tables``."""
        per_layer = np.asarray(genes).reshape(self.supernet.num_layers, len(TENSORS)).astype(np.int64)
        tensor = np.arange(len(TENSORS))
        return self.columns[tensor, per_layer], self.flags[tensor, per_layer]

    @torch.inference_mode()
    def load(self, genes: np.ndarray) -> None:
        columns, flags = self.selectors(genes)  # two small host-to-device copies per candidate
        columns, flags = torch.from_numpy(columns).to(self.device), torch.from_numpy(flags).to(self.device)
        for group in self.groups:
            group.merge(columns, flags)
