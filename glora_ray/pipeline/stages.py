"""One training unit's stages (docs/method.md §2-§3, §9): each a function that reads what the
earlier ones returned and returns a frozen record of its own, so that what the unit reports comes
from those records alone.  Every stage resumes from what an earlier run completed.

``run_unit`` is the driver: train (or sweep the lr) -> search -> retrain the winner (optional) ->
test once -> export -> baselines -> comparison, placement and the unit's row.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import pandas as pd

from .. import storage
from ..budget import Budget
from ..checkpoint import SupernetSpec, load_supernet, numpy_state
from ..data import DataConfig
from ..errors import GLoRARayError, TrainingDiverged
from ..identity import identity_changes, with_identity
from ..runtime import quiet_ray_logs
from ..search import SearchResult, run_search
from ..supernet import Supernet
from ..train import train_supernet
from ..train.job import HISTORY_FILE
from ..train.loop import training_compute
from . import layout
from .baselines import VAL_SPLIT, BaselineOutcome, baseline, run_baselines
from .comparison import comparison_rows, write_comparison
from .config import DatasetOutcome, PipelineConfig
from .export import export_winner
from .holdout import split_accuracies
from .inference import INFERENCE_FILE, describe as describe_inference, winner_inference
from .lr_sweep import sweep_learning_rate
from .nodes import PLACEMENT_FILE, nodes_used, write_placement
from .peft_export import PeftExportError, export_peft
from .row_kinds import SUPERNET_WEIGHTS, retrained_weights
from .unit import TrainingUnit, spec_for

log = logging.getLogger(__name__)
TEST_FILE = "test.json"  # the winner's single test result: this winner is never tested again
PARETO_TEST_FILE = "pareto_test.parquet"
LR_SWEEP_FILE = "lr_sweep.json"
WALL_TIME_FILE = "wall_time.json"  # per unit: the seconds of every invocation that finished it


@dataclass(frozen=True)
class Unit:
    """What every stage of one unit reads: its settings, data, spec and output folders."""

    cfg: PipelineConfig
    unit: TrainingUnit
    spec: SupernetSpec
    say: "_Progress"

    @property
    def data(self) -> DataConfig:
        return self.unit.data

    @property
    def train_uri(self) -> str:
        return layout.train_uri(self.cfg.out, self.unit.path)

    @property
    def export_uri(self) -> str:
        return layout.export_uri(self.cfg.out, self.unit.path)

    @property
    def dataset_uri(self) -> str:
        return layout.dataset_uri(self.cfg.out, self.unit.path)

    def accuracies(self, checkpoint: str, genes, split: str) -> list[float]:
        """Accuracy of each subnet on one of the unit's lists by name: ``VAL_SPLIT`` (its search
        list) or a test list's name; on an evaluator actor's resources."""
        lists = {VAL_SPLIT: (self.unit.search_split, None), **{t.name: (t.split, t.classes) for t in self.unit.tests}}
        split_name, classes = lists[split]
        return _remote_accuracies(self.cfg, checkpoint, genes, self.data, split_name, classes)


@dataclass(frozen=True)
class Trained:
    """Stage 1: the supernet (or the lr sweep's chosen one)."""

    lr: float
    checkpoint_dir: str
    compute: dict[str, float]  # train.loop.training_compute of every training behind the winner


@dataclass(frozen=True)
class Winner:
    """Stages 2 and 3: the searched winner and the weights it is tested with."""

    search: SearchResult
    checkpoint_dir: str  # the supernet's, or the retraining's
    supernet: Supernet  # those weights, loaded
    val_acc: float  # the search's, or the retrained weights' (a report: nothing is chosen on it)
    weights: str  # row_kinds: the supernet's or "retrained N epochs"
    compute: dict[str, float]

    @property
    def best(self):
        return self.search.best


def train_stage(u: Unit, window: tuple[int, int]) -> Trained:
    """Stage 1: train the supernet (Ray Train), or sweep the lr over Ray Tune trials and keep the best."""
    cfg, say = u.cfg, u.say
    if cfg.lr_sweep:
        say(f"stage 1: lr sweep over {list(cfg.lr_sweep)} (Ray Tune)")
        sweep = sweep_learning_rate(u.spec, u.data, u.unit.train_config(cfg.train, window=window), cfg.lr_sweep,
                                    u.train_uri, cfg.search, cfg.lr_sweep_subnets, cfg.train.seed, u.unit.search_split)
        storage.write_json(storage.join(u.export_uri, LR_SWEEP_FILE), asdict(sweep))
        trials = [(t["lr"], "diverged" if t["diverged"] else round(t["val_acc"], 4)) for t in sweep.trials]
        say(f"stage 1: lr {sweep.lr:g} chosen; trials {trials}")
        history = storage.read_json(storage.join(sweep.checkpoint_dir, HISTORY_FILE))
        return Trained(sweep.lr, sweep.checkpoint_dir, training_compute(history))
    lr = u.unit.lr
    where = "in this process (Ray Train local mode)" if cfg.train.num_workers == 0 else f"{cfg.train.world_size} worker(s)"
    say(f"stage 1: training the supernet, lr {lr:g}, {cfg.train.epochs} epochs, {where}")
    trained = train_supernet(u.spec, u.data, u.unit.train_config(cfg.train, lr, window), u.train_uri, "supernet",
                             progress=_stage(say, "stage 1"))
    last = trained.history[-1] if trained.history else {}
    say(f"stage 1: done, loss {last.get('loss', float('nan')):.4f}, train acc {last.get('train_acc', float('nan')):.4f}")
    return Trained(lr, trained.checkpoint_dir, training_compute(trained.history))


def search_stage(u: Unit, trained: Trained) -> tuple[SearchResult, Supernet]:
    """Stage 2: the evolutionary search over the trained supernet; the supernet it loaded."""
    supernet, _ = load_supernet(trained.checkpoint_dir, expected=u.spec)
    val_images, val_labels = u.data.arrays(u.unit.search_split)
    u.say("stage 2: evolutionary search")
    initial = [baseline(name).genes(supernet) for name in u.cfg.seed_population]
    search = run_search(u.spec, numpy_state(supernet), val_images, val_labels, u.cfg.search,
                        layout.search_uri(u.cfg.out, u.unit.path), u.cfg.run_id(), u.unit.name,
                        progress=_stage(u.say, "stage 2"), initial=initial)
    return search, supernet


def retrain_stage(u: Unit, trained: Trained, search: SearchResult, supernet: Supernet) -> Winner:
    """Stage 3a: with ``retrain_epochs``, the winner trains alone from its supernet weights (§3.2)."""
    cfg, best = u.cfg, search.best
    if not cfg.retrain_epochs:
        return Winner(search, trained.checkpoint_dir, supernet, best.val_acc, SUPERNET_WEIGHTS, trained.compute)
    u.say(f"stage 3: retraining the winner ({best.params:,} params) alone for {cfg.retrain_epochs} epochs "
          f"from its supernet weights")
    retrained = train_supernet(
        u.spec, u.data, u.unit.train_config(cfg.train, trained.lr).for_fixed_subnet(
            best.key, epochs=cfg.retrain_epochs, init_from=trained.checkpoint_dir),
        u.train_uri, retrain_run_name(best.key), progress=_stage(u.say, "stage 3"))
    compute = {name: value + training_compute(retrained.history)[name] for name, value in trained.compute.items()}
    weights, _ = load_supernet(retrained.checkpoint_dir, expected=u.spec)
    val_acc = u.accuracies(retrained.checkpoint_dir, [best.genes], VAL_SPLIT)[0]  # a report: nothing is chosen on it
    u.say(f"stage 3: retrained, val {val_acc:.4f} (searched with {best.val_acc:.4f})")
    return Winner(search, retrained.checkpoint_dir, weights, val_acc, retrained_weights(cfg.retrain_epochs), compute)


def export_stage(u: Unit, trained: Trained, winner: Winner, tests: dict[str, float]) -> pd.DataFrame | None:
    """Stage 3c: the merged winner, its record and loader, its inference cost, a PEFT adapter when
    asked for, the tested front with ``--test-pareto`` (returned)."""
    cfg, best, say = u.cfg, winner.best, u.say
    several = {"tests": tests} if len(u.unit.tests) > 1 else {}
    export_winner(winner.supernet, u.spec, best.genes, u.export_uri, u.data, val_acc=winner.val_acc,
                  search_val_acc=best.val_acc, test_acc=tests[u.unit.tests[0].name], lr=trained.lr,
                  retrain_epochs=cfg.retrain_epochs, **several)
    say(f"stage 3: inference, {describe_inference(_inference(cfg, winner.checkpoint_dir, best, u.export_uri))}")
    if "peft" in cfg.export:
        try:
            say(f"stage 3: PEFT LoRA adapter in {export_peft(winner.supernet, best.genes, u.export_uri)}")
        except PeftExportError as err:
            say(f"stage 3: no PEFT export ({err}); the merged export holds the winner")
    front = (_test_front(cfg, winner.search.pareto, trained.checkpoint_dir, u.data, u.export_uri, winner.supernet,
                         u.unit.tests[0].split) if cfg.test_pareto else None)
    say(f"stage 3: exported to {u.export_uri} (test acc {tests[u.unit.tests[0].name]:.4f})")
    return front


def baselines_stage(u: Unit, trained: Trained) -> list[BaselineOutcome]:
    """The fixed adapters asked for, trained like the supernet and tested once on every test list."""
    cfg = u.cfg
    train = u.unit.train_config(replace(cfg.train, epochs=cfg.baseline_epochs or cfg.train.epochs), trained.lr)
    return run_baselines(cfg.baselines, u.spec, u.data, train, u.train_uri, u.dataset_uri, u.accuracies,
                         progress=u.say, tests=[t.name for t in u.unit.tests])


def record_stage(u: Unit, trained: Trained, winner: Winner, tests: dict[str, float], front: pd.DataFrame | None,
                 baselines: list[BaselineOutcome]) -> None:
    """The unit's comparison table and placement record."""
    best = winner.best
    row = {"key": best.key, "params": best.params, "val_acc": winner.val_acc, "test_acc": tests[u.unit.tests[0].name],
           "weights": winner.weights, **winner.compute}
    write_comparison(u.dataset_uri, comparison_rows(u.unit.name, u.cfg.train.seed, row, front, baselines))
    trainings = {"supernet": trained.checkpoint_dir, **({"retrain": winner.checkpoint_dir} if u.cfg.retrain_epochs else {}),
                 **{f"baseline {b.name}": b.checkpoint_dir for b in baselines}}
    placement = write_placement(u.dataset_uri, trainings, winner.search.nodes)
    u.say(f"placement: supernet on {len(nodes_used(placement, 'supernet'))} node(s), search on "
          f"{len(nodes_used(placement, 'search'))} node(s) ({PLACEMENT_FILE})")


def run_unit(cfg: PipelineConfig, unit: TrainingUnit, progress: Any = None) -> dict[str, Any]:
    """Stages 1-3 for one training unit, then its baselines (``cfg.baselines``) and its comparison
    table; returns the unit's row (``DatasetOutcome``).  A failed invocation's time is counted too.

    ``progress``: a ``ray.util.queue.Queue`` that carries this unit's progress lines to the
    driver (``run.run_units``); None: they are logged here.
    """
    quiet_ray_logs(cfg.verbose)
    u = Unit(cfg, unit, spec_for(cfg, unit.data), _progress(unit.label or unit.name, progress))
    started = time.perf_counter()
    try:
        window = Budget(cfg.search.min_params, cfg.search.max_params).resolve(u.spec.build_empty().counter)
        trained = train_stage(u, window)
        winner = retrain_stage(u, trained, *search_stage(u, trained))
        tests = _test_once(u, winner.checkpoint_dir, winner.best)
        front = export_stage(u, trained, winner, tests)
        record_stage(u, trained, winner, tests, front, baselines_stage(u, trained))
    except TrainingDiverged:
        raise  # nothing of a diverged training is kept, its time neither
    except Exception:
        try:  # a failed invocation's time counts in the unit's total too
            add_wall_time(u.dataset_uri, time.perf_counter() - started, u.say)
        except (OSError, GLoRARayError):
            pass  # e.g. the disk that failed the run is still full: the run's own error is the one to see
        raise
    best, first_test = winner.best, tests[unit.tests[0].name]
    outcome = DatasetOutcome(
        dataset=unit.data.name, group=unit.group, seed=cfg.train.seed, lr=trained.lr, params=best.params,
        head_params=winner.supernet.head_num_params, val_acc=winner.val_acc, test_acc=first_test,
        wall_seconds=add_wall_time(u.dataset_uri, time.perf_counter() - started, u.say), key=best.key,
        extra={**unit.extra, **({"tests": tests} if len(unit.tests) > 1 else {})})
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



def _winner_inputs(cfg: PipelineConfig, best) -> dict[str, Any]:
    """What decides a winner's test and inference records: the subnet and which weights it has."""
    return {"key": best.key, "retrain_epochs": cfg.retrain_epochs}


def _test_once(u: Unit, checkpoint_dir: str, best) -> dict[str, float]:
    """Each test list's accuracy of the winner; a list already tested for this winner is never tested again."""
    say, test_uri = u.say, storage.join(u.export_uri, TEST_FILE)
    stored = {}
    if storage.exists(test_uri):
        try:
            stored = storage.read_json(test_uri, dict)
        except GLoRARayError as err:  # the same weights give the same score: testing again selects nothing
            say(f"stage 3: {err}; the winner is tested again")
    tests: dict[str, float] = {}
    inputs = _winner_inputs(u.cfg, best)
    if not identity_changes(stored, inputs):  # this winner with these weights was tested: keep its scores
        tests = dict(stored.get("tests", {}))
    for test in u.unit.tests:
        if test.name in tests:
            continue
        restricted = f" (restricted to its {len(test.classes)} classes)" if test.classes is not None else ""
        say(f"stage 3: testing the winner ({best.params:,} params, val {best.val_acc:.4f}) once on {test.name}"
            f"{restricted}")
        tests[test.name] = u.accuracies(checkpoint_dir, [best.genes], test.name)[0]
        record: dict[str, Any] = {"key": best.key, "tests": tests}
        if u.unit.tests[0].name in tests:
            record["test_acc"] = tests[u.unit.tests[0].name]
        storage.write_json(test_uri, with_identity(record, inputs))
    return tests



def _inference(cfg: PipelineConfig, checkpoint_dir: str, best, export_uri: str) -> dict[str, Any]:
    """The winner's inference cost against the backbone's (``inference.json``), measured once per
    winner on an evaluator actor's resources; timings, so never part of a result's identity."""
    import ray

    uri = storage.join(export_uri, INFERENCE_FILE)
    if storage.exists(uri):
        try:
            stored = storage.read_json(uri, dict)
            if not identity_changes(stored, _winner_inputs(cfg, best)):
                return stored
        except GLoRARayError:
            pass  # damaged: measured again
    task = _on_evaluator_resources(cfg, winner_inference)
    record = with_identity({**ray.get(task.remote(checkpoint_dir, best.genes)), "key": best.key},
                           _winner_inputs(cfg, best))
    storage.write_json(uri, record)
    return record



def _on_evaluator_resources(cfg: PipelineConfig, function: Callable[..., Any]):
    """``function`` as a Ray task with one evaluator actor's CPUs and GPUs (test and inference run
    where the search's evaluations do)."""
    import ray

    return ray.remote(function).options(num_cpus=cfg.search.cpus_per_actor, num_gpus=cfg.search.gpus_per_actor)


def _remote_accuracies(cfg: PipelineConfig, checkpoint_dir: str, genes_list, data: DataConfig, split: str = "test",
                       classes: tuple[int, ...] | None = None) -> list[float]:
    """Test evaluation on the resources of one evaluator actor (a GPU where actors get one)."""
    import ray

    task = _on_evaluator_resources(cfg, split_accuracies)
    return ray.get(task.remote(checkpoint_dir, genes_list, data, split, cfg.search.eval_batch_size, classes))



def _test_front(cfg, front: pd.DataFrame, checkpoint_dir: str, data: DataConfig, export_uri: str,
                supernet, split: str) -> pd.DataFrame:
    """The front with its test accuracies; a front tested before is read back, never retested."""
    uri = storage.join(export_uri, PARETO_TEST_FILE)
    if storage.exists(uri):
        tested = storage.read_parquet(uri)
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


