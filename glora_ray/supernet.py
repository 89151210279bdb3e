"""The GLoRA supernet over any torch model: adapt matching layers, choose subnets, merge."""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import GLoRARayError, GLoRARayTypeError
from .fold import FoldPlan, plan_bias_folds
from .layers import ADAPTABLE_LAYER_TYPES, GLoRALayer
from .params import ParamCounter
from .space import Choice, SearchSpace, SearchSpaceError, Subnet

SubnetLike = Subnet | np.ndarray | Sequence[int] | str


def find_classifier_name(model: nn.Module) -> str | None:
    """The classifier head's module name: timm's ``get_classifier()``, else the last nn.Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        for name, module in model.named_modules():
            if module is head and name:
                return name
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear_names[-1] if linear_names else None


def match_targets(name: str, targets: str | Sequence[str] | None) -> bool:
    """PEFT-style matching: a string is a full regex; a list matches by name or dotted suffix."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


LayerTypes = Sequence[str | type[nn.Module]]


def resolve_layer_types(layer_types: LayerTypes) -> tuple[type[GLoRALayer], ...]:
    """The GLoRA layer classes for ``layer_types``: names of ``ADAPTABLE_LAYER_TYPES`` and/or
    base module classes (``nn.Linear``, ``nn.Conv2d`` or subclasses of them)."""
    valid = f"names {sorted(ADAPTABLE_LAYER_TYPES)} or the classes " + ", ".join(
        f"torch.nn.{a.base_type.__name__}" for a in ADAPTABLE_LAYER_TYPES.values())
    if isinstance(layer_types, (str, type)) or not isinstance(layer_types, Sequence) or not layer_types:
        raise GLoRARayTypeError(f"layer_types must be a non-empty sequence of {valid}, got {layer_types!r}")
    adapters = []
    for entry in layer_types:
        if isinstance(entry, str) and entry in ADAPTABLE_LAYER_TYPES:
            adapter = ADAPTABLE_LAYER_TYPES[entry]
        elif isinstance(entry, type):
            adapter = next((a for a in ADAPTABLE_LAYER_TYPES.values() if issubclass(entry, a.base_type)), None)
            if adapter is None:
                raise GLoRARayTypeError(f"layer_types: {entry.__name__} cannot be adapted; valid are {valid}")
        else:
            raise GLoRARayError(f"layer_types: {entry!r} is not adaptable; valid are {valid}")
        if adapter not in adapters:
            adapters.append(adapter)
    return tuple(adapters)


def _adapter_for(module: nn.Module, adapters: Sequence[type[GLoRALayer]]) -> type[GLoRALayer] | None:
    return next((a for a in adapters if isinstance(module, a.base_type)), None)


def _check_model(model: object) -> None:
    if isinstance(model, Supernet):
        raise GLoRARayTypeError("model is already a Supernet; pass the plain model (e.g. supernet.model is "
                                "adapted in place, so build one Supernet per fresh model)")
    if not isinstance(model, nn.Module):
        raise GLoRARayTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapted = next((n for n, m in model.named_modules() if isinstance(m, GLoRALayer)), None)
    if adapted is not None:
        raise GLoRARayError(f"model already holds GLoRA layers (e.g. {adapted!r}): a Supernet adapts a model in "
                            f"place, once; build the second one on a fresh model")


def _check_head(model: nn.Module, head: object) -> None:
    if not isinstance(head, str):
        raise GLoRARayTypeError(f"head must be the classifier's module name (a str) or None, got {head!r}")
    names = {n for n, _ in model.named_modules() if n}
    if head not in names:
        guess = find_classifier_name(model)
        raise GLoRARayError(f"head {head!r} is not a module of {type(model).__name__}; pass its classifier's "
                            f"module name (found: {guess!r}) or None to find it")


