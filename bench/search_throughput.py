"""Issue 6, item 2: search throughput with 1 and 2 evaluator actors, and Ray's overhead.

Runs the real ``run_search`` on a local Ray instance (one CPU and one torch thread per actor, the
supernet shared zero-copy, Parquet written every generation), once per actor count per round,
the order alternating between rounds.  The timings come from ``SearchResult``: the generations'
wall seconds (the window, after the actors started) and ``SearchResult.pool`` (actor start, time
inside ``EvaluatorPool.evaluate``); each candidate's own time is the population's eval_seconds.

  candidates/s             evaluations / window
  scaling efficiency       (candidates/s with n actors) / (n x candidates/s with 1 actor)
  overhead per candidate   (actors x window - sum of eval_seconds) / evaluations, in actor-seconds,
                           split into inside ``pool.evaluate`` (Ray dispatch, result transfer, actors
                           idle at a generation's end) and the driver's time between generations

Check: every actor count gives the same population (timing columns aside).

    python -m bench.search_throughput --size small [--actors 1,2]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PRESETS, BenchError, Timing, check, comma_list, local_ray, machine_info, main_of, parser_for, say, search_config,
)

parser = parser_for("search_throughput", __doc__, device=False)
parser.add_argument("--actors", default="1,2", help="actor counts to compare, comma-separated (default 1,2)")


def run_once(problem, state_ref, config, out: str) -> dict[str, Any]:
    """One whole search: the numbers of its window, and its population."""
    from glora_ray.search import read_population, run_search, without_timing

    result = run_search(problem.spec, state_ref, problem.images, problem.labels, config, out, "bench", "synthetic",
                        progress=lambda line: None)
    frame, pool = read_population(out), result.pool
    actors, window, count = result.actors, sum(result.generation_seconds), len(frame)
    evaluating = float(frame["eval_seconds"].sum())
    return {
        "actors": actors, "candidates": count, "generations": len(result.generation_seconds), "window_s": window,
        "startup_s": pool.start_s, "candidates_per_s": count / window, "eval_s_per_candidate": evaluating / count,
        "actor_utilisation": evaluating / (actors * window),
        "overhead_actor_s_per_candidate": (actors * window - evaluating) / count,
        "pool_overhead_actor_s_per_candidate": (actors * pool.evaluate_s - evaluating) / count,
        "driver_actor_s_per_candidate": actors * (window - pool.evaluate_s) / count,
        "population": without_timing(frame),
    }


def measure(args) -> dict[str, Any]:
    import pandas as pd
    import torch

    size = PRESETS[args.size]
    try:
        counts = sorted({1, *(int(a) for a in comma_list(args.actors))})  # scaling is relative to one actor
    except ValueError:
        raise BenchError(f"--actors must be comma-separated integers, got {args.actors!r}") from None
    if counts[0] < 1:
        raise BenchError(f"--actors needs counts >= 1, got {args.actors!r}")
    repeats = args.repeats or size.search_repeats
    torch.set_num_threads(1)  # the driver's own torch work stays off the actors' cores
    problem = size.model.problem(size.val_images, args.seed)
    configs = {n: search_config(size, n, args.seed) for n in counts}
    c = configs[1]
    say(f"[search_throughput] {size.model.describe()} | {len(problem.labels)} val images, batch {size.eval_batch} | "
        f"population {c.population}, {c.generations} generations | actors {counts} | {repeats} rounds")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with local_ray(num_cpus=max(counts), object_store_bytes=4 * problem.weight_bytes) as ray, \
            tempfile.TemporaryDirectory(prefix="glora-bench-search-") as root:
        state_ref = ray.put(problem.state)  # once, shared by every run
        for r in range(repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                run = run_once(problem, state_ref, configs[n], f"{root}/r{r}-a{n}")
                runs[n].append(run)
                say(f"  round {r + 1}/{repeats}, {n} actor(s): {run['candidates']} candidates in "
                    f"{run['window_s']:.2f} s = {run['candidates_per_s']:.2f}/s | eval "
                    f"{run['eval_s_per_candidate'] * 1e3:.0f} ms, overhead {run['overhead_actor_s_per_candidate'] * 1e3:.0f} "
                    f"ms per candidate | startup {run['startup_s']:.1f} s")
    reference, same = runs[1][0]["population"], True
    for run in (run for n in counts for run in runs[n]):
        try:
            pd.testing.assert_frame_equal(run.pop("population"), reference)
        except AssertionError:
            same = False
    per_candidate = Timing({str(n): [1.0 / run["candidates_per_s"] for run in runs[n]] for n in counts})
    summary = {str(n): {k: statistics.median(run[k] for run in runs[n]) for k in runs[n][0] if k != "actors"}
               for n in counts}
    scaling: dict[str, Any] = {}
    for n in counts[1:]:
        scaling[f"speedup_{n}_over_1"] = speedup = per_candidate.ratio("1", str(n))
        scaling[f"efficiency_{n}"] = speedup.median / n
        say(f"speedup {n}/1: {speedup.text()} -> efficiency {speedup.median / n:.0%}")
    for n, s in summary.items():
        say(f"{n} actor(s): {s['candidates_per_s']:.2f} candidates/s | utilisation {s['actor_utilisation']:.0%} | "
            f"overhead {s['overhead_actor_s_per_candidate'] * 1e3:.0f} ms per candidate (pool "
            f"{s['pool_overhead_actor_s_per_candidate'] * 1e3:.0f}, driver {s['driver_actor_s_per_candidate'] * 1e3:.0f})"
            f" vs eval {s['eval_s_per_candidate'] * 1e3:.0f} ms")
    return {
        "size": size.name, "device": "cpu", "machine": machine_info(),
        "settings": {"model": size.model.describe(), "val_images": len(problem.labels), "eval_batch": size.eval_batch,
                     "population": c.population, "generations": c.generations, "actor_counts": counts,
                     "cpus_per_actor": 1, "threads_per_actor": 1, "repeats": repeats, "seed": args.seed},
        "ratios": {**scaling, "overhead_over_eval": {n: s["overhead_actor_s_per_candidate"] / s["eval_s_per_candidate"]
                                                     for n, s in summary.items()}},
        "runs": summary,
        "checks": {"same_results": check(same, "every actor count gave the same population (timing columns aside)")},
    }


main = main_of("search_throughput", parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
