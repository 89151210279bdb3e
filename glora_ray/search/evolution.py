"""The evolutionary search as an ask/tell planner, free of Ray (docs/method.md §3).

One seeded ``numpy.random.Generator`` drives every draw.  ``ask()`` draws all of a generation's
candidates (mutants, crossovers, random fill) before any of that generation's results exist,
and ``tell()`` takes the results as a mapping, so neither the number of evaluators nor the
order in which they finish can change what is drawn next.  Candidates are ranked by
(accuracy desc, params asc, key asc): a total order, so ties never depend on arrival order.

Selection follows AutoFormer, whose search GLoRA reuses: the parents of a generation are the
top ``parents`` of everything evaluated so far (elitist), and a generation consists only of new
candidates: a subnet already evaluated is never drawn again, so every candidate appears in
exactly one generation.  The last generation is ranked like every other.
"""
from __future__ import annotations

from ..errors import GLoRARayError

import enum
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from ..budget import InfeasibleBudgetError, sample_within_budget
from ..params import ParamCounter
from ..space import SearchSpace
from .config import SearchConfig


class Origin(str, enum.Enum):
    RANDOM = "random"
    MUTATION = "mutation"
    CROSSOVER = "crossover"


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    generation: int
    key: str  # the canonical encoding (SearchSpace.genes_to_string)
    genes: np.ndarray = field(compare=False)  # equal keys mean equal genes
    params: int
    origin: Origin
    parent_ids: tuple[str, ...]


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    val_acc: float

    @property
    def rank_key(self) -> tuple[float, int, str]:
        return (-self.val_acc, self.candidate.params, self.candidate.key)


class SpaceExhaustedWarning(UserWarning):
    """A generation found fewer new candidates within the budget than it asked for."""


def candidate_id(generation: int, index: int) -> str:
    """Opaque, sortable id of a candidate; never parsed."""
    return f"g{generation:04d}-c{index:04d}"


