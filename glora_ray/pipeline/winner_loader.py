"""Load an exported GLoRA winner as a plain timm model, with the preprocessing it was trained with.

This file is copied beside every export (``<dataset>/export/load_winner.py``) and needs only
torch, timm, numpy, Pillow and safetensors: glora-ray itself is not needed to use a winner.

    from load_winner import load_winner
    model, transform = load_winner("path/to/export")      # the folder holding subnet.json
    logits = model(transform(Image.open("x.png")).unsqueeze(0))

``transform`` is the preprocessing of the run (docs/method.md §4 in the glora-ray repository):
RGB, resized straight to the model's size with the recorded filter (no crop), scaled to [0, 1],
normalised with the recorded mean and std.  The record is ``subnet.json``'s "preprocessing".
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING}


def load_winner(folder: str | os.PathLike) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """The merged winner in ``folder`` (``merged.safetensors`` and ``subnet.json``) as a plain timm
    model in eval mode, and the function that turns a PIL image into its input tensor (C, H, W)."""
    with open(os.path.join(folder, "subnet.json")) as handle:
        record: dict[str, Any] = json.load(handle)
    model = timm.create_model(record["model"], pretrained=False, **record["create_model_kwargs"])
    state = load_file(os.path.join(folder, "merged.safetensors"))
    for key in record.get("added_bias_keys", []):  # a bias-less layer that gained one in the merge
        layer = model.get_submodule(key[: -len(".bias")])
        layer.bias = torch.nn.Parameter(torch.empty_like(state[key]))
    model.load_state_dict(state, strict=True)
    model.eval()
    prep = record["preprocessing"]
    size, resample = int(prep["size"]), _FILTERS[prep["interpolation"]]
    mean, std = np.asarray(prep["mean"], np.float32), np.asarray(prep["std"], np.float32)

    def transform(image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB").resize((size, size), resample), dtype=np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))

    return model, transform
