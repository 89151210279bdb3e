"""The job: per dataset, stage 1 (train), stage 2 (search), stage 3 (test once, merge, export)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Callable

import pandas as pd

from .. import storage
from ..backbone import BackboneError, create_backbone
from ..budget import Budget
from ..checkpoint import SupernetSpec, load_supernet, numpy_state
from ..data import EMBEDDED_DATASETS, DataConfig
from ..data.digits import write_digits_dataset
from ..search import run_search
from ..train import train_supernet
from . import layout
from .config import DatasetOutcome, PipelineConfig, PipelineConfigError
from .export import export_winner
from .holdout import split_accuracies
from .lr_sweep import sweep_learning_rate
from .summary import format_summary, summary_frame
from .unit import TrainingUnit, vtab_data, vtab_unit

log = logging.getLogger(__name__)
EVAL_SPLITS = ("val200", "test")
TEST_FILE = "test.json"  # the winner's single test result; present means "tested once already"
PARETO_TEST_FILE = "pareto_test.parquet"
LR_SWEEP_FILE = "lr_sweep.json"


def run_id_for(cfg: PipelineConfig) -> str:
    """Stable across reruns of the same job, so a resumed run writes the same rows."""
    identity = json.dumps(cfg.identity(), sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def spec_for(cfg: PipelineConfig, dataset: str | DataConfig) -> SupernetSpec:
    data = data_for(cfg, dataset) if isinstance(dataset, str) else dataset
    return SupernetSpec(backbone=cfg.backbone, num_classes=data.num_classes, ranks=cfg.ranks,
                        targets=cfg.targets, dataset=data.name, adapter_seed=cfg.train.seed)


def data_for(cfg: PipelineConfig, dataset: str) -> DataConfig:
    return vtab_data(cfg, dataset)


# -- before any compute ----------------------------------------------------------------------
def _check_backbone_weights(cfg: PipelineConfig) -> None:
    """Checkpoint file and (offline) hub cache: loads the weights once on the CPU."""
    if cfg.backbone.pretrained or cfg.backbone.checkpoint_path:
        create_backbone(cfg.backbone, num_classes=2)


def _check_output(cfg: PipelineConfig) -> None:
    config_uri = storage.join(cfg.out, layout.CONFIG_FILE)
    if storage.exists(config_uri):
        stored = storage.read_json(config_uri)
        if not cfg.resume:
            raise PipelineConfigError(f"--out {cfg.out} already holds a run; drop --no-resume to continue it, "
                                      f"or choose another --out")
        stored_identity, identity = stored.get("identity", {}), json.loads(json.dumps(cfg.identity(), default=str))
        differing = sorted(_differences(stored_identity, identity))
        if differing:
            raise PipelineConfigError(
                f"--out {cfg.out} holds a different run's results (differs in {', '.join(differing[:6])}); "
                f"choose another --out"
            )
    elif not storage.is_empty_dir(cfg.out):
        raise PipelineConfigError(f"--out {cfg.out} is not empty and holds no glora-ray run ({layout.CONFIG_FILE}); "
                                  f"choose an empty or new folder")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def preflight(cfg: PipelineConfig) -> dict[str, tuple[int, int]]:
    """Every check that needs no training, in order of cost; returns each dataset's budget."""
    _check_output(cfg)
    try:
        cfg.backbone.validate()  # model name and checkpoint path: before anything builds a model
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    for dataset in cfg.datasets:
        if dataset in EMBEDDED_DATASETS and cfg.write_embedded_data:
            write_digits_dataset(cfg.data_root)
        data_for(cfg, dataset).validate((cfg.train.split, *EVAL_SPLITS))
    budgets = {}
    for dataset in cfg.datasets:
        counter = spec_for(cfg, dataset).build_empty().counter
        budgets[dataset] = Budget(cfg.search.min_params, cfg.search.max_params).resolve(counter)
    try:
        _check_backbone_weights(cfg)
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    return budgets


