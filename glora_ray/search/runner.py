"""Stage 2 driver: evolve subnets on a Ray actor pool, write Parquet after every generation, resume.

Determinism: the planner (evolution.py) draws each generation completely before it is
evaluated and ranks by a total order, and accuracies do not depend on which actor computes
them, so the actor count, batching and finishing order never change the results.

Resume: a generation's Parquet file is its commit.  Rerunning over the same output replays the
planner over the stored generations (drawing exactly what it drew before, checked candidate by
candidate and against the generator state stored in each file), then continues with the next
generation.  ``run.json`` records what the results depend on (search settings, model, budget,
fingerprints of the weights and validation data); a rerun with any of them changed is refused
with the differing field named.  ``generations`` may grow, to extend a finished run.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import ray

from ..budget import Budget
from ..checkpoint import SupernetSpec
from .config import SearchConfig
from .evaluator import check_val_arrays
from .evolution import EvolutionPlanner, ResumeMismatchError, Scored
from .pareto import FRONT_COLUMNS, pareto_front
from .pool import ActorSettings, CrashPlan, EvaluatorPool, plan_actor_count
from .results import (
    FORMAT_VERSION, MANIFEST_FILE, PARETO_FILE, POPULATION_DIR, RESULT_FILE, ResultStore, front_table, generation_table,
    population_schema, stored_scores,
)


@dataclass(frozen=True)
class BestSubnet:
    key: str
    genes: np.ndarray
    params: int
    val_acc: float
    candidate_id: str
    generation: int
    choices: dict[str, dict[str, str]]  # layer -> tensor -> choice name


@dataclass
class SearchResult:
    best: BestSubnet
    pareto: pd.DataFrame  # columns FRONT_COLUMNS: key, params, val_acc, candidate_id, generation, origin
    population_path: str
    evaluations: int
    generations_done: int
    out_uri: str
    run_id: str
    dataset: str
    budget: tuple[int, int]
    resumed_generations: int = 0  # complete generations found under out_uri at the start
    exhausted: bool = False  # stopped early: no new candidate fits the budget
    actors: int = 0  # actors used by this invocation (0 when nothing was left to evaluate)
    extra: dict[str, Any] = field(default_factory=dict)


def array_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes: what a resume must find unchanged."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _normalised(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True))


def check_manifest(stored: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse to continue a run whose results depended on something else; name the field."""
    have, want = _flatten(_normalised(stored)), _flatten(_normalised(current))
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise ResumeMismatchError(
                f"{where} holds a run with {name}={have.get(name)!r}; this command has {want.get(name)!r}. "
                f"Resume with the same settings, or write to a new output"
            )


