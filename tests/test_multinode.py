"""A search over a simulated multi-node cluster: the actors spread over the worker nodes, none on
the driver's 0-CPU head, and the results equal a one-node run's (formerly bench/multinode.py).

``ray.cluster_utils.Cluster`` needs its own driver, so the cluster run happens in a subprocess
(``cluster_search`` below); the one-node run uses the session's ``ray_local``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from glora_ray.search import SearchConfig, read_population, read_result, run_search, without_timing

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
SEARCH = dict(population=6, parents=2, mutants=2, crossovers=2, generations=2, eval_batch_size=16, seed=0,
              cpus_per_actor=1.0, threads_per_actor=1)


def tiny_problem():
    from glora_ray.search.synthetic import synthetic_problem
    from helpers import tiny_spec

    return synthetic_problem(tiny_spec(), 32, seed=0)


def cluster_search(out: str) -> None:
    """In a subprocess: the search on a head with 0 CPUs plus WORKERS nodes of 1 CPU; writes
    ``placement.json`` (actor -> "head" / "worker-<i>") into ``out``."""
    import logging
    import socket

    import pandas as pd  # noqa: F401  (imported before Ray, as in the test process)
    import ray
    from ray.cluster_utils import Cluster

    problem = tiny_problem()
    with socket.socket() as sock:  # a free port for the head's API server: 8265 may be taken
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = 256 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=store,
                                                                include_dashboard=False, dashboard_port=port))
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(WORKERS)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        result = run_search(problem.spec, problem.state, problem.images, problem.labels,
                            SearchConfig(**SEARCH, num_actors=WORKERS, actor_placement="SPREAD"), out, "run-m",
                            "synthetic")
        names = {cluster.head_node.node_id: "head", **{n.node_id: f"worker-{i + 1}" for i, n in enumerate(nodes)}}
        placement = {actor: names.get(info["node_id"], info["node_id"]) for actor, info in result.pool.actors.items()}
        Path(out, "placement.json").write_text(json.dumps(placement))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_simulated_cluster_spreads_the_actors_and_gives_one_nodes_results(ray_local, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                                     os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # the cluster is the child's own
    child = subprocess.run([sys.executable, "-c", f"from test_multinode import cluster_search; "
                                                  f"cluster_search({str(multi)!r})"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    problem = tiny_problem()
    run_search(problem.spec, problem.state, problem.images, problem.labels, SearchConfig(**SEARCH, num_actors=1),
               str(single), "run-m", "synthetic")

    placement = json.loads((multi / "placement.json").read_text())
    assert sorted(placement.values()) == [f"worker-{i + 1}" for i in range(WORKERS)]  # spread, none on the head
    frame = read_population(multi)
    assert set(frame["actor"]) <= set(placement)
    pd.testing.assert_frame_equal(without_timing(frame), without_timing(read_population(single)))
    assert read_result(multi) == read_result(single)
