"""Stage 2 driver: evolve subnets on a Ray actor pool, write Parquet after every generation, resume.

Determinism: the planner (evolution.py) draws each generation completely before it is
evaluated and ranks by a total order, and accuracies do not depend on which actor computes
them, so the actor count, batching and finishing order never change the results.

Resume: a generation's Parquet file is its commit.  Rerunning over the same output replays the
planner over the stored generations (drawing exactly what it drew before, checked candidate by
candidate and against the generator state stored in each file), then continues with the next
generation.  ``run.json`` records what the results depend on (search settings, model, budget,
fingerprints of the weights and validation data, the initial subnets); a rerun with any of
them changed is refused with the differing field named.  ``generations`` may grow, to extend a
finished run.  Seeded generation 0, budget repair of offspring and the fitness are the
planner's (docs/method.md §3); each generation's commit record counts its candidates' origins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import ray

from .. import storage
from ..budget import Budget
from ..checkpoint import SupernetSpec
from ..errors import GLoRARayError, GLoRARayTypeError
from ..identity import describe, identity_changes, identity_digest, with_identity
from ..progress import StageClock
from ..runtime import init_ray
from .config import Fitness, SearchConfig
from .evaluator import EvalResult, check_val_arrays
from .evolution import Candidate, DrawCounts, EvolutionPlanner, ResumeMismatchError, Scored
from .pareto import FRONT_COLUMNS, pareto_front
from .pool import ActorSettings, EvaluatorPool, PoolStats, plan_actor_count
from .results import (
    FORMAT_CHANGES, FORMAT_VERSION, MANIFEST_FILE, PARETO_FILE, ResultFileError, POPULATION_DIR, RESULT_FILE, ResultStore, front_table, generation_table,
    population_schema, stored_scores,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestSubnet:
    """One ranked candidate of a search: the winner, or a member of ``SearchResult.top``."""

    key: str
    genes: np.ndarray
    params: int
    val_acc: float
    val_loss: float  # mean validation cross-entropy
    candidate_id: str
    generation: int
    choices: dict[str, dict[str, str]]  # layer -> tensor -> choice name


@dataclass
class SearchResult:
    best: BestSubnet  # == top[0]
    # The front of (fitness, params), ``best`` on it; columns FRONT_COLUMNS: key, params, val_acc,
    # val_loss, candidate_id, generation, origin
    pareto: pd.DataFrame
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
    # The best ``config.parents`` candidates of everything evaluated, in ranking order (best
    # first), ranked by ``config.fitness`` (docs/method.md §3): the elite the next generation
    # would draw from.
    top: tuple[BestSubnet, ...] = ()
    # Timings of this invocation (not stored: result.json holds deterministic content only): the
    # pool's (actor starts, time inside its evaluate calls, where each actor ran; None when
    # nothing was evaluated) and each evaluated generation's wall seconds (evaluate, commit, plan).
    pool: PoolStats | None = None
    generation_seconds: tuple[float, ...] = ()
    # Where each generation was evaluated: actor name -> Ray node id, one dict per generation, as
    # each generation file's commit record stores it (empty for generations stored before).
    nodes: tuple[dict[str, str], ...] = ()


def array_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes: what a resume must find unchanged."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def check_manifest(stored: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse to continue a run (``stored``: its run.json) whose results depended on something
    other than ``current``; name the field."""
    diffs = identity_changes(stored, current)
    if diffs:
        name, have, want = diffs[0]
        raise ResumeMismatchError(
            f"{where} holds a run with {name}={have!r}; this command has {want!r}. "
            f"Resume with the same settings, or write to a new output"
            + (f" (also differs: {describe(diffs[1:])})" if len(diffs) > 1 else "")
        )


