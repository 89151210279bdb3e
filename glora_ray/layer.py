"""The GLoRA layer (SPEC §1): a frozen base layer plus weight-entangled support tensors A..E.

``GLoRASupport`` owns the five tensors over a 2-D weight view (d_out, d_in) and hands out the
slice a choice uses; it knows nothing of how the base layer applies its weight, so a
convolution variant can reuse it by viewing its kernel as (out, in * kh * kw).
``GLoRALinear`` applies it to an ``nn.Linear``.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .params import tensor_param_count
from .space import TENSORS, Choice, Kind, LayerChoice, SearchSpace


class GLoRASupport(nn.Module):
    """Largest form of every support tensor, shared by every choice (weight entanglement)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        max_rank: int,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.d_in, self.d_out, self.max_rank = d_in, d_out, max_rank
        kw = {"device": device, "dtype": dtype}
        # Down factors, D and E start at zero, so the adapted layer starts equal to the base.
        self.A_down = nn.Parameter(torch.zeros(d_out, max_rank, **kw))
        self.A_up = nn.Parameter(torch.empty(max_rank, d_in, **kw))
        self.B_down = nn.Parameter(torch.zeros(d_out, max_rank, **kw))
        self.B_up = nn.Parameter(torch.empty(max_rank, d_in, **kw))
        self.C_down = nn.Parameter(torch.zeros(d_in, max_rank, **kw))
        self.C_up = nn.Parameter(torch.empty(max_rank, 1, **kw))
        self.D = nn.Parameter(torch.zeros(d_out, **kw))
        self.E = nn.Parameter(torch.zeros(d_out, **kw))
        self.reset_up_factors(init, generator)

    def reset_up_factors(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        if self.A_up.is_meta:
            return
        for up in (self.A_up, self.B_up, self.C_up):
            if init == "kaiming":
                nn.init.kaiming_uniform_(up, a=math.sqrt(5), generator=generator)
            elif init == "xavier":
                nn.init.xavier_uniform_(up, generator=generator)
            else:
                raise ValueError(f"init must be 'kaiming' or 'xavier', got {init!r}")

    def factors(self, tensor: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of a rank-``rank`` LoRA: the first ``rank`` components (nested ranks)."""
        down, up = getattr(self, f"{tensor}_down"), getattr(self, f"{tensor}_up")
        return down[:, :rank], up[:rank, :]

    def vector(self, tensor: str) -> torch.Tensor:
        """The vector form: column 0 of the down factor, or the whole D / E."""
        if tensor in ("D", "E"):
            return getattr(self, tensor)
        return getattr(self, f"{tensor}_down")[:, 0]

    def scalar(self, tensor: str) -> torch.Tensor:
        """The scalar form: element [0, 0] of the down factor, or element 0 of D / E."""
        if tensor in ("D", "E"):
            return getattr(self, tensor)[0]
        return getattr(self, f"{tensor}_down")[0, 0]

    def dense(self, tensor: str, choice: Choice) -> torch.Tensor | None:
        """The tensor's value broadcastable to its SPEC shape, or None for ``none``.

        A, B -> (d_out, d_in) / (d_out, 1) / (); C -> (d_in, 1); D, E -> (d_out,) / ().
        """
        if choice.kind is Kind.NONE:
            return None
        if choice.kind is Kind.SCALAR:
            return self.scalar(tensor)
        if choice.kind is Kind.LORA:
            down, up = self.factors(tensor, choice.rank)
            return down @ up
        vec = self.vector(tensor)
        return vec if tensor in ("D", "E") else vec[:, None]


class GLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with GLoRA support tensors; ``set_choice`` fixes the subnet."""

    def __init__(
        self,
        base: nn.Linear,
        space: SearchSpace,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"GLoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.space = space
        self.glora = GLoRASupport(
            base.in_features, base.out_features, space.max_rank, init, generator,
            device=base.weight.device, dtype=base.weight.dtype,
        )
        self._choice: tuple[Choice, ...] = space.layer_choice_objects(space.encode_layer(space.largest_layer_choice()))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # -- choice ------------------------------------------------------------------------
    def set_choice(self, choice: LayerChoice, layer_name: str = "<layer>") -> None:
        self._choice = self.space.layer_choice_objects(self.space.encode_layer(choice, layer_name))

    def set_choice_genes(self, genes) -> None:
        self._choice = self.space.layer_choice_objects(genes)

    @property
    def choice(self) -> dict[str, str]:
        return {t: c.name for t, c in zip(TENSORS, self._choice)}

    def _resolve(self, choice: LayerChoice | None) -> tuple[Choice, ...]:
        if choice is None:
            return self._choice
        return self.space.layer_choice_objects(self.space.encode_layer(choice))

    def num_params(self, choice: LayerChoice | None = None) -> int:
        """SPEC's parameter count of ``choice`` (default: the current one)."""
        return sum(
            tensor_param_count(t, c, self.in_features, self.out_features)
            for t, c in zip(TENSORS, self._resolve(choice))
        )

    # -- compute -----------------------------------------------------------------------
    def effective_bias(self, choice: tuple[Choice, ...] | None = None) -> torch.Tensor | None:
        """b0 + b0 * D + E + W0 @ C, or None when every term is absent."""
        _, _, c_choice, d_choice, e_choice = choice or self._choice
        w0, b0 = self.base.weight, self.base.bias
        bias = None
        if b0 is not None:
            d = self.glora.dense("D", d_choice)
            bias = b0 if d is None else b0 + b0 * d
        e = self.glora.dense("E", e_choice)
        if e is not None:
            bias = e.expand(self.out_features) if bias is None else bias + e
        c = self.glora.dense("C", c_choice)
        if c is not None:
            prompt = (w0 @ c)[:, 0]
            bias = prompt if bias is None else bias + prompt
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_choice, b_choice = self._choice[0], self._choice[1]
        w0 = self.base.weight
        # W0 + W0 * A: only a LoRA A needs the full (d_out, d_in) matrix; vector and scalar
        # scale the base output instead.
        if a_choice.kind is Kind.LORA:
            out = F.linear(x, w0 + w0 * self.glora.dense("A", a_choice))
        else:
            out = F.linear(x, w0)
            a = self.glora.dense("A", a_choice)
            if a is not None:
                out = out + out * (a[:, 0] if a.dim() == 2 else a)
        # + B: LoRA as two thin matmuls; vector / scalar B is constant along d_in, so
        # x @ B.T is the row sum of x times B.
        if b_choice.kind is Kind.LORA:
            down, up = self.glora.factors("B", b_choice.rank)
            out = out + F.linear(F.linear(x, up), down)
        elif b_choice.kind is not Kind.NONE:
            b = self.glora.dense("B", b_choice)
            out = out + x.sum(dim=-1, keepdim=True) * (b[:, 0] if b.dim() == 2 else b)
        bias = self.effective_bias()
        return out if bias is None else out + bias

    @torch.no_grad()
    def merged_weight_and_bias(self, choice: LayerChoice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W0 + W0 * A + B and the effective bias, built out of place from the ORIGINAL W0."""
        resolved = self._resolve(choice)
        a_choice, b_choice = resolved[0], resolved[1]
        w0 = self.base.weight
        # The first op makes a fresh tensor; later terms accumulate into it (never into W0).
        # Fused ops keep the kernel count low: a candidate merges all its layers every time.
        if b_choice.kind is Kind.LORA:
            weight = torch.addmm(w0, *self.glora.factors("B", b_choice.rank))
        else:
            b = self.glora.dense("B", b_choice)
            weight = w0.clone() if b is None else w0 + b
        a = self.glora.dense("A", a_choice)
        if a is not None:
            weight.addcmul_(w0, a)
        bias = self.effective_bias(resolved)
        if bias is not None:
            bias = bias.detach().clone() if bias is self.base.bias else bias.detach()
        return weight.detach(), bias

    def merged(self, choice: LayerChoice | None = None) -> nn.Linear:
        """A new plain ``nn.Linear`` equal to this layer under ``choice``; the base is untouched."""
        weight, bias = self.merged_weight_and_bias(choice)
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device="meta", dtype=weight.dtype)
        plain.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        return plain

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, choice={self.choice}"

