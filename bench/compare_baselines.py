"""Issue 12, item 4: the searched GLoRA subnet against fixed adapters at equal budget, over seeds.

Runs the real job (``run_pipeline``, as ``pipelines/vtab.py`` does) with ``--baselines`` and
``--seeds`` on a preset (default: the embedded default, whatever backbone it holds), then writes
the per-seed table, mean ± std per configuration and the paired differences (GLoRA minus each
baseline, per seed) as Markdown and JSON.  The run itself resumes: rerunning with the same
``--out`` reuses every finished stage.

    python -m bench.compare_baselines                                  # default preset, seeds 0 1 2
    python -m bench.compare_baselines --quick                          # minutes: proves it runs
    python -m bench.compare_baselines --preset default -- --epochs 30 --max-params 40k

Options after ``--`` (or any option this script does not know) go to the pipeline unchanged.
Output: ``bench/results/compare_baselines_<tag>.{md,json}`` (``--tag``; default: the preset,
plus ``_quick``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EXIT_CANNOT_MEASURE, REPO_ROOT, machine_info, prepare_environment, publish  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_BASELINES = ("lora", "ssf", "bitfit", "head")
# A setting that only proves the script runs end to end: its figures mean nothing.
QUICK_OPTIONS = ("--epochs", "2", "--warmup-epochs", "1", "--checkpoint-every", "2", "--population", "8",
                 "--parents", "3", "--mutants", "3", "--crossovers", "2", "--generations", "2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/compare_baselines.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", default="default", help="pipeline preset (pipelines/vtab.py --preset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baselines", nargs="+", default=list(DEFAULT_BASELINES))
    parser.add_argument("--quick", action="store_true", help=f"add {' '.join(QUICK_OPTIONS)} (a smoke run)")
    parser.add_argument("--out", help="pipeline output folder (default: ~/glora-ray/results/compare_baselines_<tag>)")
    parser.add_argument("--tag", help="result file suffix (default: <preset>[_quick])")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the .md and .json go")
    return parser


def pipeline_argv(args: argparse.Namespace, extra: Sequence[str], out: str) -> list[str]:
    argv = ["--preset", args.preset, "--seeds", *map(str, args.seeds), "--baselines", *args.baselines,
            "--test-pareto", "--out", out]
    return argv + (list(QUICK_OPTIONS) if args.quick else []) + [a for a in extra if a != "--"]


def paired_differences(table, baselines: Sequence[str]) -> list[dict[str, Any]]:
    """Per baseline: GLoRA's test accuracy minus the baseline's, seed by seed (same seed, same data)."""
    out = []
    for dataset, rows in table.groupby("dataset", sort=False):
        by_seed = rows.set_index(["name", "seed"])["test_acc"]
        params = rows.groupby("name")["params"].mean()
        for name in baselines:
            diffs = [float(by_seed[("glora", s)] - by_seed[(name, s)]) for s in sorted(rows["seed"].unique())]
            mean = sum(diffs) / len(diffs)
            std = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else float("nan")
            out.append({"dataset": dataset, "baseline": name, "glora_params": float(params["glora"]),
                        "baseline_params": float(params[name]), "test_diff_mean": mean, "test_diff_std": std,
                        "test_diff_ci95": mean_interval(mean, std, len(diffs)),
                        # at least as good: the issue-19 bar counts a tie (as many test images right)
                        "glora_wins": sum(d > 0 for d in diffs), "glora_at_least": sum(d >= 0 for d in diffs),
                        "seeds": len(diffs), "per_seed": diffs})
    return out


def mean_interval(mean: float, std: float, n: int, level: float = 0.95) -> list[float] | None:
    """Student-t confidence interval of a mean over ``n`` paired seeds (None below two seeds).

    It says whether a margin is resolved: with three seeds the t quantile is 4.3, so a mean
    margin must exceed about 2.5 standard deviations of the per-seed differences to exclude 0."""
    if n < 2 or std != std:
        return None
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / n ** 0.5
    return [mean - half, mean + half]


def markdown(result: dict[str, Any]) -> str:
    setting = result["setting"]
    lines = [
        f"# GLoRA vs fixed adapters: {result['tag']}", "",
        f"- backbone: `{setting['backbone']}` ({setting['weights']}), ranks {setting['ranks']}, "
        f"forms narrowed {setting.get('forms') or 'nowhere (full space)'}, {setting['adapted_layers']} adapted layers",
        f"- datasets {setting['datasets']}, seeds {setting['seeds']}, {setting['epochs']} epochs, "
        f"lr {setting['lr']}, budget {setting['budget']}, search: population {setting['population']}, "
        f"{setting['generations']} generations",
        *_levers_line(setting),
        f"- command: `python -m bench.compare_baselines {' '.join(result['argv'])}`",
        f"- machine: {result['machine']['cpu']}, torch {result['machine']['torch']}, ray {result['machine']['ray']}, "
        f"{result['machine']['date_utc']} UTC; wall {result['wall_seconds_this_invocation']:.0f} s "
        "(this invocation; a resumed run skips finished stages)", "",
        "| dataset | configuration | adapter params | val acc % | test acc % | seeds | train images | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["mean"]:
        lines.append(f"| {row['dataset']} | {row['name']} | {row['params']:,.0f} | {_pm(row['val_acc'], row['val_acc_std'])} "
                     f"| {_pm(row['test_acc'], row['test_acc_std'])} | {row['seeds']} | {_count(row.get('train_images'))} "
                     f"| {_count(row.get('train_seconds'))} |")
    lines += ["", "Train images: images through a forward and backward pass (epochs x images x subnets per step; "
              "GLoRA's supernet and its retraining together); train s: their wall time."]
    lines += ["", "GLoRA minus baseline, test accuracy, paired by seed:", "",
              "| dataset | baseline | GLoRA params | baseline params | difference (points) | GLoRA better in "
              "| GLoRA at least as good in | 95 % interval of the difference |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for d in result["paired"]:
        lines.append(f"| {d['dataset']} | {d['baseline']} | {d['glora_params']:,.0f} | {d['baseline_params']:,.0f} "
                     f"| {_pm(d['test_diff_mean'], d['test_diff_std'], sign=True)} | {d['glora_wins']}/{d['seeds']} seeds "
                     f"| {d['glora_at_least']}/{d['seeds']} seeds | {_interval(d['test_diff_ci95'])} |")
    lines += ["", "The interval: Student's t over the seeds' paired differences; one that holds 0 leaves the "
              "comparison unresolved at this number of seeds."]
    lines += ["", "Per seed (every row of the comparison tables):", "",
              "| dataset | seed | configuration | adapter params | val acc % | test acc % |", "|---|---:|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['dataset']} | {row['seed']} | {row['name']} | {row['params']:,} | {row['val_acc'] * 100:.2f} "
                     f"| {row['test_acc'] * 100:.2f} |")
    return "\n".join(lines) + "\n"


def _levers_line(setting: dict[str, Any]) -> list[str]:
    """The issue-19 levers of the run (absent from results written before they existed)."""
    if "subnet_sampling" not in setting:
        return []
    return [f"- levers: subnet sampling {setting['subnet_sampling']}, sandwich {setting['sandwich']}, distill "
            f"{setting['distill']}, fitness {setting['fitness']}, generation 0 seeded with "
            f"{setting['seed_population'] or 'nothing'}, retrain {setting['retrain_epochs']} epochs"]


def _interval(bounds: list[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0] * 100:+.2f} to {bounds[1] * 100:+.2f}"  # None: one seed


def _count(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:,.0f}"  # None/NaN: not recorded


def _pm(mean: float, std: float, sign: bool = False) -> str:
    head = f"{mean * 100:+.2f}" if sign else f"{mean * 100:.2f}"
    return head if std is None or std != std else f"{head} ± {std * 100:.2f}"  # None/NaN: one seed


def _setting(cfg, budgets: dict[str, Any]) -> dict[str, Any]:
    from glora_ray.pipeline.unit import spec_for

    structure = spec_for(cfg, cfg.datasets[0]).build_empty()
    backbone = cfg.backbone
    weights = ("pretrained (timm)" if backbone.pretrained else f"checkpoint {backbone.checkpoint_path}"
               if backbone.checkpoint_path else f"pretrained ({backbone.weights})" if backbone.weights else "random init")
    return {"preset_backbone": cfg.backbone.to_dict(), "backbone": cfg.backbone.name, "weights": weights,
            "ranks": list(cfg.ranks), "forms": {t: list(k) for t, k in cfg.forms.items()}, "adapted_layers": structure.num_layers, "datasets": list(cfg.datasets),
            "seeds": list(cfg.seeds), "epochs": cfg.train.epochs, "lr": cfg.lr if cfg.lr is not None else "paper table",
            "budget": budgets, "population": cfg.search.population, "generations": cfg.search.generations,
            "baselines": list(cfg.baselines), "subnet_sampling": cfg.train.subnet_sampling,
            "sandwich": cfg.train.sandwich, "distill": cfg.train.distill, "fitness": cfg.search.fitness.value,
            "seed_population": list(cfg.seed_population), "retrain_epochs": cfg.retrain_epochs}


def _records(frame) -> list[dict[str, Any]]:
    """Plain JSON types (numpy integers would be written as strings; NaN becomes null)."""
    return json.loads(frame.to_json(orient="records"))


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    import time

    from glora_ray import storage
    from glora_ray.errors import GLoRARayError
    from glora_ray.pipeline import layout
    from glora_ray.pipeline.cli import parse_config
    from glora_ray.pipeline.comparison import aggregate
    from glora_ray.pipeline.config import default_home
    from glora_ray.pipeline.run import comparison_table, run_pipeline

    args, extra = build_parser().parse_known_args(argv)
    tag = args.tag or args.preset + ("_quick" if args.quick else "")
    out = args.out or os.path.join(default_home(), "results", f"compare_baselines_{tag}")
    cfg = parse_config(pipeline_argv(args, extra, out))
    started = time.perf_counter()
    try:
        run_pipeline(cfg)
    except GLoRARayError as err:
        print(f"cannot measure: {err}", file=sys.stderr)
        return EXIT_CANNOT_MEASURE
    wall = time.perf_counter() - started
    table = comparison_table(cfg)
    stored = storage.read_json(storage.join(cfg.out, layout.CONFIG_FILE))
    result = {
        "bench": "compare_baselines", "tag": tag, "argv": list(argv if argv is not None else sys.argv[1:]),
        "pipeline_out": cfg.out, "wall_seconds_this_invocation": wall, "machine": machine_info(),
        "setting": _setting(cfg, stored.get("budgets", {})),
        "rows": _records(table), "mean": _records(aggregate(table)),
        "paired": paired_differences(table, cfg.baselines),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    publish(args.results_dir, f"compare_baselines_{tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
