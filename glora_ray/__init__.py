"""glora-ray: GLoRA supernets, trained with Ray Train and searched on a Ray actor pool.

The public names load on first use (``lazy``): ``import glora_ray`` loads neither torch nor Ray.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "GLoRARayError": "errors", "GLoRARayTypeError": "errors",
    "Budget": "budget", "InfeasibleBudgetError": "budget", "parse_param_count": "budget",
    "sample_within_budget": "budget",
    "ADAPTABLE_LAYER_TYPES": "layers", "GLoRAConv2d": "layers", "GLoRALayer": "layers", "GLoRALinear": "layers",
    "GLoRASupport": "layers",
    "ParamCounter": "params",
    "TENSORS": "space", "SearchSpace": "space", "SearchSpaceError": "space",
    "Supernet": "supernet", "load_merged_state_dict": "supernet",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .budget import Budget, InfeasibleBudgetError, parse_param_count, sample_within_budget
    from .errors import GLoRARayError, GLoRARayTypeError
    from .layers import ADAPTABLE_LAYER_TYPES, GLoRAConv2d, GLoRALayer, GLoRALinear, GLoRASupport
    from .params import ParamCounter
    from .space import TENSORS, SearchSpace, SearchSpaceError
    from .supernet import Supernet, load_merged_state_dict
