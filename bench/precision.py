"""Issue 14, items 2 and 3: what reduced precision changes in results (not in speed).

Two comparisons, each against fp32 on the same inputs, Ray-free (``gpu_check`` calls ``main``):

  ranking   the same random subnets of one supernet evaluated by ``Evaluator`` (merged mode,
            the default strategy) in fp32 and in each other precision (bf16 autocast; TF32 on
            CUDA only): how many of fp32's top 10 each precision also puts in its top 10
            (ties broken by draw order), whether the best subnet is the same, Spearman's rank
            correlation, and the largest accuracy difference.  Labels come from the supernet
            under a random teacher subnet, so subnets differ in accuracy.
  training  short supernet trainings (``SupernetTraining``, the engine's loop) on the digits
            dataset (sklearn's, written locally), in fp32 and in each other precision, for
            several seeds: the final training loss and the validation accuracy of a few fixed
            subnets (evaluated in fp32).  "Within noise" means the difference between
            precisions is of the order of the spread between seeds.

    python -m bench.precision --size small                  # CPU: fp32 against bf16
    python -m bench.precision --size base --device cuda --precisions fp32,tf32,bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    BenchError, add_common_args, check, comma_list, machine_info, make_search_problem, prepare_environment, preset, run_bench,
    say, timing_setup,
)

TOP = 10
# Per size: subnets ranked, training epochs and seeds.
RANK_SUBNETS = {"tiny": 12, "small": 40, "base": 40}
TRAIN_EPOCHS = {"tiny": 1, "small": 4, "base": 4}
TRAIN_SEEDS = {"tiny": 1, "small": 3, "base": 3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, repeats=False)
    parser.add_argument("--precisions", default=None,
                        help="fp32 first, then the ones compared with it (default: fp32,bf16 on the CPU, "
                             "fp32,tf32,bf16 on CUDA)")
    parser.add_argument("--subnets", type=int, default=None, help="subnets ranked (default: per --size)")
    parser.add_argument("--parts", default="ranking,training", help="ranking, training or both (default both)")
    return parser


def top_k(accuracies: Sequence[float], k: int) -> list[int]:
    """Indices of the k best, ties broken by index (draw order)."""
    return sorted(range(len(accuracies)), key=lambda i: (-accuracies[i], i))[:k]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties."""
    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        for value in np.unique(values):  # average ranks of ties
            ranked[values == value] = ranked[values == value].mean()
        return ranked

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_ranking(args: argparse.Namespace, precisions: list[str], device, threads: int) -> dict[str, Any]:
    from glora_ray.search.evaluator import Evaluator

    size = preset(args.size)
    problem = make_search_problem(size, args.seed)
    count = args.subnets or RANK_SUBNETS[size.name]
    evaluators = {p: Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=size.eval_batch,
                               device=device, threads=threads, precision=p) for p in precisions}
    reference = evaluators[precisions[0]]
    rng = np.random.default_rng(args.seed + 3)
    subnets = [reference.supernet.sample_genes(rng) for _ in range(count)]
    accuracies, seconds = {}, {}
    for precision, evaluator in evaluators.items():
        results = evaluator.evaluate(subnets)
        accuracies[precision] = [r.val_acc for r in results]
        seconds[precision] = statistics.median(r.seconds for r in results)
    base = accuracies[precisions[0]]
    k = min(TOP, count)
    best = top_k(base, k)
    rows = {}
    for precision in precisions[1:]:
        acc = accuracies[precision]
        rows[precision] = {
            f"top{k}_agree": len(set(best) & set(top_k(acc, k))),
            "best_same": top_k(acc, 1) == best[:1],
            "spearman": spearman(base, acc),
            "max_abs_accuracy_difference": max(abs(x - y) for x, y in zip(base, acc)),
            "equal_accuracies": sum(x == y for x, y in zip(base, acc)),
            "seconds_per_candidate_over_fp32": seconds[precision] / seconds[precisions[0]],
        }
        r = rows[precision]
        say(f"  ranking {precision} vs {precisions[0]}: top {k} agree {r[f'top{k}_agree']}/{k}, best same "
            f"{r['best_same']}, Spearman {r['spearman']:.3f}, max |acc diff| {r['max_abs_accuracy_difference']:.3f}, "
            f"{r['equal_accuracies']}/{count} accuracies equal; seconds per candidate x"
            f"{r['seconds_per_candidate_over_fp32']:.2f}")
    return {"subnets": count, "val_images": len(problem.labels), "top": k, "accuracies": accuracies,
            "seconds_per_candidate": seconds, "against_fp32": rows,
            "spread_of_fp32_accuracies": [min(base), max(base)]}


