"""The GPU check: issue 6 items 1 and 4, issue 14 items 2 and 3, on one CUDA GPU, Ray-free.

Runs ``bench.eval_cost``, ``bench.train_step`` and ``bench.precision`` (their ``main``, in this
process) for ViT-B/16 at 224 px, random init:

  1. fp32 (TF32 off): evaluation (200 images, batch 100: merged with the default strategy on
     CUDA, ``batched``, and the per-layer ``per_candidate`` merge of before issue 14 / plain
     backbone / unmerged supernet) and the training step (batch 64: supernet / plain LoRA-B /
     head only, plus the supernet with bf16 autocast); the evaluation run also checks merged
     against unmerged logits (relative error < 1e-4); then the training step of
     EfficientNet-Lite0 with GLoRA on its 49 convolutions at 224 px, channels-last (the default
     for a CNN) against contiguous, and with bf16 autocast;
  2. the same with TF32 (skip with --no-tf32): the evaluation's goal is merged / backbone <= 1.10;
  3. the evaluation in bf16 autocast;
  4. ``bench.precision``: the ranking of 40 subnets in TF32 and bf16 against fp32 (top-10
     agreement), and short digits trainings in fp32, TF32 and bf16 (3 seeds),

then prints one JSON summary (last stdout line; also written to --out/summary.json).  No stage
starts after --budget-s seconds (default 300, so that the whole run stays under 7 minutes),
and a skipped stage is listed as such.  Exit status: 0, or the first
failing stage's (1: a check failed, 2: cannot measure, e.g. no CUDA).

    python -m bench.gpu_check                 # on the GPU machine (needs torch + timm, not Ray)
    python -m bench.gpu_check --smoke         # tiny model on the CPU: seconds, to try it here
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import eval_cost, precision as precision_bench, train_step
from bench.common import EXIT_CANNOT_MEASURE, BenchError, machine_info, prepare_environment, resolve_device, say

STAGES = (  # (precision, bench)
    ("fp32", "eval_cost"),
    ("fp32", "train_step"),
    ("fp32", "train_step_cnn"),
    ("tf32", "eval_cost"),
    ("tf32", "train_step"),
    ("bf16", "eval_cost"),
    ("all", "precision"),
)
# Extra arguments per stage (issue 14): the old per-layer merge next to the default, bf16 training.
EXTRA_ARGV = {
    ("fp32", "eval_cost"): ["--merge-strategies", "auto,per_candidate"],
    ("tf32", "eval_cost"): ["--merge-strategies", "auto,per_candidate"],
    ("bf16", "eval_cost"): ["--precision", "bf16", "--merge-strategies", "auto,per_candidate"],
    ("fp32", "train_step"): ["--precisions", "fp32,bf16"],
    # EfficientNet-Lite0's convolutions: bf16 and the layout (auto is channels-last for a CNN).
    ("fp32", "train_step_cnn"): ["--family", "cnn", "--precisions", "fp32,bf16", "--layouts", "auto,contiguous"],
    ("all", "precision"): ["--precisions", "fp32,tf32,bf16"],
}
# What each stage keeps in the summary (the full results are in --out).
KEEP = ("ratios", "images_per_s", "seconds_median", "step_ms_median", "peak_memory_mib", "goals", "correctness",
        "checks", "settings", "ranking", "training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (to try the script without a GPU)")
    parser.add_argument("--size", choices=("tiny", "small", "base"), default="base")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cuda")
    parser.add_argument("--no-tf32", action="store_true", help="skip the TF32 stages")
    parser.add_argument("--eval-repeats", type=int, default=None, help="evaluation rounds (default: per --size; base 15)")
    parser.add_argument("--train-repeats", type=int, default=None, help="training rounds (default: per --size; base 5)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no stage after this many seconds (default 300: the whole run stays under 7 min)")
    parser.add_argument("--out", default=None,
                        help="folder for each stage's JSON and summary.json (default: a temporary folder)")
    return parser


def stage_argv(args: argparse.Namespace, precision: str, bench: str, json_out: Path) -> list[str]:
    argv = ["--size", args.size, "--device", args.device, "--json-out", str(json_out)]
    if precision == "tf32":
        argv.append("--tf32")
    argv += EXTRA_ARGV.get((precision, bench), [])
    if args.smoke and bench == "precision":  # no TF32 on the CPU; the training part takes minutes there
        argv[argv.index("fp32,tf32,bf16")] = "fp32,bf16"
        argv += ["--parts", "ranking"]
    repeats = {"eval_cost": args.eval_repeats, "train_step": args.train_repeats,
               "train_step_cnn": args.train_repeats}.get(bench)
    if repeats is not None:
        argv += ["--repeats", str(repeats)]
    return argv


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], int]:
    device = resolve_device(args.device)
    start = time.perf_counter()
    summary: dict[str, Any] = {"bench": "gpu_check", "size": args.size, "device": str(device),
                               "machine": machine_info(device), "stages": {}, "skipped": []}
    status = 0
    mains = {"eval_cost": eval_cost.main, "train_step": train_step.main, "train_step_cnn": train_step.main,
             "precision": precision_bench.main}
    for precision, bench in STAGES:
        name = f"{bench}_{precision}"
        if precision == "tf32" and (args.no_tf32 or args.smoke):
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            summary["skipped"].append(f"{name}: {elapsed:.0f} s had passed (--budget-s {args.budget_s:g})")
            say(f"[gpu_check] skipping {name}: over the time budget")
            continue
        say(f"[gpu_check] {name} (at {elapsed:.0f} s)")
        json_out = out / f"{name}.json"
        stage_start = time.perf_counter()
        code = mains[bench](stage_argv(args, precision, bench, json_out))
        seconds = round(time.perf_counter() - stage_start, 1)
        release_memory()
        if code and not status:
            status = code
        if not json_out.is_file():
            summary["stages"][name] = {"exit_status": code, "seconds": seconds,
                                       "error": "no result (see the message above)"}
            if code == EXIT_CANNOT_MEASURE:
                break  # e.g. no CUDA: the other stages cannot measure either
            continue
        result = json.loads(json_out.read_text())
        summary["stages"][name] = {"exit_status": code, "seconds": seconds,
                                   **{k: result[k] for k in KEEP if k in result}}
    fp32_eval = summary["stages"].get("eval_cost_fp32", {})
    summary["correctness"] = fp32_eval.get("correctness")
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    summary["exit_status"] = status
    return summary, status


def headline(summary: dict[str, Any]) -> list[str]:
    """The numbers for the README's GPU rows, one line per stage."""
    lines = []
    for name, stage in summary["stages"].items():
        ratios = stage.get("ratios", {})
        if name.startswith("eval_cost") and ratios:
            lines.append(
                f"{name}: merged/backbone {ratios['merged_over_backbone']['median']:.3f}x, "
                f"unmerged/backbone {ratios['unmerged_over_backbone']['median']:.3f}x, "
                + "".join(f"{k.removesuffix('_over_backbone')}/backbone {v['median']:.3f}x, "
                          for k, v in ratios.items() if k.startswith("merged_") and k != "merged_over_backbone") +
                f"merge share {ratios['merge_share_of_merged']['median']:.3f}; images/s "
                + ", ".join(f"{k} {v:.0f}" for k, v in stage.get("images_per_s", {}).items()))
        elif name.startswith("precision") and "ranking" in stage:
            lines.append(f"{name}: ranking against fp32: " + "; ".join(
                f"{p} top-10 agree {r.get('top10_agree')}/10, Spearman {r['spearman']:.3f}"
                for p, r in stage["ranking"]["against_fp32"].items())
                + ("; training val accuracy " + ", ".join(
                    f"{p} {v['val_acc_mean']:.4f}" for p, v in stage["training"]["summary"].items())
                   if "training" in stage else ""))
        elif name.startswith("train_step") and ratios:
            lines.append(
                f"{name}: images/s " + ", ".join(f"{k} {v:.0f}" for k, v in stage.get("images_per_s", {}).items())
                + f"; supernet/lora {ratios['supernet_over_lora']['median']:.3f}x, "
                f"supernet/head {ratios['supernet_over_head']['median']:.3f}x")
        else:
            lines.append(f"{name}: exit status {stage.get('exit_status')}")
    if summary.get("correctness"):
        c = summary["correctness"]
        lines.append(f"merged vs unmerged logits (TF32 off): relative error {c['max_logits_relative_error']:.2e} "
                     f"(tolerance {c['tolerance']:g})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.size, args.device = "tiny", "cpu"
    try:
        with tempfile.TemporaryDirectory(prefix="glora-gpu-check-") as tmp:
            out = Path(args.out) if args.out else Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            summary, status = run(args, out)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BenchError as err:
        print(f"gpu_check: cannot measure: {err}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_MEASURE
    say(f"[gpu_check] done in {summary['elapsed_s']} s")
    for line in headline(summary):
        say(f"  {line}")
    print(json.dumps(summary), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
