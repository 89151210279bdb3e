"""The winner as a HuggingFace PEFT LoRA adapter, for subnets that are LoRA with a rank per layer.

A subnet whose every layer has B = ``lora<k>`` or ``none`` and A, C, D, E ``none`` computes
``W0 + B_down B_up`` in each layer (docs/method.md §1): PEFT's LoRA with ``lora_B = B_down``,
``lora_A = B_up`` and a scaling ``lora_alpha / r`` of 1, the rank of each layer given through
``rank_pattern`` (and ``alpha_pattern``).  The classifier head, trained in full, is saved as a
module to save.  A search restricted to these forms (``--forms-A none --forms-B lora none
--forms-C none --forms-D none --forms-E none``) answers "which rank for each layer?".

PEFT builds and writes the files itself (``save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained`` loads onto the timm model.
Supported layers: ``nn.Linear`` and a plain ``nn.Conv2d`` (no groups, no dilation, no
"same"-padding subclass), where PEFT's LoRA equals GLoRA's.  Anything else is refused naming the
layer; the merged export always works.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import storage
from ..errors import GLoRARayError
from ..space import TENSORS, Kind
from ..supernet import Supernet

PEFT_DIR = "peft"


class PeftExportError(GLoRARayError):
    """A winner that PEFT's LoRA cannot express, or PEFT missing."""


def lora_ranks(supernet: Supernet, genes: np.ndarray) -> dict[str, int]:
    """Each adapted layer's LoRA rank (layers with B ``none`` left out), or a ``PeftExportError``
    naming the first layer that is not LoRA-form or that PEFT's LoRA cannot hold."""
    ranks: dict[str, int] = {}
    for (name, layer), choices in zip(zip(supernet.layer_names, supernet.layers()), supernet.layer_choices(genes)):
        named = dict(zip(TENSORS, choices))
        others = {t: c.name for t, c in named.items() if t != "B" and c.kind is not Kind.NONE}
        if others or named["B"].kind not in (Kind.LORA, Kind.NONE):
            used = {**others, **({"B": named["B"].name} if named["B"].kind not in (Kind.LORA, Kind.NONE) else {})}
            raise PeftExportError(f"layer {name!r} uses {used}: PEFT's LoRA holds only B = lora<k> or none with A, C, "
                                  f"D, E none; use the merged export (or search with --forms-A none --forms-B lora none "
                                  f"--forms-C none --forms-D none --forms-E none)")
        if named["B"].kind is Kind.NONE:
            continue
        base = layer.base
        if isinstance(base, nn.Conv2d) and (type(base) is not nn.Conv2d or base.groups != 1 or base.dilation != (1, 1)
                                            or base.padding_mode != "zeros"):
            raise PeftExportError(f"layer {name!r} is a {type(base).__name__} (groups {base.groups}, dilation "
                                  f"{base.dilation}) that PEFT's LoRA does not reproduce; use the merged export")
        ranks[name] = named["B"].rank
    if not ranks:
        raise PeftExportError("the winner adapts no layer (every B is none): there is no LoRA to export")
    return ranks


def export_peft(supernet: Supernet, genes: np.ndarray, out_uri: str) -> str:
    """Write the PEFT adapter of the winner ``genes`` under ``out_uri``/peft; returns that folder."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise PeftExportError(f"--export peft needs the peft package ({err}): pip install peft") from None
    ranks = lora_ranks(supernet, genes)
    plain = supernet.merged(_empty(supernet))  # the frozen backbone with the trained head
    patterns = {re.escape(name): rank for name, rank in ranks.items()}
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(ranks),
                        rank_pattern=patterns, alpha_pattern=patterns, lora_dropout=0.0, bias="none",
                        modules_to_save=[supernet.head_name] if supernet.head_name else None)
    model = get_peft_model(plain, config)
    with torch.no_grad():
        for name, choices in zip(supernet.layer_names, supernet.layer_choices(genes)):
            if name not in ranks:
                continue
            b = supernet.layer(name).terms(choices)[TENSORS.index("B")]  # the LowRank B of this choice
            wrapped = model.base_model.model.get_submodule(name)
            lora_a, lora_b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
            lora_a.copy_(b.up.reshape(lora_a.shape))
            lora_b.copy_(b.down.reshape(lora_b.shape))
    folder = storage.join(out_uri, PEFT_DIR)
    with tempfile.TemporaryDirectory(prefix="glora-peft-") as staging:
        model.save_pretrained(staging)
        storage.install_dir(Path(staging), folder)
    return folder


def _empty(supernet: Supernet) -> np.ndarray:
    """The subnet with every tensor none: the plain backbone and the trained head."""
    return supernet.to_genes({name: supernet.space.empty_layer_choice() for name in supernet.layer_names})
