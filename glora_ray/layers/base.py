"""What every GLoRA layer shares (docs/method.md §1): choice, counts, effective bias, merging.

A subclass names the base type it wraps and how that base applies a weight; everything is
computed over the 2-D view ``(d_out, d_in)`` of the base weight, so the linear and the
convolution layers share the formula, the merge and the forward's plan.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..errors import GLoRARayTypeError
from ..space import TENSORS, Choice, Kind, LayerChoice, SearchSpace, SearchSpaceError
from .formula import adapted_bias, adapted_weight
from .support import GLoRASupport, LowRank, PerRow, Term

# A layer's choice as the user gives it (names) or as it flows inside (one Choice per tensor).
LayerChoiceLike = LayerChoice | Sequence[Choice]
# Why a support tensor can be inert on a layer (docs/method.md §1.5), by tensor.
INERT_REASON = {"D": "the layer has no bias, and D only scales the bias"}


def inert_choice_error(layer_name: str, tensor: str, choice_name: str) -> SearchSpaceError:
    return SearchSpaceError(f"layer {layer_name!r}, tensor {tensor!r}: {choice_name!r} cannot act on this layer "
                            f"({INERT_REASON[tensor]}); only 'none' is in the space there")


class GLoRALayer(nn.Module):
    """A frozen base layer plus GLoRA support tensors; ``set_choice`` fixes the subnet."""

    base_type: ClassVar[type[nn.Module]]
    groups: int = 1  # independent input groups of the weight (a grouped convolution has more)

    def __init__(
        self,
        base: nn.Module,
        space: SearchSpace,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        cls = type(self).__name__
        if isinstance(base, GLoRALayer):
            raise GLoRARayTypeError(f"{cls}: base is already a {type(base).__name__}; wrap the plain layer once")
        if not isinstance(base, self.base_type):
            raise GLoRARayTypeError(f"{cls}: base must be a torch.nn.{self.base_type.__name__}, "
                                    f"got {type(base).__name__}")
        if not isinstance(space, SearchSpace):
            raise GLoRARayTypeError(f"{cls}: space must be a glora_ray.SearchSpace (e.g. SearchSpace((8, 4))), "
                                    f"got {type(space).__name__} {space!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.space = space
        d_out = base.weight.shape[0]
        self.glora = GLoRASupport(
            base.weight[0].numel(), d_out, space.max_rank, init, generator,
            device=base.weight.device, dtype=base.weight.dtype,
        )
        # The largest choice this layer offers (an inert tensor is none).
        self._choice: tuple[Choice, ...] = tuple(
            Choice(Kind.NONE) if t in self.inert_tensors else c for t, c in zip(TENSORS, space.largest_layer_choices()))

    # -- geometry --------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.glora.d_in

    @property
    def d_out(self) -> int:
        return self.glora.d_out

    @property
    def inert_tensors(self) -> frozenset[str]:
        """Support tensors that cannot change this layer's output, so it offers them only as
        ``none`` (docs/method.md §1.5): D scales the base bias, and a layer without one has none."""
        return frozenset() if self.base.bias is not None else frozenset({"D"})

    def weight_2d(self) -> torch.Tensor:
        """The base weight as (d_out, d_in): a view, never a copy to write into."""
        return self.base.weight.reshape(self.d_out, self.d_in)

    # -- choice ------------------------------------------------------------------------
    def set_choice(self, choice: LayerChoiceLike, layer_name: str = "<layer>") -> None:
        self._choice = self._resolve(choice, layer_name)

    def set_choice_genes(self, genes: Sequence[int], layer_name: str = "<layer>") -> None:
        self._choice = self._resolve(self.space.choices_from_genes(genes, layer_name), layer_name)

    @property
    def choice(self) -> dict[str, str]:
        """The current choice by name, e.g. ``{"A": "lora8", "B": "vector", ...}``."""
        return self.space.choice_names(self._choice)

    @property
    def choices(self) -> tuple[Choice, ...]:
        return self._choice

    def _resolve(self, choice: LayerChoiceLike | None, layer_name: str = "<layer>") -> tuple[Choice, ...]:
        if choice is None:
            return self._choice
        if isinstance(choice, Mapping):
            choices = self.space.choices_from_names(choice, layer_name)
        else:
            choices = self.space.check_choices(choice, layer_name)
        for tensor, c in zip(TENSORS, choices):
            if tensor in self.inert_tensors and c.kind is not Kind.NONE:
                raise inert_choice_error(layer_name, tensor, c.name)
        return choices

    def terms(self, choice: LayerChoiceLike | None = None) -> tuple[Term | None, ...]:
        """The support term of each tensor A..E under ``choice`` (default: the current one)."""
        return tuple(self.glora.term(t, c) for t, c in zip(TENSORS, self._resolve(choice)))

    def num_params(self, choice: LayerChoiceLike | None = None) -> int:
        """Parameter count of ``choice`` (docs/method.md §1): the elements of the slices it uses."""
        return sum(t.num_params for t in self.terms(choice) if t is not None)

    # -- compute -----------------------------------------------------------------------
    def effective_bias(self, terms: Sequence[Term | None] | None = None) -> torch.Tensor | None:
        """b0 + b0 * D + E + W0 @ C (W0 the original weight), or None when every term is absent."""
        _, _, c, d, e = terms if terms is not None else self.terms()
        return adapted_bias(self.weight_2d(), self.base.bias, c, d, e)

    def _b_apart(self, b: Term) -> bool:
        """Whether B is applied beside the base (thin factors, row sums) rather than folded in.

        A per-row B never needs the kernel.  A LoRA B applied as two thin products costs about
        rank * (groups * d_in + d_out) per output position, against d_in * d_out for the
        weight-gradient of a folded kernel: the cheaper one wins.
        """
        if isinstance(b, PerRow):
            return True
        return b.rank * (self.groups * self.d_in + self.d_out) < self.d_in * self.d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, *_ = terms = self.terms()
        x = self._prepare_input(x)
        fold_b = b is not None and (isinstance(a, LowRank) or not self._b_apart(b))
        if isinstance(a, LowRank) or fold_b:
            # One pass with the rebuilt kernel W0 + W0 * A (+ B).
            weight = adapted_weight(self.weight_2d(), a, b if fold_b else None)
            out = self._apply_weight(x, weight.view_as(self.base.weight))
        else:
            # The same formula on the output: a vector or scalar A scales the base output per
            # channel (W0 x + (W0 * A) x = W0 x * (1 + A)) and B adds its own product with x.
            out = self._apply_weight(x, self.base.weight)
            if a is not None:
                out = out + out * self._per_channel(a.value)
        if b is not None and not fold_b:
            if isinstance(b, LowRank):
                out = out + self._apply_low_rank(x, b)
            else:  # constant along d_in: x's sum over each output's receptive field, scaled
                out = out + self._row_sum(x) * self._per_channel(b.value)
        bias = self.effective_bias(terms)
        return out if bias is None else out + self._per_channel(bias)

    # Subclasses: how the base applies a weight, along which axis its output channels lie.
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply_low_rank(self, x: torch.Tensor, term: LowRank) -> torch.Tensor:
        raise NotImplementedError

    def _row_sum(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _per_channel(self, value: torch.Tensor) -> torch.Tensor:
        return value

    # -- merging -----------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight_2d(self, terms: Sequence[Term | None] | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """W0 + W0 * A + B as a (d_out, d_in) tensor, never W0 itself (docs/method.md §1.6);
        ``out``: a (d_out, d_in) buffer to write, which a caller merging layer after layer reuses."""
        a, b = (self.terms() if terms is None else terms)[:2]
        return adapted_weight(self.weight_2d(), a, b, out)

    @torch.no_grad()
    def merged_weight_and_bias(self, choice: LayerChoiceLike | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W0 + W0 * A + B (shaped like the base weight) and the effective bias, out of place."""
        terms = self.terms(choice)
        weight = self.merged_weight_2d(terms)
        bias = self.effective_bias(terms)
        if bias is not None:  # a vector: copied, as it may be a view of b0 or of E
            bias = bias.detach().clone()
        return weight.detach().view_as(self.base.weight), bias

    def merged(self, choice: LayerChoiceLike | None = None) -> nn.Module:
        """A new plain layer of the base's own class equal to this layer under ``choice``.

        The base is untouched: the copy gets fresh weight and bias tensors (a bias-less base
        gains a bias when E or C is chosen, docs/method.md §1).
        """
        weight, bias = self.merged_weight_and_bias(choice)
        # A copy of the base's class, settings and hooks without copying its tensors (memo: None).
        plain = copy.deepcopy(self.base, memo={id(p): None for p in self.base.parameters(recurse=False)})
        plain.register_parameter("weight", nn.Parameter(weight.contiguous(), requires_grad=False))
        plain.register_parameter("bias", None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False))
        return plain

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, choice={self.choice}"
