"""Population analysis for notebooks: what the paper's Figures 3 and 4 show, per run."""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from ..space import TENSORS


def layer_type(layer_name: str) -> str:
    """The layer's role inside its repeated block: "blocks.3.attn.qkv" -> "attn.qkv".

    Module paths are dotted by torch's own convention; the role is what follows the last
    numeric (block index) component, or the whole name when there is none.
    """
    parts = layer_name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric and numeric[-1] + 1 < len(parts) else layer_name


def best_per_generation(population: pd.DataFrame) -> pd.DataFrame:
    """Best validation accuracy evaluated in each generation, and the best so far."""
    per_gen = population.groupby("generation")["val_acc"].max().rename("generation_best").to_frame()
    per_gen["best_so_far"] = per_gen["generation_best"].cummax()
    return per_gen.reset_index()


def top_candidates(population: pd.DataFrame, count: int) -> pd.DataFrame:
    """The ``count`` best evaluations: accuracy first, fewer parameters on ties."""
    return population.sort_values(["val_acc", "params", "key"], ascending=[False, True, True]).head(count)


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