# -- one dataset -------------------------------------------------------------------------------
def run_dataset(cfg_dict: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Stages 1-3 for one dataset; every stage resumes from what an earlier run completed."""
    cfg = PipelineConfig.from_dict(cfg_dict)
    return run_unit(cfg, vtab_unit(cfg, dataset))


def run_unit(cfg: PipelineConfig, unit: TrainingUnit) -> dict[str, Any]:
    """Stages 1-3 for one training unit; every stage resumes from what an earlier run completed."""
    say = _progress(unit.name)
    started = time.perf_counter()
    spec, data = spec_for(cfg, unit.data), unit.data
    export_uri = layout.export_uri(cfg.out, unit.path)

    sweep = None
    if cfg.lr_sweep:
        say(f"stage 1: lr sweep over {list(cfg.lr_sweep)} (Ray Tune)")
        sweep = sweep_learning_rate(spec, data, unit.train_config(cfg.train), cfg.lr_sweep,
                                    layout.train_uri(cfg.out, unit.path), cfg.search, cfg.lr_sweep_subnets,
                                    cfg.train.seed, unit.search_split)
        storage.write_json(storage.join(export_uri, LR_SWEEP_FILE), asdict(sweep))
        lr, checkpoint_dir = sweep.lr, sweep.checkpoint_dir
        say(f"stage 1: lr {lr:g} chosen; trials {[(t['lr'], round(t['val_acc'], 4)) for t in sweep.trials]}")
    else:
        lr = unit.lr
        say(f"stage 1: training the supernet, lr {lr:g}, {cfg.train.epochs} epochs, {cfg.train.world_size} worker(s)")
        trained = train_supernet(spec, data, unit.train_config(cfg.train, lr), layout.train_uri(cfg.out, unit.path),
                                 "supernet")
        checkpoint_dir = trained.checkpoint_dir
        last = trained.history[-1] if trained.history else {}
        say(f"stage 1: done, loss {last.get('loss', float('nan')):.4f}, train acc {last.get('train_acc', float('nan')):.4f}")

    supernet, spec = load_supernet(checkpoint_dir, expected=spec)
    val_images, val_labels = data.arrays(unit.search_split)
    say("stage 2: evolutionary search")
    search = run_search(spec, numpy_state(supernet), val_images, val_labels, cfg.search,
                        layout.search_uri(cfg.out, unit.path), run_id_for(cfg), unit.name, progress=say)
    best = search.best
    del val_images, val_labels

    tests = _test_once(cfg, unit, checkpoint_dir, best, storage.join(export_uri, TEST_FILE), say)
    test_acc = tests[unit.tests[0].name]
    several = {"tests": tests} if len(unit.tests) > 1 else {}
    export_winner(supernet, spec, best.genes, export_uri, val_acc=best.val_acc, test_acc=test_acc, lr=lr, **several)
    if cfg.test_pareto:
        _test_front(cfg, search.pareto, checkpoint_dir, data, export_uri, supernet, unit.tests[0].split)
    say(f"stage 3: exported to {export_uri} (test acc {test_acc:.4f})")
    outcome = DatasetOutcome(
        dataset=unit.data.name, group=unit.group, lr=lr, params=best.params,
        head_params=supernet.head_num_params, val_acc=best.val_acc, test_acc=test_acc,
        wall_seconds=time.perf_counter() - started, subnet=best.key, extra={**unit.extra, **several},
    )
    return asdict(outcome)


def _test_once(cfg: PipelineConfig, unit: TrainingUnit, checkpoint_dir: str, best, test_uri: str,
               say: Callable[[str], None]) -> dict[str, float]:
    """Each test list's accuracy of the winner; a list already tested for this winner is never tested again."""
    stored = storage.read_json(test_uri) if storage.exists(test_uri) else {}
    tests: dict[str, float] = {}
    if stored.get("subnet") == best.key:  # this winner was tested already: keep what it scored
        tests = dict(stored.get("tests") or {unit.tests[0].name: stored["test_acc"]})
    for test in unit.tests:
        if test.name in tests:
            continue
        restricted = f" (restricted to its {len(test.classes)} classes)" if test.classes is not None else ""
        say(f"stage 3: testing the winner ({best.params:,} params, val {best.val_acc:.4f}) once on {test.name}"
            f"{restricted}")
        tests[test.name] = _remote_accuracies(cfg, checkpoint_dir, [best.genes], unit.data, test.split,
                                              test.classes)[0]
        record: dict[str, Any] = {"subnet": best.key, "tests": tests}
        if unit.tests[0].name in tests:
            record["test_acc"] = tests[unit.tests[0].name]
        storage.write_json(test_uri, record)
    return tests


def _remote_accuracies(cfg: PipelineConfig, checkpoint_dir: str, genes_list, data: DataConfig, split: str = "test",
                       classes: tuple[int, ...] | None = None) -> list[float]:
    """Test evaluation on the resources of one evaluator actor (a GPU where actors get one)."""
    import ray

    task = ray.remote(split_accuracies).options(num_cpus=cfg.search.cpus_per_actor,
                                                num_gpus=cfg.search.gpus_per_actor)
    return ray.get(task.remote(checkpoint_dir, genes_list, data, split, cfg.search.eval_batch_size, classes))


def _test_front(cfg, front: pd.DataFrame, checkpoint_dir: str, data: DataConfig, export_uri: str, supernet,
                split: str) -> None:
    genes = [supernet.to_genes(key) for key in front["key"]]
    accuracies = _remote_accuracies(cfg, checkpoint_dir, genes, data, split)
    table = front.assign(test_acc=accuracies)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(export_uri, PARETO_TEST_FILE), buffer.getvalue())


