"""Issue 19, lever 2: does the supernet rank subnets as they rank when trained alone?

N subnets drawn within the search's budget (seeded) are each trained alone with the baselines'
schedule, scored on val200 and tested once; supernets trained the ways the pipeline offers
(``TRAININGS``) score the same subnets on val200, as the search would.  Reported per training:
Kendall's tau-b of the supernet's val200 accuracy (and of its negated val loss) against the
standalone test accuracy; and, for reference, the standalone subnets' own val200 accuracy
against their test accuracy (how well 200 images rank these subnets once each is trained).
Ray-free (it runs on a GPU machine without Ray); the library code is the pipeline's own.

    python -m bench.ranking_agreement --dataset digits_orientation --max-params 128364
    python -m bench.ranking_agreement --smoke                          # tiny preset: proves it runs
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EXIT_CANNOT_MEASURE, REPO_ROOT, machine_info, prepare_environment, publish, say  # noqa: E402

# TrainConfig changes of each supernet training; those that draw within a budget get the search's window.
TRAININGS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "budget": {"subnet_sampling": "budget"},
    "sandwich": {"subnet_sampling": "budget", "sandwich": 2},
    "distill": {"subnet_sampling": "budget", "sandwich": 2, "distill": True},
}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (ties allowed); NaN when either is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau needs sequences of one length, got {len(x)} and {len(y)}")
    first, second = np.triu_indices(len(x), 1)  # every pair once
    dx, dy = np.sign(x[first] - x[second]), np.sign(y[first] - y[second])
    denominator = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))  # pairs not tied in x, in y
    return float(np.sum(dx * dy) / denominator) if denominator else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/ranking_agreement.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", default="default", help="pipeline preset (pipelines/vtab.py --preset)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subnets", type=int, default=8, help="subnets trained alone (the issue asks >= 8)")
    parser.add_argument("--trainings", nargs="+", default=["uniform", "sandwich"], choices=list(TRAININGS))
    parser.add_argument("--max-params", type=int, help="the search's budget (default: the preset's)")
    parser.add_argument("--epochs", type=int, help="every training's epochs (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=str(Path.home() / "glora-ray" / "data"))
    parser.add_argument("--tag", help="result file suffix (default: <preset>_<dataset>)")
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1 epoch, 3 subnets (figures mean nothing)")
    return parser


def _train(spec, data, train, device):
    """A supernet trained in this process, and the seconds it took."""
    from glora_ray.train.loop import SupernetTraining

    start = time.perf_counter()
    training = SupernetTraining(spec.build(), data.build(train.split), train, device).setup()
    training.run()
    return training.supernet.eval(), time.perf_counter() - start


def _scores(spec, supernet, genes, images, labels, batch_size: int, device) -> list[tuple[float, float]]:
    """(accuracy, mean cross-entropy) of each subnet, scored as the search's evaluators score it."""
    from glora_ray.checkpoint import numpy_state
    from glora_ray.search.evaluator import Evaluator

    evaluator = Evaluator(spec, numpy_state(supernet), images, labels, batch_size=batch_size, device=device)
    return [(r.val_acc, r.val_loss) for r in evaluator.evaluate(genes)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from glora_ray.budget import Budget, sample_within_budget
    from glora_ray.search.evaluator import evaluate_subnet
    from glora_ray.pipeline.config import PipelineConfig, preset
    from glora_ray.pipeline.preflight import preflight
    from glora_ray.pipeline.unit import spec_for, vtab_data

    values = preset(args.preset)
    values.update(datasets=(args.dataset,), data_root=args.data_root)
    cfg = PipelineConfig(**values).for_seed(args.seed)
    preflight(cfg)  # bad input refused before any training; the embedded datasets written if missing
    train = replace(cfg.train_for(args.dataset), precision="fp32")  # the CPU's numerics on a GPU too
    if args.epochs:
        train = replace(train, epochs=args.epochs, warmup_epochs=min(train.warmup_epochs, args.epochs - 1))
    data, spec = vtab_data(cfg, args.dataset), spec_for(cfg, args.dataset)
    structure = spec.build_empty()
    max_params = args.max_params if args.max_params is not None else cfg.search.max_params
    window = Budget(cfg.search.min_params, max_params).resolve(structure.counter)
    rng = np.random.default_rng([args.seed, 19])
    picks = [sample_within_budget(rng, structure.counter, *window) for _ in range(args.subnets)]
    device, batch = torch.device(args.device), cfg.search.eval_batch_size
    val, test = data.arrays("val200"), data.arrays("test")
    standalone = []
    for number, genes in enumerate(picks, 1):
        key = structure.subnet_key(genes)
        net, seconds = _train(spec, data, train.for_fixed_subnet(key), device)
        val_acc, test_acc = (evaluate_subnet(net, genes, *split, batch_size=batch) for split in (val, test))
        standalone.append({"key": key, "params": structure.counter.count(genes),
                           "val_acc": val_acc, "test_acc": test_acc, "train_seconds": seconds})
        say(f"subnet {number}/{len(picks)}: {standalone[-1]['params']:,} params, val {val_acc:.3f} test {test_acc:.3f}")
    test_accs = [s["test_acc"] for s in standalone]
    trainings = {}
    for name in args.trainings:
        trained = replace(train, **TRAININGS[name])
        if trained.needs_budget:  # draws within the search's window
            trained = replace(trained, budget=tuple(window))
        supernet, seconds = _train(spec, data, trained, device)
        scores = _scores(spec, supernet, picks, *val, batch, device)
        trainings[name] = {"train_seconds": seconds, "supernet_val_acc": [a for a, _ in scores],
                           "supernet_val_loss": [loss for _, loss in scores],
                           "tau_acc": kendall_tau([a for a, _ in scores], test_accs),
                           "tau_loss": kendall_tau([-loss for _, loss in scores], test_accs)}
        say(f"{name}: tau(val acc, test) {trainings[name]['tau_acc']:+.2f}, "
            f"tau(-val loss, test) {trainings[name]['tau_loss']:+.2f}")
    return {"bench": "ranking_agreement", "preset": args.preset, "dataset": args.dataset, "seed": args.seed,
            "window": list(window), "epochs": train.epochs, "standalone": standalone,
            "tau_standalone_val": kendall_tau([s["val_acc"] for s in standalone], test_accs),
            "trainings": trainings, "machine": machine_info(torch.device(args.device)),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Ranking agreement: {result['preset']}, {result['dataset']}, seed {result['seed']}", "",
             f"- {len(result['standalone'])} subnets within {result['window'][0]:,}-{result['window'][1]:,} params, "
             f"{result['epochs']} epochs each; {result['machine']['cpu']}, {result['date_utc']} UTC", "",
             "| ranking by | Kendall tau against standalone test | training s |", "|---|---:|---:|",
             f"| standalone val200 accuracy (each subnet's own weights) | {result['tau_standalone_val']:+.2f} | |"]
    for name, row in result["trainings"].items():
        lines.append(f"| supernet `{name}`, val200 accuracy | {row['tau_acc']:+.2f} | {row['train_seconds']:.0f} |")
        lines.append(f"| supernet `{name}`, val200 loss | {row['tau_loss']:+.2f} | |")
    lines += ["", "| subnet params | standalone val % | standalone test % | "
              + " | ".join(f"`{n}` val %" for n in result["trainings"]) + " |",
              "|---:|---:|---:|" + "---:|" * len(result["trainings"])]
    for i, s in enumerate(result["standalone"]):
        cells = " | ".join(f"{row['supernet_val_acc'][i] * 100:.1f}" for row in result["trainings"].values())
        lines.append(f"| {s['params']:,} | {s['val_acc'] * 100:.1f} | {s['test_acc'] * 100:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    from glora_ray.errors import GLoRARayError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.epochs, args.subnets = "tiny", 1, 3
    if args.subnets < 2:
        parser.error(f"--subnets must be >= 2 (a ranking needs two subnets), got {args.subnets}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    try:
        result = measure(args)
    except GLoRARayError as err:  # bad input, refused before any training
        print(f"cannot measure: {err}", file=sys.stderr)
        return EXIT_CANNOT_MEASURE
    tag = args.tag or f"{args.preset}_{args.dataset}" + ("_smoke" if args.smoke else "")
    publish(args.results_dir, f"ranking_agreement_{tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
