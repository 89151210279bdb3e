"""Issue 6, item 2: search throughput with 1 and 2 evaluator actors, and Ray's overhead.

Runs the real ``run_search`` (``EvaluatorPool`` actors, one CPU and one torch thread each, the
supernet shared zero-copy, Parquet written every generation) on a local Ray instance, once per
actor count per round, the order alternating between rounds.  The pool ``run_search`` builds is
the real one, subclassed only to record timestamps (``raytools.recording_pools``).

Per run, over the window from "actors ready" to the end of the last generation:

  candidates/s             evaluations / window
  scaling efficiency       (candidates/s with n actors) / (n x candidates/s with 1 actor)
  overhead per candidate   (actors x window - sum of eval_seconds) / evaluations, in actor-seconds:
                           everything but the evaluations themselves (merge + forward, timed inside
                           the actor), split into the time inside ``pool.evaluate`` (Ray dispatch,
                           result transfer, actors idle at the end of a generation) and the driver's
                           time between generations (planning, Parquet, result files)

Check: every actor count gives the same population (timing columns aside).

    python -m bench.search_throughput --size small
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BenchError, SearchProblem, Timing, add_common_args, check, machine_info, make_search_problem,
    prepare_environment, preset, require_ray, run_bench, say, search_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.search_throughput", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, device=False)
    parser.add_argument("--actors", default="1,2", help="actor counts to compare, comma-separated (default 1,2)")
    parser.add_argument("--generations", type=int, default=None, help="generations per search (default: per --size)")
    parser.add_argument("--population", type=int, default=None, help="population (default: per --size)")
    return parser


def run_once(problem: SearchProblem, state_ref, config, out: str) -> dict[str, Any]:
    """One whole search; the numbers of its steady window, and its population."""
    from glora_ray.search import read_population, run_search, without_timing

    from bench.raytools import recording_pools

    marks: list[float] = []
    with recording_pools() as pools:
        start = time.perf_counter()
        run_search(problem.spec, state_ref, problem.images, problem.labels, config, out, "bench", "synthetic",
                   progress=lambda line: marks.append(time.perf_counter()))
    if len(pools) != 1 or not marks:
        raise BenchError(f"expected one pool and at least one generation, got {len(pools)} pools, "
                         f"{len(marks)} generations")
    record, frame = pools[0], read_population(out)
    actors = len(record.actors)
    window = marks[-1] - record.ready
    count = len(frame)
    evaluating = float(frame["eval_seconds"].sum())
    inside_pool = actors * record.evaluate_seconds - evaluating
    driver = actors * (window - record.evaluate_seconds)
    return {
        "actors": actors,
        "candidates": count,
        "generations": len(marks),
        "window_s": window,
        "startup_s": record.ready - start,
        "candidates_per_s": count / window,
        "eval_s_per_candidate": evaluating / count,
        "actor_utilisation": evaluating / (actors * window),
        "overhead_actor_s_per_candidate": (actors * window - evaluating) / count,
        "pool_overhead_actor_s_per_candidate": inside_pool / count,
        "driver_actor_s_per_candidate": driver / count,
        "population": without_timing(frame),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    require_ray()
    import pandas as pd
    import torch

    from bench.raytools import local_ray

    size = preset(args.size)
    try:
        counts = sorted({int(a) for a in args.actors.split(",") if a.strip()})
    except ValueError:
        raise BenchError(f"--actors must be comma-separated integers, got {args.actors!r}") from None
    if not counts or counts[0] < 1:
        raise BenchError(f"--actors needs counts >= 1, got {args.actors!r}")
    if 1 not in counts:
        counts = [1, *counts]  # scaling is relative to one actor
    repeats = args.repeats or size.search_repeats
    torch.set_num_threads(1)  # the driver's own torch work (building the problem) stays off the actors' cores
    problem = make_search_problem(size, args.seed)
    configs = {n: search_config(size, n, args.seed, args.population, args.generations) for n in counts}
    c = configs[1]
    say(f"[search_throughput] {size.model.describe()} | {len(problem.labels)} val images, batch {size.eval_batch} | "
        f"population {c.population}, {c.generations} generations | actors {counts}, 1 CPU and 1 thread each | "
        f"{repeats} rounds")

    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with local_ray(num_cpus=max(counts), object_store_bytes=4 * problem.weight_bytes), \
            tempfile.TemporaryDirectory(prefix="glora-bench-search-") as root:
        import ray

        state_ref = ray.put(problem.state)  # once, shared by every run
        for r in range(repeats):
            order = counts if r % 2 == 0 else counts[::-1]
            for n in order:
                run = run_once(problem, state_ref, configs[n], f"{root}/r{r}-a{n}")
                runs[n].append(run)
                say(f"  round {r + 1}/{repeats}, {n} actor(s): {run['candidates']} candidates in "
                    f"{run['window_s']:.2f} s = {run['candidates_per_s']:.2f}/s | "
                    f"eval {run['eval_s_per_candidate'] * 1e3:.0f} ms, "
                    f"overhead {run['overhead_actor_s_per_candidate'] * 1e3:.0f} ms per candidate | "
                    f"startup {run['startup_s']:.1f} s")

    reference = runs[1][0]["population"]
    same = True
    for n in counts:
        for run in runs[n]:
            try:
                pd.testing.assert_frame_equal(run.pop("population"), reference)
            except AssertionError:
                same = False
    per_candidate = Timing({str(n): [1.0 / run["candidates_per_s"] for run in runs[n]] for n in counts})
    summary: dict[str, Any] = {}
    scaling: dict[str, Any] = {}
    for n in counts:
        numbers = {k: statistics.median(run[k] for run in runs[n]) for k in runs[n][0] if k != "actors"}
        summary[str(n)] = numbers
        if n > 1:
            speedup = per_candidate.ratio("1", str(n))
            scaling[f"speedup_{n}_over_1"] = speedup
            scaling[f"efficiency_{n}"] = speedup.median / n
    for n in counts:
        s = summary[str(n)]
        say(f"{n} actor(s): {s['candidates_per_s']:.2f} candidates/s | utilisation {s['actor_utilisation']:.0%} | "
            f"overhead per candidate {s['overhead_actor_s_per_candidate'] * 1e3:.0f} ms "
            f"(pool {s['pool_overhead_actor_s_per_candidate'] * 1e3:.0f} ms, "
            f"driver {s['driver_actor_s_per_candidate'] * 1e3:.0f} ms) "
            f"vs eval {s['eval_s_per_candidate'] * 1e3:.0f} ms")
    for n in counts[1:]:
        say(f"speedup {n}/1: {scaling[f'speedup_{n}_over_1'].text()} -> efficiency {scaling[f'efficiency_{n}']:.0%}")
    overhead_ratio = {str(n): summary[str(n)]["overhead_actor_s_per_candidate"] / summary[str(n)]["eval_s_per_candidate"]
                      for n in counts}
    return {
        "size": size.name,
        "device": "cpu",
        "machine": machine_info(),
        "settings": {
            "model": size.model.describe(), "val_images": len(problem.labels), "eval_batch": size.eval_batch,
            "population": c.population, "parents": c.parents, "mutants": c.mutants, "crossovers": c.crossovers,
            "generations": c.generations, "actor_counts": counts, "cpus_per_actor": 1, "threads_per_actor": 1,
            "repeats": repeats, "seed": args.seed,
        },
        "ratios": {**scaling, "overhead_over_eval": overhead_ratio},
        "runs": summary,
        "checks": {"same_results": check(same, "every actor count gave the same population (timing columns aside)")},
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("search_throughput", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
