"""GLoRA on ``nn.Conv2d`` (docs/method.md §7): the formula of §1 over the kernel's 2-D view.

W0 of shape (out, in/groups, kh, kw) is viewed as (d_out, d_in) = (out, in/groups * kh * kw);
every term, slice, initialisation and count is the linear layer's over that view.  Stride,
padding, dilation and groups stay the base's; every convolution here runs on the input padded
the way the base pads it, so the extra terms see exactly the base's receptive fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GLoRARayTypeError
from ..space import SearchSpace
from .base import GLoRALayer
from .support import LowRank


def _timm_same_padding_type() -> type | None:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # timm is optional for the layer itself
        return None
    return Conv2dSame


class GLoRAConv2d(GLoRALayer):
    """A frozen ``nn.Conv2d`` (any kernel, stride, padding, dilation, groups) with GLoRA."""

    base_type = nn.Conv2d

    def __init__(self, base: nn.Conv2d, space: SearchSpace, init: str = "kaiming",
                 generator: torch.Generator | None = None):
        super().__init__(base, space, init, generator)
        same = _timm_same_padding_type()
        self._tf_same = same is not None and isinstance(base, same)
        if not self._tf_same and type(base).forward is not nn.Conv2d.forward:
            # e.g. weight-standardised convs: their forward transforms the weight first.
            raise GLoRARayTypeError(
                f"GLoRAConv2d: {type(base).__name__} has its own forward; supported are nn.Conv2d and "
                f"timm's Conv2dSame (exclude this layer with Supernet's targets)"
            )
        self.groups = base.groups
        # Where the padding happens: on the input (padding modes, TF 'SAME') or in the conv.
        self._pads_input = self._tf_same or base.padding_mode != "zeros"
        self._conv_padding = 0 if self._pads_input else base.padding

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:
        return self.base.out_channels

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._tf_same:
            from timm.layers import pad_same

            return pad_same(x, self.base.kernel_size, self.base.stride, self.base.dilation)
        if self._pads_input:
            return F.pad(x, self.base._reversed_padding_repeated_twice, mode=self.base.padding_mode)
        return x

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.base.stride, self._conv_padding, self.base.dilation, groups)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv(x, weight, self.groups)

    def _apply_low_rank(self, x: torch.Tensor, term: LowRank) -> torch.Tensor:
        """down @ up as two thin convs: up (shared by every group) over the kernel window, then
        a grouped 1x1 conv with down, so output channel o sees only its own group's k features."""
        rank, kernel = term.rank, self.base.weight.shape[1:]
        up = term.up.reshape(rank, *kernel).repeat(self.groups, 1, 1, 1)
        hidden = self._conv(x, up, self.groups)
        return F.conv2d(hidden, term.down[:, :, None, None], groups=self.groups)

    def _row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over each output's receptive field (its group's channels, its window)."""
        n, c, h, w = x.shape
        per_group = x.reshape(n, self.groups, c // self.groups, h, w).sum(dim=2)
        ones = x.new_ones(self.groups, 1, *self.base.kernel_size)
        window = self._conv(per_group, ones, self.groups)  # (n, groups, h', w')
        per_out = self.out_channels // self.groups
        return window.repeat_interleave(per_out, dim=1) if self.groups > 1 and per_out > 1 else window

    def _per_channel(self, value: torch.Tensor) -> torch.Tensor:
        return value[:, None, None] if value.dim() else value
