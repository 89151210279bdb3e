"""glora-ray: GLoRA supernets, trained with Ray Train and searched on a Ray actor pool."""
from .errors import GLoRARayError, GLoRARayTypeError
from .budget import Budget, InfeasibleBudgetError, parse_param_count, sample_within_budget
from .layer import GLoRALinear, GLoRASupport
from .params import ParamCounter
from .space import TENSORS, SearchSpace, SearchSpaceError
from .supernet import Supernet

__all__ = [
    "TENSORS",
    "Budget",
    "GLoRALinear",
    "GLoRARayError",
    "GLoRARayTypeError",
    "GLoRASupport",
    "InfeasibleBudgetError",
    "ParamCounter",
    "SearchSpace",
    "SearchSpaceError",
    "Supernet",
    "parse_param_count",
    "sample_within_budget",
]
__version__ = "0.1.0"
