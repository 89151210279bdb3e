"""Population analysis for notebooks: what the paper's Figures 3 and 4 show, per run.

"Best" is always the search's own ranking (``search.ranking``, the run's ``--fitness``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from ..search.config import Fitness
from ..search.ranking import SCORE_COLUMN, ranked
from ..space import TENSORS


def layer_type(layer_name: str) -> str:
    """The layer's role inside its repeated block: "blocks.3.attn.qkv" -> "attn.qkv".

    Module paths are dotted by torch's own convention; the role is what follows the last
    numeric (block index) component, or the whole name when there is none.
    """
    parts = layer_name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric and numeric[-1] + 1 < len(parts) else layer_name


def best_per_generation(population: pd.DataFrame, fitness: Fitness) -> pd.DataFrame:
    """The score (``ranking.SCORE_COLUMN``: val_acc or val_loss) of the best evaluation of each
    generation, and of the best so far, by the search's ranking."""
    score = SCORE_COLUMN[Fitness(fitness)]
    best = ranked(population, fitness).groupby("generation", sort=True).head(1).sort_values("generation")
    so_far = best[score].cummin() if score == "val_loss" else best[score].cummax()
    return pd.DataFrame({"generation": best["generation"].to_numpy(), "generation_best": best[score].to_numpy(),
                         "best_so_far": so_far.to_numpy()})


def top_candidates(population: pd.DataFrame, count: int, fitness: Fitness) -> pd.DataFrame:
    """The ``count`` best evaluations by the search's ranking."""
    return ranked(population, fitness).head(count)


def choice_distribution(candidates: pd.DataFrame, layer_names: Sequence[str], gene_column) -> pd.DataFrame:
    """Counts of each choice per layer and tensor over ``candidates`` (long format).

    ``gene_column(layer, tensor)`` names the population column of one gene.
    """
    rows = []
    for layer_index, layer in enumerate(layer_names):
        for tensor in TENSORS:
            counts = candidates[gene_column(layer, tensor)].value_counts()
            rows.extend(
                {"layer_index": layer_index, "layer": layer, "tensor": tensor, "choice": choice, "count": int(n)}
                for choice, n in counts.items()
            )
    return pd.DataFrame(rows, columns=["layer_index", "layer", "tensor", "choice", "count"])


def params_by_layer_type(layer_params: Mapping[str, int]) -> pd.Series:
    """Adapter parameters of one subnet summed per layer type (paper Figure 3)."""
    series = pd.Series(dict(layer_params), dtype="int64")
    return series.groupby(series.index.map(layer_type)).sum().sort_values(ascending=False)
