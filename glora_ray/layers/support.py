"""Weight-entangled support tensors A..E over a 2-D weight view (docs/method.md §1, §7).

``used_part`` is the one place that says which part of the stored tensors a choice's kind uses;
``GLoRASupport.term`` cuts that part out as a value (a ``LowRank`` pair of factors, a ``PerRow``
vector or scalar, or ``None``) and the batched merge turns it into masks.  Layers, merging and
parameter counts all work from those, so none of them switches on the kind again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import GLoRARayError
from ..space import Choice, Kind

FACTORED = ("A", "B", "C")  # stored as (down, up) factors
VECTORS = ("D", "E")  # stored as plain vectors


@dataclass(frozen=True)
class LowRank:
    """A LoRA term ``down @ up``; the full matrix is built only when asked for."""

    down: torch.Tensor  # (rows, rank)
    up: torch.Tensor  # (rank, cols)

    def matrix(self) -> torch.Tensor:
        return self.down @ self.up

    @property
    def rank(self) -> int:
        return self.up.shape[0]

    @property
    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()


@dataclass(frozen=True)
class PerRow:
    """A term constant along each row: a vector ``(rows,)`` or a scalar ``()``."""

    value: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """The value broadcastable to a ``(rows, cols)`` matrix."""
        return self.value[..., None] if self.value.dim() else self.value

    @property
    def num_params(self) -> int:
        return self.value.numel()


Term = LowRank | PerRow


@dataclass(frozen=True)
class UsedPart:
    """Which part of a support tensor's stored factors a choice uses."""

    components: int  # leading columns of the down factor (or of D / E); 0: the tensor is absent
    low_rank: bool  # ``down[:, :k] @ up[:k]``; otherwise one column spread along d_in
    single_value: bool  # a scalar: element 0 of that column stands for all of it


def used_part(choice: Choice) -> UsedPart:
    """``lora<k>``: the first k components of down and up (nested ranks); ``vector``: column 0
    of the down factor, or the whole D / E; ``scalar``: element 0 of that vector; ``none``: nothing."""
    if choice.kind is Kind.LORA:
        return UsedPart(choice.rank, low_rank=True, single_value=False)
    return UsedPart(0 if choice.kind is Kind.NONE else 1, low_rank=False, single_value=choice.kind is Kind.SCALAR)


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
        if init not in ("kaiming", "xavier"):
            raise GLoRARayError(f"init must be 'kaiming' or 'xavier', got {init!r}")
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
            else:
                nn.init.xavier_uniform_(up, generator=generator)

    def term(self, tensor: str, choice: Choice) -> Term | None:
        """The part of the stored tensors that ``choice`` uses (``used_part``), as views."""
        part = used_part(choice)
        if part.components == 0:
            return None
        if part.low_rank:
            down, up = getattr(self, f"{tensor}_down"), getattr(self, f"{tensor}_up")
            return LowRank(down[:, :part.components], up[:part.components, :])
        vector = getattr(self, tensor) if tensor in VECTORS else getattr(self, f"{tensor}_down")[:, 0]
        return PerRow(vector[0] if part.single_value else vector)
