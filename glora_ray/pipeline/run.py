"""The job: per training unit, stage 1 (train), stage 2 (search), stage 3 (test once, merge, export).

VTAB-1k runs one unit per dataset; few-shot and domain generalization build their own units
(``unit.TrainingUnit``, docs/method.md §8) and run them through ``run_units`` too.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow.fs as pafs

from .. import storage
from ..budget import Budget
from ..checkpoint import load_supernet, numpy_state
from ..data import DataConfig
from ..errors import GLoRARayError, NoSpaceError, TrainingDiverged
from ..runtime import child_runtime_env, init_ray, on_this_node, quiet_ray_logs
from ..search import run_search
from ..train import train_supernet
from ..train.job import HISTORY_FILE
from ..train.loop import training_compute
from . import layout
from .baselines import VAL_SPLIT as BASELINE_VAL_SPLIT, baseline, run_baselines
from .comparison import comparison_rows, read_comparisons, write_comparison
from .config import DatasetOutcome, PipelineConfig, run_record
from .export import export_winner
from .holdout import split_accuracies
from .inference import INFERENCE_FILE, describe as describe_inference, winner_inference
from .peft_export import PeftExportError, export_peft
from .lr_sweep import sweep_learning_rate
from .preflight import check_cluster, preflight
from .row_kinds import SUPERNET_WEIGHTS, retrained_weights
from .summary import summary_frame
from .lock import LOCK_FILE
from .nodes import PLACEMENT_FILE, check_nodes_see, nodes_used, write_placement
from .unit import TrainingUnit, spec_for, vtab_data, vtab_unit

log = logging.getLogger(__name__)
TEST_FILE = "test.json"  # the winner's single test result; present means "tested once already"
PARETO_TEST_FILE = "pareto_test.parquet"
LR_SWEEP_FILE = "lr_sweep.json"
WALL_TIME_FILE = "wall_time.json"  # per unit: the seconds of every invocation that finished it


def run_id_for(cfg: PipelineConfig) -> str:
    """Stable across reruns of the same job, so a resumed run writes the same rows."""
    identity = json.dumps(cfg.identity(), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


# -- one unit ----------------------------------------------------------------------------------
def run_dataset(cfg_dict: dict[str, Any], dataset: str, progress: Any = None,
                label: str | None = None) -> dict[str, Any]:
    """Stages 1-3, baselines and comparison for one VTAB-1k dataset (or an own one in its layout);
    see ``run_unit``.  ``label``: the progress lines' prefix (default: the dataset's name)."""
    cfg = PipelineConfig.from_dict(cfg_dict)
    return run_unit(cfg, replace(vtab_unit(cfg, dataset), label=label), progress)


def run_unit(cfg: PipelineConfig, unit: TrainingUnit, progress: Any = None) -> dict[str, Any]:
    """Stages 1-3 for one training unit, then its baselines (``cfg.baselines``, trained like the
    supernet on the unit's training list, scored on its search list and its first test list) and
    its comparison table; every stage resumes from what an earlier run completed.

    ``progress``: a ``ray.util.queue.Queue`` that carries this unit's progress lines to the
    driver (``run_units``); None: they are logged here.
    """
    quiet_ray_logs(cfg.verbose)
    say = _progress(unit.label or unit.name, progress)
    started = time.perf_counter()
    try:
        return _run_stages(cfg, unit, say, started)
    except TrainingDiverged:
        raise  # nothing of a diverged training is kept, its time neither
    except Exception:
        try:  # a failed invocation's time counts in the unit's total too
            add_wall_time(layout.dataset_uri(cfg.out, unit.path), time.perf_counter() - started, say)
        except (OSError, GLoRARayError):
            pass  # e.g. the disk that failed the run is still full: the run's own error is the one to see
        raise


def _run_stages(cfg: PipelineConfig, unit: TrainingUnit, say: "_Progress", started: float) -> dict[str, Any]:
    spec, data = spec_for(cfg, unit.data), unit.data
    export_uri = layout.export_uri(cfg.out, unit.path)
    structure = spec.build_empty()  # meta device: the counter and the baselines' genes
    window = Budget(cfg.search.min_params, cfg.search.max_params).resolve(structure.counter)

    sweep = None
    if cfg.lr_sweep:
        say(f"stage 1: lr sweep over {list(cfg.lr_sweep)} (Ray Tune)")
        sweep = sweep_learning_rate(spec, data, unit.train_config(cfg.train, window=window), cfg.lr_sweep,
                                    layout.train_uri(cfg.out, unit.path), cfg.search, cfg.lr_sweep_subnets,
                                    cfg.train.seed, unit.search_split)
        storage.write_json(storage.join(export_uri, LR_SWEEP_FILE), asdict(sweep))
        lr, checkpoint_dir = sweep.lr, sweep.checkpoint_dir
        compute = training_compute(storage.read_json(storage.join(checkpoint_dir, HISTORY_FILE)))
        trials = [(t["lr"], "diverged" if t["diverged"] else round(t["val_acc"], 4)) for t in sweep.trials]
        say(f"stage 1: lr {lr:g} chosen; trials {trials}")
    else:
        lr = unit.lr
        where = "in this process (Ray Train local mode)" if cfg.train.num_workers == 0 else \
            f"{cfg.train.world_size} worker(s)"
        say(f"stage 1: training the supernet, lr {lr:g}, {cfg.train.epochs} epochs, {where}")
        trained = train_supernet(spec, data, unit.train_config(cfg.train, lr, window),
                                 layout.train_uri(cfg.out, unit.path), "supernet", progress=_stage(say, "stage 1"))
        checkpoint_dir = trained.checkpoint_dir
        compute = training_compute(trained.history)
        last = trained.history[-1] if trained.history else {}
        say(f"stage 1: done, loss {last.get('loss', float('nan')):.4f}, train acc {last.get('train_acc', float('nan')):.4f}")

    supernet, spec = load_supernet(checkpoint_dir, expected=spec)
    val_images, val_labels = data.arrays(unit.search_split)
    say("stage 2: evolutionary search")
    initial = [baseline(name).genes(structure) for name in cfg.seed_population]
    search = run_search(spec, numpy_state(supernet), val_images, val_labels, cfg.search,
                        layout.search_uri(cfg.out, unit.path), run_id_for(cfg), unit.name,
                        progress=_stage(say, "stage 2"), initial=initial)
    best = search.best
    del val_images, val_labels

    # Baselines score on this unit's search list (as the baseline module's val split) and every test list, by name.
    unit_split = {BASELINE_VAL_SPLIT: unit.search_split, **{t.name: t.split for t in unit.tests}}
    classes = {BASELINE_VAL_SPLIT: None, **{t.name: t.classes for t in unit.tests}}

    def accuracies(checkpoint: str, genes, split: str) -> list[float]:
        return _remote_accuracies(cfg, checkpoint, genes, data, unit_split[split], classes[split])

    winner_dir, val_acc = checkpoint_dir, best.val_acc
    if cfg.retrain_epochs:
        say(f"stage 3: retraining the winner ({best.params:,} params) alone for {cfg.retrain_epochs} epochs "
            f"from its supernet weights")
        retrained = train_supernet(
            spec, data, unit.train_config(cfg.train, lr).for_fixed_subnet(
                best.key, epochs=cfg.retrain_epochs, init_from=checkpoint_dir),
            layout.train_uri(cfg.out, unit.path), retrain_run_name(best.key), progress=_stage(say, "stage 3"))
        winner_dir = retrained.checkpoint_dir
        compute = {name: value + training_compute(retrained.history)[name] for name, value in compute.items()}
        supernet, _ = load_supernet(winner_dir, expected=spec)
        val_acc = accuracies(winner_dir, [best.genes], BASELINE_VAL_SPLIT)[0]  # a report: nothing is chosen on it
        say(f"stage 3: retrained, val {val_acc:.4f} (searched with {best.val_acc:.4f})")

    tests = _test_once(cfg, unit, winner_dir, best, storage.join(export_uri, TEST_FILE), say)
    test_acc = tests[unit.tests[0].name]
    several = {"tests": tests} if len(unit.tests) > 1 else {}
    export_winner(supernet, spec, best.genes, export_uri, data, val_acc=val_acc, search_val_acc=best.val_acc,
                  test_acc=test_acc, lr=lr, retrain_epochs=cfg.retrain_epochs, **several)
    say(f"stage 3: inference, {describe_inference(_inference(cfg, winner_dir, best, export_uri))}")
    if "peft" in cfg.export:
        try:
            say(f"stage 3: PEFT LoRA adapter in {export_peft(supernet, best.genes, export_uri)}")
        except PeftExportError as err:
            say(f"stage 3: no PEFT export ({err}); the merged export holds the winner")
    front = (_test_front(cfg, search.pareto, checkpoint_dir, data, export_uri, supernet, unit.tests[0].split)
             if cfg.test_pareto else None)
    say(f"stage 3: exported to {export_uri} (test acc {test_acc:.4f})")
    dataset_uri = layout.dataset_uri(cfg.out, unit.path)
    baseline_train = unit.train_config(replace(cfg.train, epochs=cfg.baseline_epochs or cfg.train.epochs), lr)
    baselines = run_baselines(cfg.baselines, spec, data, baseline_train, layout.train_uri(cfg.out, unit.path),
                              dataset_uri, accuracies, progress=say, tests=[t.name for t in unit.tests])
    weights = retrained_weights(cfg.retrain_epochs) if cfg.retrain_epochs else SUPERNET_WEIGHTS
    winner = {"key": best.key, "params": best.params, "val_acc": val_acc, "test_acc": test_acc, "weights": weights,
              **compute}
    write_comparison(dataset_uri, comparison_rows(unit.name, cfg.train.seed, winner, front, baselines))
    trainings = {"supernet": checkpoint_dir, **({"retrain": winner_dir} if cfg.retrain_epochs else {}),
                 **{f"baseline {b.name}": b.checkpoint_dir for b in baselines}}
    placement = write_placement(dataset_uri, trainings, search.nodes)
    say(f"placement: supernet on {len(nodes_used(placement, 'supernet'))} node(s), search on "
        f"{len(nodes_used(placement, 'search'))} node(s) ({PLACEMENT_FILE})")
    outcome = DatasetOutcome(
        dataset=unit.data.name, group=unit.group, seed=cfg.train.seed, lr=lr, params=best.params,
        head_params=supernet.head_num_params, val_acc=val_acc, test_acc=test_acc,
        wall_seconds=add_wall_time(dataset_uri, time.perf_counter() - started, say), key=best.key,
        extra={**unit.extra, **several},
    )
    return asdict(outcome)


def add_wall_time(dataset_uri: str, seconds: float, say: Callable[[str], None] = log.warning) -> float:
    """Record this invocation's ``seconds`` on a unit beside those of the earlier ones (a resumed,
    extended or failed run) in ``WALL_TIME_FILE``; return the total, the unit's wall time over
    all of them.  A damaged record is started afresh, with a warning (its history is lost)."""
    uri = storage.join(dataset_uri, WALL_TIME_FILE)
    runs: list[float] = []
    if storage.exists(uri):
        try:
            runs = [float(s) for s in storage.read_json(uri, dict)["runs"]]
        except (GLoRARayError, KeyError, TypeError, ValueError) as err:
            say(f"{uri} is damaged ({err}); the wall-time record starts again with this run")
    runs.append(seconds)
    storage.write_json(uri, {"runs": runs, "total": sum(runs)})
    return sum(runs)


def retrain_run_name(key: str) -> str:
    """The retraining's Ray Train run: one per winner, so another winner never resumes it."""
    return f"retrain-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _test_once(cfg: PipelineConfig, unit: TrainingUnit, checkpoint_dir: str, best, test_uri: str,
               say: _Progress) -> dict[str, float]:
    """Each test list's accuracy of the winner; a list already tested for this winner is never tested again."""
    stored = {}
    if storage.exists(test_uri):
        try:
            stored = storage.read_json(test_uri, dict)
        except GLoRARayError as err:  # the same weights give the same score: testing again selects nothing
            say(f"stage 3: {err}; the winner is tested again")
    tests: dict[str, float] = {}
    # This winner, with these weights (retrained or not), was tested already: keep what it scored.
    if stored.get("key") == best.key and stored.get("retrain_epochs", 0) == cfg.retrain_epochs:
        tests = dict(stored.get("tests") or {unit.tests[0].name: stored["test_acc"]})
    for test in unit.tests:
        if test.name in tests:
            continue
        restricted = f" (restricted to its {len(test.classes)} classes)" if test.classes is not None else ""
        say(f"stage 3: testing the winner ({best.params:,} params, val {best.val_acc:.4f}) once on {test.name}"
            f"{restricted}")
        tests[test.name] = _remote_accuracies(cfg, checkpoint_dir, [best.genes], unit.data, test.split,
                                              test.classes)[0]
        record: dict[str, Any] = {"key": best.key, "retrain_epochs": cfg.retrain_epochs, "tests": tests}
        if unit.tests[0].name in tests:
            record["test_acc"] = tests[unit.tests[0].name]
        storage.write_json(test_uri, record)
    return tests


