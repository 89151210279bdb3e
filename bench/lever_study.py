"""Issue 19: which levers make the searched GLoRA adapter beat the fixed ones, measured Ray-free.

The same library code as the pipeline (``SupernetTraining``, ``EvolutionPlanner``, ``Evaluator``,
``evaluate_subnet``), run in one process per (dataset, seed) without Ray, so that it runs where Ray
is not installed (the GPU machine) and many configurations fit in minutes.  Per dataset and seed:

* supernets trained four ways (``TRAININGS``): uniform subnets (the paper), subnets drawn within
  the budget, the sandwich rule, the sandwich with in-place distillation;
* searches on them (``SEARCHES``): fitness accuracy or loss, generation 0 random or seeded with the
  fixed adapters; every searched winner tested once, and optionally retrained alone for
  ``--retrain-epochs`` from its supernet weights (stage-3 retraining), then tested;
* the fixed adapters (LoRA, SSF) trained with the same schedule and tested;
* ranking agreement: with ``--standalone N`` (seed 0), N random in-budget subnets trained alone
  and tested, against their val accuracy in each supernet (Kendall tau).

Every row carries its training compute (epochs x images x passes per step, and seconds).

    python -m bench.lever_study --device cuda --out /tmp/levers          # the study (a GPU)
    python -m bench.lever_study --smoke                                  # tiny ViT, CPU, a minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, TrainConfig changes); the budget window is filled in per run.
TRAININGS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "budget": {"subnet_sampling": "budget"},
    "sandwich": {"subnet_sampling": "budget", "sandwich": 2},
    "distill": {"subnet_sampling": "budget", "sandwich": 2, "distill": True},
}
# (name, fitness, seeded generation 0)
SEARCHES: dict[str, tuple[str, bool]] = {
    "acc": ("accuracy", False),
    "loss": ("loss", False),
    "acc+seeded": ("accuracy", True),
    "loss+seeded": ("loss", True),
}
BASELINES = ("lora", "ssf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/lever_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--datasets", nargs="+", default=["digits", "digits_orientation"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trainings", nargs="+", default=list(TRAININGS), choices=list(TRAININGS))
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--retrain-epochs", type=int, default=20)
    parser.add_argument("--retrain-searches", nargs="+", default=["acc", "loss+seeded"], choices=list(SEARCHES),
                        help="the searches whose winners are also retrained")
    parser.add_argument("--standalone", type=int, default=8, help="subnets trained alone for Kendall tau (seed 0)")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), help="fixed adapters to train")
    parser.add_argument("--baseline-epochs", type=int, nargs="+", default=[],
                        help="also train the fixed adapters for these many epochs (equal compute: e.g. 40)")
    parser.add_argument("--max-params", type=int, help="override the preset's budget")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--generations", type=int, help="override the preset's generations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=1, help="(dataset, seed) jobs in parallel")
    parser.add_argument("--data-root", default="/tmp/glora-lever-data")
    parser.add_argument("--out", default="bench/results/lever_study")
    parser.add_argument("--summarise", metavar="DIR", help="print the Markdown table of the rows-*.jsonl in DIR, "
                        "run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1 epoch, 1 seed, one dataset: proves it runs")
    return parser


def _setup(args: argparse.Namespace, dataset: str, seed: int):
    from glora_ray.budget import Budget
    from glora_ray.checkpoint import SupernetSpec
    from glora_ray.pipeline.config import PipelineConfig, preset
    from glora_ray.pipeline.unit import vtab_data

    values = preset(args.preset)
    values.update(datasets=(dataset,), data_root=args.data_root)
    cfg = PipelineConfig(**values).for_seed(seed)
    # fp32 everywhere: the CPU default's numerics, also on a GPU (where "auto" would be bf16).
    train = replace(cfg.train_for(dataset), precision="fp32")
    if args.epochs:
        train = replace(train, epochs=args.epochs, warmup_epochs=min(train.warmup_epochs, args.epochs - 1))
    search = cfg.search if not args.generations else replace(cfg.search, generations=args.generations)
    if args.max_params:
        search = replace(search, max_params=args.max_params)
    data = vtab_data(cfg, dataset)
    spec = SupernetSpec(backbone=cfg.backbone, num_classes=data.num_classes, ranks=cfg.ranks, forms=cfg.forms,
                        targets=cfg.targets, layer_types=cfg.layer_types, dataset=data.name, adapter_seed=seed)
    counter = spec.build_empty().counter
    window = Budget(search.min_params, search.max_params).resolve(counter)
    return cfg, train, search, data, spec, window


def _train(spec, data, train, device, supernet=None):
    """(supernet, seconds, passes per step) of one training run in this process."""
    import torch

    from glora_ray.train.loop import SupernetTraining

    net = supernet if supernet is not None else spec.build()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
        training = SupernetTraining(net, data.build(train.split), train, device).setup()
        state = training.run()
    passes = state.history[-1].get("passes", 1) if state.history else 1
    return training.supernet, time.perf_counter() - start, passes


def _search(spec, supernet, val, search, window, fitness: str, initial, device):
    """The planner's winner and ranking: ask, evaluate in this process, tell."""
    from glora_ray.checkpoint import numpy_state
    from glora_ray.search.evaluator import Evaluator
    from glora_ray.search.evolution import EvolutionPlanner

    config = replace(search, fitness=fitness)  # validated on construction
    evaluator = Evaluator(spec, numpy_state(supernet), *val, batch_size=config.eval_batch_size, device=device)
    planner = EvolutionPlanner(config, evaluator.supernet.space, evaluator.supernet.counter, *window,
                               initial=initial)
    start = time.perf_counter()
    for _ in range(config.generations):
        candidates = planner.ask()
        if not candidates:
            break
        results = evaluator.evaluate([c.genes for c in candidates])
        planner.tell({r.key: r.val_acc for r in results}, {r.key: r.val_loss for r in results})
    return planner, time.perf_counter() - start


