"""Issue 6, item 3: the private memory (USS) of each evaluator actor, against the weights.

The supernet's state is put once in the object store as numpy arrays (``checkpoint.numpy_state``)
and every ``EvaluatorPool`` actor maps it zero-copy (docs/method.md §9).  For 1, 2 and 4 actors, in
merged and in supernet (unmerged) mode, each actor builds its evaluator, evaluates one candidate,
and then its process's USS (memory no other process shares; psutil ``memory_full_info().uss``)
is read, next to the bytes of the state in the object store.  An actor's "extra" memory is its
USS above a bare worker's (one that imports torch, timm and the engine and holds no model): what
its model and data cost it.  Two control actors: the same evaluator over a private copy of the
state shows what the sharing saves; the same evaluator with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``) shows how much of merged mode's memory is freed blocks the
allocator keeps.

What to expect: in supernet mode an actor holds only activations.  In merged mode it depends on
the merge strategy (--merge-strategies, glora_ray/search/merge.py): ``just_in_time`` (the CPU
default since issue 14) holds one layer's merged weight at a time and a bias per layer;
``per_candidate`` (before issue 14) holds the merged weights of every adapted layer of its
current candidate (new tensors, by design: the shared originals are never written), which for a
ViT is nearly all of its weights, plus what the allocator keeps of the previous candidate's.  A
private copy adds the whole state on top.

    python -m bench.actor_memory --size small      # ViT-B/16 weights (338 MiB), 32 px images
    python -m bench.actor_memory --size small --merge-strategies auto,per_candidate   # before / after
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    BenchError, add_common_args, build_supernet, check, comma_list, machine_info, make_spec, prepare_environment, preset,
    random_labels, require_ray, run_bench, say, state_bytes, synthetic_images,
)

MIB = 2**20
# glibc raises its mmap threshold each time it frees a large mmapped block, so later blocks of
# that size come from the heap and stay there when freed; a fixed threshold turns that off.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(MIB)}
CONTROLS = ("private_copy", "fixed_mmap_threshold")
SMALL_FRACTION = 0.10  # issue 14: an extra actor costs at most a tenth of the weights
VISIBLE_WEIGHTS = 64 * MIB  # below this, the weights vanish in an actor's baseline (interpreter, torch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.actor_memory", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, device=False, repeats=False)
    parser.add_argument("--actors", default=None, help="actor counts, comma-separated (default: per --size, e.g. 1,2,4)")
    parser.add_argument("--modes", default="merged,supernet", help="evaluation modes (default merged,supernet)")
    parser.add_argument("--merge-strategies", default="auto",
                        help="merged mode's strategies, comma-separated: the first is 'merged', each other one adds "
                             "rows merged_<s> (auto, just_in_time, per_candidate, batched; default auto)")
    parser.add_argument("--controls", default=",".join(CONTROLS),
                        help=f"control actors, comma-separated, from {','.join(CONTROLS)} (default: both; '' for none)")
    return parser


def process_memory(pid: int) -> dict[str, int]:
    try:
        import psutil
    except ImportError:
        raise BenchError("psutil is needed to read an actor's USS: pip install psutil") from None
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.AccessDenied, psutil.NoSuchProcess) as err:
        raise BenchError(f"cannot read the memory of actor process {pid}: {err}") from None
    return {"uss": int(info.uss), "pss": int(info.pss), "rss": int(info.rss)}


def merged_layer_bytes(supernet) -> int:
    """What ``MergedModel`` holds privately: a weight and a bias per adapted layer."""
    total = 0
    for layer in supernet.layers():
        weight = layer.base.weight
        total += (weight.numel() + weight.shape[0]) * weight.element_size()
    return total


def bare_actor_class():
    """The baseline: a worker that imports what an evaluator imports and holds no model."""

    class BareActor:
        def __init__(self, threads: int):
            import timm  # noqa: F401  (the evaluator builds its model with timm)
            import torch

            import glora_ray.search.pool  # noqa: F401

            torch.set_num_threads(threads)
            torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's CPU kernels, as an evaluation does

        def ready(self) -> bool:
            return True

    return BareActor


def private_copy_actor_class():
    """The control: ``EvaluatorActor`` over a private copy of the state (what sharing avoids)."""
    from glora_ray.search.pool import EvaluatorActor

    class PrivateCopyActor(EvaluatorActor):
        def __init__(self, spec, state, *rest):
            super().__init__(spec, {k: np.array(v, copy=True) for k, v in state.items()}, *rest)

    return PrivateCopyActor


def one_actor_memory(actor_class, spec, refs, settings, key: str, runtime_env: dict | None = None) -> dict[str, int]:
    """USS, PSS and RSS of one actor of ``actor_class`` after it evaluated ``key``."""
    import ray

    from bench.raytools import whereabouts

    options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0}
    if runtime_env:
        options["runtime_env"] = runtime_env
    handle = ray.remote(actor_class).options(**options).remote(spec, *refs, settings, 0)
    try:
        ray.get(handle.evaluate.remote([key]))
        return process_memory(whereabouts(handle)["pid"])
    finally:
        ray.kill(handle, no_restart=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ray = require_ray()
    import torch

    from glora_ray.checkpoint import numpy_state
    from glora_ray.search.config import EvalMode
    from glora_ray.search.merge import resolve_merge_strategy
    from glora_ray.search.pool import ActorSettings, EvaluatorActor, EvaluatorPool

    from bench.raytools import local_ray, whereabouts

    size = preset(args.size)
    try:
        counts = sorted({int(a) for a in args.actors.split(",")}) if args.actors else list(size.memory_actors)
        modes = [EvalMode(m) for m in comma_list(args.modes)]
        strategies = [resolve_merge_strategy(m, torch.device("cpu")).value for m in comma_list(args.merge_strategies)]
    except ValueError as err:
        raise BenchError(f"--actors takes integers, --modes merged/supernet, --merge-strategies "
                         f"auto/just_in_time/per_candidate/batched: {err}") from None
    if not counts or counts[0] < 1 or not modes or not strategies:
        raise BenchError("need at least one actor count >= 1 and one mode")
    wanted_controls = set(comma_list(args.controls))
    if wanted_controls - set(CONTROLS):
        raise BenchError(f"--controls: unknown {sorted(wanted_controls - set(CONTROLS))}; choose from {list(CONTROLS)}")
    torch.set_num_threads(1)
    model = size.memory_model
    spec = make_spec(model, seed=args.seed)
    supernet = build_supernet(spec, seed=args.seed)
    state = numpy_state(supernet)
    weights = state_bytes(state)
    merged_bytes = merged_layer_bytes(supernet)
    count = size.memory_val_images
    images = synthetic_images(count, model.img_size, args.seed)
    labels = random_labels(count, spec.num_classes, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    keys = [supernet.subnet_key(supernet.sample_genes(rng)) for _ in range(max(counts))]
    del supernet
    say(f"[actor_memory] {model.describe()} | state in the object store {weights / MIB:.1f} MiB "
        f"(adapted layers, merged: {merged_bytes / MIB:.1f} MiB) | {count} images | actors {counts}, modes "
        f"{[m.value for m in modes]}")

    rows: list[dict[str, Any]] = []
    controls: dict[str, dict[str, Any]] = {}
    store = 2 * weights + images.nbytes + 64 * MIB
    with local_ray(num_cpus=max(counts), object_store_bytes=store):
        refs = (ray.put(state), ray.put(images), ray.put(labels))
        bare = ray.remote(bare_actor_class()).options(num_cpus=1, max_restarts=0).remote(1)
        try:
            ray.get(bare.ready.remote())
            baseline = process_memory(whereabouts(bare)["pid"])["uss"]
        finally:
            ray.kill(bare, no_restart=True)
        say(f"  baseline: a worker that imports torch, timm and the engine, with no model: USS {baseline / MIB:.0f} MiB")
        # (row label, mode, merge strategy): merged mode once per strategy, the first labelled "merged".
        runs = [(mode.value if i == 0 else f"{mode.value}_{strategy}", mode, strategy)
                for mode in modes
                for i, strategy in enumerate(dict.fromkeys(strategies) if mode is EvalMode.MERGED else strategies[:1])]
        for label, mode, strategy in runs:
            settings = ActorSettings(batch_size=count, mode=mode, threads=1, cpus=1.0, gpus=0.0, merge=strategy)
            for n in counts:
                pool = EvaluatorPool(spec, *refs, n, settings, max_replacements=0, max_candidate_retries=0)
                try:
                    results = pool.evaluate(keys[:n], batch_size=1)  # one candidate per actor
                    actors = [whereabouts(slot.handle) for slot in pool.live]
                    memory = [process_memory(a["pid"]) for a in actors]
                finally:
                    pool.shutdown()
                if len(results) != n:
                    raise BenchError(f"{n} actors returned {len(results)} results")
                uss = [m["uss"] for m in memory]
                row = {"mode": label, "merge_strategy": strategy if mode is EvalMode.MERGED else None, "actors": n, "uss_per_actor": uss, "uss_median": statistics.median(uss),
                       "pss_median": statistics.median(m["pss"] for m in memory),
                       "rss_median": statistics.median(m["rss"] for m in memory)}
                rows.append(row)
                say(f"  {label:8s} {n} actor(s): USS per actor {', '.join(f'{u / MIB:.0f}' for u in uss)} MiB; "
                    f"above the baseline {(row['uss_median'] - baseline) / weights:.2f}x the weights")
        if wanted_controls:
            settings = ActorSettings(batch_size=count, mode=EvalMode.MERGED, threads=1, cpus=1.0, gpus=0.0)
            control_runs = {
                "private_copy": (private_copy_actor_class(), None, "merged, private copy of the state"),
                "fixed_mmap_threshold": (EvaluatorActor, {"env_vars": FIXED_MMAP_THRESHOLD},
                                         "merged, MALLOC_MMAP_THRESHOLD_=1MiB"),
            }
            for name, (actor_class, runtime_env, what) in control_runs.items():
                if name not in wanted_controls:
                    continue
                memory = one_actor_memory(actor_class, spec, refs, settings, keys[0], runtime_env)
                controls[name] = {"what": what, "actors": 1, **{f"{k}_median": v for k, v in memory.items()}}
                say(f"  control ({what}): USS {memory['uss'] / MIB:.0f} MiB; "
                    f"above the baseline {(memory['uss'] - baseline) / weights:.2f}x the weights")

    # "extra": an actor's USS above the bare baseline, i.e. what its model and data cost it.
    ratios: dict[str, Any] = {"baseline_over_weights": baseline / weights}
    for row in rows:
        ratios[f"extra_over_weights_{row['mode']}_{row['actors']}"] = (row["uss_median"] - baseline) / weights
    first_merged = next((r for r in rows if r["mode"] == "merged"), None)
    for name, control in controls.items():
        ratios[f"extra_over_weights_{name}_1"] = (control["uss_median"] - baseline) / weights
    if "private_copy" in controls and first_merged is not None:
        saved = controls["private_copy"]["uss_median"] - first_merged["uss_median"]
        ratios["sharing_saves_over_weights"] = saved / weights
    ratios["merged_layers_over_weights"] = merged_bytes / weights
    goals = {f"extra_actor_le_{SMALL_FRACTION}_weights_{label}":
             max(r["uss_median"] for r in rows if r["mode"] == label) - baseline <= SMALL_FRACTION * weights
             for label, _, _ in runs}
    if weights < VISIBLE_WEIGHTS or "sharing_saves_over_weights" not in ratios:
        sharing = check(True, f"skipped: {weights / MIB:.1f} MiB of weights are too few to see next to an "
                              f"actor's baseline, or no control was run")
    else:
        saved = ratios["sharing_saves_over_weights"]
        sharing = check(saved > 0.5, f"a private copy costs {saved:.2f}x the weights more than a shared-state actor")
    for name, value in ratios.items():
        say(f"{name}: {value:.2f}")
    for name, met in goals.items():
        say(f"goal {name}: {'met' if met else 'MISSED'}")
    return {
        "size": size.name,
        "device": "cpu",
        "machine": machine_info(),
        "settings": {"model": model.describe(), "val_images": count, "actor_counts": counts,
                     "modes": [m.value for m in modes], "merge_strategies": strategies, "threads_per_actor": 1,
                     "seed": args.seed},
        "weight_bytes": weights,
        "merged_layer_bytes": merged_bytes,
        "baseline_uss": baseline,
        "ratios": ratios,
        "actors": rows,
        "controls": controls,
        "goals": goals,
        "checks": {"zero_copy_sharing": sharing},
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("actor_memory", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
