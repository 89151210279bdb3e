"""Issue 6, item 4: the supernet's training step against plain LoRA and against the head alone.

All run the engine's own ``SupernetTraining.run_epoch`` (AdamW, warm-up/cosine schedule, a subnet
drawn every step, stochastic depth 0.1) on the same data, batch and threads, one epoch of a few
steps at a time, interleaved:

  supernet   every adapted layer draws its own random choice every step (docs/method.md §2);
  lora       one fixed subnet: B = LoRA of the largest rank, A, C, D, E none (plain LoRA);
  head       one fixed subnet with every tensor none: only the classifier head trains.

--precisions fp32,bf16 adds the supernet in each further precision (``TrainConfig.precision``),
--layouts auto,contiguous in each further memory layout (``TrainConfig.channels_last``).  Ray-free.

    python -m bench.train_step --size small [--family cnn] [--precisions fp32,bf16] [--layouts auto,contiguous]
    python -m bench.train_step --size base --device cuda
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import PRESETS, BenchError, comma_list, machine_info, main_of, measure_interleaved, parser_for, say, timing_setup
from glora_ray.supernet import Supernet

DROP_PATH_RATE = 0.1  # docs/method.md §2
LAYOUTS = {"auto": None, "contiguous": False, "channels_last": True}  # -> TrainConfig.channels_last

parser = parser_for("train_step", __doc__, family=True)
parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: per --size)")
parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default: per --size)")
parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each variant first (default 1)")
parser.add_argument("--precisions", default=None,
                    help="comma-separated: the first for every variant, each other adds supernet_<p> (default fp32)")
parser.add_argument("--layouts", default="auto",
                    help="comma-separated (auto, contiguous, channels_last): the first for every variant, "
                         "each other adds supernet_<layout>")


class PinnedSupernet(Supernet):
    """A supernet trained as one fixed subnet: ``set_subnet`` applies ``pinned`` whatever it is given."""

    pinned: np.ndarray | None = None

    def pin(self, choice: dict[str, str]) -> "PinnedSupernet":
        self.pinned = np.tile(self.space.encode_layer(choice), self.num_layers)  # the same choice in every layer
        super().set_subnet(self.pinned)
        return self

    def set_subnet(self, subnet) -> None:
        super().set_subnet(self.pinned if self.pinned is not None else subnet)


def build(spec, cls: type[Supernet] = Supernet) -> Supernet:
    """As ``SupernetSpec.build`` (same backbone seed, same adapter generator), as ``cls``."""
    from glora_ray.backbone import create_backbone

    return cls(create_backbone(spec.backbone, spec.num_classes), spec.space, targets=spec.targets,
               layer_types=spec.layer_types, init=spec.init, generator=torch.Generator().manual_seed(spec.adapter_seed))


def measure(args) -> dict[str, Any]:
    from glora_ray.data import ArrayDataset
    from glora_ray.precision import resolve_precision
    from glora_ray.train import SupernetTraining, TrainConfig

    size = PRESETS[args.size]
    model = size.model_for(args.family)
    setup = timing_setup(args)
    device = setup.device
    repeats, batch, steps = args.repeats or size.train_repeats, args.batch_size or size.train_batch, args.steps or size.train_steps
    layouts = list(dict.fromkeys(comma_list(args.layouts))) or ["auto"]
    if min(batch, steps) < 1 or args.warmup < 0 or set(layouts) - set(LAYOUTS):
        raise BenchError(f"--batch-size and --steps must be >= 1, --warmup >= 0, --layouts from {list(LAYOUTS)}")
    try:
        precisions = list(dict.fromkeys(resolve_precision(p, device).value
                                        for p in comma_list(args.precisions or ("tf32" if setup.tf32 else "fp32"))))
    except ValueError as err:
        raise BenchError(f"--precisions: {err}") from None
    say(f"[train_step] {model.describe()} | batch {batch}, {steps} steps per timed epoch | {setup.describe()} | "
        f"{repeats} rounds")
    spec = model.spec(args.seed, drop_path_rate=DROP_PATH_RATE)
    count = batch * steps
    rng = np.random.default_rng(args.seed)
    dataset = ArrayDataset(rng.standard_normal((count, 3, model.img_size, model.img_size), dtype=np.float32),
                           rng.integers(0, spec.num_classes, count).astype(np.int64))
    # Long schedule, no warm-up: the learning rate does not matter to the step time.
    cfg = TrainConfig(epochs=10_000, batch_size=batch, warmup_epochs=0, seed=args.seed, num_workers=0,
                      precision=precisions[0], channels_last=LAYOUTS[layouts[0]])
    cfg.validate()
    lora_choice = {"A": "none", "B": f"lora{spec.space.max_rank}", "C": "none", "D": "none", "E": "none"}
    nets = {"supernet": (build(spec), cfg), "lora": (build(spec, PinnedSupernet).pin(lora_choice), cfg),
            "head": (build(spec, PinnedSupernet).pin(spec.space.empty_layer_choice()), cfg),
            **{f"supernet_{p}": (build(spec), replace(cfg, precision=p)) for p in precisions[1:]},
            **{f"supernet_{layout}": (build(spec), replace(cfg, channels_last=LAYOUTS[layout])) for layout in layouts[1:]}}
    runs = {name: SupernetTraining(net, dataset, c, device).setup() for name, (net, c) in nets.items()}
    supernet, lora = nets["supernet"][0], nets["lora"][0]
    trained = {"supernet": f"any subnet, up to {supernet.num_params(supernet.largest_subnet()):,} adapter params",
               "lora": f"{lora.num_params(lora.pinned):,} adapter params (B = {lora_choice['B']})",
               "head": "0 adapter params", **{name: f"as supernet, {name[9:]}" for name in list(runs)[3:]}}
    peak_mib: dict[str, float] = {}
    if device.type == "cuda":  # one untimed epoch each, alone, for its peak memory
        for name, run in runs.items():
            torch.cuda.reset_peak_memory_stats(device)
            run.run_epoch()
            torch.cuda.synchronize(device)
            peak_mib[name] = torch.cuda.max_memory_allocated(device) / 2**20
    timing = measure_interleaved({name: run.run_epoch for name, run in runs.items()}, setup, repeats=repeats,
                                 warmup=args.warmup, on_round=lambda r, t: say(
                                     f"  round {r + 1}/{repeats}: "
                                     + ", ".join(f"{k} {v / steps * 1e3:.1f} ms/step" for k, v in t.items())))
    for name, run in runs.items():
        if any(not np.isfinite(h["loss"]) for h in run.state.history):
            raise BenchError(f"{name}: the training loss is not finite")
    ratios = {"supernet_over_lora": timing.ratio("supernet", "lora"), "supernet_over_head": timing.ratio("supernet", "head"),
              "lora_over_head": timing.ratio("lora", "head"),
              **{f"{name}_over_supernet": timing.ratio(name, "supernet") for name in list(runs)[3:]}}
    images_per_s = {name: count / timing.median(name) for name in runs}
    for name in runs:
        say(f"{name:9s} {images_per_s[name]:8.1f} images/s" + (f", peak {peak_mib[name]:.0f} MiB" if name in peak_mib else ""))
    for name, stat in ratios.items():
        say(f"{name.replace('_over_', ' / '):18s} step time {stat.text()}")
    return {
        "size": size.name, "family": args.family, "device": str(device), "machine": machine_info(device),
        "settings": {"model": model.describe(), "batch_size": batch, "steps_per_epoch": steps, "repeats": repeats,
                     "warmup": args.warmup, "threads": setup.threads, "clock": setup.clock, "tf32": setup.tf32,
                     "drop_path_rate": DROP_PATH_RATE, "seed": args.seed, "precisions": precisions, "layouts": layouts,
                     "channels_last": runs["supernet"].layout is torch.channels_last},
        "ratios": ratios,
        "step_ms_median": {name: timing.median(name) / steps * 1e3 for name in runs},
        "seconds_per_round": timing.seconds,
        "images_per_s": images_per_s,
        "trained": trained,
        "peak_memory_mib": peak_mib,
        "checks": {},
    }


main = main_of("train_step", parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