class EvolutionPlanner:
    """Plans generations; the caller evaluates them (in any order) and reports back."""

    def __init__(self, config: SearchConfig, space: SearchSpace, counter: ParamCounter, lo: int, hi: int):
        if counter.space != space:
            raise ValueError(f"counter is for {counter.space!r}, planner for {space!r}")
        self.config = config
        self.space = space
        self.counter = counter
        self.lo, self.hi = lo, hi
        self.rng = np.random.default_rng(config.seed)
        self.generation = 0  # the next generation ``ask`` plans
        self.evaluated: dict[str, Scored] = {}  # the cache across generations, by canonical key
        self.history: list[list[Scored]] = []
        self._pending: list[Candidate] | None = None
        self._cardinality = space.gene_cardinalities(counter.num_layers)

    # -- ask / tell ---------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """All of the next generation's candidates; empty when the space has nothing new left."""
        if self._pending is not None:
            raise RuntimeError(f"generation {self.generation} was asked for and not yet told its results")
        g = self.generation
        cfg = self.config
        taken: set[str] = set()  # keys drawn in this generation (dedupe within it)
        picked: list[tuple[np.ndarray, Origin, tuple[str, ...]]] = []
        if g > 0:
            parents = self.top(cfg.parents)
            picked += self._offspring(parents, cfg.mutants, self._mutate, taken)
            if len(parents) >= 2:
                picked += self._offspring(parents, cfg.crossovers, self._crossover, taken)
        picked += self._random(cfg.population - len(picked), taken)
        if len(picked) < cfg.population:
            warnings.warn(
                f"generation {g}: only {len(picked)} new candidates within [{self.lo:,}, {self.hi:,}] params "
                f"(population {cfg.population}); the space or budget holds few unevaluated subnets",
                SpaceExhaustedWarning, stacklevel=2,
            )
        candidates = [
            Candidate(candidate_id(g, i), g, self.space.genes_to_string(genes), genes,
                      self.counter.count(genes), origin, parents)
            for i, (genes, origin, parents) in enumerate(picked)
        ]
        self._pending = candidates
        return list(candidates)

    def tell(self, accuracies: Mapping[str, float]) -> list[Scored]:
        """Record the results of the asked generation: exactly one accuracy per candidate key."""
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask()")
        wanted = {c.key for c in self._pending}
        missing, extra = wanted - set(accuracies), set(accuracies) - wanted
        if missing or extra:
            raise ValueError(
                f"generation {self.generation}: results missing for {len(missing)} candidates "
                f"(e.g. {sorted(missing)[:3]}), unexpected for {len(extra)} (e.g. {sorted(extra)[:3]})"
            )
        scored = [Scored(c, float(accuracies[c.key])) for c in self._pending]
        for s in scored:
            self.evaluated[s.candidate.key] = s
        self.history.append(scored)
        self._pending = None
        self.generation += 1
        return scored

    # -- ranking ------------------------------------------------------------------------
    def ranked(self) -> list[Scored]:
        return sorted(self.evaluated.values(), key=lambda s: s.rank_key)

    def top(self, k: int) -> list[Scored]:
        return self.ranked()[:k]

    @property
    def best(self) -> Scored | None:
        return min(self.evaluated.values(), key=lambda s: s.rank_key, default=None)

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    # -- drawing ------------------------------------------------------------------------
    def _admissible(self, genes: np.ndarray, taken: set[str]) -> str | None:
        """The key of ``genes`` if it is within budget and new, else None."""
        params = self.counter.count(genes)
        if not self.lo <= params <= self.hi:
            return None
        key = self.space.genes_to_string(genes)
        if key in self.evaluated or key in taken:
            return None
        return key

    def _offspring(self, parents: list[Scored], count: int, draw, taken: set[str]):
        out = []
        for _ in range(count * self.config.max_draw_tries):
            if len(out) == count:
                break
            genes, parent_ids, origin = draw(parents)
            key = self._admissible(genes, taken)
            if key is not None:
                taken.add(key)
                out.append((genes, origin, parent_ids))
        return out

    def _mutate(self, parents: list[Scored]):
        parent = parents[int(self.rng.integers(len(parents)))].candidate
        # Draw the mask and the replacement values for every gene, so each try consumes the
        # same amount of randomness whatever it redraws.
        redraw = self.rng.random(parent.genes.size) < self.config.m_prob
        values = self.rng.integers(self._cardinality).astype(np.int8)
        return np.where(redraw, values, parent.genes).astype(np.int8), (parent.candidate_id,), Origin.MUTATION

    def _crossover(self, parents: list[Scored]):
        i, j = self.rng.choice(len(parents), size=2, replace=False)
        a, b = parents[int(i)].candidate, parents[int(j)].candidate
        from_a = self.rng.random(a.genes.size) < 0.5
        return np.where(from_a, a.genes, b.genes).astype(np.int8), (a.candidate_id, b.candidate_id), Origin.CROSSOVER

    def _random(self, count: int, taken: set[str]):
        out = []
        for _ in range(max(0, count) * self.config.max_draw_tries):
            if len(out) == count:
                break
            try:
                genes = sample_within_budget(self.rng, self.counter, self.lo, self.hi)
            except InfeasibleBudgetError:
                if self.generation == 0 and not out:
                    raise
                break  # the repairing sampler gave up: settle for fewer
            key = self._admissible(genes, taken)
            if key is not None:
                taken.add(key)
                out.append((genes, Origin.RANDOM, ()))
        return out

    # -- resume -------------------------------------------------------------------------
    def replay(self, generations: Iterable[list[tuple[str, str, float]]]) -> None:
        """Re-run ``ask``/``tell`` over stored generations, rebuilding the generator's state.

        Each stored generation is a list of (candidate_id, key, val_acc).  The candidates this
        planner draws must be exactly the stored ones; anything else means the stored run came
        from other settings or another version of the algorithm, and is refused.
        """
        for stored in generations:
            asked = self.ask()
            have = [(c.candidate_id, c.key) for c in asked]
            want = [(cid, key) for cid, key, _ in stored]
            if have != want:
                diff = next((i for i, (h, w) in enumerate(zip(have, want)) if h != w), min(len(have), len(want)))
                self._pending = None
                raise ResumeMismatchError(
                    f"generation {self.generation}: the stored candidates differ from what this seed and "
                    f"these settings draw (first difference at row {diff}: stored "
                    f"{want[diff] if diff < len(want) else None}, drawn {have[diff] if diff < len(have) else None})"
                )
            self.tell({key: acc for _, key, acc in stored})


class ResumeMismatchError(GLoRARayError):
    """Stored results that this run cannot continue (other settings, data or model)."""
