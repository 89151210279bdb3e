"""Issue 6, item 1: what evaluating one candidate costs, against the plain backbone.

Timed interleaved in one process, on the same resident validation data and threads:

  backbone   the plain timm model (no adapters) through the engine's own evaluation loop, in the
             evaluator's batches, so it differs from ``merged`` only by the merge;
  merged     ``Evaluator.evaluate([key])`` in merged mode, what every search actor does per
             candidate (the evaluator picks its batch from the activation size, evaluator.py);
  unmerged   the same in supernet mode: the supernet forward with the subnet fixed;
  merge      the merging inside ``merged`` alone (``MergedModel.load``, and for ``just_in_time``
             every layer's merge once per batch, as its forward does);
  merged_<s> with --merge-strategies, ``merged`` again with merge strategy <s> (merge.py).

Goal: merged / backbone <= 1.05.  Check: merged and unmerged logits agree (relative error below
1e-4 in fp32; 2e-2 with TF32, 5e-2 in bf16).  Ray-free.

    python -m bench.eval_cost --size small               # CPU, one thread
    python -m bench.eval_cost --size small --family cnn  # EfficientNet-Lite0, GLoRA on its convolutions
    python -m bench.eval_cost --size base --device cuda [--tf32] [--precision bf16]
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (
    PRESETS, BenchError, check, comma_list, machine_info, main_of, measure_interleaved, parser_for, say, timing_setup,
)

GOAL, GOAL_REDUCED_PRECISION_CUDA = 1.05, 1.10  # issue 14: 1.10 with TF32 or bf16 on a GPU
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2}

parser = parser_for("eval_cost", __doc__, family=True)
parser.add_argument("--val-images", type=int, default=None, help="validation images (default: per --size)")
parser.add_argument("--batch-size", type=int, default=None, help="smallest evaluation batch (default: per --size)")
parser.add_argument("--subnets", type=int, default=4, help="random subnets, evaluated in turn (default 4)")
parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
parser.add_argument("--merge-strategies", default="auto",
                    help="comma-separated: the first is 'merged', each other adds a variant merged_<s> "
                         "(auto, just_in_time, per_candidate, batched)")
parser.add_argument("--img-size", type=int, default=None, help="image size in pixels (default: per --size)")
parser.add_argument("--precision", default="fp32", help="evaluation precision: fp32, tf32 (CUDA), bf16")


@torch.inference_mode()
def merge_work(evaluator, genes: np.ndarray) -> None:
    """The merging one candidate costs ``evaluator``: its ``load``, and for ``just_in_time`` (whose
    ``load`` only selects) every layer's merge once per batch, as its forward does."""
    from glora_ray.search.merge import MergeStrategy

    evaluator.model.load(genes)
    if evaluator.merge_strategy is MergeStrategy.JUST_IN_TIME:
        merger = evaluator.model.merger
        for _ in range(evaluator.batches):
            for i in range(len(merger.layers)):
                merger.weight(i)


@torch.inference_mode()
def relative_error(a, b, genes: np.ndarray, images: torch.Tensor) -> float:
    """||logits(a) - logits(b)|| / ||logits(b)|| of one subnet, each evaluator in its precision."""
    from glora_ray.precision import compute_precision

    logits = []
    for ev in (a, b):
        ev._select(genes)
        with compute_precision(ev.precision, images.device):
            logits.append(ev.model(images).double())
    return float((logits[0] - logits[1]).norm() / logits[1].norm().clamp_min(1e-30))


