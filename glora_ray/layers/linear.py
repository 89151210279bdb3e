"""GLoRA on ``nn.Linear`` (docs/method.md §1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GLoRALayer
from .support import LowRank


class GLoRALinear(GLoRALayer):
    """A frozen ``nn.Linear`` with GLoRA support tensors over its (out, in) weight."""

    base_type = nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def _apply_low_rank(self, x: torch.Tensor, term: LowRank) -> torch.Tensor:
        return F.linear(F.linear(x, term.up), term.down)

    def _row_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=-1, keepdim=True)