def _inference(cfg: PipelineConfig, checkpoint_dir: str, best, export_uri: str) -> dict[str, Any]:
    """The winner's inference cost against the backbone's (``inference.json``), measured once per
    winner on an evaluator actor's resources; timings, so never part of a result's identity."""
    import ray

    uri = storage.join(export_uri, INFERENCE_FILE)
    if storage.exists(uri):
        try:
            stored = storage.read_json(uri, dict)
            if stored.get("key") == best.key and stored.get("retrain_epochs") == cfg.retrain_epochs:
                return stored
        except GLoRARayError:
            pass  # damaged: measured again
    task = ray.remote(winner_inference).options(num_cpus=cfg.search.cpus_per_actor, num_gpus=cfg.search.gpus_per_actor)
    record = {**ray.get(task.remote(checkpoint_dir, best.genes)), "key": best.key, "retrain_epochs": cfg.retrain_epochs}
    storage.write_json(uri, record)
    return record


def _remote_accuracies(cfg: PipelineConfig, checkpoint_dir: str, genes_list, data: DataConfig, split: str = "test",
                       classes: tuple[int, ...] | None = None) -> list[float]:
    """Test evaluation on the resources of one evaluator actor (a GPU where actors get one)."""
    import ray

    task = ray.remote(split_accuracies).options(num_cpus=cfg.search.cpus_per_actor,
                                                num_gpus=cfg.search.gpus_per_actor)
    return ray.get(task.remote(checkpoint_dir, genes_list, data, split, cfg.search.eval_batch_size, classes))