def measure(args) -> dict[str, Any]:
    from glora_ray.backbone import create_backbone
    from glora_ray.precision import Precision, compute_precision
    from glora_ray.search.evaluator import Evaluator, _count_correct
    from glora_ray.search.merge import resolve_merge_strategy

    size = PRESETS[args.size]
    model = size.model_for(args.family)
    model = replace(model, img_size=args.img_size) if args.img_size else model
    setup = timing_setup(args)
    device = setup.device
    repeats, count = args.repeats or size.eval_repeats, args.val_images or size.val_images
    batch = args.batch_size or size.eval_batch
    if min(count, batch, args.subnets, model.img_size) < 1:
        raise BenchError("--val-images, --batch-size, --subnets and --img-size must be >= 1")
    try:
        strategies = [resolve_merge_strategy(s, device).value for s in comma_list(args.merge_strategies) or ["auto"]]
    except ValueError as err:
        raise BenchError(f"--merge-strategies: {err}") from None
    problem = model.problem(count, args.seed)
    # --tf32 alone means the evaluation's forward runs in TF32 (the evaluator sets it per call).
    precision = "tf32" if setup.tf32 and args.precision == "fp32" else args.precision
    make = lambda **kw: Evaluator(problem.spec, problem.state, problem.images, problem.labels,  # noqa: E731
                                  batch_size=batch, device=device, threads=setup.threads, precision=precision, **kw)
    merged = make(mode="merged", merge=strategies[0])
    others = {f"merged_{s}": make(mode="merged", merge=s) for s in dict.fromkeys(strategies[1:]) if s != strategies[0]}
    unmerged = make(mode="supernet")
    plain = create_backbone(problem.spec.backbone, problem.spec.num_classes).to(device).eval().requires_grad_(False)
    x, y = merged.images, merged.labels
    say(f"[eval_cost] {model.describe()} | {count} images, batch {merged.eval_batch} (at least {batch}; "
        f"{merged.image_activation_bytes / 1024:.0f} KiB of activations per image) | {setup.describe()} | "
        f"{repeats} rounds | precision {precision}, merge {','.join(strategies)}")

    rng = np.random.default_rng(args.seed + 2)
    subnets = [merged.supernet.sample_genes(rng) for _ in range(args.subnets)]
    keys = [merged.supernet.subnet_key(g) for g in subnets]
    turn = {name: itertools.cycle(range(len(keys))) for name in ("merged", "unmerged", "merge", *others)}

    def backbone() -> int:
        with compute_precision(merged.precision, device):
            return _count_correct(plain, x, y, merged.eval_batch)

    variants = {
        "backbone": backbone,
        "merged": lambda: merged.evaluate([keys[next(turn["merged"])]]),
        "unmerged": lambda: unmerged.evaluate([keys[next(turn["unmerged"])]]),
        "merge": lambda: merge_work(merged, subnets[next(turn["merge"])]),
        **{name: (lambda name=name, ev=ev: ev.evaluate([keys[next(turn[name])]])) for name, ev in others.items()},
    }
    timing = measure_interleaved(variants, setup, repeats=repeats, warmup=args.warmup, on_round=lambda r, t: say(
        f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items())))
    ratios = {f"{name}_over_backbone": timing.ratio(name, "backbone") for name in ("merged", "unmerged", *others)}
    share = ratios["merge_share_of_merged"] = timing.ratio("merge", "merged")
    # If the merged forward costs what the backbone's does, merged / backbone = 1 / (1 - share).
    ratios["implied_merged_over_backbone"] = 1.0 / (1.0 - share.median) if share.median < 1 else float("inf")
    tolerance = TOLERANCE[merged.precision.value]
    rel_err = max(relative_error(merged, unmerged, g, x[:batch]) for g in subnets)
    strategy_err = {name: max(relative_error(ev, merged, g, x[:batch]) for g in subnets) for name, ev in others.items()}
    per_second = {name: count / timing.median(name) for name in ("backbone", "merged", "unmerged", *others)}
    goal = GOAL_REDUCED_PRECISION_CUDA if device.type == "cuda" and merged.precision is not Precision.FP32 else GOAL
    met = ratios["merged_over_backbone"].median <= goal
    for name, stat in ratios.items():
        say(f"{name.replace('_over_', ' / '):28s} {f'{stat:.3f}x' if isinstance(stat, float) else stat.text()}"
            + (f"   goal <= {goal}x: {'met' if met else 'MISSED'}" if name == "merged_over_backbone" else ""))
    say("images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in per_second.items()))
    for name, err in {**strategy_err, "unmerged": rel_err}.items():
        say(f"{name} vs merged logits: relative error {err:.2e}" + (" (bit for bit)" if err == 0 else ""))
    return {
        "size": size.name, "family": args.family, "device": str(device), "machine": machine_info(device),
        "settings": {"model": model.describe(), "val_images": count, "batch_size": batch,
                     "eval_batch": merged.eval_batch, "subnets": len(subnets), "repeats": repeats,
                     "warmup": args.warmup, "threads": setup.threads, "clock": setup.clock, "tf32": setup.tf32,
                     "seed": args.seed, "precision": merged.precision.value, "merge_strategy": strategies[0],
                     "other_merge_strategies": [name.removeprefix("merged_") for name in others]},
        "ratios": ratios,
        "seconds_median": {name: timing.median(name) for name in variants},
        "seconds_per_round": timing.seconds,
        "images_per_s": per_second,
        "goals": {"merged_over_backbone_le_1_05": ratios["merged_over_backbone"].median <= GOAL,
                  **({"merged_over_backbone_le_1_10": met} if goal != GOAL else {})},
        "correctness": {"max_logits_relative_error": rel_err, "tolerance": tolerance,
                        **{f"{name}_vs_merged_max_relative_error": e for name, e in strategy_err.items()}},
        "checks": {"merged_matches_unmerged": check(rel_err < tolerance, f"max relative error {rel_err:.2e} "
                                                                         f"< {tolerance:g}")},
    }


main = main_of("eval_cost", parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
