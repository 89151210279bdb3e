"""Issue 6, item 4: the supernet's training step against plain LoRA and against the head alone.

All three run the engine's own training code, ``SupernetTraining.run_epoch`` -> ``train_epoch``
(AdamW, the warm-up/cosine schedule, a subnet drawn every step, SupernetTraining's DataLoader
over in-memory arrays, stochastic depth 0.1), on the same data, batch and threads, timed one
epoch of a few steps at a time, interleaved:

  supernet   every adapted layer draws its own random choice every step (docs/method.md §2);
  lora       one fixed subnet, B = LoRA of the largest rank and A, C, D, E none in every
             adapted layer: plain LoRA on the same layers;
  head       one fixed subnet with every tensor none: only the classifier head trains (a linear
             probe; the backward pass stops at the head).

With --precisions fp32,bf16 (issue 14) the supernet runs again in each further precision
(``TrainConfig.precision``: bf16 autocast, TF32 on CUDA), timed in the same rounds; with
--layouts auto,channels_last (or contiguous) it runs again in each further memory layout
(``TrainConfig.channels_last``; ``auto`` is channels-last for a CNN).

A fixed subnet is a ``Supernet`` whose ``set_subnet`` applies the pinned genes (the per-step draw
is still made, so the loop is the same).  Ray-free (``gpu_check`` calls ``main``).

    python -m bench.train_step --size small
    python -m bench.train_step --size small --family cnn    # EfficientNet-Lite0, GLoRA on its convolutions
    python -m bench.train_step --size small --family cnn --layouts auto,channels_last
    python -m bench.train_step --size base --device cuda
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (
    CLOCKS, BenchError, add_common_args, add_family_arg, comma_list, machine_info, make_spec, measure_interleaved, prepare_environment, preset,
    random_labels, run_bench, say, synthetic_images, timing_setup,
)
from glora_ray.supernet import Supernet

DROP_PATH_RATE = 0.1  # docs/method.md §2


class PinnedSupernet(Supernet):
    """A supernet trained as one fixed subnet: whatever ``set_subnet`` is given, it applies
    ``pinned`` (set with ``pin``)."""

    pinned: np.ndarray | None = None

    def pin(self, subnet) -> "PinnedSupernet":
        self.pinned = self.to_genes(subnet)
        super().set_subnet(self.pinned)
        return self

    def set_subnet(self, subnet) -> None:
        super().set_subnet(self.pinned if self.pinned is not None else subnet)


def build(spec, cls: type[Supernet] = Supernet) -> Supernet:
    """As ``SupernetSpec.build`` (same backbone seed, same adapter generator), as ``cls``."""
    from glora_ray.backbone import create_backbone

    generator = torch.Generator().manual_seed(spec.adapter_seed)
    return cls(create_backbone(spec.backbone, spec.num_classes), spec.space, targets=spec.targets,
               layer_types=spec.layer_types, init=spec.init, generator=generator)


def uniform_subnet(supernet: Supernet, choice: dict[str, str]) -> np.ndarray:
    """The same layer choice in every adapted layer, as genes."""
    return np.tile(supernet.space.encode_layer(choice), supernet.num_layers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_family_arg(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: per --size; docs/method.md §2: 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default: per --size)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each variant first (default 1)")
    parser.add_argument("--precisions", default=None,
                        help="training precisions, comma-separated (fp32, tf32 on CUDA, bf16, auto): the first for "
                             "every variant, each other one adds a variant supernet_<p> (default: fp32, or tf32 "
                             "with --tf32)")
    parser.add_argument("--layouts", default="auto",
                        help="memory layouts, comma-separated (auto, contiguous, channels_last): the first for every "
                             "variant, each other one adds a variant supernet_<layout> (default: auto)")
    return parser


LAYOUTS = {"auto": None, "contiguous": False, "channels_last": True}  # -> TrainConfig.channels_last


def parse_layouts(text: str) -> list[str]:
    layouts = list(dict.fromkeys(comma_list(text))) or ["auto"]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise BenchError(f"--layouts: {unknown} not among {list(LAYOUTS)}")
    return layouts


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from glora_ray.data import ArrayDataset
    from glora_ray.train import SupernetTraining, TrainConfig

    size = preset(args.size)
    model = size.model_for(args.family)
    timing = timing_setup(args)
    device, threads, clock, sync = timing.device, timing.threads, timing.clock, timing.sync
    repeats = args.repeats or size.train_repeats
    batch = args.batch_size or size.train_batch
    steps = args.steps or size.train_steps
    if batch < 1 or steps < 1 or args.warmup < 0:
        raise BenchError("--batch-size and --steps must be >= 1, --warmup >= 0")
    layouts = parse_layouts(args.layouts)
    say(f"[train_step] {model.describe()} | batch {batch}, {steps} steps per timed epoch | {timing.describe()} "
        f"| {repeats} rounds")

    spec = make_spec(model, drop_path_rate=DROP_PATH_RATE, seed=args.seed)
    count = batch * steps
    dataset = ArrayDataset(synthetic_images(count, model.img_size, args.seed),
                           random_labels(count, spec.num_classes, args.seed + 1))
    from glora_ray.precision import resolve_precision

    default = "tf32" if timing.tf32 else "fp32"
    try:
        precisions = list(dict.fromkeys(resolve_precision(p, device).value
                                        for p in comma_list(args.precisions or default)))
    except ValueError as err:
        raise BenchError(f"--precisions: {err}") from None
    # Long schedule, no warm-up: the learning rate does not matter to the step time.
    cfg = TrainConfig(epochs=10_000, batch_size=batch, warmup_epochs=0, seed=args.seed, num_workers=0,
                      precision=precisions[0], channels_last=LAYOUTS[layouts[0]])
    cfg.validate()

    supernet = build(spec)
    lora = build(spec, PinnedSupernet)
    largest_lora = f"lora{spec.space.max_rank}"
    lora.pin(uniform_subnet(lora, {"A": "none", "B": largest_lora, "C": "none", "D": "none", "E": "none"}))
    head = build(spec, PinnedSupernet)
    head.pin(uniform_subnet(head, head.space.empty_layer_choice()))
    models = {"supernet": supernet, "lora": lora, "head": head}
    runs = {name: SupernetTraining(net, dataset, cfg, device).setup() for name, net in models.items()}
    for precision in precisions[1:]:  # the supernet again, in another precision
        name = f"supernet_{precision}"
        runs[name] = SupernetTraining(build(spec), dataset, replace(cfg, precision=precision), device).setup()
        models[name] = runs[name].supernet
    for layout in layouts[1:]:  # the supernet again, in another memory layout
        name = f"supernet_{layout}"
        runs[name] = SupernetTraining(build(spec), dataset, replace(cfg, channels_last=LAYOUTS[layout]), device).setup()
        models[name] = runs[name].supernet

    trained = {
        "supernet": f"any subnet, up to {supernet.num_params(supernet.largest_subnet()):,} adapter params",
        "lora": f"{lora.num_params(lora.pinned):,} adapter params (B = {largest_lora})",
        "head": "0 adapter params",
        **{f"supernet_{p}": f"as supernet, in {p}" for p in precisions[1:]},
        **{f"supernet_{layout}": f"as supernet, layout {runs[f'supernet_{layout}'].layout}" for layout in layouts[1:]},
    }
    peak_mib: dict[str, float] = {}
    if device.type == "cuda":  # one untimed epoch each, alone, for its peak memory
        for name, run in runs.items():
            torch.cuda.reset_peak_memory_stats(device)
            run.run_epoch()
            sync()
            peak_mib[name] = torch.cuda.max_memory_allocated(device) / 2**20
    timing = measure_interleaved(
        {name: run.run_epoch for name, run in runs.items()}, repeats=repeats, warmup=args.warmup, sync=sync,
        clock=CLOCKS[clock],
        on_round=lambda r, t: say(f"  round {r + 1}/{repeats}: "
                                  + ", ".join(f"{k} {v / steps * 1e3:.1f} ms/step" for k, v in t.items())),
    )
    for name, run in runs.items():
        if any(not np.isfinite(h["loss"]) for h in run.state.history):
            raise BenchError(f"{name}: the training loss is not finite")
    step_ms = {name: timing.median(name) / steps * 1e3 for name in runs}
    images_per_s = {name: count / timing.median(name) for name in runs}
    ratios = {
        "supernet_over_lora": timing.ratio("supernet", "lora"),
        "supernet_over_head": timing.ratio("supernet", "head"),
        "lora_over_head": timing.ratio("lora", "head"),
        **{f"supernet_{p}_over_supernet": timing.ratio(f"supernet_{p}", "supernet") for p in precisions[1:]},
        **{f"supernet_{layout}_over_supernet": timing.ratio(f"supernet_{layout}", "supernet") for layout in layouts[1:]},
    }
    for name in runs:
        say(f"{name:9s} {images_per_s[name]:8.1f} images/s  ({trained[name]})"
            + (f", peak {peak_mib[name]:.0f} MiB" if name in peak_mib else ""))
    for name, stat in ratios.items():
        say(f"{name.replace('_over_', ' / '):18s} step time {stat.text()}")
    return {
        "size": size.name,
        "family": args.family,
        "device": str(device),
        "machine": machine_info(device),
        "settings": {
            "model": model.describe(), "batch_size": batch, "steps_per_epoch": steps, "repeats": repeats,
            "warmup": args.warmup, "threads": threads, "clock": clock,
            "tf32": bool(args.tf32 and device.type == "cuda"),
            "drop_path_rate": DROP_PATH_RATE, "seed": args.seed, "precisions": precisions, "layouts": layouts,
            "channels_last": runs["supernet"].layout is torch.channels_last,
        },
        "ratios": ratios,
        "step_ms_median": step_ms,
        "seconds_per_round": timing.seconds,
        "images_per_s": images_per_s,
        "trained": trained,
        "peak_memory_mib": peak_mib,
        "checks": {},
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("train_step", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
