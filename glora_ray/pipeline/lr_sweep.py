"""The paper's one hyperparameter search (its appendix A): the supernet lr, as Ray Tune trials.

Each trial is a whole Ray Train run (``train_supernet``) scored by the mean val200 accuracy of
the same seeded random in-budget subnets, so trials differ only in their learning rate.  A trial
whose training diverges (``TrainingDiverged``) is recorded as such, with no score, and never
chosen; when every trial diverges the sweep raises it.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..budget import Budget, sample_within_budget
from ..checkpoint import SupernetSpec, load_supernet
from ..data import DataConfig
from ..errors import TrainingDiverged
from ..search import SearchConfig, evaluate_subnet
from ..streams import Stream, rng as stream
from ..train import TrainConfig, train_supernet

SCORE = "val_acc"
TRIAL_FIELDS = (SCORE, "lr", "final_loss", "checkpoint_dir", "diverged")
log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    lr: float
    checkpoint_dir: str  # the chosen trial's supernet: no retraining after the sweep
    # lr, val_acc, final_loss, checkpoint_dir, diverged of every trial; a diverged trial has its
    # error message under diverged ("" otherwise) and None for val_acc, final_loss, checkpoint_dir.
    trials: list[dict[str, Any]]


def run_name_for(lr: float) -> str:
    return f"supernet-lr{lr:.0e}"


def scoring_subnets(spec: SupernetSpec, search: SearchConfig, count: int, seed: int) -> list[np.ndarray]:
    """The in-budget subnets every trial is scored with: drawn once, from ``seed``."""
    counter = spec.build_empty().counter
    lo, hi = Budget(search.min_params, search.max_params).resolve(counter)
    rng = stream(Stream.LR_SWEEP_SCORING, seed, count)
    return [sample_within_budget(rng, counter, lo, hi) for _ in range(count)]


def _trial(config: dict[str, Any], *, spec: SupernetSpec, data: DataConfig, train: TrainConfig,
           storage_path: str, subnets: list[np.ndarray], eval_batch_size: int, search_split: str) -> None:
    from ray import tune

    lr = float(config["lr"])
    try:
        result = train_supernet(spec, data, replace(train, lr=lr), storage_path, run_name_for(lr))
    except TrainingDiverged as err:
        tune.report({SCORE: math.nan, "lr": lr, "final_loss": math.nan, "checkpoint_dir": "", "diverged": str(err)})
        return
    supernet, _ = load_supernet(result.checkpoint_dir)
    images, labels = data.arrays(search_split)
    scores = [evaluate_subnet(supernet, genes, images, labels, eval_batch_size) for genes in subnets]
    tune.report({
        SCORE: float(np.mean(scores)),
        "lr": lr,
        "final_loss": float(result.history[-1]["loss"]) if result.history else math.nan,
        "checkpoint_dir": result.checkpoint_dir,
        "diverged": "",
    })


def trial_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """One trial as the sweep's outcome records it: a diverged one without score, loss or checkpoint."""
    record = {k: metrics.get(k, "") for k in TRIAL_FIELDS}
    if record["diverged"]:
        record.update({SCORE: None, "final_loss": None, "checkpoint_dir": None})
    return record


def choose_trial(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest score, on a tie the smaller lr (the choice never depends on trial
    order); diverged trials are never chosen, and if every trial diverged the sweep fails."""
    healthy = [t for t in trials if not t["diverged"]]
    for trial in trials:
        if trial["diverged"]:
            log.warning("lr sweep: lr %g diverged and is left out: %s", trial["lr"], trial["diverged"])
    if not healthy:
        lrs = ", ".join(f"{t['lr']:g}" for t in trials)
        raise TrainingDiverged(f"lr sweep: every learning rate diverged ({lrs}); first: {trials[0]['diverged']}")
    return max(healthy, key=lambda t: (t[SCORE], -t["lr"]))


def sweep_learning_rate(spec: SupernetSpec, data: DataConfig, train: TrainConfig, lrs: Sequence[float],
                        storage_path: str, search: SearchConfig, subnets: int, seed: int,
                        search_split: str = "val200") -> SweepOutcome:
    """One Tune trial per lr, scored on ``search_split``; the trial driver reserves no CPU, so its
    Train workers can run."""
    import ray
    from ray import tune

    scoring = scoring_subnets(spec, search, subnets, seed)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    # Trials that cannot get their workers' CPUs would only queue; run as many as fit.
    concurrent = max(1, int(cluster_cpus // (train.world_size * train.cpus_per_worker)))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec, data=data, train=train, storage_path=storage_path,
                             subnets=scoring, eval_batch_size=search.eval_batch_size, search_split=search_split),
        # No CPU for the trial driver; Tune refuses an all-zero request, so it asks for one byte.
        {"CPU": 0, "memory": 1},
    )
    # Tune registers a trainable under its name for the whole Ray job: sweeps running at once (other
    # datasets, other seeds) under one name would run each other's trials.  One name per sweep.
    trainable.__name__ = f"lr_sweep_{hashlib.sha256(storage_path.encode()).hexdigest()[:12]}"
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.grid_search([float(x) for x in lrs])},
        tune_config=tune.TuneConfig(metric=SCORE, mode="max", max_concurrent_trials=concurrent),
        # A trial lost with its node is run again; its train_supernet resumes from the last checkpoint.
        run_config=tune.RunConfig(name="lr_sweep", storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=train.max_failures)),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"lr sweep: {len(failed)} trial(s) failed; first error: {failed[0].error}")
    trials = sorted((trial_record(r.metrics) for r in grid), key=lambda t: t["lr"])
    best = choose_trial(trials)
    return SweepOutcome(lr=best["lr"], checkpoint_dir=best["checkpoint_dir"], trials=trials)
