"""GLoRA layers: the shared support tensors and one adapter per adaptable base type.

``ADAPTABLE_LAYER_TYPES`` is the one table of what a supernet can adapt, by the names users
give (``layer_types=("linear", "conv2d")``).
"""
from .base import GLoRALayer, LayerChoiceLike
from .conv import GLoRAConv2d
from .linear import GLoRALinear
from .support import GLoRASupport, LowRank, PerRow

ADAPTABLE_LAYER_TYPES: dict[str, type[GLoRALayer]] = {"linear": GLoRALinear, "conv2d": GLoRAConv2d}

__all__ = ["ADAPTABLE_LAYER_TYPES", "GLoRAConv2d", "GLoRALayer", "GLoRALinear", "GLoRASupport",
           "LayerChoiceLike", "LowRank", "PerRow"]
