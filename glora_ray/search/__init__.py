"""Stage 2: the parallel evolutionary search over a trained GLoRA supernet.

``evolution`` (the algorithm), ``pareto`` and ``evaluator`` need no Ray; ``pool`` runs
evaluators as Ray actors; ``results`` stores Parquet through pyarrow filesystems; ``runner``
ties them together in ``run_search``.

Names are imported on first use: an evaluator actor imports ``glora_ray.search.pool`` and so
runs this file, and should not pay for pandas, pyarrow and the driver's modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EvalMode": "config", "Fitness": "config", "Placement": "config", "SearchConfig": "config", "SearchConfigError": "config",
    "EvalResult": "evaluator", "Evaluator": "evaluator", "MergedModel": "evaluator", "evaluate_subnet": "evaluator",
    "Candidate": "evolution", "DrawCounts": "evolution", "EvolutionPlanner": "evolution", "Origin": "evolution",
    "ResumeMismatchError": "evolution", "Scored": "evolution", "SpaceExhaustedWarning": "evolution",
    "StoredScore": "evolution",
    "best_under": "pareto", "pareto_front": "pareto", "pareto_mask": "pareto",
    "ActorStartError": "pool", "AllActorsDiedError": "pool", "CandidateCrashError": "pool",
    "EvaluationPoolError": "pool", "EvaluatorPool": "pool", "plan_actor_count": "pool",
    "ResultStore": "results", "gene_column": "results", "population_schema": "results", "read_pareto": "results",
    "read_population": "results", "read_result": "results", "without_timing": "results",
    "BestSubnet": "runner", "SearchResult": "runner", "run_search": "runner",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .config import EvalMode, Fitness, Placement, SearchConfig, SearchConfigError
    from .evaluator import EvalResult, Evaluator, MergedModel, evaluate_subnet
    from .evolution import (
        Candidate, DrawCounts, EvolutionPlanner, Origin, ResumeMismatchError, Scored, SpaceExhaustedWarning, StoredScore,
    )
    from .pareto import best_under, pareto_front, pareto_mask
    from .pool import (
        ActorStartError, AllActorsDiedError, CandidateCrashError, EvaluationPoolError, EvaluatorPool,
        plan_actor_count,
    )
    from .results import (
        ResultStore, gene_column, population_schema, read_pareto, read_population, read_result, without_timing,
    )
    from .runner import BestSubnet, SearchResult, run_search
