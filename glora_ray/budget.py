"""Parameter budgets: the reachable range, a feasibility check, and bounded sampling and repair within it
(docs/method.md §3)."""
from __future__ import annotations

from .errors import GLoRARayError

import re
from dataclasses import dataclass

import numpy as np

from .params import ParamCounter

_SUFFIXES = {"": 1, "k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000, "b": 1_000_000_000, "B": 1_000_000_000}
_COUNT_PATTERN = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbB]?)\s*")
_MAX_COUNT = 2**63 - 1  # counts are int64 in the search's tables


class InfeasibleBudgetError(GLoRARayError):
    """A budget that no subnet of the space can meet."""


def parse_param_count(value: str | int | float) -> int:
    """``"0.29M"`` -> 290000, ``"800k"`` -> 800000, ``1603776`` -> 1603776 (docs/method.md §3).

    A negative, infinite or not-a-number count, or one beyond int64, is refused by name.
    """
    if isinstance(value, (int, np.integer)):
        scaled: float | int = int(value)
    elif isinstance(value, float):
        scaled = value
    else:
        match = _COUNT_PATTERN.fullmatch(str(value))
        if match is None:
            raise GLoRARayError(f"parameter count {value!r} is not a number with an optional k/M/B suffix (e.g. '0.29M')")
        scaled = float(match.group(1)) * _SUFFIXES[match.group(2)]
    if scaled != scaled:  # NaN
        raise GLoRARayError(f"parameter count {value!r} is not a number")
    if scaled < 0:
        raise GLoRARayError(f"parameter count {value!r} is negative; give a count >= 0 (e.g. '0.29M')")
    if scaled > _MAX_COUNT:
        raise GLoRARayError(f"parameter count {value!r} is too large (above {_MAX_COUNT:,}); give a count such as '0.29M'")
    return int(round(scaled))


@dataclass(frozen=True)
class Budget:
    """Allowed adapter parameter counts, inclusive; ``None`` means unbounded on that side."""

    min_params: int | None = None
    max_params: int | None = None

    @classmethod
    def parse(cls, min_params=None, max_params=None) -> "Budget":
        return cls(
            None if min_params is None else parse_param_count(min_params),
            None if max_params is None else parse_param_count(max_params),
        )

    def resolve(self, counter: ParamCounter) -> tuple[int, int]:
        """The concrete [lo, hi] for a model and space; raises at once when infeasible."""
        reach_lo, reach_hi = counter.min_params, counter.max_params
        lo = reach_lo if self.min_params is None else self.min_params
        hi = reach_hi if self.max_params is None else self.max_params
        if lo > hi:
            raise InfeasibleBudgetError(f"budget min_params={lo:,} is above max_params={hi:,}")
        if hi < reach_lo or lo > reach_hi:
            raise InfeasibleBudgetError(
                f"budget [{lo:,}, {hi:,}] parameters is outside what this space reaches on this model: "
                f"[{reach_lo:,}, {reach_hi:,}]"
            )
        return max(lo, reach_lo), min(hi, reach_hi)


def repair_into_budget(genes: np.ndarray, costs: np.ndarray, lo: int, hi: int,
                       rng: np.random.Generator) -> np.ndarray | None:
    """``genes`` moved one gene at a time toward [lo, hi] (docs/method.md §3), or None.

    ``costs`` is ``ParamCounter.gene_costs()`` (-1 marks a value a gene does not have).  Each
    step picks, uniformly with ``rng``, a move that lands in the window, else one that heads
    toward it without overshooting; at most one step per gene value, so it never loops
    unboundedly.  None when every remaining move overshoots the window.  Genes already inside
    are returned unchanged (a copy) without drawing from ``rng``.
    """
    genes = np.asarray(genes).copy()
    rows = np.arange(costs.shape[0])
    valid = costs >= 0
    for _ in range(costs.size):
        current = costs[rows, genes]
        total = int(current.sum())
        if lo <= total <= hi:
            return genes
        delta = costs - current[:, None]  # change in total for each (gene, value) move
        new_total = total + delta
        wrong_way = delta >= 0 if total > hi else delta <= 0
        movable = valid & ~wrong_way
        landing = movable & (new_total >= lo) & (new_total <= hi)
        # Prefer a move that lands in the window, then one that does not overshoot it.
        not_past = movable & ((new_total >= lo) if total > hi else (new_total <= hi))
        for pool in (landing, not_past):
            options = np.argwhere(pool)
            if len(options):
                g, v = options[rng.integers(len(options))]
                genes[g] = v
                break
        else:
            return None  # every move overshoots: give up on this draw
    current = costs[rows, genes]
    return genes if lo <= int(current.sum()) <= hi else None


def sample_within_budget(
    rng: np.random.Generator,
    counter: ParamCounter,
    lo: int,
    hi: int,
    max_tries: int = 32,
) -> np.ndarray:
    """A uniformly drawn subnet, repaired into [lo, hi] when needed; never loops unboundedly."""
    costs = counter.gene_costs()
    for _ in range(max_tries):
        genes = counter.draw(rng).astype(np.int64)
        total = int(costs[np.arange(len(genes)), genes].sum())
        if lo <= total <= hi:
            return genes.astype(np.int8)
        repaired = repair_into_budget(genes, costs, lo, hi, rng)
        if repaired is not None:
            return repaired.astype(np.int8)
    raise InfeasibleBudgetError(
        f"no subnet found within [{lo:,}, {hi:,}] parameters after {max_tries} draws with repair; "
        f"the window may be narrower than the parameter counts this space can form "
        f"(reachable range [{counter.min_params:,}, {counter.max_params:,}])"
    )
