"""The GLoRA supernet over any torch model: adapt matching linear layers, choose subnets, merge."""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .layer import GLoRALinear
from .params import ParamCounter
from .space import SearchSpace, SearchSpaceError, Subnet

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


class Supernet(nn.Module):
    """Wraps ``model`` in place: matching ``nn.Linear`` layers become ``GLoRALinear``.

    Everything but the support tensors and the classifier head is frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        targets: str | Sequence[str] | None = None,
        head: str | None = None,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.model = model
        self.space = space
        self.head_name = head if head is not None else find_classifier_name(model)
        names = [
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != self.head_name and match_targets(n, targets)
        ]
        if not names:
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"targets {targets!r} match no nn.Linear of {type(model).__name__} "
                f"(its linear layers include {linear[:6]}; head {self.head_name!r} is never adapted)"
            )
        model.requires_grad_(False)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, GLoRALinear(getattr(parent, child), space, init=init, generator=generator))
        self.layer_names: tuple[str, ...] = tuple(names)
        if self.head_name is not None:
            self.head.requires_grad_(True)
        self.counter = ParamCounter(space, [(l.in_features, l.out_features) for l in self.layers()])

    # -- structure ---------------------------------------------------------------------
    @property
    def head(self) -> nn.Module | None:
        return None if self.head_name is None else self.model.get_submodule(self.head_name)

    def layers(self) -> Iterator[GLoRALinear]:
        for name in self.layer_names:
            yield self.model.get_submodule(name)

    def layer(self, name: str) -> GLoRALinear:
        return self.model.get_submodule(name)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- subnets -----------------------------------------------------------------------
    def to_genes(self, subnet: SubnetLike) -> np.ndarray:
        """Any accepted subnet form (mapping, gene array, string key) as validated genes."""
        if isinstance(subnet, str):
            return self.space.genes_from_string(subnet, self.num_layers)
        if isinstance(subnet, Mapping):
            return self.space.encode(subnet, self.layer_names)
        return self.space.validate_genes(np.asarray(subnet), self.num_layers)

    def decode(self, subnet: SubnetLike) -> dict[str, dict[str, str]]:
        return self.space.decode(self.to_genes(subnet), self.layer_names)

    def subnet_key(self, subnet: SubnetLike) -> str:
        return self.space.genes_to_string(self.to_genes(subnet))

    def set_subnet(self, subnet: SubnetLike) -> None:
        genes = self.to_genes(subnet).reshape(self.num_layers, -1)
        for layer, layer_genes in zip(self.layers(), genes):
            layer.set_choice_genes(layer_genes)

    def current_subnet(self) -> dict[str, dict[str, str]]:
        return {n: l.choice for n, l in zip(self.layer_names, self.layers())}

    def largest_subnet(self) -> np.ndarray:
        return np.zeros(self.space.num_genes(self.num_layers), dtype=np.int8)

    def sample_subnet(self, rng: np.random.Generator) -> dict[str, dict[str, str]]:
        return self.space.decode(self.sample_genes(rng), self.layer_names)

    def sample_genes(self, rng: np.random.Generator) -> np.ndarray:
        return self.space.sample_genes(rng, self.num_layers)

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
            raise ValueError(f"adapter state does not match this supernet: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
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
            raise ValueError(f"{path}: adapters were saved for other adapted layers than this supernet's")
        device = next(iter(self.adapter_state_dict().values())).device
        self.load_adapter_state_dict(load_file(os.fspath(path), device=str(device)))
        return meta

    # -- merging -----------------------------------------------------------------------
    def merged_state_dict(self, subnet: SubnetLike | None = None) -> dict[str, torch.Tensor]:
        """State dict of the plain model with ``subnet`` merged in.

        Adapted layers get new tensors, built out of place; every other entry is the
        supernet's own tensor (not a copy), so shared read-only weights stay shared.
        """
        genes = None if subnet is None else self.to_genes(subnet).reshape(self.num_layers, -1)
        prefixes = tuple(f"{n}." for n in self.layer_names)
        merged = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefixes)}
        for i, (name, layer) in enumerate(zip(self.layer_names, self.layers())):
            choice = None if genes is None else self.space.decode_layer(genes[i], name)
            weight, bias = layer.merged_weight_and_bias(choice)
            merged[f"{name}.weight"] = weight
            if bias is not None:
                merged[f"{name}.bias"] = bias
        return merged

    def merged(self, subnet: SubnetLike | None = None) -> nn.Module:
        """A plain copy of the model with ``subnet`` merged in: no GLoRA module is left."""
        genes = None if subnet is None else self.to_genes(subnet).reshape(self.num_layers, -1)
        plain = copy.deepcopy(self.model)
        for i, name in enumerate(self.layer_names):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name)
            layer: GLoRALinear = getattr(parent, child)
            choice = None if genes is None else self.space.decode_layer(genes[i], name)
            setattr(parent, child, layer.merged(choice))
        plain.requires_grad_(True)
        return plain