def _check_state(structure, state: Mapping[str, np.ndarray]) -> None:
    expected = {k: tuple(v.shape) for k, v in structure.state_dict().items()}
    have = {k: tuple(np.shape(v)) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state does not match the spec's supernet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k in expected if expected[k] != have[k]]
    if wrong:
        raise ValueError(f"state tensor {wrong[0]!r} has shape {have[wrong[0]]}, the spec's supernet has {expected[wrong[0]]}")


def _front_frame(scored: list[Scored]) -> pd.DataFrame:
    frame = pd.DataFrame({
        "key": [s.candidate.key for s in scored],
        "params": np.array([s.candidate.params for s in scored], dtype=np.int64),
        "val_acc": np.array([s.val_acc for s in scored], dtype=np.float64),
        "candidate_id": [s.candidate.candidate_id for s in scored],
        "generation": np.array([s.candidate.generation for s in scored], dtype=np.int32),
        "origin": [s.candidate.origin.value for s in scored],
    }, columns=list(FRONT_COLUMNS))
    return pareto_front(frame)


def run_search(
    spec: SupernetSpec,
    state: Mapping[str, np.ndarray] | ray.ObjectRef,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    config: SearchConfig,
    out_uri: str,
    run_id: str,
    dataset: str,
    progress: Callable[[str], None] | None = print,
    *,
    fault: CrashPlan | None = None,
) -> SearchResult:
    """Evolve subnets of the supernet ``(spec, state)`` under ``config``'s budget.

    ``state`` is the supernet's state as numpy arrays (``checkpoint.numpy_state``), or an
    ObjectRef to them already in the object store; it is put there at most once and shared
    zero-copy by every actor, like the validation arrays.  ``fault`` is a test hook that makes
    actors crash (see ``CrashPlan``).
    """
    say = progress or (lambda line: None)
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    config.validate()
    for name, value in (("run_id", run_id), ("dataset", dataset)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    check_val_arrays(val_images, val_labels, spec.num_classes)

    # Cheap checks first: structure on the meta device, budget, stored run.
    structure = spec.build_empty()
    space, counter, layer_names = structure.space, structure.counter, structure.layer_names
    lo, hi = Budget(config.min_params, config.max_params).resolve(counter)
    state_ref = state if isinstance(state, ray.ObjectRef) else None
    state_arrays = ray.get(state_ref) if state_ref is not None else dict(state)  # zero-copy for a ref
    _check_state(structure, state_arrays)

    store = ResultStore(out_uri)
    manifest = {
        "format": FORMAT_VERSION,
        "run_id": run_id,
        "dataset": dataset,
        "config": config.result_identity(),
        "budget": {"min_params": lo, "max_params": hi},
        "spec": spec.to_dict(),
        "layers": list(layer_names),
        "state_sha256": array_fingerprint(state_arrays),
        "val_sha256": array_fingerprint({"images": val_images, "labels": val_labels}),
    }
    fingerprint = hashlib.sha256(json.dumps(_normalised(manifest), sort_keys=True).encode()).hexdigest()
    stored_numbers = store.generation_numbers()
    if store.exists(MANIFEST_FILE):
        check_manifest(store.read_json(MANIFEST_FILE), manifest, store.uri)
    elif stored_numbers:
        raise ResumeMismatchError(f"{store.population_uri} holds generation files but {store.uri} has no "
                                  f"{MANIFEST_FILE}; refusing to mix runs")
    else:
        store.write_json(manifest, MANIFEST_FILE)
    store.remove_temporaries()  # leftovers of a run killed mid-write

    planner = EvolutionPlanner(config, space, counter, lo, hi)
    schema = population_schema(layer_names)
    if stored_numbers != list(range(len(stored_numbers))):
        raise ResumeMismatchError(f"{store.population_uri}: generations {stored_numbers} are not 0..n-1 without gaps")
    for number in stored_numbers:
        stored = store.read_generation(number, schema)
        if stored.commit.get("run_fingerprint") != fingerprint:
            raise ResumeMismatchError(f"{store.population_uri}: generation {number} belongs to another run")
        planner.replay(stored_scores([stored.table]))
        if _normalised(planner.rng_state()) != _normalised(stored.commit.get("rng_state")):
            raise ResumeMismatchError(f"generation {number}: the generator state differs from the stored one")
    resumed = len(stored_numbers)
    if resumed:
        say(f"[{run_id}] resuming: {resumed} complete generations, {len(planner.evaluated)} evaluations "
            f"found in {store.population_uri}")

    def finish(exhausted: bool, finished: bool, actors: int) -> SearchResult:
        scored = list(planner.evaluated.values())
        front = _front_frame(scored)
        best = planner.best
        result = SearchResult(
            best=BestSubnet(best.candidate.key, best.candidate.genes.copy(), best.candidate.params, best.val_acc,
                            best.candidate.candidate_id, best.candidate.generation,
                            space.decode(best.candidate.genes, layer_names)),
            pareto=front, population_path=store.population_uri, evaluations=len(scored),
            generations_done=planner.generation, out_uri=store.uri, run_id=run_id, dataset=dataset,
            budget=(lo, hi), resumed_generations=resumed, exhausted=exhausted, actors=actors,
        )
        store.write_table(front_table(front), PARETO_FILE)
        store.write_json(_result_record(result, config, finished), RESULT_FILE)
        return result

    exhausted = False
    candidates = []
    if planner.generation < config.generations:
        candidates = planner.ask()  # drawn before any actor starts: a budget problem fails cheaply
        exhausted = not candidates
    if not candidates:
        return finish(exhausted, True, 0)

    # The expensive part: one put of the weights and the data, then the actors.
    if not ray.is_initialized():
        ray.init()
    if state_ref is None:
        state_ref = ray.put(state_arrays)
    images_ref, labels_ref = ray.put(np.ascontiguousarray(val_images)), ray.put(np.ascontiguousarray(val_labels))
    num_actors = plan_actor_count(config, ray.cluster_resources())
    settings = ActorSettings(config.eval_batch_size, config.eval_mode, config.actor_threads,
                             config.cpus_per_actor, config.gpus_per_actor, config.actor_placement.value)
    pool = EvaluatorPool(
        spec, state_ref, images_ref, labels_ref, num_actors, settings,
        max_replacements=config.replacements_allowed(num_actors),
        max_candidate_retries=config.max_candidate_retries, call_timeout_s=config.call_timeout_s,
        start_timeout_s=config.actor_start_timeout_s, crash=fault,
    )
    try:
        while candidates:
            g = planner.generation
            start = time.perf_counter()
            keys = [c.key for c in candidates]
            results = pool.evaluate(keys, config.batch_size_for(len(keys), pool.num_actors))
            scored = planner.tell({key: results[key].val_acc for key in keys})
            commit = {
                "format": FORMAT_VERSION, "run_fingerprint": fingerprint, "generation": g,
                "rng_state": planner.rng_state(), "evaluations": len(planner.evaluated),
            }
            store.write_generation(g, generation_table(
                scored, results, run_id=run_id, dataset=dataset, seed=config.seed, space=space,
                layer_names=layer_names, commit=commit,
            ))
            done = planner.generation >= config.generations
            candidates = [] if done else planner.ask()
            exhausted = not done and not candidates
            result = finish(exhausted, done or exhausted, pool.num_actors)
            seconds = time.perf_counter() - start
            say(
                f"[{run_id}] generation {g + 1}/{config.generations}: best val_acc {result.best.val_acc:.4f} "
                f"({result.best.params:,} params) | front {len(result.pareto)} | evaluations {result.evaluations} "
                f"(+{len(scored)}) | {len(scored) / max(seconds, 1e-9):.1f} candidates/s"
            )
    finally:
        pool.shutdown()
    if exhausted:
        say(f"[{run_id}] stopped after generation {planner.generation}: no unevaluated subnet fits the budget")
    return result


def _result_record(result: SearchResult, config: SearchConfig, finished: bool) -> dict[str, Any]:
    """result.json: deterministic content only (no timings), so equal runs write equal files."""
    best = result.best
    return {
        "format": FORMAT_VERSION,
        "run_id": result.run_id,
        "dataset": result.dataset,
        "finished": finished,
        "exhausted": result.exhausted,
        "generations_done": result.generations_done,
        "evaluations": result.evaluations,
        "budget": {"min_params": result.budget[0], "max_params": result.budget[1]},
        "config": {**config.result_identity(), "generations": config.generations},
        "best": {
            "candidate_id": best.candidate_id, "generation": best.generation, "key": best.key,
            "genes": [int(g) for g in best.genes], "params": best.params, "val_acc": best.val_acc,
            "choices": best.choices,
        },
        "pareto_size": len(result.pareto),
        "population": POPULATION_DIR,  # relative to the output, like "pareto"
        "pareto": PARETO_FILE,
    }
