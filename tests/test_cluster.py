"""The whole job on a cluster, the way users run it, with its results on object storage.

A simulated cluster (``ray.cluster_utils.Cluster``: a 0-CPU head and two 1-CPU worker nodes) runs
``ray job submit ... pipelines/vtab.py`` on the tiny preset with 2 training workers and 2 actors,
``--out`` in a bucket of a real S3-compatible server on 127.0.0.1 (moto's server mode).  A worker
node is taken away mid-training and a fresh one added; the job must finish, spread over the nodes,
and its restored training must equal one trained without interruption.  The same command then
resumes.  The cluster needs a driver of its own, so ``tests/cluster_job.py`` runs it in a subprocess.
(``file://`` outputs: test_pipeline's finished run writes to one and resumes from it.)
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors

from glora_ray import faults, storage
from glora_ray.pipeline import layout
from glora_ray.data import DataError
from glora_ray.pipeline.nodes import PLACEMENT_FILE, compare_views, nodes_used
from helpers import REPO, injected_faults, tiny_args

BUCKET = "glora"
# Epochs of 12 steps (800 images, global batch 64): the hang comes 2 steps after the epoch-2 checkpoint.
CLUSTER_ARGS = ("--train-workers", "2", "--train-cpus", "1", "--actors", "2", "--actor-cpus", "1",
                "--epochs", "4", "--checkpoint-every", "2")
HANG_STEP = 2 * 12 + 2


@pytest.fixture(scope="module")
def s3():
    """A bucket on an S3-compatible server on 127.0.0.1; this process and its children reach it
    through the standard AWS variables."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


def test_working_dir_is_far_below_the_upload_limit():
    # `ray job submit --working-dir .` uploads the checkout; Ray refuses more than 100 MiB.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    total = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    assert total < 10 * 2**20, f"{total / 2**20:.1f} MiB would be uploaded"


def test_a_node_that_does_not_see_the_data_or_the_output_is_named():
    # What check_nodes_see gets back from each node (the cluster test runs it for real).
    expected = {"/data/digits/train800.txt": "a1", "/data/digits/images/7.png": "b2"}
    view = {"node_id": "3" * 56, "address": "10.0.0.3", "digests": dict(expected), "probe": True}
    compare_views("/runs/out", expected, [view, view])
    cases = [({"/data/digits/images/7.png": None}, True, r"node 10\.0\.0\.3 \(id 333333333333\) does not have "
                                                        r"/data/digits/images/7\.png, .* mount --data-root"),
             ({"/data/digits/train800.txt": "ff"}, True, "holds another version of /data/digits/train800.txt"),
             ({}, False, r"--out /runs/out: node 10\.0\.0\.3 .* does not see this folder")]
    for changed, probe, message in cases:
        with pytest.raises(DataError, match=message):
            compare_views("/runs/out", expected, [view, {**view, "digests": {**expected, **changed}, "probe": probe}])


def _adapters(folder: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(storage.join(folder, "adapters.safetensors")))


@pytest.mark.slow
def test_the_job_spans_the_nodes_survives_a_lost_node_writes_to_s3_and_resumes(s3, tmp_path):
    out = f"s3://{BUCKET}/run"
    argv = tiny_args(tmp_path / "data", "unused", *CLUSTER_ARGS)
    del argv[argv.index("--out"):argv.index("--out") + 2]  # cluster_job.py adds --out
    env = {**os.environ, **s3, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # the cluster is the child's own
    report_path = tmp_path / "report.json"
    try:
        with injected_faults(train_step={"step": HANG_STEP, "action": "hang"}):
            child = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_job.py"), str(report_path), out,
                                    *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        Path(faults.hang_marker()).unlink(missing_ok=True)
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(report_path.read_text())
    names = report["nodes"]
    first, rerun = report["jobs"]
    assert report["hang_reached"], first["logs"][-3000:]

    # 1. A worker node lost mid-training, a fresh one added: the job still succeeds.
    assert first["returncode"] == 0, first["logs"][-4000:]
    assert "data: 2 node(s) besides this one see the 12 checked file(s)" in first["logs"]  # 3 lists, 3 images each
    placement = storage.read_json(storage.join(layout.dataset_uri(out, "digits"), PLACEMENT_FILE))
    assert names[placement["driver"]] == "head"
    segments = [(s["epochs"], sorted(names[n] for n in s["nodes"])) for s in placement["training"]["supernet"]]
    # Restored from its epoch-2 checkpoint: the epochs before it ran on the lost node, the rest on
    # the fresh one; two workers, one per worker node, throughout.
    assert segments == [([0, 1], ["worker-1", "worker-2"]), ([2, 3], ["worker-2", "worker-3"])]
    search_nodes = sorted(names[n] for n in nodes_used(placement, "search"))
    assert search_nodes == ["worker-2", "worker-3"]  # the two actors, one per live worker node
    assert all(len(set(g["actors"].values())) == 2 for g in placement["search"])

    # ... and its training equals one trained without interruption, to the bit.
    supernet = storage.join(layout.train_uri(out, "digits"), "supernet", "supernet")
    restored, reference = _adapters(supernet), _adapters(report["uninterrupted"])
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[name], reference[name]) for name in restored)
    history = storage.read_json(storage.join(supernet, "history.json"))
    assert [h["loss"] for h in history] == [h["loss"] for h in
                                            storage.read_json(storage.join(report["uninterrupted"], "history.json"))]

    # 2. Everything is in the bucket and readable from there.
    fs, root = storage.resolve(out)
    summary = pq.read_table(f"{root}/{layout.SUMMARY_FILE}", filesystem=fs).to_pandas()
    assert list(summary["dataset"]) == ["digits"] and summary["test_acc"].iloc[0] > 0.15  # chance: 0.1
    population = pq.read_table(f"{root}/digits/search/population", filesystem=fs).to_pandas()
    assert set(population["generation"]) == {0, 1}
    export = layout.export_uri(out, "digits")
    subnet = storage.read_json(storage.join(export, "subnet.json"))
    assert subnet["key"] == summary["key"].iloc[0] and subnet["params"] <= 6_000
    assert len(storage.read_bytes(storage.join(export, "merged.safetensors"))) > 100_000
    assert storage.read_json(storage.join(export, "test.json"))["test_acc"] == summary["test_acc"].iloc[0]

    # 3. The same command resumes: nothing trained, searched or tested again; the same result.
    assert rerun["returncode"] == 0, rerun["logs"][-4000:]
    assert "stage 1: epoch" not in rerun["logs"] and "testing the winner" not in rerun["logs"]
    assert "resuming: 2 complete generations, 16 evaluations" in rerun["logs"]
    assert len(storage.read_json(storage.join(layout.dataset_uri(out, "digits"), "wall_time.json"))["runs"]) == 2
    again = pq.read_table(f"{root}/{layout.SUMMARY_FILE}", filesystem=fs).to_pandas()
    pd.testing.assert_frame_equal(again.drop(columns="wall_seconds"), summary.drop(columns="wall_seconds"))