class Supernet(nn.Module):
    """Wraps ``model`` in place: matching layers of ``layer_types`` become GLoRA layers.

    A layer is adapted when its type is one of ``layer_types`` (default: every ``nn.Linear``),
    its name matches ``targets`` and it is not the classifier head.  Everything but the support
    tensors and the head is frozen, and the backbone's normalisation layers stay in eval mode
    (their running statistics never change; docs/method.md §7).
    """

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        targets: str | Sequence[str] | None = None,
        head: str | None = None,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
        layer_types: LayerTypes = ("linear",),
    ):
        _check_model(model)
        if not isinstance(space, SearchSpace):
            raise GLoRARayTypeError(f"space must be a glora_ray.SearchSpace (e.g. SearchSpace((8, 4))), "
                                    f"got {type(space).__name__} {space!r}")
        if head is not None:
            _check_head(model, head)
        adapters = resolve_layer_types(layer_types)
        super().__init__()
        self.model = model
        self.space = space
        self.head_name = head if head is not None else find_classifier_name(model)
        chosen = [
            (n, adapter) for n, m in model.named_modules()
            if (adapter := _adapter_for(m, adapters)) is not None and n != self.head_name and match_targets(n, targets)
        ]
        if not chosen:
            kinds = " / ".join(f"nn.{a.base_type.__name__}" for a in adapters)
            candidates = [n for n, m in model.named_modules() if _adapter_for(m, adapters) is not None]
            raise GLoRARayError(
                f"targets {targets!r} match no {kinds} of {type(model).__name__} "
                f"(its layers of that type include {candidates[:6]}; head {self.head_name!r} is never adapted)"
            )
        model.requires_grad_(False)
        for name, adapter in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, adapter(getattr(parent, child), space, init=init, generator=generator))
        self.layer_names: tuple[str, ...] = tuple(n for n, _ in chosen)
        if self.head_name is not None:
            self.head.requires_grad_(True)
        self.counter = ParamCounter(space, [(l.d_in, l.d_out) for l in self.layers()],
                                    [l.inert_tensors for l in self.layers()])
        head_prefix = None if self.head_name is None else self.head_name + "."
        # Frozen normalisation: anything tracking running statistics, outside the head.
        self._frozen_norms = [
            m for n, m in model.named_modules()
            if getattr(m, "track_running_stats", False) and not (n == self.head_name or head_prefix and n.startswith(head_prefix))
        ]
        self._fold_plan: FoldPlan | None = None
        self.train(self.training)

    def train(self, mode: bool = True) -> "Supernet":
        """Train mode for adapters and head; the backbone's norm layers stay in eval mode."""
        super().train(mode)
        for norm in getattr(self, "_frozen_norms", ()):
            norm.eval()
        return self

    # -- structure ---------------------------------------------------------------------
    @property
    def head(self) -> nn.Module | None:
        return None if self.head_name is None else self.model.get_submodule(self.head_name)

    def layers(self) -> Iterator[GLoRALayer]:
        for name in self.layer_names:
            yield self.model.get_submodule(name)

    def layer(self, name: str) -> GLoRALayer:
        return self.model.get_submodule(name)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- subnets -----------------------------------------------------------------------
    def to_genes(self, subnet: SubnetLike) -> np.ndarray:
        """Any accepted subnet form (mapping, gene array, string key) as validated genes: in the
        space, and no form a layer does not offer (an inert tensor, ``ParamCounter.check``)."""
        if isinstance(subnet, str):
            genes = self.space.genes_from_string(subnet, self.num_layers)
        elif isinstance(subnet, Mapping):
            genes = self.space.encode(subnet, self.layer_names)
        else:
            genes = self.space.validate_genes(np.asarray(subnet), self.num_layers)
        return self.counter.check(genes, self.layer_names)

    def decode(self, subnet: SubnetLike) -> dict[str, dict[str, str]]:
        return self.space.decode(self.to_genes(subnet), self.layer_names)

    def subnet_key(self, subnet: SubnetLike) -> str:
        return self.space.genes_to_string(self.to_genes(subnet))

    def layer_choices(self, subnet: SubnetLike) -> list[tuple[Choice, ...]]:
        """``subnet`` as one ``Choice`` per tensor per layer: the form the layers take."""
        genes = self.to_genes(subnet).reshape(self.num_layers, -1)
        return [self.space.choices_from_genes(g, n) for g, n in zip(genes, self.layer_names)]

    def set_subnet(self, subnet: SubnetLike) -> None:
        for layer, choices in zip(self.layers(), self.layer_choices(subnet)):
            layer.set_choice(choices)

    def current_subnet(self) -> dict[str, dict[str, str]]:
        return {n: l.choice for n, l in zip(self.layer_names, self.layers())}

    def largest_subnet(self) -> np.ndarray:
        return self.counter.largest()

    def sample_subnet(self, rng: np.random.Generator) -> dict[str, dict[str, str]]:
        return self.space.decode(self.sample_genes(rng), self.layer_names)

    def sample_genes(self, rng: np.random.Generator) -> np.ndarray:
        return self.counter.draw(rng)

    def num_params(self, subnet: SubnetLike | None = None) -> int:
        """Adapter parameters of ``subnet`` (default: the current one); the head is not counted."""
        if subnet is None:
            return sum(l.num_params() for l in self.layers())
        return self.counter.count(self.to_genes(subnet))

    @property
    def head_num_params(self) -> int:
        head = self.head
        return 0 if head is None else sum(p.numel() for p in head.parameters())

    # -- parameters and state ------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Support tensors and head only, keyed as in ``self.model``: no frozen backbone."""
        prefixes = tuple(f"{n}.glora." for n in self.layer_names)
        if self.head_name is not None:
            prefixes += (f"{self.head_name}.",)
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(prefixes)}

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise GLoRARayError(f"adapter state does not match this supernet: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise GLoRARayError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        self.model.load_state_dict(dict(state), strict=False)

    def adapter_metadata(self) -> dict[str, str]:
        """What ``load_adapters`` checks: the space and the adapted layers."""
        return {"space": json.dumps(self.space.to_dict()), "layers": json.dumps(list(self.layer_names))}

    def adapter_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """The adapter state as safetensors bytes (for any storage backend)."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        return save(tensors, metadata={**self.adapter_metadata(), **(metadata or {})})

    def save_adapters(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the adapter state as safetensors, atomically (temporary name, then rename)."""
        from . import storage  # pyarrow only when saving

        storage.write_bytes(os.fspath(path), self.adapter_bytes(metadata))

    def load_adapters(self, path: str | os.PathLike) -> dict[str, str]:
        """Load adapters saved by ``save_adapters``; refuses a different space or layer set."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "space" in meta and SearchSpace.from_dict(json.loads(meta["space"])) != self.space:
            raise SearchSpaceError(f"{path}: adapters were trained for space {meta['space']}, this supernet has {self.space.to_dict()}")
        if "layers" in meta and tuple(json.loads(meta["layers"])) != self.layer_names:
            raise GLoRARayError(f"{path}: adapters were saved for other adapted layers than this supernet's")
        device = next(iter(self.adapter_state_dict().values())).device
        self.load_adapter_state_dict(load_file(os.fspath(path), device=str(device)))
        return meta

    # -- merging -----------------------------------------------------------------------
    def _merge_choices(self, subnet: SubnetLike | None) -> list[tuple[Choice, ...] | None]:
        return [None] * self.num_layers if subnet is None else self.layer_choices(subnet)

    def fold_plan(self, example_input: torch.Tensor | None = None) -> FoldPlan:
        """Which BatchNorm absorbs the merged bias of each bias-less adapted layer (docs/method.md §7).

        Found once, by one forward of ``example_input`` (default: a zero image of the model's
        configured input size) recording which function reads each such layer's output, and
        cached: the structure never changes.  Pass ``example_input`` for a model without a timm
        configuration; it replaces the cached plan.
        """
        if example_input is not None or getattr(self, "_fold_plan", None) is None:
            self._fold_plan = plan_bias_folds(self.model, dict(zip(self.layer_names, self.layers())), example_input)
        return self._fold_plan

    def merged_state_dict(self, subnet: SubnetLike | None = None) -> dict[str, torch.Tensor]:
        """State dict of the plain model with ``subnet`` (default: the current one) merged in.

        Adapted layers get new tensors, built out of place; every other entry is the
        supernet's own tensor (not a copy), so shared read-only weights stay shared.  A layer
        without a bias gets one when E or C is chosen (docs/method.md §1.6); where that layer's
        output goes straight into a BatchNorm, the bias is folded into a new running mean
        instead (``fold_plan``, docs/method.md §7), so the state loads strictly into the plain
        architecture.  Otherwise the bias stays (``added_bias_keys`` names it): load such a state
        with ``load_merged_state_dict``.
        """
        prefixes = tuple(f"{n}." for n in self.layer_names)
        merged = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefixes)}
        for name, layer, choices in zip(self.layer_names, self.layers(), self._merge_choices(subnet)):
            weight, bias = layer.merged_weight_and_bias(choices)
            merged[f"{name}.weight"] = weight
            if bias is not None:
                merged[f"{name}.bias"] = bias
        self.fold_plan().fold_state(merged)
        return merged

    def added_bias_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys of a merged ``state`` that the plain architecture lacks: biases of bias-less
        layers that could not be folded.  Empty: the state loads with plain ``load_state_dict``."""
        return [f"{n}.bias" for n, l in zip(self.layer_names, self.layers())
                if l.base.bias is None and f"{n}.bias" in state]

    def merged(self, subnet: SubnetLike | None = None) -> nn.Module:
        """A plain copy of the model with ``subnet`` merged in: no GLoRA module is left, and
        biases are folded into BatchNorms as in ``merged_state_dict``."""
        plain = copy.deepcopy(self.model)
        for name, choices in zip(self.layer_names, self._merge_choices(subnet)):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name)
            setattr(parent, child, getattr(parent, child).merged(choices))
        self.fold_plan().fold_module(plain)
        plain.requires_grad_(True)
        return plain

def load_merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a merged state dict (``Supernet.merged_state_dict``) into the plain model, strictly.

    A bias-less layer whose merged bias could not be folded into a BatchNorm (``Supernet.fold_plan``,
    docs/method.md §7) gets a bias parameter first, so the plain model computes exactly what the
    subnet computes.  A state without such biases loads as with ``model.load_state_dict``.
    """
    own = model.state_dict()
    for key in state:
        module_name, _, leaf = key.rpartition(".")
        if key in own or leaf != "bias":
            continue
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, nn.Module) and getattr(module, "bias", False) is None and f"{module_name}.weight" in own:
            module.bias = nn.Parameter(torch.empty_like(state[key], device=own[f"{module_name}.weight"].device))
    model.load_state_dict(dict(state), strict=True)
