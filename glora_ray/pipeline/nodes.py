"""The cluster's nodes: what each one sees of the run's inputs, and what the run placed where.

``check_nodes_see`` runs once Ray is up, before the run is recorded: a training worker, an
evaluator actor or a test task may land on any node with CPUs or GPUs, and each reads the images
from ``--data-root`` as a local path there (a shared mount: NFS, Lustre, a cloud disk).  A node
that lacks a list file or an image, or holds another version of it, is named in one line now
rather than failing a worker mid-run.  A local ``--out`` must be shared the same way, since Ray
Train's workers write checkpoints into it; a URI ``--out`` needs no such check.

``write_placement`` records where a unit's stages ran in ``<unit>/placement.json``, from what the
stages stored themselves: each training's history names the node of every rank, epoch by epoch
(``train.job``), and each search generation's commit record the node of every actor
(``search.runner``).  So the record is the same whether the unit ran in one go or was resumed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from typing import Any, Mapping, Sequence

from .. import storage
from ..data.vtab import DataError
from ..train.job import HISTORY_FILE
from .unit import TrainingUnit

log = logging.getLogger(__name__)
PLACEMENT_FILE = "placement.json"
_IMAGES_PER_LIST = 3  # images compared per list file besides the list itself: first, middle, last


def _digest(path: str) -> str | None:
    """sha256 of the file at ``path`` on this node; None when it is missing or unreadable."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def inputs_of(units: Sequence[TrainingUnit], checkpoint: str | None = None) -> list[str]:
    """The files every node must see as this driver does: each list file a unit reads, a few of
    the images it names (reading all of them on every node would cost as much as the run), and a
    local backbone ``checkpoint``, which every worker and actor loads."""
    paths: dict[str, None] = {}
    if checkpoint is not None and storage.local_path(checkpoint) is not None:
        paths[storage.local_path(checkpoint)] = None
    for unit in units:
        for split in unit.splits:
            paths[str(unit.data.list_path(split))] = None
            samples = unit.data.samples(split, check_exists=False)
            for index in sorted({0, len(samples) // 2, len(samples) - 1}) if samples else ():
                paths[str(samples[index].path)] = None
    return list(paths)


def _look(paths: Sequence[str], probe: str | None) -> dict[str, Any]:
    """On one node: the digest of each path and whether the probe file of a local --out is there."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
            "digests": {p: _digest(p) for p in paths}, "probe": probe is None or os.path.isfile(probe)}


def _worker_nodes() -> list[str]:
    """The ids of the alive nodes other than this one that can run workers, actors or tasks."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] != here
            and (node["Resources"].get("CPU", 0) > 0 or node["Resources"].get("GPU", 0) > 0)]


def check_nodes_see(out: str, units: Sequence[TrainingUnit], checkpoint: str | None = None) -> None:
    """Every other node with CPUs or GPUs sees the units' inputs (``inputs_of``) with this driver's
    content, and a local ``out`` as the same folder; else a ``DataError`` naming the node and the
    first file it does not see (``compare_views``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _worker_nodes()
    if not nodes:
        return  # one machine: preflight read everything here
    paths = inputs_of(units, checkpoint)
    local_out = storage.local_path(out)
    probe = None if local_out is None else os.path.join(local_out, f".glora-ray-probe-{uuid.uuid4().hex}")
    if probe is not None:
        os.makedirs(local_out, exist_ok=True)
        open(probe, "w").close()
    try:
        look = ray.remote(num_cpus=0)(_look)
        seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(paths, probe) for node in nodes])
    finally:
        if probe is not None:
            os.remove(probe)
    compare_views(out, {path: _digest(path) for path in paths}, seen)
    log.info("data: %d node(s) besides this one see the %d checked file(s)", len(nodes), len(paths))


def compare_views(out: str, expected: Mapping[str, str | None], seen: Sequence[Mapping[str, Any]]) -> None:
    """Refuse the first node whose view (``_look``) differs from this driver's digests ``expected``."""
    for view in seen:
        where = f"node {view['address']} (id {view['node_id'][:12]})"
        if not view["probe"]:
            raise DataError(f"--out {out}: {where} does not see this folder, where Ray Train's workers write "
                            f"their checkpoints; give a folder every node mounts at the same path, or a URI "
                            f"(s3://, gs://)")
        for path, digest in view["digests"].items():
            if digest != expected[path]:
                what = "does not have" if digest is None else "holds another version of"
                raise DataError(f"{where} {what} {path}, which the run reads on every node at that local path: "
                                f"mount --data-root (and a --checkpoint file) the same way on every node, "
                                f"e.g. from a shared file system")


def node_table() -> dict[str, dict[str, Any]]:
    """Every node the cluster has known in this session, by id: address, host name, alive."""
    import ray

    return {node["NodeID"]: {"address": node["NodeManagerAddress"], "hostname": node["NodeManagerHostname"],
                             "alive": bool(node["Alive"])} for node in ray.nodes()}


def training_segments(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Runs of consecutive epochs trained on the same nodes: ``{"epochs": [first, last], "nodes":
    [node of rank 0, rank 1, ...]}``; a restart on other nodes (a lost node replaced) starts a new one."""
    segments: list[dict[str, Any]] = []
    for entry in history:
        nodes = entry.get("nodes")  # absent in histories written before placement was recorded
        if segments and segments[-1]["nodes"] == nodes and segments[-1]["epochs"][1] == entry["epoch"] - 1:
            segments[-1]["epochs"][1] = entry["epoch"]
        else:
            segments.append({"epochs": [entry["epoch"], entry["epoch"]], "nodes": nodes})
    return segments


def write_placement(unit_uri: str, trainings: Mapping[str, str], search_nodes: Sequence[Mapping[str, str]]) -> dict:
    """``<unit>/placement.json``: the node of this unit's driver task, each training's segments
    (``trainings``: stage name -> its supernet folder, whose history names the nodes) and each
    search generation's actors (actor -> node), with every node named there described."""
    import ray

    record: dict[str, Any] = {
        "driver": ray.get_runtime_context().get_node_id(),
        "training": {stage: training_segments(storage.read_json(storage.join(folder, HISTORY_FILE)))
                     for stage, folder in trainings.items()},
        "search": [{"generation": g, "actors": dict(sorted(nodes.items()))} for g, nodes in enumerate(search_nodes)],
    }
    used = {record["driver"], *(n for nodes in search_nodes for n in nodes.values())}
    used.update(n for segments in record["training"].values() for s in segments for n in s["nodes"] or ())
    record["nodes"] = {node: info for node, info in node_table().items() if node in used}
    storage.write_json(storage.join(unit_uri, PLACEMENT_FILE), record)
    return record


def nodes_used(record: Mapping[str, Any], stage: str) -> set[str]:
    """The nodes a stage of a ``placement.json`` record ran on: ``"search"`` or a training's name."""
    if stage == "search":
        return {node for generation in record["search"] for node in generation["actors"].values()}
    return {node for segment in record["training"][stage] for node in segment["nodes"] or ()}
