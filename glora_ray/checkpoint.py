"""The supernet checkpoint that stage 1 writes and stages 2 and 3 load.

A directory with ``supernet.json`` (a ``SupernetSpec``: backbone, classes, space, targets,
adapted layer types, dataset) and ``adapters.safetensors`` (support tensors and head only). The frozen backbone is
rebuilt from its recorded source, so a checkpoint stays small.
"""
from __future__ import annotations

from .errors import DamagedFileError, GLoRARayError, one_line

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import storage
from .backbone import BackboneConfig, create_backbone, empty_backbone
from .space import SearchSpace
from .supernet import Supernet

SPEC_FILE = "supernet.json"
ADAPTERS_FILE = "adapters.safetensors"


class CheckpointMismatchError(GLoRARayError):
    """A checkpoint trained for another model, space, dataset or class count."""


class MissingCheckpointError(GLoRARayError, FileNotFoundError):
    """No checkpoint (or training state) where one was expected."""


class NonFiniteCheckpointError(GLoRARayError):
    """A checkpoint holding NaN or infinite weights: a training that diverged (docs/method.md §7)."""


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def describe_names(names: list[str], limit: int = 3) -> str:
    """``"a, b, c, ... (7 in all)"`` for an error message."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


@dataclass
class SupernetSpec:
    """Everything needed to rebuild a supernet's structure and frozen weights."""

    backbone: BackboneConfig
    num_classes: int
    ranks: tuple[int, ...] = (8, 4)
    # Tensors whose kinds are narrowed (SearchSpace forms, by kind name); empty: the full space.
    forms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    targets: list[str] | str | None = None
    # Which module types are adapted, by name ("linear", "conv2d"; docs/method.md §7).
    layer_types: tuple[str, ...] = ("linear",)
    dataset: str = ""
    init: str = "kaiming"
    adapter_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(self.ranks, self.forms)

    def build(self) -> Supernet:
        """Backbone with its real weights, plus freshly initialised adapters (seeded)."""
        model = create_backbone(self.backbone, self.num_classes)
        generator = torch.Generator().manual_seed(self.adapter_seed)
        return Supernet(model, self.space, targets=self.targets, layer_types=self.layer_types, init=self.init,
                        generator=generator)

    def build_empty(self) -> Supernet:
        """The structure on the meta device, for ``load_state_dict(..., assign=True)``."""
        model = empty_backbone(self.backbone, self.num_classes)
        return Supernet(model, self.space, targets=self.targets, layer_types=self.layer_types, init=self.init)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ranks"] = list(self.ranks)
        data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SupernetSpec":
        data = dict(data)
        data["backbone"] = BackboneConfig.from_dict(data["backbone"])
        data["ranks"] = tuple(data["ranks"])
        data["forms"] = {t: tuple(kinds) for t, kinds in data.get("forms", {}).items()}
        if "layer_types" in data:
            data["layer_types"] = tuple(data["layer_types"])
        return cls(**data)

    def check_matches(self, expected: "SupernetSpec", where: str) -> None:
        """Refuse a checkpoint whose model, space, dataset or classes differ from ``expected``."""
        fields = {
            "model": (self.backbone.name, expected.backbone.name),
            "ranks": (tuple(self.ranks), tuple(expected.ranks)),
            "forms": (self.space.restricted_forms, expected.space.restricted_forms),
            "num_classes": (self.num_classes, expected.num_classes),
            "dataset": (self.dataset, expected.dataset),
            "targets": (self.targets, expected.targets),
            "layer_types": (tuple(self.layer_types), tuple(expected.layer_types)),
            "img_size": (self.backbone.img_size, expected.backbone.img_size),
        }
        for name, (have, want) in fields.items():
            if have != want:
                raise CheckpointMismatchError(f"{where}: checkpoint has {name}={have!r}, expected {want!r}")


