"""The exported winner's inference cost against the plain backbone's (the paper's Table 3).

A merged winner is a plain timm model of the backbone's architecture (docs/method.md §1.6), so it
should cost what the backbone costs.  Measured, not assumed: FLOPs of one image through each
(torch's FLOP counter) and images per second at batch 1, 4 and 16, the two models timed in
alternation, round after round, and the median kept, so a drifting machine slows both alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

BATCHES = (1, 4, 16)
ROUNDS = 5  # timed rounds per batch size; the first forward of each model is an untimed warm-up
INFERENCE_FILE = "inference.json"


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (matmuls and convolutions, as torch counts them)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def _images_per_s(model: nn.Module, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    return len(batch) / (time.perf_counter() - start)


@torch.inference_mode()
def compare_inference(merged: nn.Module, backbone: nn.Module, img_size: int, device: torch.device | str,
                      batches: Sequence[int] = BATCHES, rounds: int = ROUNDS, seed: int = 0) -> dict[str, Any]:
    """FLOPs per image and images/s per batch size of ``merged`` and ``backbone``, and their ratios."""
    device = torch.device(device)
    models = {"merged": merged.eval().to(device), "backbone": backbone.eval().to(device)}
    generator = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, 3, img_size, img_size, generator=generator).to(device) for b in batches}
    counted = {name: flops(model, inputs[batches[0]][:1]) for name, model in models.items()}
    speeds: dict[int, dict[str, list[float]]] = {b: {name: [] for name in models} for b in batches}
    for batch in batches:
        for model in models.values():
            model(inputs[batch])  # warm-up: allocations, lazy kernels
        for round_ in range(rounds):
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                speeds[batch][name].append(_images_per_s(models[name], inputs[batch]))
    per_batch = {}
    for batch, by_model in speeds.items():
        merged_ips, backbone_ips = (statistics.median(by_model[name]) for name in ("merged", "backbone"))
        per_batch[str(batch)] = {"merged_images_per_s": merged_ips, "backbone_images_per_s": backbone_ips,
                                 "ratio": merged_ips / backbone_ips}
    return {"device": str(device), "threads": torch.get_num_threads(), "rounds": rounds, "img_size": img_size,
            "flops_per_image": counted, "flops_equal": counted["merged"] == counted["backbone"],
            "batches": per_batch}


def winner_inference(checkpoint_dir: str, genes: Any) -> dict[str, Any]:
    """``compare_inference`` of the winner merged from ``checkpoint_dir`` (what is exported) and of
    the plain backbone it came from, on this process's device (a GPU when Ray gave it one)."""
    import timm

    from ..backbone import plain_model_kwargs
    from ..checkpoint import load_supernet
    from ..search.evaluator import default_device

    supernet, spec = load_supernet(checkpoint_dir)
    merged = supernet.merged(genes)
    backbone = timm.create_model(spec.backbone.name, pretrained=False, **plain_model_kwargs(spec.backbone, spec.num_classes))
    return compare_inference(merged, backbone, spec.backbone.img_size, default_device())


def describe(record: dict[str, Any]) -> str:
    """One line: the speed ratio per batch size and whether the FLOPs are equal."""
    # By batch size: a record read back from JSON has its keys as strings, sorted "1", "16", "4".
    batches = sorted(record["batches"].items(), key=lambda item: int(item[0]))
    ratios = ", ".join(f"{b}: {v['ratio']:.2f}x" for b, v in batches)
    flop = record["flops_per_image"]["merged"] / 1e9
    same = "equal" if record["flops_equal"] else f"NOT equal (backbone {record['flops_per_image']['backbone'] / 1e9:.3f})"
    return f"merged winner / plain backbone, images/s by batch {ratios}; FLOPs {same} ({flop:.3f} GFLOPs per image)"


def read_inference(out: str, unit_path: str) -> dict[str, Any]:
    """The ``inference.json`` a run stored for one unit."""
    from .. import storage
    from . import layout

    return storage.read_json(storage.join(layout.export_uri(out, unit_path), INFERENCE_FILE), dict)
