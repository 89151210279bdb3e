"""Parameter counts of GLoRA choices (docs/method.md §1, "Parameter count of a choice")."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .layers.base import inert_choice_error
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


def layer_cost_table(space: SearchSpace, d_in: int, d_out: int, inert: frozenset[str] = frozenset()) -> np.ndarray:
    """Costs of one layer as an array (tensor, gene) -> params; -1 marks a choice the layer does not
    offer: an unused slot, or a form of a tensor in ``inert`` (one that cannot act on this layer,
    docs/method.md §1.5), which keeps only ``none``."""
    support = _shape_only_support(d_in, d_out, space.max_rank)
    width = max(space.num_choices(t) for t in TENSORS)
    table = np.full((len(TENSORS), width), -1, dtype=np.int64)
    for ti, t in enumerate(TENSORS):
        for gi, c in enumerate(space.choice_objects(t)):
            term = support.term(t, c)
            if term is None or t not in inert:
                table[ti, gi] = 0 if term is None else term.num_params
    return table


class ParamCounter:
    """Fast counts of whole subnets from gene arrays: one table lookup per gene; and the values each
    gene may take, for every draw of a subnet (``draw``, ``largest``, ``check``).

    ``dims`` holds each adapted layer's (d_in, d_out), in layer order; ``inert`` the tensors that
    cannot act on each layer (``GLoRALayer.inert_tensors``: D on a layer without a bias), whose
    genes there may only be ``none``.  A subnet holds no parameter that changes nothing.
    """

    def __init__(self, space: SearchSpace, dims: list[tuple[int, int]], inert: Sequence[frozenset[str]] = ()):
        self.space = space
        self.dims = [(int(d_in), int(d_out)) for d_in, d_out in dims]
        self.num_layers = len(self.dims)
        self.inert = tuple(frozenset(x) for x in inert) or (frozenset(),) * self.num_layers
        if len(self.inert) != self.num_layers:
            raise ValueError(f"inert names {len(self.inert)} layers, dims {self.num_layers}")
        # (layers, tensors, gene) -> params; few distinct layers, so one table each
        tables = {layer: layer_cost_table(space, *layer[0], layer[1]) for layer in set(zip(self.dims, self.inert))}
        self.table = np.stack([tables[layer] for layer in zip(self.dims, self.inert)]) if dims else (
            np.zeros((0, len(TENSORS), 1), dtype=np.int64)
        )
        valid = np.where(self.table >= 0, self.table, np.iinfo(np.int64).max)
        self.gene_min = valid.min(axis=2)  # (layers, tensors)
        self.gene_max = self.table.max(axis=2)
        offered = self.gene_costs() >= 0  # (genes, width)
        self.cardinality = offered.sum(axis=1)  # values each gene may take
        # Row g: gene g's offered values in order, so the k-th uniform draw maps to a value.
        self._values = np.argsort(~offered, axis=1, kind="stable")

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Every gene drawn uniformly from the values it may take (one ``rng.integers`` call: where
        every value is offered, the very draw of ``SearchSpace.sample_genes``)."""
        picks = rng.integers(self.cardinality)
        return self._values[np.arange(len(picks)), picks].astype(np.int8)

    def largest(self) -> np.ndarray:
        """Each gene's largest offered form (gene 0 of the space, or ``none`` where it is inert)."""
        return self._values[:, 0].astype(np.int8)

    def check(self, genes: np.ndarray, layer_names: Sequence[str] | None = None) -> np.ndarray:
        """``genes`` (already in the space's range), refusing a form a layer does not offer;
        ``layer_names`` name the layers in the message (default: their index)."""
        costs = self.gene_costs()
        bad = np.flatnonzero(costs[np.arange(len(genes)), genes] < 0)
        if bad.size:
            layer, tensor = divmod(int(bad[0]), len(TENSORS))
            raise inert_choice_error(f"#{layer}" if layer_names is None else layer_names[layer], TENSORS[tensor],
                                     self.space.choices(TENSORS[tensor])[genes[bad[0]]])
        return genes

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
