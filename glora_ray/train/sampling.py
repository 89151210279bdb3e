"""Which subnets one supernet training step trains (docs/method.md §2.1).

Every draw comes from the step's stream (``streams.rng(Stream.TRAIN_STEP, seed, step)``), so every data-parallel worker
trains the same subnets at the same step without talking to the others, and a resumed run draws
exactly what the interrupted one would have.

* ``uniform`` (the paper): one subnet, every gene drawn uniformly from its forms.
* ``budget``: one subnet drawn within the search's budget window (``budget.sample_within_budget``),
  so training is spent on the subnets the search will read.
* a sandwich (``TrainConfig.sandwich = N > 0``, BigNAS): the largest subnet within the window, the
  smallest, and N subnets drawn as above; their gradients are accumulated into one step.  The
  largest and smallest are fixed for the run (drawn once from the seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..budget import repair_into_budget, sample_within_budget
from ..errors import GLoRARayError
from ..params import ParamCounter
from ..streams import Stream, rng as stream
from .config import SubnetSampling, TrainConfig, TrainConfigError

# The largest (smallest) subnet of a window is any subnet in its top (bottom) 5 %: repairing the
# all-largest (all-smallest) subnet into that band keeps it close to the bound and cheap to find.
_EDGE_BAND = 0.05


def edge_subnets(counter: ParamCounter, lo: int, hi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(largest, smallest) subnets within [lo, hi]: the space's extremes moved into the window's
    top and bottom band by the seeded repair of ``budget.repair_into_budget``."""
    costs = counter.gene_costs()
    valid = costs >= 0
    band = max(1, int((hi - lo) * _EDGE_BAND))
    largest = counter.largest().astype(np.int64)
    smallest = np.where(valid, costs, np.iinfo(costs.dtype).max).argmin(axis=1)
    rng = stream(Stream.EDGE_SUBNETS, seed)
    picked = []
    for genes, (a, b) in ((largest, (max(lo, hi - band), hi)), (smallest, (lo, min(hi, lo + band)))):
        total = counter.count(genes)
        if a <= total <= b:
            picked.append(genes.astype(np.int8))
            continue
        repaired = repair_into_budget(genes, costs, a, b, rng)
        if repaired is None:
            # A band no subnet lands in (a small space): fall back to the whole window.
            repaired = repair_into_budget(genes, costs, lo, hi, rng)
        if repaired is None:
            raise GLoRARayError(f"no subnet of this space lies within [{lo:,}, {hi:,}] adapter parameters")
        picked.append(np.asarray(repaired, dtype=np.int8))
    return picked[0], picked[1]


@dataclass(frozen=True)
class StepSubnets:
    """The subnets of every training step of one run: ``for_step(step)``, largest first in a sandwich."""

    counter: ParamCounter
    seed: int
    sampling: SubnetSampling
    window: tuple[int, int] | None
    sandwich: int
    edges: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def from_config(cls, counter: ParamCounter, cfg: TrainConfig) -> "StepSubnets":
        sampling = SubnetSampling(cfg.subnet_sampling)
        window = None if cfg.budget is None else (int(cfg.budget[0]), int(cfg.budget[1]))
        if window is None and (sampling is SubnetSampling.BUDGET or cfg.sandwich > 0):
            raise TrainConfigError(f"subnet_sampling={sampling.value!r} with sandwich={cfg.sandwich} draws within the "
                                   f"search's budget: set budget=(min_params, max_params) (the pipeline does)")
        if window is None:
            return cls(counter, cfg.seed, sampling, None, 0, None)
        edges = edge_subnets(counter, *window, cfg.seed) if cfg.sandwich > 0 else None
        return cls(counter, cfg.seed, sampling, window, cfg.sandwich, edges)

    @property
    def per_step(self) -> int:
        """Forward and backward passes per step."""
        return 1 if self.edges is None else 2 + self.sandwich

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        if self.sampling is SubnetSampling.BUDGET:
            return sample_within_budget(rng, self.counter, *self.window)
        return self.counter.draw(rng)  # the paper's draw

    def for_step(self, step: int) -> list[np.ndarray]:
        rng = stream(Stream.TRAIN_STEP, self.seed, step)
        if self.edges is None:
            return [self._draw(rng)]
        return [self.edges[0], self.edges[1], *(self._draw(rng) for _ in range(self.sandwich))]
