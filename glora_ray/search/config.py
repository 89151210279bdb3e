"""Settings of the evolutionary search (docs/method.md §3 defaults), validated when constructed."""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..budget import parse_param_count
from ..errors import GLoRARayError
from ..identity import EXECUTION_ONLY, EXTENDS, result_identity
from ..options import BUDGET, SEARCH, option
from ..precision import Precision, parse_precision
from ..settings import from_known_fields


class SearchConfigError(GLoRARayError):
    """A search setting out of range; the message names the field and what would be valid."""


class MergeStrategy(str, enum.Enum):
    """How an evaluator puts a subnet's merged weights into the plain backbone (search/merge.py,
    docs/method.md §1.6)."""

    JUST_IN_TIME = "just_in_time"
    PER_CANDIDATE = "per_candidate"
    BATCHED = "batched"


AUTO_MERGE = "auto"  # resolved per actor device: see merge.resolve_merge_strategy
MERGE_CHOICES = [AUTO_MERGE, *(m.value for m in MergeStrategy)]  # what merge_strategy accepts


def auto_merge_strategy(on_gpu: bool) -> MergeStrategy:
    """What ``auto`` means: ``batched`` on CUDA (device memory is per actor anyway; launches are
    what cost), ``just_in_time`` elsewhere (host weights are shared between actors; private memory
    is what costs)."""
    return MergeStrategy.BATCHED if on_gpu else MergeStrategy.JUST_IN_TIME


class EvalMode(str, enum.Enum):
    """How an evaluator runs a candidate.

    ``merged``: the subnet is merged into plain weights out of place and the plain backbone runs
    (GLoRA's zero-cost inference; the default, and the faster one, see evaluator.py).
    ``supernet``: the supernet runs with the subnet selected, unmerged.
    """

    MERGED = "merged"
    SUPERNET = "supernet"


class Fitness(str, enum.Enum):
    """What ranks the candidates (docs/method.md §3): parents and the winner follow it.

    ``accuracy`` (the paper's): validation accuracy, higher first, then parameter count (lower
    first), then the canonical key.  ``loss``: mean validation cross-entropy, lower first, then
    accuracy, parameter count and key as above: finer-grained than accuracy on a small ``val200``
    where many candidates tie.
    """

    ACCURACY = "accuracy"
    LOSS = "loss"


FITNESS_CHOICES = [f.value for f in Fitness]


class Placement(str, enum.Enum):
    """Where Ray starts the evaluator actors (Ray's ``scheduling_strategy``).

    ``SPREAD``: over as many nodes as possible, best effort (the default: a multi-node search
    uses every node's CPUs or GPUs and loses fewer actors with one node).  ``DEFAULT``: Ray's
    default hybrid policy, which fills a node before it starts on the next.
    """

    SPREAD = "SPREAD"
    DEFAULT = "DEFAULT"


