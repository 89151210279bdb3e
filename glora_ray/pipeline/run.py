"""The job: checks, then every training unit (``stages.run_unit``: train, search, test once,
merge, export), concurrently as the cluster allows, then the job's summary.

VTAB-1k runs one unit per dataset; few-shot and domain generalization build their own units
(``unit.TrainingUnit``, docs/method.md §8) and run them through ``run_units`` too.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import replace
from typing import Any, Sequence

import pandas as pd
import pyarrow.fs as pafs

from .. import storage
from ..errors import GLoRARayError, NoSpaceError, TrainingDiverged
from ..runtime import child_runtime_env, init_ray, on_this_node, quiet_ray_logs
from . import layout
from .comparison import read_comparisons, write_comparison
from .config import PipelineConfig, run_record
from .lock import LOCK_FILE
from .nodes import check_nodes_see
from .preflight import check_cluster, preflight
from .stages import run_unit
from .summary import summary_frame
from .unit import TrainingUnit, vtab_unit

log = logging.getLogger(__name__)


def _dataset_comparison(cfg: PipelineConfig, dataset: str) -> pd.DataFrame:
    """One dataset's comparison table over every seed of ``cfg``, as each seed's run stored it."""
    return read_comparisons([layout.dataset_uri(run.out, dataset) for _, run in cfg.seed_runs()])


def comparison_table(cfg: PipelineConfig) -> pd.DataFrame:
    """GLoRA against fixed adapters (``comparison.COMPARISON_COLUMNS``) for every dataset and seed
    of the finished run ``cfg``: the searched winner, the tested front and every baseline."""
    return pd.concat([_dataset_comparison(cfg, dataset) for dataset in cfg.datasets], ignore_index=True)


# -- the whole job ------------------------------------------------------------------------------
def _concurrency(cfg: PipelineConfig) -> int:
    import ray

    if cfg.max_concurrent_datasets is not None:
        return cfg.max_concurrent_datasets
    cpus = ray.cluster_resources().get("CPU", 1)
    per_dataset = max(cfg.train.world_size * cfg.train.cpus_per_worker, cfg.search.cpus_per_actor)
    return max(1, int(cpus // per_dataset))


def run_units(cfg: PipelineConfig, units: Sequence[TrainingUnit],
              runs: Sequence[PipelineConfig] | None = None) -> list[dict[str, Any]]:
    """Every unit, concurrently where the cluster has room; their rows in the units' order.

    ``runs``: the configuration each unit runs under (default ``cfg`` for all; VTAB's --seeds
    gives each seed its own).  Ray must be up (``init_ray``).  Progress lines reach this driver's
    logger through a queue; a unit's bad-input error is raised as itself (``_outcome``).
    """
    runs = [cfg] * len(units) if runs is None else list(runs)
    import ray
    from ray.util.queue import Queue

    # The unit driver only orchestrates: its Train workers and actors hold the resources.
    # Its children (Train's controller and cleaner, Tune) must find this Ray instance and no other.
    # It and the queue stay on this driver's node: a lost worker node must not take them along.
    driver_node = on_this_node()
    remote_unit = ray.remote(num_cpus=0)(run_unit).options(runtime_env=child_runtime_env(),
                                                           scheduling_strategy=driver_node)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node})
    limit, pending = _concurrency(cfg), list(range(len(units)))
    rows: dict[int, dict[str, Any]] = {}
    running: dict[Any, int] = {}
    try:
        while pending or running:
            while pending and len(running) < limit:
                index = pending.pop(0)
                running[remote_unit.remote(runs[index], units[index], progress)] = index
            done, _ = ray.wait(list(running), num_returns=1, timeout=_PROGRESS_POLL_S)
            _drain(progress)
            for ref in done:
                rows[running.pop(ref)] = _outcome(ref)
        _drain(progress)
    except TrainingDiverged:
        if len(units) == 1:  # with several, others may still be writing into --out
            withdraw_empty_run(cfg.out)
        raise
    finally:
        progress.shutdown()
    return [rows[i] for i in range(len(units))]


def withdraw_empty_run(out: str) -> None:
    """After a training diverged: when no unit of the run in ``out`` (a path or URI) kept anything
    (the diverged training removes its own folder), remove the run's records too, so that ``out``
    is as before and a rerun with other settings (a lower lr) may use it.  Only the run's
    top-level records and empty folders are removed, never a file of a unit."""
    fs, root = storage.resolve(out)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    if any(posixpath.dirname(path) != root for path in files):
        return  # a unit kept something: the record stays, and with it the run's settings
    for path in files:
        if posixpath.basename(path) != LOCK_FILE:
            fs.delete_file(path)
    for folder in sorted((e.path for e in entries if e.type == pafs.FileType.Directory), key=len, reverse=True):
        fs.delete_dir(folder)  # deepest first: each is empty by then
    log.info("--out %s: the run diverged before any unit kept anything; its record is removed", out)


def start_run(cfg: PipelineConfig, budgets: dict[str, tuple[int, int]], units: Sequence[TrainingUnit]) -> None:
    """After the checks that need no Ray: join or start Ray, check its resources and that every node
    sees the units' data (and a local ``--out``), then record the run (``config.json``), so that a
    recorded run is one that passed every check."""
    quiet_ray_logs(cfg.verbose)
    init_ray()
    check_cluster(cfg)
    check_nodes_see(cfg.out, units, cfg.backbone.checkpoint_path)
    storage.write_json(storage.join(cfg.out, layout.CONFIG_FILE),
                       {**run_record(cfg), "run_id": cfg.run_id(),
                        "budgets": {name: list(b) for name, b in budgets.items()}})


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """Check everything, then run every dataset (concurrently where the cluster has room).

    Progress (stages, epochs, generations with elapsed time and ETA) is logged on this module's
    logger; bad input raises a ``GLoRARayError`` before compute, also from inside a dataset's task.
    """
    budgets = preflight(cfg)
    # Every (dataset, seed) is one independent unit; with --seeds each seed has its own output folder.
    runs = [(dataset, seed, run) for dataset in cfg.datasets for seed, run in cfg.seed_runs()]
    units = [replace(vtab_unit(run, dataset), label=f"{dataset} seed={seed}" if cfg.seeds else None)
             for dataset, seed, run in runs]
    start_run(cfg, budgets, units)
    frame = summary_frame(run_units(cfg, units, [run for _, _, run in runs]))
    storage.write_parquet(storage.join(cfg.out, layout.SUMMARY_FILE), frame)
    if cfg.seeds:  # the mean ± std table and the plot over every seed, in <out>/<dataset>/
        for dataset in cfg.datasets:
            write_comparison(layout.dataset_uri(cfg.out, dataset), _dataset_comparison(cfg, dataset))
    return frame


_PROGRESS_POLL_S = 0.5


def _drain(progress) -> None:
    for line in progress.get_nowait_batch(progress.qsize()):
        log.info(line)


def _outcome(ref) -> dict[str, Any]:
    """A unit's row; its bad-input error as itself (one line), not Ray's wrapper."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        if isinstance(err.cause, GLoRARayError):
            raise err.cause from None
        no_space = NoSpaceError.found_in(err)
        if no_space is not None:
            raise no_space from None
        raise
