"""How an evaluator puts one subnet's merged weights into the plain backbone (docs/method.md §1.6, §9).

Three strategies, one result (``W0 + W0*A + B`` and ``b0 + b0*D + E + W0@C`` per adapted layer,
docs/method.md §1), different costs:

``just_in_time`` (the default on the CPU)
    Each adapted layer's weight is merged just before it runs (a forward pre-hook on the plain
    layer), by the GLoRA formula (``layers/formula.py``) into a buffer that every layer reuses in
    turn: an actor holds one layer's merged weight at a time and a bias vector per layer
    instead of a private merged copy of every adapted layer, so actors that share the weights
    zero-copy stay small, and no weight-sized memory is allocated per batch.  The
    weight is merged once per batch instead of once per candidate (a layer whose A and B are
    both ``none`` runs on the shared W0 itself).  Bit for bit the same logits as
    ``per_candidate`` (same function, same plain layer ``forward``).
``per_candidate``
    Every adapted layer merged once per candidate into new tensors (the path before issue 14):
    the least merging, but a private copy of the adapted weights per actor.
``batched`` (the default on CUDA)
    All adapted layers of one weight shape merged together by the same formula over stacked,
    masked terms (``bmm``, ``baddbmm``, ``addcmul``) into persistent stacked buffers that the plain layers view: a few
    dozen kernels per candidate instead of a dozen per layer, so the merge is not bound by
    kernel launches.  The layers' frozen weights are re-pointed into one stacked tensor per
    shape (no second copy).  Float results equal the per-layer merge up to the masked zeros' rounding.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GLoRARayError
from ..precision import Precision, matmul_precision
from ..layers.formula import adapted_bias, adapted_weight
from ..layers.support import FACTORED, VECTORS, LowRank, PerRow, Term, used_part
from ..space import TENSORS
from ..supernet import Supernet
from .config import AUTO_MERGE as AUTO, MERGE_CHOICES, MergeStrategy, auto_merge_strategy


def resolve_merge_strategy(value: MergeStrategy | str, device: torch.device) -> MergeStrategy:
    """The strategy named, or for ``auto`` the one for ``device`` (``config.auto_merge_strategy``)."""
    if value == AUTO:
        return auto_merge_strategy(device.type == "cuda")
    try:
        return MergeStrategy(value)
    except ValueError:
        raise GLoRARayError(f"merge strategy {value!r} is not one of {MERGE_CHOICES}") from None


class Merger(Protocol):
    def load(self, genes: np.ndarray) -> None:
        """Make the plain backbone compute the subnet ``genes``."""


def _zero_bias(weight: torch.Tensor) -> torch.Tensor:
    # No base bias and no D / E / C term: a zero bias keeps one code path (and equal bits).
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


class PerCandidateMerge:
    """Every adapted layer merged once per candidate into new tensors, set on the plain layers."""

    def __init__(self, supernet: Supernet, targets: Sequence[nn.Module]):
        self.supernet, self.targets = supernet, list(targets)
        self._zero_bias: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def load(self, genes: np.ndarray) -> None:
        choices = self.supernet.layer_choices(genes)
        for i, (layer, target) in enumerate(zip(self.supernet.layers(), self.targets)):
            weight, bias = layer.merged_weight_and_bias(choices[i])
            if bias is None:
                bias = self._zero_bias.get(i)
                if bias is None:
                    bias = self._zero_bias[i] = _zero_bias(weight)
            target.weight = nn.Parameter(weight, requires_grad=False)
            target.bias = nn.Parameter(bias, requires_grad=False)


class JustInTimeMerge:
    """Each plain adapted layer gets its merged weight from a forward pre-hook and drops it after.

    ``load`` computes every layer's bias (``b0 + b0*D + E + W0@C``: a vector, but half the merge's
    work through ``W0@C``) once per candidate and keeps the candidate's A and B terms, all the
    weight depends on; the hook builds ``W0 + W0*A + B`` from them.  The GLoRA layers' own choice
    is never touched.  The plain layer's own ``forward`` applies the weight (``F.linear``, or a
    convolution with the base's settings).
    """

    def __init__(self, supernet: Supernet, targets: Sequence[nn.Module]):
        self.supernet = supernet
        self.targets = list(targets)
        self.layers = layers = list(supernet.layers())
        # Every layer's bias lives in one buffer allocated once: kept small tensors allocated
        # between the merge's large temporaries would pin freed heap blocks (glibc keeps them).
        sizes = [l.base.weight.shape[0] for l in layers]
        weight = layers[0].base.weight
        store = torch.zeros(sum(sizes), dtype=weight.dtype, device=weight.device)
        self.biases = list(torch.split(store, sizes))
        # The merged weight is written into one buffer of the largest layer's size, reused by
        # every layer in turn (one runs at a time): a weight's worth allocated and freed per
        # layer and batch made the allocator hand pages back to the system and fault them in
        # again, costing the forward more than the merge did.
        largest = max(layer.base.weight.numel() for layer in layers)
        self.weight_buffer = torch.empty(largest, dtype=weight.dtype, device=weight.device)
        for i, target in enumerate(self.targets):
            # weight and bias become plain attributes, set only while the layer runs.
            for name in ("weight", "bias"):
                if name in target._parameters:
                    del target._parameters[name]
                setattr(target, name, None)
            target.register_forward_pre_hook(self._hook_merge(i))
            target.register_forward_hook(_drop_weight)
        # Per layer, the loaded candidate's A and B terms: what its merged weight depends on.
        self.weight_terms: list[tuple[Term | None, Term | None]] = [(None, None)] * len(layers)

    def weight(self, i: int) -> torch.Tensor:
        """Layer ``i``'s merged weight under the loaded candidate: a new tensor, or the shared W0
        itself when A and B are both ``none`` (the plain layer only reads it: no copy needed)."""
        layer, (a, b) = self.layers[i], self.weight_terms[i]
        if a is None and b is None:
            return layer.base.weight.detach()
        out = self.weight_buffer[:layer.d_out * layer.d_in].view(layer.d_out, layer.d_in)
        return layer.merged_weight_2d((a, b), out).view_as(layer.base.weight)

    def _hook_merge(self, i: int):
        def merge(module: nn.Module, args: tuple) -> None:
            device = args[0].device
            if device.type == "cuda":
                # The merge in full fp32, no TF32 (the formula leaves autocast out itself); only the
                # layer's own op takes the precision.
                with matmul_precision(Precision.FP32, device):
                    weight = self.weight(i)
            else:
                weight = self.weight(i)
            module.weight, module.bias = weight, self.biases[i]

        return merge

    @torch.inference_mode()
    def load(self, genes: np.ndarray) -> None:
        for i, (layer, choices) in enumerate(zip(self.layers, self.supernet.layer_choices(genes))):
            terms = layer.terms(choices)
            bias = layer.effective_bias(terms)
            if bias is None:  # as ``PerCandidateMerge``: a zero bias keeps one code path
                self.biases[i].zero_()
            else:
                self.biases[i].copy_(bias)
            self.weight_terms[i] = terms[0], terms[1]


def _drop_weight(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    module.weight = None  # the merged weight is freed as soon as the layer has run


# -- batched -----------------------------------------------------------------------------------
def _choice_tables(space, max_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Each choice's ``used_part`` as masks, per tensor, indexed by gene: ``columns[t, g, k]`` 1
    where component k of the down factor (or of D / E) is used; ``flags[t, g]``: (the up factor is
    used, else a row of ones spreads the column along d_in; element 0 stands for the column)."""
    most = max(len(space.choice_objects(t)) for t in TENSORS)
    columns = np.zeros((len(TENSORS), most, max_rank), dtype=np.float32)
    flags = np.zeros((len(TENSORS), most, 2), dtype=bool)
    for t, tensor in enumerate(TENSORS):
        for g, choice in enumerate(space.choice_objects(tensor)):
            part = used_part(choice)
            columns[t, g, :part.components] = 1.0
            flags[t, g] = (part.low_rank, part.single_value)
    return columns, flags