def save_supernet(directory: str | os.PathLike, supernet: Supernet, spec: SupernetSpec) -> str:
    """Write the checkpoint into ``directory`` (a path or URI), each file atomically."""
    directory = os.fspath(directory)
    storage.write_bytes(storage.join(directory, ADAPTERS_FILE),
                        supernet.adapter_bytes({"model": spec.backbone.name, "dataset": spec.dataset}))
    storage.write_bytes(storage.join(directory, SPEC_FILE), json.dumps(spec.to_dict(), indent=2).encode())
    return directory


def read_spec(directory: str | os.PathLike) -> SupernetSpec:
    uri = storage.join(os.fspath(directory), SPEC_FILE)
    if not storage.exists(uri):
        raise MissingCheckpointError(f"{uri}: no supernet checkpoint here (expected {SPEC_FILE} and {ADAPTERS_FILE})")
    return SupernetSpec.from_dict(storage.read_json(uri))


def load_supernet(directory: str | os.PathLike, expected: SupernetSpec | None = None) -> tuple[Supernet, SupernetSpec]:
    """Rebuild a trained supernet from ``directory`` (a path or URI, like the results); with
    ``expected``, refuse a mismatched checkpoint first."""
    spec = read_spec(directory)
    if expected is not None:
        spec.check_matches(expected, str(directory))
    supernet = spec.build()
    _load_adapter_file(supernet, directory)
    check_finite(supernet, directory)
    return supernet, spec


def check_finite(supernet: Supernet, directory: str | os.PathLike) -> None:
    """Refuse a checkpoint whose adapters or head hold NaN or infinite values: searching, testing or
    exporting it would only report chance accuracy as a result."""
    bad = nonfinite_tensors(supernet.adapter_state_dict())
    if bad:
        raise NonFiniteCheckpointError(
            f"{os.fspath(directory)}: the checkpoint holds non-finite weights ({describe_names(bad)}): its training "
            f"diverged; train again with a lower lr or narrower forms (docs/method.md §7)"
        )


def load_adapters_into(supernet: Supernet, directory: str | os.PathLike, expected: SupernetSpec) -> None:
    """Overwrite ``supernet``'s adapters and head with those of the checkpoint in ``directory``
    (e.g. to start a retraining from a trained supernet); a checkpoint of another spec is refused."""
    read_spec(directory).check_matches(expected, str(directory))
    _load_adapter_file(supernet, directory)
    check_finite(supernet, directory)


def _load_adapter_file(supernet: Supernet, directory: str | os.PathLike) -> None:
    uri = storage.join(os.fspath(directory), ADAPTERS_FILE)
    local = storage.local_path(uri)
    try:
        if local is not None:
            supernet.load_adapters(local)
            return
        with tempfile.TemporaryDirectory(prefix="glora-adapters-") as local:  # safetensors reads files
            path = os.path.join(local, ADAPTERS_FILE)
            with open(path, "wb") as handle:
                handle.write(storage.read_bytes(uri))
            supernet.load_adapters(path)
    except GLoRARayError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own errors on a cut or foreign file
        raise DamagedFileError(f"{uri} is damaged ({one_line(err)}); remove the folder {os.fspath(directory)} and "
                               f"run the same command again: it is rebuilt from the last training checkpoint") from None


def adapters_readable(directory: str) -> bool:
    """Whether the checkpoint's adapter file parses whole (a cheap look, no model built)."""
    from safetensors.torch import load as load_bytes

    try:
        load_bytes(storage.read_bytes(storage.join(directory, ADAPTERS_FILE)))
        read_spec(directory)
    except Exception:  # noqa: BLE001 - any failure means: not usable as it is
        return False
    return True


def numpy_state(supernet: Supernet) -> dict[str, np.ndarray]:
    """The whole supernet state as numpy arrays: what ``ray.put`` shares zero-copy."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in supernet.state_dict().items()}


def supernet_from_numpy(spec: SupernetSpec, state: dict[str, np.ndarray]) -> Supernet:
    """A supernet whose tensors are views of ``state`` (no copy). Never write into it in place."""
    supernet = spec.build_empty()
    with warnings.catch_warnings():
        # Shared object-store arrays are read-only by design; torch warns about exactly that.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    supernet.load_state_dict(tensors, strict=True, assign=True)
    return supernet.requires_grad_(False)
