"""Issue 6, item 5: a search over a simulated multi-node cluster, against a single node.

``ray.cluster_utils.Cluster`` starts a head with 0 CPUs (the driver's node: it holds the object
store copy that the driver puts, and runs no actor) and ``--workers`` worker nodes of
``--cpus-per-node`` CPUs, all on this machine.  The real ``run_search`` runs on it with the
actors placed by ``SearchConfig.actor_placement`` (default SPREAD); each actor reports the node
it runs on (``raytools.recording_pools``).  Then the same search runs on a plain one-node Ray
instance with one actor.

Checks: the actors are spread over the worker nodes (with SPREAD) and none runs on the head;
the final population (timing and actor columns aside) and result.json equal the single-node
run's.  The wall times are printed for information only: simulated nodes share this machine's
cores, so they say nothing about a real cluster's speed.

    python -m bench.multinode --size small          # 3 worker nodes of 1 CPU
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BenchError, SearchProblem, add_common_args, check, machine_info, make_search_problem, prepare_environment,
    preset, require_ray, run_bench, say, search_config,
)

MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.multinode", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, device=False, repeats=False)
    parser.add_argument("--workers", type=int, default=None, help="worker nodes (default: per --size, 2-3)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each worker node (default 1)")
    parser.add_argument("--actors", type=int, default=None, help="evaluator actors (default: workers x cpus-per-node)")
    parser.add_argument("--placement", choices=("SPREAD", "DEFAULT"), default="SPREAD",
                        help="SearchConfig.actor_placement (default SPREAD)")
    return parser


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def search(problem: SearchProblem, config, out: str) -> tuple[Any, float]:
    from glora_ray.search import run_search

    start = time.perf_counter()
    result = run_search(problem.spec, problem.state, problem.images, problem.labels, config, out, "bench",
                        "synthetic", progress=lambda line: say(f"    {line}"))
    return result, time.perf_counter() - start


def on_cluster(problem: SearchProblem, config, out: str, workers: int, cpus: int) -> dict[str, Any]:
    """The search on a simulated cluster: where each actor ran, and the wall time."""
    import ray
    from ray.cluster_utils import Cluster

    from bench.raytools import init_kwargs, recording_pools

    store = max(256 * MIB, 3 * problem.weight_bytes)
    start = time.perf_counter()
    cluster = None
    try:
        try:
            # A free port for the head's API server: 8265 may belong to another Ray on this machine.
            cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=0, object_store_memory=store, include_dashboard=False, dashboard_port=free_port()))
            nodes = [cluster.add_node(num_cpus=cpus, object_store_memory=store) for _ in range(workers)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, **init_kwargs())
        except Exception as err:  # a cluster that does not come up cannot be measured
            raise BenchError(f"the simulated cluster did not start: {type(err).__name__}: {err}") from err
        up = time.perf_counter() - start
        names = {cluster.head_node.node_id: "head", **{n.node_id: f"worker-{i + 1}" for i, n in enumerate(nodes)}}
        say(f"  cluster up in {up:.1f} s: head (0 CPUs) + {workers} worker nodes of {cpus} CPU(s); "
            f"resources {ray.cluster_resources().get('CPU', 0):g} CPUs")
        with recording_pools() as pools:
            result, seconds = search(problem, config, out)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    if len(pools) != 1:
        raise BenchError(f"expected one evaluator pool, got {len(pools)}")
    placement = {actor: names.get(where["node_id"], where["node_id"]) for actor, where in pools[0].actors.items()}
    return {"result": result, "seconds": seconds, "cluster_up_s": up, "placement": placement,
            "worker_nodes": [names[n.node_id] for n in nodes]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    require_ray()
    import pandas as pd
    import torch

    from glora_ray.search import read_population, read_result, without_timing

    from bench.raytools import local_ray

    size = preset(args.size)
    workers = args.workers or size.cluster_workers
    if workers < 1 or args.cpus_per_node < 1:
        raise BenchError("--workers and --cpus-per-node must be >= 1")
    actors = args.actors or workers * args.cpus_per_node
    if not 1 <= actors <= workers * args.cpus_per_node:
        raise BenchError(f"--actors {actors} does not fit {workers} nodes x {args.cpus_per_node} CPUs")
    torch.set_num_threads(1)
    problem = make_search_problem(size, args.seed)
    multi_config = search_config(size, actors, args.seed, actor_placement=args.placement)
    single_config = search_config(size, 1, args.seed)
    say(f"[multinode] {size.model.describe()} | population {multi_config.population}, "
        f"{multi_config.generations} generations | {actors} actors on {workers} nodes ({args.placement}) "
        f"vs 1 actor on one node")

    with tempfile.TemporaryDirectory(prefix="glora-bench-multinode-") as root:
        say("  multi-node run:")
        multi = on_cluster(problem, multi_config, f"{root}/multi", workers, args.cpus_per_node)
        say("  single-node run:")
        with local_ray(num_cpus=1, object_store_bytes=3 * problem.weight_bytes):
            single, single_seconds = search(problem, single_config, f"{root}/single")
        frame_multi, frame_single = read_population(f"{root}/multi"), read_population(f"{root}/single")
        try:
            pd.testing.assert_frame_equal(without_timing(frame_multi), without_timing(frame_single))
            same_population = True
        except AssertionError:
            same_population = False
        same_result = read_result(f"{root}/multi") == read_result(f"{root}/single")

    placement = multi["placement"]
    node_of_actor = dict(placement)
    per_node = collections.Counter(node_of_actor.get(a, "?") for a in frame_multi["actor"])
    used = sorted(set(placement.values()))
    want = min(actors, workers)
    say("  placement: " + ", ".join(f"{a} on {n}" for a, n in sorted(placement.items())))
    say("  candidates evaluated per node: " + ", ".join(f"{n} {c}" for n, c in sorted(per_node.items())))
    say(f"  same population as the single-node run: {same_population}; same result.json: {same_result}; "
        f"best {multi['result'].best.key[:16]}... val_acc {multi['result'].best.val_acc:.4f}")
    say(f"  wall: cluster {multi['seconds']:.1f} s vs single node {single_seconds:.1f} s "
        f"(simulated nodes share this machine's cores: not a speed measurement)")
    checks = {
        "same_results": check(same_population and same_result,
                              f"population equal: {same_population}; result.json equal: {same_result}"),
        "none_on_head": check("head" not in used, f"nodes used: {used}"),
    }
    if args.placement == "SPREAD":
        checks["spread"] = check(len([n for n in used if n != "head"]) == want,
                                 f"{actors} actors on {len(used)} node(s) {used}; expected {want} worker nodes")
    return {
        "size": size.name,
        "device": "cpu",
        "machine": machine_info(),
        "settings": {"model": size.model.describe(), "workers": workers, "cpus_per_node": args.cpus_per_node,
                     "actors": actors, "placement": args.placement, "population": multi_config.population,
                     "generations": multi_config.generations, "seed": args.seed},
        "placement": placement,
        "nodes_used": used,
        "candidates_per_node": dict(per_node),
        "evaluations": multi["result"].evaluations,
        "best": {"key": multi["result"].best.key, "val_acc": multi["result"].best.val_acc},
        "ratios": {"wall_cluster_over_single": multi["seconds"] / single_seconds},
        "seconds": {"cluster_up": multi["cluster_up_s"], "cluster_search": multi["seconds"],
                    "single_search": single_seconds},
        "checks": checks,
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("multinode", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
