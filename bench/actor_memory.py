"""Issue 6, item 3: the private memory (USS) of each evaluator actor, against the weights.

The supernet's state is put once in the object store as numpy arrays and every ``EvaluatorPool``
actor maps it zero-copy (docs/method.md §9).  For 1, 2 and 4 actors, in merged and in supernet
mode, each actor evaluates one candidate, then its USS (psutil ``memory_full_info().uss``, memory
no other process shares; the pid comes from ``EvaluatorPool.stats``) is read.  "Extra" memory is
the USS above a bare worker's (one that imports torch, timm and the engine and holds no model).
Controls: the same evaluator over a private copy of the state (what sharing saves), and with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``: how much is freed blocks kept).

Goal (issue 14): an extra actor costs at most 0.10x the weights.

    python -m bench.actor_memory --size small      # ViT-B/16 weights (338 MiB), 32 px images
    python -m bench.actor_memory --size small --merge-strategies auto,per_candidate
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import MIB, PRESETS, BenchError, check, comma_list, local_ray, machine_info, main_of, parser_for, say

CONTROLS = {"private_copy": "merged, private copy of the state",
            "fixed_mmap_threshold": "merged, MALLOC_MMAP_THRESHOLD_=1MiB"}
SMALL_FRACTION = 0.10
VISIBLE_WEIGHTS = 64 * MIB  # below this, the weights vanish in an actor's baseline (interpreter, torch)

parser = parser_for("actor_memory", __doc__, device=False, repeats=False)
parser.add_argument("--actors", default=None, help="actor counts, comma-separated (default: per --size, e.g. 1,2,4)")
parser.add_argument("--modes", default="merged,supernet", help="evaluation modes (default merged,supernet)")
parser.add_argument("--merge-strategies", default="auto",
                    help="merged mode's strategies: the first is 'merged', each other adds rows merged_<s>")
parser.add_argument("--controls", default=",".join(CONTROLS), help=f"from {','.join(CONTROLS)} ('' for none)")


def uss(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        raise BenchError("psutil is needed to read an actor's USS: pip install psutil") from None
    return int(psutil.Process(pid).memory_full_info().uss)


class BareActor:
    """The baseline: a worker that imports what an evaluator imports and holds no model."""

    def __init__(self):
        import os

        import timm  # noqa: F401
        import torch

        import glora_ray.search.pool  # noqa: F401

        torch.set_num_threads(1)
        torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's CPU kernels, as an evaluation does
        self.pid = os.getpid()

    def ready(self) -> dict[str, int]:
        return {"pid": self.pid}


def control_actor(name: str, spec, refs, settings, key: str) -> int:
    """USS of one control actor after it evaluated ``key``."""
    import ray

    from glora_ray.search.pool import EvaluatorActor

    class PrivateCopyActor(EvaluatorActor):
        def __init__(self, spec, state, *rest):
            super().__init__(spec, {k: np.array(v, copy=True) for k, v in state.items()}, *rest)

    options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0}
    if name == "fixed_mmap_threshold":
        options["runtime_env"] = {"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(MIB)}}
    actor_class = PrivateCopyActor if name == "private_copy" else EvaluatorActor
    handle = ray.remote(actor_class).options(**options).remote(spec, *refs, settings, 0)
    try:
        ray.get(handle.evaluate.remote([key]))
        return uss(ray.get(handle.ready.remote())["pid"])
    finally:
        ray.kill(handle, no_restart=True)


def measure(args) -> dict[str, Any]:
    import torch

    from glora_ray.search.config import EvalMode
    from glora_ray.search.merge import resolve_merge_strategy
    from glora_ray.search.pool import ActorSettings, EvaluatorPool

    size = PRESETS[args.size]
    try:
        counts = sorted({int(a) for a in comma_list(args.actors)}) if args.actors else list(size.memory_actors)
        modes = [EvalMode(m) for m in comma_list(args.modes)]
        strategies = [resolve_merge_strategy(m, torch.device("cpu")).value for m in comma_list(args.merge_strategies)]
    except ValueError as err:
        raise BenchError(f"--actors takes integers, --modes merged/supernet, --merge-strategies "
                         f"auto/just_in_time/per_candidate/batched: {err}") from None
    controls = comma_list(args.controls)
    if not counts or counts[0] < 1 or not modes or not strategies or set(controls) - set(CONTROLS):
        raise BenchError(f"need actor counts >= 1, a mode, a strategy, and controls from {list(CONTROLS)}")
    torch.set_num_threads(1)
    model = size.memory_model
    problem = model.problem(size.memory_val_images, args.seed)
    weights = problem.weight_bytes
    merged_bytes = sum((l.base.weight.numel() + l.base.weight.shape[0]) * l.base.weight.element_size()
                       for l in problem.supernet.layers())  # a weight and a bias per adapted layer
    rng = np.random.default_rng(args.seed + 2)
    keys = [problem.supernet.subnet_key(problem.supernet.sample_genes(rng)) for _ in range(max(counts))]
    say(f"[actor_memory] {model.describe()} | state {weights / MIB:.1f} MiB (adapted layers merged: "
        f"{merged_bytes / MIB:.1f} MiB) | {len(problem.labels)} images | actors {counts}, modes {[m.value for m in modes]}")
    # (row label, mode, strategy): merged mode once per strategy, the first labelled "merged".
    runs = [(mode.value if i == 0 else f"{mode.value}_{strategy}", mode, strategy) for mode in modes
            for i, strategy in enumerate(dict.fromkeys(strategies) if mode is EvalMode.MERGED else strategies[:1])]
    rows, extra = [], {}
    with local_ray(num_cpus=max(counts), object_store_bytes=2 * weights + problem.images.nbytes + 64 * MIB) as ray:
        refs = (ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels))
        bare = ray.remote(BareActor).options(num_cpus=1, max_restarts=0).remote()
        baseline = uss(ray.get(bare.ready.remote())["pid"])
        ray.kill(bare, no_restart=True)
        say(f"  baseline: a worker with torch, timm and the engine imported, no model: USS {baseline / MIB:.0f} MiB")
        for label, mode, strategy in runs:
            settings = ActorSettings(len(problem.labels), mode, threads=1, cpus=1.0, gpus=0.0, merge=strategy)
            for n in counts:
                pool = EvaluatorPool(problem.spec, *refs, n, settings, max_replacements=0, max_candidate_retries=0)
                try:
                    if len(pool.evaluate(keys[:n], batch_size=1)) != n:  # one candidate per actor
                        raise BenchError(f"{n} actors did not return {n} results")
                    memory = [uss(info["pid"]) for info in pool.stats.actors.values()]
                finally:
                    pool.shutdown()
                rows.append({"mode": label, "merge_strategy": strategy if mode is EvalMode.MERGED else None,
                             "actors": n, "uss_per_actor": memory, "uss_median": statistics.median(memory)})
                extra[f"{label}_{n}"] = (rows[-1]["uss_median"] - baseline) / weights
                say(f"  {label:8s} {n} actor(s): USS {', '.join(f'{u / MIB:.0f}' for u in memory)} MiB; "
                    f"above the baseline {extra[f'{label}_{n}']:.2f}x the weights")
        settings = ActorSettings(len(problem.labels), EvalMode.MERGED, threads=1, cpus=1.0, gpus=0.0)
        control_uss = {name: control_actor(name, problem.spec, refs, settings, keys[0]) for name in controls}
    for name, value in control_uss.items():
        extra[f"{name}_1"] = (value - baseline) / weights
        say(f"  control ({CONTROLS[name]}): USS {value / MIB:.0f} MiB; above the baseline {extra[f'{name}_1']:.2f}x")

    ratios: dict[str, Any] = {"baseline_over_weights": baseline / weights, "merged_layers_over_weights":
                              merged_bytes / weights, **{f"extra_over_weights_{k}": v for k, v in extra.items()}}
    if "private_copy" in control_uss and "merged_1" in extra:
        ratios["sharing_saves_over_weights"] = extra["private_copy_1"] - extra["merged_1"]
    goals = {f"extra_actor_le_{SMALL_FRACTION}_weights_{label}":
             max(r["uss_median"] for r in rows if r["mode"] == label) - baseline <= SMALL_FRACTION * weights
             for label, _, _ in runs}
    saved = ratios.get("sharing_saves_over_weights")
    sharing = (check(True, f"skipped: {weights / MIB:.1f} MiB of weights are too few to see, or no control ran")
               if weights < VISIBLE_WEIGHTS or saved is None else
               check(saved > 0.5, f"a private copy costs {saved:.2f}x the weights more than a shared-state actor"))
    for name, met in goals.items():
        say(f"goal {name}: {'met' if met else 'MISSED'}")
    return {
        "size": size.name, "device": "cpu", "machine": machine_info(),
        "settings": {"model": model.describe(), "val_images": len(problem.labels), "actor_counts": counts,
                     "modes": [m.value for m in modes], "merge_strategies": strategies, "threads_per_actor": 1,
                     "seed": args.seed},
        "weight_bytes": weights, "merged_layer_bytes": merged_bytes, "baseline_uss": baseline,
        "ratios": ratios, "actors": rows,
        "controls": {name: {"what": CONTROLS[name], "actors": 1, "uss_median": v} for name, v in control_uss.items()},
        "goals": goals,
        "checks": {"zero_copy_sharing": sharing},
    }


main = main_of("actor_memory", parser, measure)

if __name__ == "__main__":
    raise SystemExit(main())
