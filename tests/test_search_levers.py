"""The search's levers without Ray (docs/method.md §3): seeded generation 0, offspring repaired into
the budget, and the loss fitness."""
import contextlib
import logging

import numpy as np
import pytest

from glora_ray import Budget, sample_within_budget
from glora_ray.search import (
    EvolutionPlanner, Fitness, Origin, ResumeMismatchError, SearchConfig, SearchConfigError, evolution,
)
from glora_ray.space import SearchSpaceError
from helpers import COUNTER, SPACE, fitness, logged, run

SMALL = dict(population=20, parents=5, mutants=8, crossovers=8, generations=5)


def middle_window(fraction: float) -> tuple[int, int]:
    """A window of ``fraction`` of the reachable parameter range, centred in it."""
    lo, hi = COUNTER.min_params, COUNTER.max_params
    mid, half = (lo + hi) // 2, int(fraction * (hi - lo)) // 2
    return mid - half, mid + half


def seeds_within(lo: int, hi: int, count: int, seed: int = 123) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [sample_within_budget(rng, COUNTER, lo, hi) for _ in range(count)]


@contextlib.contextmanager
def info_records(name: str = "glora_ray.search.evolution"):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with logged(name, logging.INFO) as records:
            yield records
    finally:
        logger.setLevel(level)


# -- seeded generation 0 ----------------------------------------------------------------------

def test_generation_zero_starts_with_the_seeds_within_budget():
    lo, hi = Budget.parse("250k", "600k").resolve(COUNTER)
    inside = seeds_within(lo, hi, 3)
    largest = np.zeros(COUNTER.num_layers * 5, dtype=np.int8)  # every tensor at its largest form
    assert COUNTER.count(largest) > hi
    given = [inside[0], largest, inside[1], inside[0].copy(), inside[2]]  # one outside, one duplicate
    with info_records() as records:
        planner = EvolutionPlanner(SearchConfig(**SMALL), SPACE, COUNTER, lo, hi, initial=given)
    asked = planner.ask()
    keys = [SPACE.genes_to_string(g) for g in inside]
    assert [c.key for c in asked[:3]] == keys
    assert all(c.origin is Origin.SEEDED and c.parent_ids == () for c in asked[:3])
    assert all(c.origin is Origin.RANDOM for c in asked[3:]) and len(asked) == 20
    assert SPACE.genes_to_string(largest) not in {c.key for c in asked}
    assert len({c.key for c in asked}) == 20
    # The skipped seed is logged with its key, its count and the window.
    message = " ".join(r.getMessage() for r in records)
    assert SPACE.genes_to_string(largest) in message and f"{COUNTER.count(largest):,} params" in message
    assert f"[{lo:,}, {hi:,}]" in message
    planner.tell({c.key: fitness(c.genes) for c in asked})
    assert (planner.draws[0].seeded, planner.draws[0].random) == (3, 17)
    assert "seeded 3, mutation 0/0, crossover 0/0, random 17" == planner.draws[0].describe()


def test_more_seeds_than_population_keep_the_first_and_bad_seeds_name_their_index():
    lo, hi = COUNTER.min_params, COUNTER.max_params
    given = seeds_within(lo, hi, 7)
    config = SearchConfig(population=5, parents=2, mutants=2, crossovers=2, generations=2)
    planner = EvolutionPlanner(config, SPACE, COUNTER, lo, hi, initial=given)
    asked = planner.ask()
    assert [c.key for c in asked] == [SPACE.genes_to_string(g) for g in given[:5]]
    assert {c.origin for c in asked} == {Origin.SEEDED}
    with pytest.raises(SearchSpaceError, match=r"initial\[1\]: expected 240 genes"):
        EvolutionPlanner(config, SPACE, COUNTER, lo, hi, initial=[given[0], given[1][:10]])


# -- offspring repaired into the budget -------------------------------------------------------

def test_mutants_and_crossovers_fill_their_quota_under_a_narrow_budget(monkeypatch):
    lo, hi = middle_window(0.025)  # 2.5 % of the reachable range, in its middle
    config = SearchConfig(**SMALL, max_draw_tries=4, seed=2)
    planner, populations = run(config, lo, hi)
    later = populations[1:]
    mutants = sum(origin is Origin.MUTATION for population in later for _, _, origin, _ in population)
    crossovers = sum(origin is Origin.CROSSOVER for population in later for _, _, origin, _ in population)
    assert mutants >= 0.9 * config.mutants * len(later) and crossovers >= 0.9 * config.crossovers * len(later)
    assert all(lo <= s.candidate.params <= hi for s in planner.evaluated.values())
    assert sum(d.repaired_mutation for d in planner.draws) > 0  # the repair did the work
    assert [d.mutation for d in planner.draws[1:]] == [sum(o is Origin.MUTATION for _, _, o, _ in p) for p in later]

    # Without the repair, few raw mutants land in the window ...
    parents = planner.top(config.parents)
    raw = [lo <= COUNTER.count(planner._mutate(parents)[0]) <= hi for _ in range(500)]
    assert np.mean(raw) < 0.3
    # ... and the same search (the old reject-and-redraw) leaves most of the quota to random draws.
    monkeypatch.setattr(evolution, "repair_into_budget", lambda *args: None)
    _, unrepaired = run(config, lo, hi)
    old = sum(origin is Origin.MUTATION for population in unrepaired[1:] for _, _, origin, _ in population)
    assert old < 0.9 * config.mutants * len(unrepaired[1:])


