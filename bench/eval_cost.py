"""Issue 6, item 1: what evaluating one candidate costs, against the plain backbone.

Timed interleaved in one process, on the same resident validation data, batches and threads:

  backbone   the plain timm model (no adapters) through the engine's own evaluation loop
             (``evaluator._count_correct``), so it differs from ``merged`` only by the merge;
  merged     ``Evaluator.evaluate([key])`` in merged mode: what every search actor does per
             candidate (merge the subnet into the adapted layers out of place, then run the
             plain backbone);
  unmerged   the same ``Evaluator`` in supernet mode: the supernet forward with the subnet fixed;
  merge      ``MergedModel.load`` alone: the merge inside ``merged``, to explain the gap.

Goal: merged / backbone <= 1.05.  Check: merged and unmerged logits agree (relative error below
1e-4 in fp32; 2e-2 with --tf32).  Ray-free (``gpu_check`` calls ``main`` on machines without Ray).

    python -m bench.eval_cost --size small               # CPU, one thread
    python -m bench.eval_cost --size small --family cnn  # EfficientNet-Lite0, GLoRA on its convolutions
    python -m bench.eval_cost --size base --device cuda  # ViT-B/16, 224 px
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (
    CLOCKS, BenchError, add_common_args, add_family_arg, build_supernet, check, machine_info, make_spec, measure_interleaved,
    prepare_environment, preset, random_labels, run_bench, say, synthetic_images, timing_setup,
)

GOAL = 1.05
FP32_TOLERANCE, TF32_TOLERANCE = 1e-4, 2e-2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_cost", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_family_arg(parser)
    parser.add_argument("--val-images", type=int, default=None, help="validation images (default: per --size)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: per --size)")
    parser.add_argument("--subnets", type=int, default=4, help="random subnets, evaluated in turn (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    return parser


@torch.inference_mode()
def logits_relative_error(merged, unmerged, genes: np.ndarray, images: torch.Tensor) -> float:
    """||merged - unmerged|| / ||unmerged|| of the logits of one subnet on ``images``."""
    merged.model.load(genes)
    a = merged.model(images).double()
    unmerged.supernet.set_subnet(genes)
    b = unmerged.supernet(images).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from glora_ray.backbone import create_backbone
    from glora_ray.checkpoint import numpy_state
    from glora_ray.search.config import EvalMode
    from glora_ray.search.evaluator import Evaluator, _count_correct

    size = preset(args.size)
    model = size.model_for(args.family)
    timing = timing_setup(args)
    device, threads, clock, sync = timing.device, timing.threads, timing.clock, timing.sync
    repeats = args.repeats or size.eval_repeats
    count = args.val_images or size.val_images
    batch = args.batch_size or size.eval_batch
    if count < 1 or batch < 1 or args.subnets < 1:
        raise BenchError("--val-images, --batch-size and --subnets must be >= 1")

    say(f"[eval_cost] {model.describe()} | {count} images, batch {batch} | {timing.describe()} | {repeats} rounds")
    spec = make_spec(model, seed=args.seed)
    state = numpy_state(build_supernet(spec, seed=args.seed))
    images = synthetic_images(count, model.img_size, args.seed)
    labels = random_labels(count, spec.num_classes, args.seed + 1)
    common = dict(batch_size=batch, device=device, threads=threads)
    merged = Evaluator(spec, state, images, labels, mode=EvalMode.MERGED, **common)
    unmerged = Evaluator(spec, state, images, labels, mode=EvalMode.SUPERNET, **common)
    plain = create_backbone(spec.backbone, spec.num_classes).to(device).eval().requires_grad_(False)
    x, y = merged.images, merged.labels  # the evaluator's resident data, used by all variants

    rng = np.random.default_rng(args.seed + 2)
    subnets = [merged.supernet.sample_genes(rng) for _ in range(args.subnets)]
    keys = [merged.supernet.subnet_key(g) for g in subnets]
    turns = {name: itertools.cycle(range(len(subnets))) for name in ("merged", "unmerged", "merge")}
    variants = {
        "backbone": lambda: _count_correct(plain, x, y, batch),
        "merged": lambda: merged.evaluate([keys[next(turns["merged"])]]),
        "unmerged": lambda: unmerged.evaluate([keys[next(turns["unmerged"])]]),
        "merge": lambda: merged.model.load(subnets[next(turns["merge"])]),
    }
    timing = measure_interleaved(
        variants, repeats=repeats, warmup=args.warmup, sync=sync, clock=CLOCKS[clock],
        on_round=lambda r, t: say(f"  round {r + 1}/{repeats}: "
                                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items())),
    )
    merged_ratio = timing.ratio("merged", "backbone")
    unmerged_ratio = timing.ratio("unmerged", "backbone")
    merge_share = timing.ratio("merge", "merged")
    # If the merged forward costs what the backbone's does, merged / backbone = 1 / (1 - share):
    # a less noisy estimate than the direct ratio, whose rounds scatter on a shared machine.
    implied = 1.0 / (1.0 - merge_share.median) if merge_share.median < 1 else float("inf")
    tolerance = TF32_TOLERANCE if args.tf32 and device.type == "cuda" else FP32_TOLERANCE
    rel_err = max(logits_relative_error(merged, unmerged, g, x[:batch]) for g in subnets)
    per_second = {name: count / timing.median(name) for name in ("backbone", "merged", "unmerged")}

    verdict = "met" if merged_ratio.median <= GOAL else "MISSED"
    say(f"merged / backbone   {merged_ratio.text()}   goal <= {GOAL}x: {verdict}")
    say(f"unmerged / backbone {unmerged_ratio.text()}")
    say(f"merge / merged      {merge_share.text()}   (the merge's share of one candidate; "
        f"implies merged / backbone {implied:.3f}x)")
    say("images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in per_second.items()))
    say(f"merged vs unmerged logits: relative error {rel_err:.2e} (tolerance {tolerance:g})")
    return {
        "size": size.name,
        "family": args.family,
        "device": str(device),
        "machine": machine_info(device),
        "settings": {
            "model": model.describe(), "val_images": count, "batch_size": batch, "subnets": len(subnets),
            "repeats": repeats, "warmup": args.warmup, "threads": threads, "clock": clock,
            "tf32": bool(args.tf32 and device.type == "cuda"), "seed": args.seed,
        },
        "ratios": {
            "merged_over_backbone": merged_ratio,
            "unmerged_over_backbone": unmerged_ratio,
            "merge_share_of_merged": merge_share,
            "implied_merged_over_backbone": implied,
        },
        "seconds_median": {name: timing.median(name) for name in variants},
        "seconds_per_round": timing.seconds,
        "images_per_s": per_second,
        "goals": {"merged_over_backbone_le_1_05": merged_ratio.median <= GOAL},
        "correctness": {"max_logits_relative_error": rel_err, "tolerance": tolerance},
        "checks": {
            "merged_matches_unmerged": check(rel_err < tolerance,
                                             f"max relative error of the logits {rel_err:.2e} < {tolerance:g}"),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("eval_cost", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