def _test_front(cfg, front: pd.DataFrame, checkpoint_dir: str, data: DataConfig, export_uri: str,
                supernet, split: str) -> pd.DataFrame:
    """The front with its test accuracies; a front tested before is read back, never retested."""
    uri = storage.join(export_uri, PARETO_TEST_FILE)
    if storage.exists(uri):
        tested = pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
        if list(tested["key"]) == list(front["key"]):
            return tested
    genes = [supernet.to_genes(key) for key in front["key"]]
    accuracies = _remote_accuracies(cfg, checkpoint_dir, genes, data, split)
    table = front.assign(test_acc=accuracies)
    storage.write_parquet(uri, table)
    return table


class _Progress:
    """One unit's progress lines: to the driver's queue, else to this module's logger.

    A class rather than a closure: Ray pickles it into the training workers.
    """

    def __init__(self, prefix: str, queue: Any = None):
        self.prefix, self.queue = prefix, queue

    def __call__(self, line: str) -> None:
        line = f"{self.prefix} {line}"
        if self.queue is None:
            log.info(line)
        else:
            self.queue.put_nowait(line)


def _progress(name: str, queue: Any = None) -> _Progress:
    return _Progress(f"[{name}]", queue)


def _stage(say: _Progress, stage: str) -> _Progress:
    return _Progress(f"{say.prefix} {stage}:", say.queue)


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
                       {**run_record(cfg), "run_id": run_id_for(cfg),
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
