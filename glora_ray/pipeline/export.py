"""Stage 3 export: the winner merged into plain timm weights, its subnet, and its adapters.

``merged.safetensors`` loads with no glora_ray import::

    model = timm.create_model(subnet["model"], **subnet["create_model_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("merged.safetensors"))

Biases that a merge gives bias-less layers are folded into the BatchNorms reading them
(docs/method.md §7).  Where one cannot be, ``subnet["loader"]`` (also in the file's metadata) is
``glora_ray.load_merged_state_dict`` and ``subnet["added_bias_keys"]`` names the extra biases;
otherwise it is ``load_state_dict``.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.torch import save as safetensors_bytes

from .. import storage
from ..backbone import plain_model_kwargs
from ..checkpoint import SupernetSpec
from ..data import DataConfig
from ..supernet import Supernet
from . import winner_loader

MERGED_FILE = "merged.safetensors"
LOADER_FILE = "load_winner.py"  # winner_loader.py: the export loaded with torch and timm alone
SUBNET_FILE = "subnet.json"
ADAPTERS_FILE = "adapters.safetensors"


@dataclass
class ExportedWinner:
    merged_uri: str
    subnet_uri: str
    adapters_uri: str


PLAIN_LOADER = "load_state_dict"
GLORA_LOADER = "glora_ray.load_merged_state_dict"


def subnet_record(supernet: Supernet, spec: SupernetSpec, genes: np.ndarray, added_bias_keys: list[str],
                  data: DataConfig, **scores: Any) -> dict[str, Any]:
    """Everything needed to rebuild, load and cite the winner, and to feed it images as it was trained."""
    layers = supernet.decode(genes)
    return {
        "model": spec.backbone.name,
        "create_model_kwargs": plain_model_kwargs(spec.backbone, spec.num_classes),
        # docs/method.md §4: RGB, resized straight to size x size with this filter, /255, (x - mean) / std.
        "preprocessing": {"size": data.img_size, "mean": list(data.mean), "std": list(data.std),
                          "interpolation": data.interpolation, "crop": None},
        "loader": GLORA_LOADER if added_bias_keys else PLAIN_LOADER,
        "added_bias_keys": added_bias_keys,
        "dataset": spec.dataset,
        "ranks": list(spec.ranks),
        "forms": {t: list(kinds) for t, kinds in spec.space.restricted_forms.items()},
        "key": supernet.subnet_key(genes),
        "params": supernet.num_params(genes),
        "head_params": supernet.head_num_params,
        "layers": layers,
        "layer_params": {name: supernet.layer(name).num_params(choice) for name, choice in layers.items()},
        **scores,
    }


def export_winner(supernet: Supernet, spec: SupernetSpec, genes: np.ndarray, out_uri: str, data: DataConfig,
                  **scores: Any) -> ExportedWinner:
    """Write the artefacts under ``out_uri``, each atomically, and ``LOADER_FILE`` beside them."""
    state = supernet.merged_state_dict(genes)
    record = subnet_record(supernet, spec, genes, supernet.added_bias_keys(state), data, **scores)
    # Clone: a merged state dict references the supernet's own tensors, which may be shared.
    merged = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"model": spec.backbone.name, "create_model_kwargs": json.dumps(record["create_model_kwargs"]),
                "key": record["key"], "loader": record["loader"]}
    paths = ExportedWinner(
        merged_uri=storage.join(out_uri, MERGED_FILE),
        subnet_uri=storage.join(out_uri, SUBNET_FILE),
        adapters_uri=storage.join(out_uri, ADAPTERS_FILE),
    )
    storage.write_bytes(paths.merged_uri, safetensors_bytes(merged, metadata=metadata))
    storage.write_bytes(paths.adapters_uri, supernet.adapter_bytes({"model": spec.backbone.name, "dataset": spec.dataset}))
    storage.write_json(paths.subnet_uri, record)
    storage.write_bytes(storage.join(out_uri, LOADER_FILE), inspect.getsource(winner_loader).encode())
    return paths