@dataclass
class SearchConfig:
    # -- the algorithm (docs/method.md §3) --------------------------------------------------------
    population: int = field(default=50, metadata=option(SEARCH, argparse={"type": int}))
    parents: int = field(default=10, metadata=option(SEARCH, argparse={"type": int}))
    mutants: int = field(default=25, metadata=option(SEARCH, argparse={"type": int}))
    crossovers: int = field(default=25, metadata=option(SEARCH, argparse={"type": int}))
    m_prob: float = field(default=0.2, metadata=option(SEARCH, "per-gene mutation probability",
                                                       argparse={"type": float}))
    generations: int = field(default=20, metadata={**EXTENDS, **option(  # raising it extends a run
        SEARCH, argparse={"type": int})})
    # "0.29M", "800k" or an int; None: what the space reaches
    min_params: int | str | None = field(default=None, metadata=option(BUDGET, unset="what the space reaches"))
    max_params: int | str | None = field(default=None, metadata=option(BUDGET, unset="what the space reaches"))
    seed: int = 0
    # Bounded redraws: a generation tries at most this many draws per wanted mutant, crossover
    # or random candidate before settling for fewer (a tight budget or a small space never hangs).
    max_draw_tries: int = 50
    # What ranks candidates, and so picks the parents and the winner: "accuracy" or "loss".
    fitness: Fitness = field(default=Fitness.ACCURACY, metadata=option(
        SEARCH, "what ranks candidates (docs/method.md §3.1): 'accuracy' on the search list (the paper; ties to "
        "fewer parameters) or 'loss', its mean cross-entropy (ties to higher accuracy)",
        argparse={"choices": FITNESS_CHOICES}))
    # -- evaluation ---------------------------------------------------------------------
    eval_batch_size: int = field(default=64, metadata=option(SEARCH, argparse={"type": int}))
    eval_mode: EvalMode = EvalMode.MERGED
    # Forward passes of the evaluation: "fp32", "tf32" (CUDA actors only) or "bf16" autocast.
    precision: Precision = field(default=Precision.FP32, metadata=option(
        SEARCH, "forward passes of the evaluation: 'fp32', 'tf32' (needs --actor-gpus) or 'bf16' autocast",
        flag="--search-precision", argparse={"choices": [p.value for p in Precision]}))
    # How merged mode merges: "auto" (just_in_time on CPU actors, batched on GPU actors),
    # "just_in_time", "per_candidate" or "batched" (search/merge.py).  just_in_time and
    # per_candidate give equal accuracies bit for bit, batched only up to float summation order:
    # so it is part of a run's identity, "auto" as what it resolves to (``resolved_field``).
    merge_strategy: str = field(default=AUTO_MERGE, metadata=option(
        SEARCH, "how an actor merges a candidate (docs/method.md §9): 'auto' is just_in_time on CPUs (small "
        "actors) and batched on CUDA; per_candidate merges once per candidate (faster on small inputs, a private "
        "copy of the adapted weights per actor)", argparse={"choices": MERGE_CHOICES}))
    # -- resources and fault handling: changing these continues a run (glora_ray.identity) --
    # None: as many as the cluster's CPUs / GPUs hold
    num_actors: int | None = field(default=None, metadata={**EXECUTION_ONLY, **option(
        SEARCH, "evaluator actors", flag="--actors", argparse={"type": int}, unset="fill the cluster")})
    cpus_per_actor: float = field(default=1.0, metadata={**EXECUTION_ONLY, **option(
        SEARCH, "CPUs per evaluator actor", flag="--actor-cpus", argparse={"type": float})})
    # Fractional allowed, e.g. 0.25: four actors per GPU
    gpus_per_actor: float = field(default=0.0, metadata={**EXECUTION_ONLY, **option(
        SEARCH, "GPUs per evaluator actor (fractions share a GPU)", flag="--actor-gpus", argparse={"type": float})})
    # None: about four calls per actor per generation
    candidates_per_call: int | None = field(default=None, metadata=EXECUTION_ONLY)
    # Torch threads; None: the actor's CPUs, at least 1
    threads_per_actor: int | None = field(default=None, metadata=EXECUTION_ONLY)
    # A candidate that killed its actor more often is an error
    max_candidate_retries: int = field(default=2, metadata=EXECUTION_ONLY)
    # None: 2 x num_actors over the whole run
    max_actor_replacements: int | None = field(default=None, metadata=EXECUTION_ONLY)
    # An evaluate call running longer marks its actor dead
    call_timeout_s: float | None = field(default=None, metadata=EXECUTION_ONLY)
    actor_start_timeout_s: float = field(default=600.0, metadata=EXECUTION_ONLY)
    actor_placement: Placement = field(default=Placement.SPREAD, metadata=EXECUTION_ONLY)

    def resolved_field(self, name: str, value: Any) -> Any:
        """A field as the run's identity records it (glora_ray.identity): ``merge_strategy="auto"``
        as the strategy its actors will use (merge.resolve_merge_strategy)."""
        if name == "merge_strategy" and value == AUTO_MERGE:
            return auto_merge_strategy(self.gpus_per_actor > 0).value
        return value

    def __post_init__(self) -> None:
        try:
            self.eval_mode = EvalMode(self.eval_mode)
        except ValueError:
            raise SearchConfigError(
                f"eval_mode={self.eval_mode!r} is not one of {[m.value for m in EvalMode]}"
            ) from None
        try:
            self.fitness = Fitness(self.fitness)
        except ValueError:
            raise SearchConfigError(
                f"fitness={self.fitness!r} is not one of {FITNESS_CHOICES}"
            ) from None
        self.precision = parse_precision(self.precision, "precision", error=SearchConfigError)
        if self.merge_strategy not in MERGE_CHOICES:
            raise SearchConfigError(f"merge_strategy={self.merge_strategy!r} is not one of {MERGE_CHOICES}")
        try:
            self.actor_placement = Placement(self.actor_placement)
        except ValueError:
            raise SearchConfigError(
                f"actor_placement={self.actor_placement!r} is not one of {[p.value for p in Placement]}"
            ) from None
        for name in ("min_params", "max_params"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, parse_param_count(value))
                except ValueError as err:
                    raise SearchConfigError(f"{name}: {err}") from None
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise SearchConfigError(f"{field}={getattr(self, field)!r}: {what}")

        for name in ("population", "parents", "mutants", "crossovers", "generations", "seed",
                     "max_draw_tries", "eval_batch_size", "max_candidate_retries"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                 name, "must be an integer")
        need(self.population >= 1, "population", "must be at least 1")
        need(1 <= self.parents <= self.population, "parents", f"must be in 1..population ({self.population})")
        need(self.mutants >= 0, "mutants", "must be >= 0")
        need(self.crossovers >= 0, "crossovers", "must be >= 0")
        need(self.mutants + self.crossovers <= self.population, "mutants",
             f"mutants + crossovers ({self.mutants} + {self.crossovers}) must not exceed population ({self.population})")
        need(self.crossovers == 0 or self.parents >= 2, "parents", "crossovers need at least 2 parents")
        need(isinstance(self.m_prob, (int, float)) and 0.0 <= self.m_prob <= 1.0, "m_prob", "must be in [0, 1]")
        need(self.generations >= 1, "generations", "must be at least 1")
        need(self.seed >= 0, "seed", "must be >= 0 (a numpy seed)")
        if self.min_params is not None and self.max_params is not None and self.min_params > self.max_params:
            raise SearchConfigError(
                f"min_params={self.min_params:,} must not exceed max_params={self.max_params:,}")
        need(self.max_draw_tries >= 1, "max_draw_tries", "must be at least 1")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        need(self.num_actors is None or (isinstance(self.num_actors, int) and self.num_actors >= 1),
             "num_actors", "must be None (fill the cluster) or an integer >= 1")
        need(isinstance(self.cpus_per_actor, (int, float)) and self.cpus_per_actor > 0,
             "cpus_per_actor", "must be > 0 (fractions allowed)")
        need(isinstance(self.gpus_per_actor, (int, float)) and self.gpus_per_actor >= 0,
             "gpus_per_actor", "must be >= 0")
        # Ray accepts fractions of one GPU, and whole numbers above one.
        need(self.gpus_per_actor <= 1 or float(self.gpus_per_actor).is_integer(),
             "gpus_per_actor", "must be a fraction of one GPU or a whole number of GPUs")
        need(self.candidates_per_call is None or (isinstance(self.candidates_per_call, int) and self.candidates_per_call >= 1),
             "candidates_per_call", "must be None (automatic) or an integer >= 1")
        need(self.threads_per_actor is None or (isinstance(self.threads_per_actor, int) and self.threads_per_actor >= 1),
             "threads_per_actor", "must be None (the actor's CPUs) or an integer >= 1")
        need(self.max_candidate_retries >= 0, "max_candidate_retries", "must be >= 0")
        need(self.max_actor_replacements is None or (isinstance(self.max_actor_replacements, int) and self.max_actor_replacements >= 0),
             "max_actor_replacements", "must be None (2 x num_actors) or an integer >= 0")
        need(self.call_timeout_s is None or self.call_timeout_s > 0, "call_timeout_s", "must be None or > 0 seconds")
        need(self.actor_start_timeout_s > 0, "actor_start_timeout_s", "must be > 0 seconds")
        if self.precision is Precision.TF32 and not self.gpus_per_actor > 0:
            raise SearchConfigError("precision='tf32' is a GPU format: it needs GPU actors (gpus_per_actor > 0, "
                                    f"got {self.gpus_per_actor!r}); on CPUs use 'fp32' or 'bf16'")

    # -- derived values ---------------------------------------------------------------------
    @property
    def actor_threads(self) -> int:
        if self.threads_per_actor is not None:
            return self.threads_per_actor
        return max(1, math.floor(self.cpus_per_actor))

    def replacements_allowed(self, num_actors: int) -> int:
        return 2 * num_actors if self.max_actor_replacements is None else self.max_actor_replacements

    def batch_size_for(self, num_candidates: int, num_actors: int) -> int:
        """Candidates per actor call: about four calls per actor per generation, for balance."""
        if self.candidates_per_call is not None:
            return self.candidates_per_call
        return max(1, math.ceil(num_candidates / (4 * max(1, num_actors))))

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eval_mode"] = self.eval_mode.value
        data["fitness"] = self.fitness.value
        data["precision"] = self.precision.value
        data["actor_placement"] = self.actor_placement.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchConfig":
        return from_known_fields(cls, data, SearchConfigError, "search")

    def result_identity(self) -> dict[str, Any]:
        """The settings that determine the search's results (compared on resume)."""
        return result_identity(self)
