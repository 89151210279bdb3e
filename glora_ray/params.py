"""Parameter counts of GLoRA choices (docs/method.md §1, "Parameter count of a choice")."""
from __future__ import annotations

import numpy as np

from .layers.support import GLoRASupport
from .space import TENSORS, Choice, SearchSpace


def _shape_only_support(d_in: int, d_out: int, max_rank: int) -> GLoRASupport:
    # On the meta device: shapes without memory, so counts come from the very slices
    # the layers train (the elements a choice's gradient reaches).
    return GLoRASupport(d_in, d_out, max_rank, device="meta")


def tensor_param_count(tensor: str, choice: Choice, d_in: int, d_out: int) -> int:
    """Parameters that one support tensor uses in one layer for one choice."""
    term = _shape_only_support(d_in, d_out, max(choice.rank, 1)).term(tensor, choice)
    return 0 if term is None else term.num_params


def layer_cost_table(space: SearchSpace, d_in: int, d_out: int) -> np.ndarray:
    """Costs of one layer as an array (tensor, gene) -> params; unused slots are -1."""
    support = _shape_only_support(d_in, d_out, space.max_rank)
    width = max(space.num_choices(t) for t in TENSORS)
    table = np.full((len(TENSORS), width), -1, dtype=np.int64)
    for ti, t in enumerate(TENSORS):
        for gi, c in enumerate(space.choice_objects(t)):
            term = support.term(t, c)
            table[ti, gi] = 0 if term is None else term.num_params
    return table


class ParamCounter:
    """Fast counts of whole subnets from gene arrays: one table lookup per gene.

    ``dims`` holds each adapted layer's (d_in, d_out), in layer order.
    """

    def __init__(self, space: SearchSpace, dims: list[tuple[int, int]]):
        self.space = space
        self.dims = [(int(d_in), int(d_out)) for d_in, d_out in dims]
        self.num_layers = len(self.dims)
        # (layers, tensors, gene) -> params
        tables = {dims: layer_cost_table(space, *dims) for dims in set(self.dims)}  # few distinct shapes
        self.table = np.stack([tables[dims] for dims in self.dims]) if dims else (
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