def _progress(name: str) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(f"[{name}] {line}", flush=True)

    return say


# -- the whole job ------------------------------------------------------------------------------
def init_ray() -> None:
    """Join the cluster a `ray job submit` (or RAY_ADDRESS) names; else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        # The dashboard (when ray[default] is installed) serves the State API that Train V2's
        # placement-group cleaner polls; without it that actor logs an error every second.
        ray.init(address="local", logging_level=logging.WARNING)


def _concurrency(cfg: PipelineConfig) -> int:
    import ray

    if cfg.max_concurrent_datasets is not None:
        return cfg.max_concurrent_datasets
    cpus = ray.cluster_resources().get("CPU", 1)
    per_dataset = max(cfg.train.world_size * cfg.train.cpus_per_worker, cfg.search.cpus_per_actor)
    return max(1, int(cpus // per_dataset))


def run_units(cfg: PipelineConfig, units: list[TrainingUnit]) -> list[dict[str, Any]]:
    """Every unit, concurrently where the cluster has room; their rows in the units' order."""
    import ray

    init_ray()
    # The unit driver only orchestrates: its Train workers and actors hold the resources.
    remote_unit = ray.remote(num_cpus=0)(run_unit)
    limit, pending = _concurrency(cfg), list(range(len(units)))
    rows: dict[int, dict[str, Any]] = {}
    running: dict[Any, int] = {}
    while pending or running:
        while pending and len(running) < limit:
            index = pending.pop(0)
            running[remote_unit.remote(cfg, units[index])] = index
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            rows[running.pop(ref)] = ray.get(ref)
    return [rows[i] for i in range(len(units))]


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """Check everything, then run every dataset (concurrently where the cluster has room)."""
    budgets = preflight(cfg)
    storage.write_json(storage.join(cfg.out, layout.CONFIG_FILE),
                       {"config": cfg.to_dict(), "identity": cfg.identity(), "run_id": run_id_for(cfg),
                        "budgets": {d: list(b) for d, b in budgets.items()}})
    frame = summary_frame(run_units(cfg, [vtab_unit(cfg, dataset) for dataset in cfg.datasets]))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(cfg.out, layout.SUMMARY_FILE), buffer.getvalue())
    print(format_summary(frame), flush=True)
    print(f"results: {cfg.out} (summary: {storage.join(cfg.out, layout.SUMMARY_FILE)}; "
          f"per dataset: <dataset>/export/merged.safetensors, subnet.json, adapters.safetensors)", flush=True)
    return frame
