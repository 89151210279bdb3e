"""Parameter counts of GLoRA choices (SPEC §1, "Parameter count of a choice")."""
from __future__ import annotations

import numpy as np

from .space import TENSORS, Choice, Kind, SearchSpace


def tensor_param_count(tensor: str, choice: Choice, d_in: int, d_out: int) -> int:
    """Parameters that one support tensor uses in one layer for one choice."""
    if choice.kind is Kind.NONE:
        return 0
    if choice.kind is Kind.SCALAR:
        return 1
    if tensor in ("A", "B"):
        if choice.kind is Kind.LORA:
            return choice.rank * (d_in + d_out)
        return d_out  # vector
    if tensor == "C":
        if choice.kind is Kind.LORA:
            return choice.rank * d_in + choice.rank
        return d_in  # vector
    return d_out  # D, E vector


def layer_cost_table(space: SearchSpace, d_in: int, d_out: int) -> np.ndarray:
    """Costs of one layer as an array (tensor, gene) -> params; unused slots are -1."""
    width = max(space.num_choices(t) for t in TENSORS)
    table = np.full((len(TENSORS), width), -1, dtype=np.int64)
    for ti, t in enumerate(TENSORS):
        for gi, c in enumerate(space.choice_objects(t)):
            table[ti, gi] = tensor_param_count(t, c, d_in, d_out)
    return table


class ParamCounter:
    """Fast counts of whole subnets from gene arrays: one table lookup per gene.

    ``dims`` holds each adapted layer's (d_in, d_out), in layer order.
    """

    def __init__(self, space: SearchSpace, dims: list[tuple[int, int]]):
        self.space = space
        self.dims = list(dims)
        self.num_layers = len(self.dims)
        # (layers, tensors, gene) -> params
        self.table = np.stack([layer_cost_table(space, d_in, d_out) for d_in, d_out in self.dims]) if dims else (
            np.zeros((0, len(TENSORS), 1), dtype=np.int64)
        )
        valid = np.where(self.table >= 0, self.table, np.iinfo(np.int64).max)
        self.gene_min = valid.min(axis=2)  # (layers, tensors)
        self.gene_max = self.table.max(axis=2)

    @property
    def min_params(self) -> int:
        return int(self.gene_min.sum())

    @property
    def max_params(self) -> int:
        return int(self.gene_max.sum())

    def gene_costs(self) -> np.ndarray:
        """(num_genes, width) cost of every value of every gene, flattened layer-major."""
        return self.table.reshape(self.num_layers * len(TENSORS), -1)

    def count(self, genes: np.ndarray) -> int:
        genes = np.asarray(genes, dtype=np.int64).reshape(self.num_layers, len(TENSORS))
        picked = np.take_along_axis(self.table, genes[:, :, None], axis=2)
        return int(picked.sum())

    def count_many(self, genes: np.ndarray) -> np.ndarray:
        """Counts of a batch of gene arrays, shape (n, num_genes) -> (n,)."""
        genes = np.asarray(genes, dtype=np.int64)
        flat = self.gene_costs()
        return flat[np.arange(flat.shape[0])[None, :], genes].sum(axis=1)
