"""The whole job on a simulated cluster, as a user runs it: ``ray job submit`` of pipelines/vtab.py.

Run as a script (``python tests/cluster_job.py REPORT.json ARGV...``) by tests/test_cluster.py: a
cluster needs a driver of its own.  A 0-CPU head (the job's driver runs there) and two 1-CPU worker
nodes, so two training workers and two evaluator actors can only run one per worker node.

1. The job is submitted (``ray job submit``).  Its training hangs at a step after its first checkpoint (``faults``); the
   worker node ``worker-1`` is then removed without warning and a fresh node, ``worker-3``, added:
   a preempted spot node replaced.  The job must still succeed.
2. The same job is submitted again: it must resume (nothing retrained or re-searched).
3. The same supernet trained without interruption on the same cluster (``train_supernet``, to
   ``<out>-uninterrupted``), so the test can compare the two.

Writes REPORT.json: each job's exit status and output, the node names by id, and where the
reference run's supernet is.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
STORE_BYTES = 256 * 2**20
# The removed node is found dead after 5 missed health checks: every second instead of Ray's 3 s
# (a killed raylet refuses the check at once; a slow one still has the default timeout to answer).
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000}
HANG_TIMEOUT_S = 300
JOB_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submit(dashboard: int, argv: list[str], log: Path) -> subprocess.Popen:
    """``ray job submit`` of the pipeline, as the README has users run it; its output into ``log``."""
    command = [*RAY_CLI, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
               "--", "python", "pipelines/vtab.py", *argv]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


def _wait_for_registered_checkpoint(out: str, deadline_s: float = 120.0) -> None:
    """Until Ray Train's controller has recorded the epoch-2 checkpoint (its snapshot names one):
    the worker reports it before the hang, but on a loaded machine the controller may take longer
    than the two steps to the hang to register it, and a node lost before that restarts from zero."""
    from glora_ray import storage
    from glora_ray.pipeline import layout
    from glora_ray.train.resume import RAY_CHECKPOINT_PREFIX, RAY_SNAPSHOT_FILE

    snapshot = storage.join(layout.train_uri(out, "digits"), "supernet", RAY_SNAPSHOT_FILE)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        # A substring, not the parsed record: the controller may be writing it as it is read.
        if storage.exists(snapshot) and RAY_CHECKPOINT_PREFIX in storage.read_bytes(snapshot).decode(errors="replace"):
            return
        time.sleep(0.5)


def _wait_for_job_agent(dashboard: int, deadline_s: float = 180.0) -> None:
    """Until the head's job agent takes submissions: before it registers, a submission is refused
    ("No available agent to submit job"), which a loaded machine makes likely."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            job = client.submit_job(entrypoint="python -c pass")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)


def _finish(job: subprocess.Popen, log: Path) -> dict:
    try:
        returncode = job.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        returncode = job.wait()
    return {"returncode": returncode, "logs": log.read_text()}


def _uninterrupted_training(argv: list[str], out: str) -> str:
    """The job's stage-1 supernet, trained in one go on this cluster; returns its folder."""
    from glora_ray import storage
    from glora_ray.budget import Budget
    from glora_ray.pipeline.cli import parse_config
    from glora_ray.pipeline.unit import spec_for, vtab_unit
    from glora_ray.train import train_supernet

    cfg = parse_config([*argv, "--out", out])
    unit = vtab_unit(cfg, cfg.datasets[0])
    spec = spec_for(cfg, unit.data)
    window = Budget(cfg.search.min_params, cfg.search.max_params).resolve(spec.build_empty().counter)
    result = train_supernet(spec, unit.data, unit.train_config(cfg.train, unit.lr, window),
                            storage.join(out, unit.path, "train"), "supernet")
    return result.checkpoint_dir


def main(report_path: str, out: str, argv: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from glora_ray import faults
    from glora_ray.runtime import init_ray

    dashboard = _free_port()
    # Every port of our own: another Ray on this machine (a benchmark, say) holds the defaults.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=STORE_BYTES, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=dashboard, dashboard_agent_listen_port=_free_port(), _system_config=HEAD_SYSTEM_CONFIG))
    report: dict = {"nodes": {cluster.head_node.node_id: "head"}, "jobs": []}
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES,
                                    dashboard_agent_listen_port=_free_port()) for _ in range(2)]
        report["nodes"].update({node.node_id: f"worker-{i + 1}" for i, node in enumerate(workers)})
        cluster.wait_for_nodes()
        _wait_for_job_agent(dashboard)
        command = [*argv, "--out", out]
        logs = [Path(report_path).with_name(f"job-{i}.log") for i in range(2)]

        first = _submit(dashboard, command, logs[0])
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while not os.path.exists(faults.hang_marker()) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.5)
        report["hang_reached"] = os.path.exists(faults.hang_marker())
        if report["hang_reached"]:  # a preempted node, and its replacement
            _wait_for_registered_checkpoint(out)
            cluster.remove_node(workers[0], allow_graceful=False)
            fresh = cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES, dashboard_agent_listen_port=_free_port())
            report["nodes"][fresh.node_id] = "worker-3"
        report["jobs"].append(_finish(first, logs[0]))
        # The hang fault passes once its marker exists: the rerun and the reference run are not
        # stopped.  They run side by side: the rerun trains nothing (the time of a driver's start).
        rerun = _submit(dashboard, command, logs[1])
        os.environ["RAY_ADDRESS"] = cluster.address  # this cluster, for Train's children too
        init_ray(verbose=False)
        report["uninterrupted"] = _uninterrupted_training(argv, f"{out}-uninterrupted")
        report["jobs"].append(_finish(rerun, logs[1]))
    finally:
        Path(report_path).write_text(json.dumps(report))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
