"""The evolutionary search as an ask/tell planner, free of Ray (docs/method.md §3).

One seeded ``numpy.random.Generator`` drives every draw.  ``ask()`` draws all of a generation's
candidates (seeds, mutants, crossovers, random fill) before any of that generation's results
exist, and ``tell()`` takes the results as mappings, so neither the number of evaluators nor the
order in which they finish can change what is drawn next.  Candidates are ranked by the
configured fitness (``SearchConfig.fitness``): (accuracy desc, params asc, key asc) by default,
(loss asc, accuracy desc, params asc, key asc) for ``loss``; a total order either way, so ties
never depend on arrival order.

Generation 0 may start from given subnets (``initial``): those within the budget come first,
in the given order, and random in-budget subnets fill the rest.  A mutant or crossover that
falls outside the budget is repaired into it (``budget.repair_into_budget``, drawing from the
same generator) before it is checked for novelty, so a tight budget does not leave the
offspring quota to random draws.

Selection follows AutoFormer, whose search GLoRA reuses: the parents of a generation are the
top ``parents`` of everything evaluated so far (elitist), and a generation consists only of new
candidates: a subnet already evaluated is never drawn again, so every candidate appears in
exactly one generation.  The last generation is ranked like every other.
"""
from __future__ import annotations

from ..errors import GLoRARayError

import enum
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from ..budget import InfeasibleBudgetError, repair_into_budget, sample_within_budget
from ..params import ParamCounter
from ..space import SearchSpace, SearchSpaceError
from ..streams import Stream, rng as stream
from .config import Fitness, SearchConfig
from .ranking import rank_key

log = logging.getLogger(__name__)


class Origin(str, enum.Enum):
    """How a candidate was drawn (docs/method.md §3)."""

    SEEDED = "seeded"  # given to generation 0 (``EvolutionPlanner(initial=...)``)
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
    repaired: bool = False  # an offspring moved into the budget after it was drawn (docs/method.md §3)


@dataclass(frozen=True)
class Scored:
    """A candidate with its validation results; the planner ranks them (``ranking``, docs/method.md §3)."""

    candidate: Candidate
    val_acc: float
    val_loss: float = math.nan  # mean cross-entropy on the validation images

    def rank_key(self, fitness: Fitness) -> tuple:
        """Its position in the ranking of ``fitness``: smaller first."""
        return rank_key(fitness, self.val_acc, self.val_loss, self.candidate.params, self.candidate.key)


class StoredScore(NamedTuple):
    """One stored evaluation, as ``replay`` takes it back (results.stored_scores)."""

    candidate_id: str
    key: str
    val_acc: float
    val_loss: float


@dataclass(frozen=True)
class DrawCounts:
    """Where one generation's candidates came from, and how many offspring it wanted.

    ``repaired`` counts the kept mutants and crossovers that were moved into the budget.
    """

    generation: int
    seeded: int = 0
    mutation: int = 0
    crossover: int = 0
    random: int = 0
    mutants_wanted: int = 0
    crossovers_wanted: int = 0
    repaired_mutation: int = 0
    repaired_crossover: int = 0

    def origins(self) -> dict[str, int]:
        return {Origin.SEEDED.value: self.seeded, Origin.MUTATION.value: self.mutation,
                Origin.CROSSOVER.value: self.crossover, Origin.RANDOM.value: self.random}

    def to_dict(self) -> dict[str, Any]:
        """The generation file's commit record of it (results.generation_table's metadata)."""
        return {
            "origins": self.origins(),
            "wanted": {Origin.MUTATION.value: self.mutants_wanted, Origin.CROSSOVER.value: self.crossovers_wanted},
            "repaired": {Origin.MUTATION.value: self.repaired_mutation,
                         Origin.CROSSOVER.value: self.repaired_crossover},
        }

    def describe(self) -> str:
        """``"seeded 2, mutation 6/6, crossover 5/6, random 3"`` (seeded only when there are any)."""
        parts = [f"seeded {self.seeded}"] if self.seeded else []
        parts += [f"mutation {self.mutation}/{self.mutants_wanted}",
                  f"crossover {self.crossover}/{self.crossovers_wanted}", f"random {self.random}"]
        return ", ".join(parts)


class SpaceExhaustedWarning(UserWarning):
    """A generation found fewer new candidates within the budget than it asked for."""


def candidate_id(generation: int, index: int) -> str:
    """Opaque, sortable id of a candidate; never parsed."""
    return f"g{generation:04d}-c{index:04d}"


