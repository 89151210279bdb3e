"""glora-ray: GLoRA supernets, trained with Ray Train and searched on a Ray actor pool."""
from .errors import GLoRARayError, GLoRARayTypeError
from .budget import Budget, InfeasibleBudgetError, parse_param_count, sample_within_budget
from .layers import ADAPTABLE_LAYER_TYPES, GLoRAConv2d, GLoRALayer, GLoRALinear, GLoRASupport
from .params import ParamCounter
from .space import TENSORS, SearchSpace, SearchSpaceError
from .supernet import Supernet, load_merged_state_dict

__all__ = [
    "ADAPTABLE_LAYER_TYPES",
    "TENSORS",
    "Budget",
    "GLoRAConv2d",
    "GLoRALayer",
    "GLoRALinear",
    "GLoRARayError",
    "GLoRARayTypeError",
    "GLoRASupport",
    "InfeasibleBudgetError",
    "ParamCounter",
    "SearchSpace",
    "SearchSpaceError",
    "Supernet",
    "load_merged_state_dict",
    "parse_param_count",
    "sample_within_budget",
]
__version__ = "0.1.0"