class _ShapeGroup:
    """The adapted layers of one (d_out, d_in): stacked frozen weights, stacked support tensors,
    and the stacked merged buffers their plain layers view."""

    def __init__(self, indices: list[int], layers: list[nn.Module], targets: list[nn.Module]):
        shapes = [l.base.weight.shape for l in layers]  # (d_out, d_in) for linear, 4-D for a conv kernel
        w0 = torch.stack([l.base.weight.detach().reshape(s[0], -1) for l, s in zip(layers, shapes)])
        for i, layer in enumerate(layers):  # the stack becomes the weights' storage: no second copy
            layer.base.weight = nn.Parameter(w0[i].view(shapes[i]), requires_grad=False)
        self.w0 = w0
        self.index = torch.tensor(indices, device=w0.device)
        self.b0 = torch.stack([l.base.bias.detach() if l.base.bias is not None else torch.zeros_like(w0[0, :, 0])
                               for l in layers])
        stack = lambda name: torch.stack([getattr(l.glora, name).detach() for l in layers])  # noqa: E731
        self.down = {t: stack(f"{t}_down") for t in FACTORED}
        self.up = {t: stack(f"{t}_up") for t in FACTORED}
        # Row 0 of ones: ``down @ ones_row`` spreads a vector or scalar along d_in.
        self.ones_row = {t: torch.zeros_like(up[0]).index_fill_(0, torch.tensor([0], device=w0.device), 1.0)
                         for t, up in self.up.items()}
        self.vectors = {t: stack(t) for t in VECTORS}
        self.weight = torch.empty_like(w0)
        self.bias = torch.empty_like(self.b0)
        for i, target in enumerate(targets):
            target.weight = nn.Parameter(self.weight[i].view(shapes[i]), requires_grad=False)
            target.bias = nn.Parameter(self.bias[i], requires_grad=False)

    def _term(self, tensor: str, columns: torch.Tensor, flags: torch.Tensor) -> Term:
        """Every layer's term of ``tensor``, its unused components masked to zero: a stacked
        ``LowRank`` for A, B, C (whose product is the dense value), a stacked ``PerRow`` for D, E."""
        t = TENSORS.index(tensor)
        if tensor in VECTORS:
            vec = self.vectors[tensor]
            return PerRow(torch.where(flags[:, t, 1, None], vec[:, :1], vec) * columns[:, t, :1])
        down, up = self.down[tensor], self.up[tensor]
        low_rank, single = flags[:, t, 0, None, None], flags[:, t, 1, None, None]
        down = torch.where(single, down[:, :1, :1], down) * columns[:, t, None, :]
        return LowRank(down, torch.where(low_rank, up, self.ones_row[tensor]))

    def merge(self, columns: torch.Tensor, flags: torch.Tensor) -> None:
        columns, flags = columns.index_select(0, self.index), flags.index_select(0, self.index)
        a, b, c, d, e = (self._term(t, columns, flags) for t in TENSORS)
        adapted_weight(self.w0, a, b, out=self.weight)
        self.bias.copy_(adapted_bias(self.w0, self.b0, c, d, e))


class BatchedMerge:
    """All adapted layers of one shape merged by a few stacked ops into buffers the plain layers view."""

    def __init__(self, supernet: Supernet, targets: Sequence[nn.Module]):
        self.supernet = supernet
        self.columns, self.flags = _choice_tables(supernet.space, supernet.space.max_rank)
        layers = list(supernet.layers())
        self.device = layers[0].base.weight.device
        by_shape: dict[tuple, list[int]] = {}
        for i, layer in enumerate(layers):
            weight = layer.base.weight
            by_shape.setdefault((weight.shape[0], weight[0].numel()), []).append(i)
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