class EvolutionPlanner:
    """Plans generations; the caller evaluates them (in any order) and reports back.

    ``initial``: gene arrays that generation 0 starts with (docs/method.md §3), in the given
    order, duplicates dropped; those outside [lo, hi] are skipped (logged), and at most
    ``population`` are kept.  Random in-budget subnets fill the rest of generation 0.
    """

    def __init__(self, config: SearchConfig, space: SearchSpace, counter: ParamCounter, lo: int, hi: int,
                 initial: Sequence[np.ndarray] = ()):
        if counter.space != space:
            raise ValueError(f"counter is for {counter.space!r}, planner for {space!r}")
        self.config = config
        self.space = space
        self.counter = counter
        self.lo, self.hi = lo, hi
        self.rng = stream(Stream.SEARCH, config.seed)
        self.generation = 0  # the next generation ``ask`` plans
        self.evaluated: dict[str, Scored] = {}  # the cache across generations, by canonical key
        self.history: list[list[Scored]] = []
        self.draws: list[DrawCounts] = []  # per told generation: where its candidates came from
        self._pending: list[Candidate] | None = None
        self._pending_draws: DrawCounts | None = None
        self._costs = counter.gene_costs()
        self.initial = self._admit_seeds(initial)

    def _admit_seeds(self, initial: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """The seeds generation 0 starts with: valid, within budget, distinct, at most ``population``."""
        kept: dict[str, np.ndarray] = {}
        outside: list[str] = []
        for i, genes in enumerate(initial):
            try:
                genes = self.space.validate_genes(np.asarray(genes), self.counter.num_layers).astype(np.int8)
                self.counter.check(genes)
            except SearchSpaceError as err:
                raise SearchSpaceError(f"initial[{i}]: {err}") from None
            key = self.space.genes_to_string(genes)
            params = self.counter.count(genes)
            if not self.lo <= params <= self.hi:
                outside.append(f"{key} ({params:,} params)")
            elif key not in kept:
                kept[key] = genes
        if outside:
            log.info("%d initial subnet(s) outside the budget [%s, %s] params skipped: %s", len(outside),
                     f"{self.lo:,}", f"{self.hi:,}", "; ".join(outside))
        if len(kept) > self.config.population:
            log.info("%d initial subnets within the budget; generation 0 takes the first %d (population)",
                     len(kept), self.config.population)
        return tuple(kept.values())[:self.config.population]

    # -- ask / tell ---------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """All of the next generation's candidates; empty when the space has nothing new left."""
        if self._pending is not None:
            raise RuntimeError(f"generation {self.generation} was asked for and not yet told its results")
        g = self.generation
        cfg = self.config
        taken: set[str] = set()  # keys drawn in this generation (dedupe within it)
        # (genes, origin, parent ids, repaired)
        picked: list[tuple[np.ndarray, Origin, tuple[str, ...], bool]] = []
        if g == 0:
            for genes in self.initial:
                taken.add(self.space.genes_to_string(genes))
                picked.append((genes.copy(), Origin.SEEDED, (), False))
        else:
            parents = self.top(cfg.parents)
            picked += self._offspring(parents, cfg.mutants, self._mutate, taken)
            if len(parents) >= 2:
                picked += self._offspring(parents, cfg.crossovers, self._crossover, taken)
        picked += self._random(cfg.population - len(picked), taken, must_find=g == 0 and not picked)
        if len(picked) < cfg.population:
            warnings.warn(
                f"generation {g}: only {len(picked)} new candidates within [{self.lo:,}, {self.hi:,}] params "
                f"(population {cfg.population}); the space or budget holds few unevaluated subnets",
                SpaceExhaustedWarning, stacklevel=2,
            )
        candidates = [
            Candidate(candidate_id(g, i), g, self.space.genes_to_string(genes), genes,
                      self.counter.count(genes), origin, parents, repaired)
            for i, (genes, origin, parents, repaired) in enumerate(picked)
        ]
        origins = [c.origin for c in candidates]
        fixed = [c.origin for c in candidates if c.repaired]
        self._pending_draws = DrawCounts(
            g, seeded=origins.count(Origin.SEEDED), mutation=origins.count(Origin.MUTATION),
            crossover=origins.count(Origin.CROSSOVER), random=origins.count(Origin.RANDOM),
            mutants_wanted=cfg.mutants if g > 0 else 0, crossovers_wanted=cfg.crossovers if g > 0 else 0,
            repaired_mutation=fixed.count(Origin.MUTATION), repaired_crossover=fixed.count(Origin.CROSSOVER),
        )
        self._pending = candidates
        return list(candidates)

    def tell(self, accuracies: Mapping[str, float], losses: Mapping[str, float] | None = None) -> list[Scored]:
        """Record the results of the asked generation: exactly one accuracy (and, when given, one
        validation loss) per candidate key.  ``fitness=loss`` needs the losses."""
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask()")
        wanted = {c.key for c in self._pending}
        if losses is None and self.config.fitness is Fitness.LOSS:
            raise ValueError(f"generation {self.generation}: fitness={Fitness.LOSS.value!r} ranks by validation "
                             f"loss, but tell() got no losses")
        for what, given in (("results", accuracies), ("losses", losses)):
            if given is None:
                continue
            missing, extra = wanted - set(given), set(given) - wanted
            if missing or extra:
                raise ValueError(
                    f"generation {self.generation}: {what} missing for {len(missing)} candidates "
                    f"(e.g. {sorted(missing)[:3]}), unexpected for {len(extra)} (e.g. {sorted(extra)[:3]})"
                )
        scored = [Scored(c, float(accuracies[c.key]), math.nan if losses is None else float(losses[c.key]))
                  for c in self._pending]
        for s in scored:
            self.evaluated[s.candidate.key] = s
        self.history.append(scored)
        self.draws.append(self._pending_draws)
        self._pending = None
        self._pending_draws = None
        self.generation += 1
        return scored

    # -- ranking ------------------------------------------------------------------------
    def _rank(self, scored: Scored) -> tuple:
        return scored.rank_key(self.config.fitness)

    def ranked(self) -> list[Scored]:
        """Everything evaluated, best first by ``config.fitness``."""
        return sorted(self.evaluated.values(), key=self._rank)

    def top(self, k: int) -> list[Scored]:
        return self.ranked()[:k]

    @property
    def best(self) -> Scored | None:
        return min(self.evaluated.values(), key=self._rank, default=None)

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
        """Up to ``count`` new offspring; one outside the budget is repaired into it first."""
        out = []
        for _ in range(count * self.config.max_draw_tries):
            if len(out) == count:
                break
            genes, parent_ids, origin = draw(parents)
            moved = False
            if not self.lo <= self.counter.count(genes) <= self.hi:
                fixed = repair_into_budget(genes, self._costs, self.lo, self.hi, self.rng)
                if fixed is None:
                    continue  # every move overshoots the window: this try is rejected
                genes, moved = fixed.astype(np.int8), True
            key = self._admissible(genes, taken)
            if key is not None:
                taken.add(key)
                out.append((genes, origin, parent_ids, moved))
        return out

    def _mutate(self, parents: list[Scored]):
        parent = parents[int(self.rng.integers(len(parents)))].candidate
        # Draw the mask and the replacement values for every gene, so each try consumes the
        # same amount of randomness whatever it redraws.
        redraw = self.rng.random(parent.genes.size) < self.config.m_prob
        values = self.counter.draw(self.rng)
        return np.where(redraw, values, parent.genes).astype(np.int8), (parent.candidate_id,), Origin.MUTATION

    def _crossover(self, parents: list[Scored]):
        i, j = self.rng.choice(len(parents), size=2, replace=False)
        a, b = parents[int(i)].candidate, parents[int(j)].candidate
        from_a = self.rng.random(a.genes.size) < 0.5
        return np.where(from_a, a.genes, b.genes).astype(np.int8), (a.candidate_id, b.candidate_id), Origin.CROSSOVER

    def _random(self, count: int, taken: set[str], must_find: bool = False):
        """Up to ``count`` new random in-budget subnets; ``must_find``: raise if the sampler finds none."""
        out = []
        for _ in range(max(0, count) * self.config.max_draw_tries):
            if len(out) == count:
                break
            try:
                genes = sample_within_budget(self.rng, self.counter, self.lo, self.hi)
            except InfeasibleBudgetError:
                if must_find and not out:
                    raise
                break  # the repairing sampler gave up: settle for fewer
            key = self._admissible(genes, taken)
            if key is not None:
                taken.add(key)
                out.append((genes, Origin.RANDOM, (), False))
        return out

    # -- resume -------------------------------------------------------------------------
    def replay(self, generations: Iterable[Sequence[StoredScore]]) -> None:
        """Re-run ``ask``/``tell`` over stored generations, rebuilding the generator's state.

        Each stored generation is a list of (candidate_id, key, val_acc, val_loss) (``StoredScore``
        or plain tuples).  The candidates this planner draws must be exactly the stored ones;
        anything else means the stored run came from other settings, seeds or another version of
        the algorithm, and is refused.
        """
        for stored in generations:
            stored = [StoredScore(*row) for row in stored]
            asked = self.ask()
            have = [(c.candidate_id, c.key) for c in asked]
            want = [(row.candidate_id, row.key) for row in stored]
            if have != want:
                diff = next((i for i, (h, w) in enumerate(zip(have, want)) if h != w), min(len(have), len(want)))
                self._pending = self._pending_draws = None
                raise ResumeMismatchError(
                    f"generation {self.generation}: the stored candidates differ from what this seed and "
                    f"these settings draw (first difference at row {diff}: stored "
                    f"{want[diff] if diff < len(want) else None}, drawn {have[diff] if diff < len(have) else None})"
                )
            self.tell({row.key: row.val_acc for row in stored}, {row.key: row.val_loss for row in stored})


class ResumeMismatchError(GLoRARayError):
    """Stored results that this run cannot continue (other settings, data or model)."""