def _check_state(structure, state: Mapping[str, np.ndarray]) -> None:
    expected = {k: tuple(v.shape) for k, v in structure.state_dict().items()}
    have = {k: tuple(np.shape(v)) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or unexpected:
        raise GLoRARayError(f"state does not match the spec's supernet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k in expected if expected[k] != have[k]]
    if wrong:
        raise GLoRARayError(f"state tensor {wrong[0]!r} has shape {have[wrong[0]]}, the spec's supernet has {expected[wrong[0]]}")


def _front_frame(scored: list[Scored], fitness: Fitness) -> pd.DataFrame:
    frame = pd.DataFrame({
        "key": [s.candidate.key for s in scored],
        "params": np.array([s.candidate.params for s in scored], dtype=np.int64),
        "val_acc": np.array([s.val_acc for s in scored], dtype=np.float64),
        "val_loss": np.array([s.val_loss for s in scored], dtype=np.float64),
        "candidate_id": [s.candidate.candidate_id for s in scored],
        "generation": np.array([s.candidate.generation for s in scored], dtype=np.int32),
        "origin": [s.candidate.origin.value for s in scored],
    }, columns=list(FRONT_COLUMNS))
    return pareto_front(frame, fitness)


@dataclass
class _Search:
    """One search over one store: its settings, the planner, and what is stored so far."""

    config: SearchConfig
    store: ResultStore
    planner: EvolutionPlanner
    space: Any
    layer_names: tuple[str, ...]
    budget: tuple[int, int]
    fingerprint: str  # of run.json: every generation file must carry it
    run_id: str
    dataset: str
    resumed: int  # complete generations found in the store
    exhausted: bool = False
    nodes: list[dict[str, str]] = field(default_factory=list)  # per generation: actor -> Ray node id

    def subnet(self, scored: Scored) -> BestSubnet:
        c = scored.candidate
        return BestSubnet(key=c.key, genes=c.genes.copy(), params=c.params, val_acc=scored.val_acc,
                          val_loss=scored.val_loss, candidate_id=c.candidate_id, generation=c.generation,
                          choices=self.space.decode(c.genes, self.layer_names))

    def result(self, actors: int) -> SearchResult:
        """The best subnet and the front so far; writes pareto.parquet and result.json."""
        scored = list(self.planner.evaluated.values())
        top = tuple(self.subnet(s) for s in self.planner.top(self.config.parents))
        result = SearchResult(
            best=top[0], top=top,
            pareto=_front_frame(scored, self.config.fitness), population_path=self.store.population_uri, evaluations=len(scored),
            generations_done=self.planner.generation, out_uri=self.store.uri, run_id=self.run_id,
            dataset=self.dataset, budget=self.budget, resumed_generations=self.resumed,
            exhausted=self.exhausted, actors=actors, nodes=tuple(self.nodes),
        )
        finished = self.exhausted or self.planner.generation >= self.config.generations
        record = _result_record(result, self.config, finished)
        # A rerun that only replayed stored generations derives the record they already gave: the
        # files are there unless the last run stopped before writing them (result.json is written
        # after the front it vouches for).  A generation evaluated now always writes.
        replayed = self.planner.generation == self.resumed
        unchanged = (replayed and self.store.exists(RESULT_FILE) and self.store.exists(PARETO_FILE)
                     and self.store.read_json(RESULT_FILE) == json.loads(json.dumps(record)))
        if not unchanged:
            self.store.write_table(front_table(result.pareto), PARETO_FILE)
            self.store.write_json(record, RESULT_FILE)
        return result


def _seed_genes(structure, initial: Sequence[np.ndarray | str]) -> list[np.ndarray]:
    """``initial`` (gene arrays or keys) as validated genes of ``structure``, each error naming its index."""
    if isinstance(initial, str) or (isinstance(initial, np.ndarray) and initial.ndim != 2):
        raise GLoRARayTypeError(f"initial must be a sequence of subnets (gene arrays or keys), "
                                f"got a single {type(initial).__name__}")
    seeds = []
    for i, subnet in enumerate(initial):
        try:
            seeds.append(structure.to_genes(subnet))
        except GLoRARayError as err:
            raise type(err)(f"initial[{i}]: {err}") from None
    return seeds


def _open_manifest(store: ResultStore, manifest: dict[str, Any], config: SearchConfig) -> list[int]:
    """Check the stored run against ``manifest`` (or record a new one); the stored generation numbers."""
    stored_numbers = store.generation_numbers()
    if store.exists(MANIFEST_FILE):
        stored_manifest = store.read_json(MANIFEST_FILE)
        if stored_manifest.get("format") != FORMAT_VERSION:
            raise ResumeMismatchError(
                f"{store.uri} holds a search written in results format {stored_manifest.get('format')}; this "
                f"version writes format {FORMAT_VERSION} ({FORMAT_CHANGES}), and cannot continue it: write to a new "
                f"output (the old files stay readable with pandas)")
        check_manifest(stored_manifest, manifest, store.uri)
    elif stored_numbers:
        raise ResumeMismatchError(f"{store.population_uri} holds generation files but {store.uri} has no "
                                  f"{MANIFEST_FILE}; refusing to mix runs")
    else:
        store.write_json(with_identity({"format": FORMAT_VERSION}, manifest), MANIFEST_FILE)
    store.remove_temporaries()  # leftovers of a run killed mid-write
    if stored_numbers != list(range(len(stored_numbers))):
        raise ResumeMismatchError(f"{store.population_uri}: generations {stored_numbers} are not 0..n-1 without gaps")
    if len(stored_numbers) > config.generations:
        raise ResumeMismatchError(
            f"{store.population_uri} holds {len(stored_numbers)} generations; generations={config.generations} "
            f"cannot undo them: give generations >= {len(stored_numbers)} (more extends the run), or a new output"
        )
    return stored_numbers


def _replay(store: ResultStore, planner: EvolutionPlanner, numbers: list[int], schema, fingerprint: str) -> list[dict]:
    """Replay the stored generations through ``planner``, checking each draws what was stored;
    returns each generation's actor nodes."""
    nodes = []
    for number in numbers:
        try:
            stored = store.read_generation(number, schema)
        except ResultFileError as err:
            later = [store.generation_file(n) for n in numbers if n >= number]
            files = later[0] if len(later) == 1 else f"{later[0]} and every later one ({', '.join(later[1:])})"
            raise ResultFileError(f"{err}; remove {files} from {store.population_uri} and run again: the search "
                                  f"recomputes from generation {number}") from None
        if stored.commit.get("run_fingerprint") != fingerprint:
            raise ResumeMismatchError(f"{store.population_uri}: generation {number} belongs to another run")
        planner.replay(stored_scores([stored.table]))
        if json.loads(json.dumps(planner.rng_state())) != stored.commit.get("rng_state"):
            raise ResumeMismatchError(f"generation {number}: the generator state differs from the stored one")
        nodes.append(stored.commit.get("nodes", {}))
    return nodes


def open_store(spec: SupernetSpec, state: Mapping[str, np.ndarray], val_images: np.ndarray, val_labels: np.ndarray,
               config: SearchConfig, out_uri: str, run_id: str, dataset: str,
               initial: Sequence[np.ndarray | str] = ()) -> _Search:
    """Check the inputs, then open the store: a new run's manifest, or a stored run replayed.

    Cheap checks first (structure on the meta device, budget, stored run); a rerun with other
    result-defining settings (``initial`` among them) is refused naming the field, as is one with
    fewer ``generations`` than the store already holds.  ``initial``: subnets (gene arrays or
    keys) generation 0 starts with; those outside the budget are skipped (docs/method.md §3).
    """
    if not isinstance(config, SearchConfig):
        raise GLoRARayTypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    config.validate()
    for name, value in (("run_id", run_id), ("dataset", dataset)):
        if not isinstance(value, str) or not value:
            raise GLoRARayError(f"{name} must be a non-empty string, got {value!r}")
    check_val_arrays(val_images, val_labels, spec.num_classes)
    structure = spec.build_empty()
    space, layer_names = structure.space, tuple(structure.layer_names)
    lo, hi = Budget(config.min_params, config.max_params).resolve(structure.counter)
    _check_state(structure, state)
    seeds = _seed_genes(structure, initial)
    store = ResultStore(out_uri)
    manifest = {  # what the results depend on: a rerun with any of it changed is refused
        "run_id": run_id, "dataset": dataset, "config": config.result_identity(),
        "budget": {"min_params": lo, "max_params": hi}, "spec": spec.to_dict(), "layers": list(layer_names),
        "initial": [space.genes_to_string(genes) for genes in seeds], "state_sha256": array_fingerprint(state),
        "val_sha256": array_fingerprint({"images": val_images, "labels": val_labels}),
    }
    fingerprint = identity_digest(manifest)
    numbers = _open_manifest(store, manifest, config)
    planner = EvolutionPlanner(config, space, structure.counter, lo, hi, initial=seeds)
    nodes = _replay(store, planner, numbers, population_schema(layer_names), fingerprint)
    return _Search(config, store, planner, space, layer_names, (lo, hi), fingerprint, run_id, dataset,
                   resumed=len(numbers), nodes=nodes)


def plan_generation(search: _Search) -> list[Candidate]:
    """The next generation's candidates, drawn completely before any is evaluated; [] when done."""
    if search.planner.generation >= search.config.generations:
        return []
    candidates = search.planner.ask()
    search.exhausted = not candidates  # no unevaluated subnet fits the budget
    return candidates


def evaluate_generation(pool: EvaluatorPool, candidates: list[Candidate], config: SearchConfig) -> dict[str, EvalResult]:
    """Every candidate's validation accuracy, whatever the actors' faults or finishing order."""
    keys = [c.key for c in candidates]
    return pool.evaluate(keys, config.batch_size_for(len(keys), pool.num_actors))


def commit_generation(search: _Search, results: Mapping[str, EvalResult],
                      actor_nodes: Mapping[str, str] | None = None) -> list[Scored]:
    """Rank the evaluated generation and store it: its Parquet file is its commit.  ``actor_nodes``
    (actor name -> Ray node id) records where its candidates were evaluated."""
    g = search.planner.generation
    scored = search.planner.tell({key: r.val_acc for key, r in results.items()},
                                 {key: r.val_loss for key, r in results.items()})
    nodes = {r.actor: actor_nodes[r.actor] for r in results.values() if r.actor in (actor_nodes or {})}
    search.nodes.append(nodes)
    commit = {
        "format": FORMAT_VERSION, "run_fingerprint": search.fingerprint, "generation": g,
        "rng_state": search.planner.rng_state(), "evaluations": len(search.planner.evaluated),
        **search.planner.draws[-1].to_dict(),  # "origins", "wanted", "repaired"
        "nodes": dict(sorted(nodes.items())),
    }
    search.store.write_generation(g, generation_table(
        scored, results, run_id=search.run_id, dataset=search.dataset, seed=search.config.seed,
        space=search.space, layer_names=search.layer_names, commit=commit,
    ))
    return scored


def start_pool(spec: SupernetSpec, state: Mapping[str, np.ndarray] | ray.ObjectRef, val_images: np.ndarray,
               val_labels: np.ndarray, config: SearchConfig) -> EvaluatorPool:
    """One put of the weights and the data, then the actors (the expensive part)."""
    init_ray()
    state_ref = state if isinstance(state, ray.ObjectRef) else ray.put(dict(state))
    images_ref, labels_ref = ray.put(np.ascontiguousarray(val_images)), ray.put(np.ascontiguousarray(val_labels))
    num_actors = plan_actor_count(config, ray.cluster_resources())
    settings = ActorSettings(config.eval_batch_size, config.eval_mode, config.actor_threads,
                             config.cpus_per_actor, config.gpus_per_actor, config.actor_placement.value,
                             config.precision.value, config.merge_strategy)
    return EvaluatorPool(
        spec, state_ref, images_ref, labels_ref, num_actors, settings,
        max_replacements=config.replacements_allowed(num_actors),
        max_candidate_retries=config.max_candidate_retries, call_timeout_s=config.call_timeout_s,
        start_timeout_s=config.actor_start_timeout_s,
    )


def run_search(
    spec: SupernetSpec,
    state: Mapping[str, np.ndarray] | ray.ObjectRef,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    config: SearchConfig,
    out_uri: str,
    run_id: str,
    dataset: str,
    progress: Callable[[str], None] | None = None,
    initial: Sequence[np.ndarray | str] = (),
) -> SearchResult:
    """Evolve subnets of the supernet ``(spec, state)`` under ``config``'s budget.

    ``state`` is the supernet's state as numpy arrays (``checkpoint.numpy_state``), or an
    ObjectRef to them already in the object store; it is put there at most once and shared
    zero-copy by every actor, like the validation arrays.  ``progress`` receives one line per
    generation (default: this module's logger).  ``initial``: subnets (gene arrays or keys) that
    generation 0 starts with, origin "seeded"; those outside the budget are skipped
    (docs/method.md §3).  They are part of the run's identity: a resume must give the same.
    """
    say = progress or log.info
    state_arrays = ray.get(state) if isinstance(state, ray.ObjectRef) else state  # zero-copy for a ref
    search = open_store(spec, state_arrays, val_images, val_labels, config, out_uri, run_id, dataset, initial)
    _forget_damaged_result(search, say)
    if search.resumed:
        say(f"[{run_id}] resuming: {search.resumed} complete generations, {len(search.planner.evaluated)} "
            f"evaluations found in {search.store.population_uri}")
    candidates = plan_generation(search)  # drawn before any actor starts: a budget problem fails cheaply
    if not candidates:
        return search.result(actors=0)
    pool = start_pool(spec, state, val_images, val_labels, config)
    try:
        result = _evolve(search, pool, candidates, say)
    finally:
        pool.shutdown()
    result.pool = pool.stats
    if search.exhausted:
        say(f"[{run_id}] stopped after generation {search.planner.generation}: no unevaluated subnet fits the budget")
    return result


def _forget_damaged_result(search: _Search, say: Callable[[str], None]) -> None:
    """A damaged result.json is removed: ``_Search.result`` derives it again from the generations."""
    if not search.store.exists(RESULT_FILE):
        return
    try:
        search.store.read_json(RESULT_FILE)
    except (ValueError, UnicodeDecodeError) as err:
        say(f"{search.store.uri_of(RESULT_FILE)} is damaged ({err}); it is written again from the stored generations")
        storage.delete_file(search.store.uri_of(RESULT_FILE))


def _evolve(search: _Search, pool: EvaluatorPool, candidates: list[Candidate], say: Callable[[str], None]) -> SearchResult:
    """Evaluate, commit and plan generation after generation until the planner is done."""
    config = search.config
    clock = StageClock(config.generations - search.planner.generation)
    generation_seconds: list[float] = []
    while candidates:
        started = time.perf_counter()
        scored = commit_generation(search, evaluate_generation(pool, candidates, config), pool.actor_nodes())
        drawn: DrawCounts = search.planner.draws[-1]
        candidates = plan_generation(search)
        result = search.result(pool.num_actors)
        seconds = time.perf_counter() - started
        generation_seconds.append(seconds)
        say(
            f"[{search.run_id}] generation {search.planner.generation}/{config.generations}: best val_acc "
            f"{result.best.val_acc:.4f}, val_loss {result.best.val_loss:.4f} ({result.best.params:,} params) | "
            f"front {len(result.pareto)} | evaluations {result.evaluations} (+{len(scored)}) | "
            f"{drawn.describe()} | {len(scored) / max(seconds, 1e-9):.1f} candidates/s | {clock.step()}"
        )
    result.generation_seconds = tuple(generation_seconds)
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
            "val_loss": best.val_loss, "choices": best.choices,
        },
        "pareto_size": len(result.pareto),
        "population": POPULATION_DIR,  # relative to the output, like "pareto"
        "pareto": PARETO_FILE,
    }