def compare_training(args: argparse.Namespace, precisions: list[str], device) -> dict[str, Any]:
    from glora_ray.backbone import BackboneConfig
    from glora_ray.checkpoint import SupernetSpec
    from glora_ray.data import DataConfig, write_digits_dataset
    from glora_ray.search.evaluator import evaluate_subnet
    from glora_ray.train import SupernetTraining, TrainConfig

    size = preset(args.size)
    epochs, seeds = TRAIN_EPOCHS[size.name], TRAIN_SEEDS[size.name]
    # The test suite's digits setting: one 16 px patch per digit, mean pooling, 2 blocks.
    backbone = BackboneConfig(name="vit_tiny_patch16_224", img_size=16, drop_path_rate=0.1,
                              model_kwargs=dict(patch_size=16, depth=2, embed_dim=64, num_heads=2, global_pool="avg"))
    with tempfile.TemporaryDirectory(prefix="glora-bench-digits-") as root:
        write_digits_dataset(root)
        data = DataConfig(root, "digits", img_size=16)
        train, val = data.build("train800"), data.build("val200")
        val_images, val_labels = val.images.numpy(), val.labels.numpy()
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in precisions}
    for seed in range(args.seed, args.seed + seeds):
        spec = SupernetSpec(backbone, num_classes=10, ranks=(4, 2), dataset="digits", adapter_seed=seed)
        probe = spec.build()
        rng = np.random.default_rng(seed)
        subnets = [probe.largest_subnet()] + [probe.sample_genes(rng) for _ in range(3)]
        for precision in precisions:
            cfg = TrainConfig(epochs=epochs, lr=1e-2, warmup_epochs=min(1, epochs - 1), batch_size=64, seed=seed,
                              num_workers=0, precision=precision)
            training = SupernetTraining(spec.build(), train, cfg, device).setup()
            training.run()
            supernet = training.supernet.eval()
            accuracy = statistics.mean(evaluate_subnet(supernet, g, val_images, val_labels) for g in subnets)
            runs[precision].append({"seed": seed, "loss": training.state.history[-1]["loss"], "val_acc": accuracy})
            say(f"  training seed {seed} {precision}: final loss {runs[precision][-1]['loss']:.4f}, "
                f"val accuracy (mean of {len(subnets)} subnets) {accuracy:.4f}")
    summary = {}
    for precision, items in runs.items():
        acc = [r["val_acc"] for r in items]
        summary[precision] = {"val_acc_mean": statistics.mean(acc), "val_acc_range": [min(acc), max(acc)],
                              "loss_mean": statistics.mean(r["loss"] for r in items)}
    base = precisions[0]
    differences = {p: [a["val_acc"] - b["val_acc"] for a, b in zip(runs[p], runs[base])] for p in precisions[1:]}
    seed_spread = max(r["val_acc"] for r in runs[base]) - min(r["val_acc"] for r in runs[base])
    for precision, diff in differences.items():
        say(f"  training {precision} - {base}: val accuracy per seed {', '.join(f'{d:+.4f}' for d in diff)}; "
            f"{base}'s spread over seeds {seed_spread:.4f}")
    return {"epochs": epochs, "seeds": seeds, "runs": runs, "summary": summary,
            "val_acc_difference_per_seed": differences, "fp32_seed_spread": seed_spread}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from glora_ray.precision import Precision, resolve_precision

    size = preset(args.size)
    timing = timing_setup(args)
    device = timing.device
    default = "fp32,tf32,bf16" if device.type == "cuda" else "fp32,bf16"
    try:
        precisions = [resolve_precision(p.strip(), device).value for p in (args.precisions or default).split(",")]
    except ValueError as err:
        raise BenchError(f"--precisions: {err}") from None
    if precisions[0] != Precision.FP32.value or len(precisions) < 2:
        raise BenchError(f"--precisions must start with fp32 and name at least one more, got {precisions}")
    parts = set(comma_list(args.parts))
    if not parts or parts - {"ranking", "training"}:
        raise BenchError(f"--parts takes ranking and/or training, got {args.parts!r}")
    say(f"[precision] {size.model.describe()} | {timing.describe()} | precisions {precisions} | {sorted(parts)}")
    result: dict[str, Any] = {"size": size.name, "device": str(device), "machine": machine_info(device),
                              "settings": {"precisions": precisions, "seed": args.seed, "threads": timing.threads,
                                           "model": size.model.describe()}, "checks": {}}
    if "ranking" in parts:
        result["ranking"] = compare_ranking(args, precisions, device, timing.threads)
        rows = result["ranking"]["against_fp32"]
        result["checks"]["ranking_correlated"] = check(
            all(r["spearman"] > 0.5 for r in rows.values()),
            "Spearman > 0.5 for every precision: " + ", ".join(f"{p} {r['spearman']:.3f}" for p, r in rows.items()))
    if "training" in parts:
        result["training"] = compare_training(args, precisions, device)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("precision", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