def test_seeded_and_repaired_search_replays_exactly():
    lo, hi = middle_window(0.025)
    config = SearchConfig(**SMALL, max_draw_tries=4, seed=5)
    seeds = seeds_within(lo, hi, 4, seed=9)
    full = EvolutionPlanner(config, SPACE, COUNTER, lo, hi, initial=seeds)
    for _ in range(config.generations):
        asked = full.ask()
        full.tell({c.key: fitness(c.genes) for c in asked}, {c.key: 1.0 - fitness(c.genes) for c in asked})
    assert sum(d.repaired_mutation + d.repaired_crossover for d in full.draws) > 0
    stored = [[(s.candidate.candidate_id, s.candidate.key, s.val_acc, s.val_loss) for s in g] for g in full.history[:3]]

    resumed = EvolutionPlanner(config, SPACE, COUNTER, lo, hi, initial=seeds)
    resumed.replay(stored)
    for _ in range(2):
        asked = resumed.ask()
        resumed.tell({c.key: fitness(c.genes) for c in asked}, {c.key: 1.0 - fitness(c.genes) for c in asked})
    assert [[s.candidate for s in g] for g in resumed.history] == [[s.candidate for s in g] for g in full.history]
    assert resumed.draws == full.draws and resumed.rng_state() == full.rng_state()
    with pytest.raises(ResumeMismatchError, match="generation 0"):
        EvolutionPlanner(config, SPACE, COUNTER, lo, hi, initial=seeds[1:]).replay(stored)


# -- fitness ----------------------------------------------------------------------------------

def told(fitness_kind: Fitness, accuracy, loss):
    """Generation 0 of a small planner, told ``accuracy(i)`` and ``loss(i)`` for its i-th candidate."""
    config = SearchConfig(population=10, parents=3, mutants=3, crossovers=3, generations=2, fitness=fitness_kind)
    planner = EvolutionPlanner(config, SPACE, COUNTER, COUNTER.min_params, COUNTER.max_params)
    asked = planner.ask()
    planner.tell({c.key: accuracy(i) for i, c in enumerate(asked)}, {c.key: loss(i) for i, c in enumerate(asked)})
    return planner, asked


def test_loss_fitness_ranks_by_loss_and_accuracy_fitness_is_unchanged():
    # Candidate 9 has the best accuracy; candidate 0 the lowest loss (and the worst accuracy).
    accuracy, loss = (lambda i: 0.1 + 0.05 * i), (lambda i: 0.5 + 0.1 * i)
    by_loss, asked = told(Fitness.LOSS, accuracy, loss)
    by_acc, _ = told(Fitness.ACCURACY, accuracy, loss)
    assert by_loss.best.candidate.key == asked[0].key and by_loss.best.val_loss == 0.5
    assert by_acc.best.candidate.key == asked[9].key
    assert [s.candidate.key for s in by_loss.top(3)] == [c.key for c in asked[:3]]
    assert [s.candidate.key for s in by_acc.top(3)] == [c.key for c in asked[9:6:-1]]
    # The parents of the next generation follow the ranking.
    for planner, elite in ((by_loss, asked[:3]), (by_acc, asked[7:])):
        parents = {p for c in planner.ask() if c.origin is not Origin.RANDOM for p in c.parent_ids}
        assert parents and parents <= {c.candidate_id for c in elite}


def test_loss_ties_fall_back_to_accuracy_then_params_and_nan_ranks_last():
    planner, asked = told(Fitness.LOSS, lambda i: 0.1 * i, lambda i: float("nan") if i == 9 else 1.0)
    ranked = planner.ranked()
    assert [s.candidate.key for s in ranked[:9]] == [c.key for c in asked[8::-1]]
    assert ranked[-1].candidate.key == asked[9].key


def test_loss_fitness_needs_losses_and_the_setting_is_checked():
    config = SearchConfig(population=4, parents=2, mutants=1, crossovers=1, fitness="loss")
    assert config.fitness is Fitness.LOSS and config.to_dict()["fitness"] == "loss"
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert config.result_identity()["fitness"] == "loss"
    planner = EvolutionPlanner(config, SPACE, COUNTER, COUNTER.min_params, COUNTER.max_params)
    asked = planner.ask()
    with pytest.raises(ValueError, match="fitness='loss'.*no losses"):
        planner.tell({c.key: 0.5 for c in asked})
    with pytest.raises(ValueError, match="losses missing for 1"):
        planner.tell({c.key: 0.5 for c in asked}, {c.key: 0.5 for c in asked[1:]})
    with pytest.raises(SearchConfigError, match=r"fitness='f1' is not one of \['accuracy', 'loss'\]"):
        SearchConfig(fitness="f1")