def _test(supernet, genes, test, batch_size=200) -> float:
    from glora_ray.search.evaluator import evaluate_subnet

    return evaluate_subnet(supernet, genes, *test, batch_size=batch_size)


def _baseline_genes(structure, names):
    from glora_ray.pipeline.baselines import baseline

    return {name: baseline(name).genes(structure) for name in names}


def _kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties counted on either side)."""
    n, concordant, discordant, ties_x, ties_y = len(x), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else float("nan")


def run_job(args: argparse.Namespace, dataset: str, seed: int) -> dict[str, Any]:
    """Every training, search, retraining and baseline of one (dataset, seed)."""
    import numpy as np
    import torch

    from glora_ray.budget import sample_within_budget

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, args.processes)))
    cfg, train, search, data, spec, window = _setup(args, dataset, seed)
    device = torch.device(args.device)
    val, test = data.arrays("val200"), data.arrays("test")
    images = len(data.samples(train.split))
    structure = spec.build_empty()
    fixed = _baseline_genes(structure, args.baselines)
    seeds_in = [g for g in fixed.values() if window[0] <= structure.counter.count(g) <= window[1]]
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / f"rows-{dataset}-{seed}.jsonl"  # written as rows come: a timed-out run keeps them
    rows_file.write_text("")

    def row(**values):
        values.update(dataset=dataset, seed=seed)
        rows.append(values)
        with rows_file.open("a") as handle:
            handle.write(json.dumps(values, default=float) + "\n")
        print(f"{dataset} seed {seed} {values['config']}: val {values['val_acc']:.4f} test {values['test_acc']:.4f}",
              flush=True)

    def baselines(epochs: int) -> None:
        for name, genes in fixed.items():
            fixed_train = train.for_fixed_subnet(structure.subnet_key(genes), epochs=epochs)
            net, seconds, passes = _train(spec, data, fixed_train, device)
            row(config=name if epochs == train.epochs else f"{name}@{epochs}", kind="baseline",
                params=structure.counter.count(genes), val_acc=_test(net, genes, val), test_acc=_test(net, genes, test),
                epochs=epochs, train_images=epochs * images * passes, train_seconds=seconds)

    baselines(train.epochs)
    supernets = {}
    for training_name in args.trainings:
        changes = dict(TRAININGS[training_name])
        if changes:
            changes["budget"] = tuple(window)
        supernet, seconds, passes = _train(spec, data, replace(train, **changes), device)
        supernets[training_name] = supernet
        compute = train.epochs * images * passes
        for search_name in args.searches:
            fitness, seeded = SEARCHES[search_name]
            planner, search_seconds = _search(spec, supernet, val, search, window, fitness,
                                              seeds_in if seeded else (), device)
            ranked = planner.ranked()
            best = ranked[0]
            top = [{"key": s.candidate.key, "params": s.candidate.params, "val_acc": s.val_acc,
                    "val_loss": s.val_loss, "origin": s.candidate.origin.value,
                    "test_acc": _test(supernet, s.candidate.genes, test)} for s in ranked[:10]]
            config = f"{training_name}/{search_name}"
            row(config=config, kind="glora", params=best.candidate.params, val_acc=best.val_acc,
                val_loss=best.val_loss, test_acc=top[0]["test_acc"], origin=best.candidate.origin.value,
                epochs=train.epochs, train_images=compute, train_seconds=seconds, search_seconds=search_seconds,
                top=top)
            if args.retrain_epochs and search_name in args.retrain_searches:
                retrain_cfg = train.for_fixed_subnet(best.candidate.key, epochs=args.retrain_epochs,
                                                     warmup_epochs=min(train.warmup_epochs, args.retrain_epochs - 1))
                start = spec.build()
                start.load_adapter_state_dict(supernet.adapter_state_dict())
                retrained, retrain_seconds, _ = _train(spec, data, retrain_cfg, device, supernet=start)
                row(config=config + "+retrain", kind="glora", params=best.candidate.params,
                    val_acc=_test(retrained, best.candidate.genes, val),
                    test_acc=_test(retrained, best.candidate.genes, test), origin=best.candidate.origin.value,
                    epochs=train.epochs + args.retrain_epochs,
                    train_images=compute + args.retrain_epochs * images, train_seconds=seconds + retrain_seconds)
    for epochs in args.baseline_epochs:  # the fixed adapters at GLoRA's compute (after the rest)
        baselines(epochs)
    # Ranking agreement: subnets trained alone, against their val accuracy in each supernet.
    standalone, taus = [], {}
    if args.standalone and seed == args.seeds[0]:
        rng = np.random.default_rng([seed, 19])
        picks = [sample_within_budget(rng, structure.counter, *window) for _ in range(args.standalone)]
        for genes in picks:
            net, _, _ = _train(spec, data, train.for_fixed_subnet(structure.subnet_key(genes)), device)
            standalone.append((genes, _test(net, genes, test)))
        for training_name, supernet in supernets.items():
            val_accs = [_test(supernet, g, val) for g, _ in standalone]
            taus[training_name] = _kendall_tau(val_accs, [t for _, t in standalone])
        with (out / f"tau-{dataset}-{seed}.json").open("w") as handle:
            json.dump({"kendall_tau": taus, "standalone_test": [t for _, t in standalone]}, handle)
    return {"dataset": dataset, "seed": seed, "window": list(window), "rows": rows, "kendall_tau": taus,
            "standalone": [{"key": structure.subnet_key(g), "params": structure.counter.count(g), "test_acc": t}
                           for g, t in standalone]}


def _job(payload):
    args, dataset, seed = payload
    try:
        return run_job(args, dataset, seed)
    except Exception:  # one job's failure must not lose the others' rows: recorded, then reported
        import traceback

        return {"dataset": dataset, "seed": seed, "error": traceback.format_exc()}


def _mean_std(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean * 100:.2f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean * 100:.2f} ± {std * 100:.2f}"


def markdown(rows: Sequence[dict[str, Any]], reference: str = "lora") -> str:
    """Per dataset and configuration: mean ± std of test accuracy over seeds, the paired margin
    over ``reference`` (same dataset and seed), seeds where it is ahead, params and compute."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        ref = {r["seed"]: r["test_acc"] for r in mine if r["config"] == reference}
        lines += [f"### {dataset}", "", f"| configuration | seeds | params | val % | test % | minus {reference} "
                  f"(points) | ahead in | train images |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for config in dict.fromkeys(r["config"] for r in mine):
            got = sorted((r for r in mine if r["config"] == config), key=lambda r: r["seed"])
            diffs = [r["test_acc"] - ref[r["seed"]] for r in got if r["seed"] in ref]
            lines.append(
                f"| {config} | {len(got)} | {sum(r['params'] for r in got) / len(got):,.0f} | "
                f"{_mean_std([r['val_acc'] for r in got])} | {_mean_std([r['test_acc'] for r in got])} | "
                f"{('+' if sum(diffs) >= 0 else '') + _mean_std(diffs) if diffs else '-'} | "
                f"{sum(d > 0 for d in diffs)}/{len(diffs)} | {sum(r['train_images'] for r in got) / len(got):,.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarise:
        rows = [json.loads(line) for path in sorted(Path(args.summarise).glob("rows-*.jsonl"))
                for line in path.read_text().splitlines() if line.strip()]
        print(markdown(rows))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        args.preset, args.datasets, args.seeds, args.epochs, args.generations = "tiny", args.datasets[:1], [0], 1, 2
        args.retrain_epochs, args.standalone = 1, 3
    from glora_ray.data.digits import write_digits_dataset

    for dataset in args.datasets:
        write_digits_dataset(args.data_root, name=dataset)
    jobs = [(args, d, s) for d in args.datasets for s in args.seeds]
    started = time.perf_counter()
    if args.processes > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_job, jobs))
    else:
        results = [_job(job) for job in jobs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"argv": list(argv if argv is not None else sys.argv[1:]), "device": args.device,
               "wall_seconds": time.perf_counter() - started, "jobs": results}
    tmp = out / "lever_study.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=float))
    os.replace(tmp, out / "lever_study.json")
    print(f"wrote {out / 'lever_study.json'} in {summary['wall_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
