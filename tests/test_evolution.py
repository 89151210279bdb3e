"""The search algorithm without Ray: budget, no re-evaluation, determinism, ranking, resume replay."""
import warnings

import numpy as np
import pandas as pd
import pytest

from glora_ray import Budget, InfeasibleBudgetError, ParamCounter, SearchSpace
from glora_ray.search import (
    EvolutionPlanner, Origin, ResumeMismatchError, SearchConfig, SearchConfigError, SpaceExhaustedWarning,
    Fitness, best_under, pareto_front, pareto_mask,
)
from glora_ray.search.ranking import ranked
from helpers import COUNTER, SPACE, fitness, run

SMALL = dict(population=20, parents=5, mutants=8, crossovers=8, generations=5)


def test_budget_respected_and_nothing_evaluated_twice():
    lo, hi = Budget.parse("250k", "300k").resolve(COUNTER)
    config = SearchConfig(**SMALL)
    planner, populations = run(config, lo, hi)
    keys = [key for population in populations for _, key, _, _ in population]
    assert len(keys) == len(set(keys)) == len(planner.evaluated) == 5 * 20
    for scored in planner.evaluated.values():
        assert lo <= scored.candidate.params <= hi
        assert scored.candidate.params == COUNTER.count(scored.candidate.genes)
        assert SPACE.genes_to_string(scored.candidate.genes) == scored.candidate.key


def test_generation_composition_and_lineage():
    lo, hi = Budget.parse(max_params="0.9M").resolve(COUNTER)
    planner, populations = run(SearchConfig(**SMALL), lo, hi)
    assert all(origin is Origin.RANDOM and parents == () for _, _, origin, parents in populations[0])
    evaluated_before = {}
    for g, population in enumerate(populations):
        origins = [origin for _, _, origin, _ in population]
        if g > 0:
            assert origins.count(Origin.MUTATION) == 8 and origins.count(Origin.CROSSOVER) == 8
            assert origins.count(Origin.RANDOM) == 4
            # Parents are the top-k of everything evaluated before this generation.
            ranked = sorted(evaluated_before.values(), key=lambda s: (-s.val_acc, s.candidate.params, s.candidate.key))[:5]
            elite = {s.candidate.candidate_id for s in ranked}
            by_id = {s.candidate.candidate_id: s.candidate for s in evaluated_before.values()}
            for cid, key, origin, parents in population:
                child = planner.evaluated[key].candidate
                assert set(parents) <= elite
                if origin is Origin.MUTATION:
                    assert len(parents) == 1
                elif origin is Origin.CROSSOVER:
                    a, b = (by_id[p].genes for p in parents)
                    assert len(parents) == 2
                    # Gene-wise from the parents, unless it was moved into the budget afterwards.
                    assert child.repaired or np.all((child.genes == a) | (child.genes == b))
            drawn = planner.draws[g]
            children = [planner.evaluated[key].candidate for _, key, _, _ in population]
            assert (drawn.repaired_mutation, drawn.repaired_crossover) == (
                sum(c.repaired for c in children if c.origin is Origin.MUTATION),
                sum(c.repaired for c in children if c.origin is Origin.CROSSOVER))
            assert (drawn.mutation, drawn.crossover, drawn.random, drawn.seeded) == (
                origins.count(Origin.MUTATION), origins.count(Origin.CROSSOVER), origins.count(Origin.RANDOM), 0)
        evaluated_before.update({key: planner.evaluated[key] for _, key, _, _ in population})


def test_mutation_rate_controls_how_many_genes_change():
    lo, hi = COUNTER.min_params, COUNTER.max_params
    config = SearchConfig(population=40, parents=2, mutants=38, crossovers=0, m_prob=0.05, generations=2)
    planner, populations = run(config, lo, hi)
    parents = {s.candidate.candidate_id: s.candidate for s in planner.history[0]}
    changed = [np.mean(planner.evaluated[key].candidate.genes != parents[p[0]].genes)
               for _, key, origin, p in populations[1] if origin is Origin.MUTATION]
    # Each gene is redrawn with probability 0.05 and keeps its value 1/n of the time.
    assert 0.01 < np.mean(changed) < 0.08


def test_same_seed_same_search_whatever_the_result_order():
    lo, hi = Budget.parse("250k", "600k").resolve(COUNTER)
    config = SearchConfig(**SMALL, seed=3)
    a, pop_a = run(config, lo, hi)
    b, pop_b = run(config, lo, hi, order_seed=1)
    c, pop_c = run(config, lo, hi, order_seed=2)
    assert pop_a == pop_b == pop_c
    assert a.best == b.best == c.best
    other, pop_other = run(SearchConfig(**SMALL, seed=4), lo, hi)
    assert pop_other[0] != pop_a[0]


def test_ranking_is_total_and_the_last_generation_is_ranked():
    lo, hi = COUNTER.min_params, COUNTER.max_params
    planner, populations = run(SearchConfig(**SMALL), lo, hi)
    everything = list(planner.evaluated.values())
    expected = min(everything, key=lambda s: (-s.val_acc, s.candidate.params, s.candidate.key))
    assert planner.best == expected
    # This landscape improves every generation, so the best is found in the last one: an
    # implementation that evaluated the last generation without ranking it would miss it.
    assert planner.best.candidate.generation == len(populations) - 1
    # Accuracy down, then fewer parameters, then the key: every tie broken, whatever the order told.
    assert planner.ranked() == sorted(everything, key=lambda s: (-s.val_acc, s.candidate.params, s.candidate.key))


def test_ask_and_tell_protocol_errors():
    planner = EvolutionPlanner(SearchConfig(**SMALL), SPACE, COUNTER, 0, COUNTER.max_params)
    asked = planner.ask()
    with pytest.raises(RuntimeError, match="not yet told"):
        planner.ask()
    with pytest.raises(ValueError, match="missing for 1"):
        planner.tell({c.key: 0.5 for c in asked[1:]})
    with pytest.raises(ValueError, match="unexpected for 1"):
        planner.tell({**{c.key: 0.5 for c in asked}, "zzz": 0.1})
    planner.tell({c.key: 0.5 for c in asked})
    with pytest.raises(RuntimeError, match="without a pending"):
        planner.tell({})


def test_small_space_exhausts_without_hanging_or_repeating():
    # One layer, one rank, a narrow window: only a few dozen subnets fit.
    space = SearchSpace((2,))
    counter = ParamCounter(space, [(8, 8)])
    lo, hi = 10, 20
    fits = [g for g in np.ndindex(*space.gene_cardinalities(1)) if lo <= counter.count(np.array(g)) <= hi]
    config = SearchConfig(population=12, parents=3, mutants=4, crossovers=4, generations=50, max_draw_tries=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planner, populations = run(config, lo, hi, counter=counter, space=space)
    keys = [key for population in populations for _, key, _, _ in population]
    assert len(keys) == len(set(keys)) and len(keys) <= len(fits)
    assert len(keys) >= 0.8 * len(fits)  # the bounded tries still find nearly all of them
    assert len(populations) < 50 and any(issubclass(w.category, SpaceExhaustedWarning) for w in caught)


def test_infeasible_window_fails_at_once():
    counter = ParamCounter(SearchSpace((2,)), [(8, 8)])
    # Inside the reachable range but between the counts the space can form: 1 and 2 are
    # reachable (scalars), 3..7 are too; 1000 is not. Pick a gap: no count equals 999.
    assert counter.max_params < 999
    with pytest.raises(InfeasibleBudgetError):
        Budget(999, 1000).resolve(counter)
    odd_counts = {counter.count(np.array(g)) for g in np.ndindex(*SearchSpace((2,)).gene_cardinalities(1))}
    gap = next(n for n in range(counter.max_params) if n not in odd_counts)
    planner = EvolutionPlanner(SearchConfig(population=4, parents=2, mutants=1, crossovers=1), SearchSpace((2,)),
                               counter, gap, gap)
    with pytest.raises(InfeasibleBudgetError, match="no subnet found"):
        planner.ask()


def test_replay_restores_the_generator_and_checks_stored_candidates():
    lo, hi = Budget.parse("250k", "600k").resolve(COUNTER)
    config = SearchConfig(**SMALL, seed=7)
    full, populations = run(config, lo, hi)
    stored = [[(s.candidate.candidate_id, s.candidate.key, s.val_acc, s.val_loss) for s in gen]
              for gen in full.history[:3]]
    resumed = EvolutionPlanner(config, SPACE, COUNTER, lo, hi)
    resumed.replay(stored)
    assert resumed.generation == 3
    for _ in range(2):
        asked = resumed.ask()
        resumed.tell({c.key: fitness(c.genes) for c in asked})
    assert [[(s.candidate.candidate_id, s.candidate.key) for s in g] for g in resumed.history] == \
        [[(cid, key) for cid, key, _, _ in population] for population in populations]
    assert resumed.rng_state() == full.rng_state()

    tampered = [list(g) for g in stored]
    cid, key, acc, loss = tampered[1][4]
    tampered[1][4] = (cid, key, acc + 0.5, loss)  # a different accuracy changes the parents of generation 2
    other = EvolutionPlanner(config, SPACE, COUNTER, lo, hi)
    with pytest.raises(ResumeMismatchError, match="generation 2"):
        other.replay(tampered)
    with pytest.raises(ResumeMismatchError, match="generation 0"):
        EvolutionPlanner(SearchConfig(**SMALL, seed=8), SPACE, COUNTER, lo, hi).replay(stored)


@pytest.mark.parametrize("kwargs, field", [
    (dict(population=0), "population"),
    (dict(parents=60), "parents"),
    (dict(mutants=40, crossovers=20), "mutants"),
    (dict(parents=1, mutants=1, crossovers=1), "parents"),
    (dict(m_prob=1.5), "m_prob"),
    (dict(generations=0), "generations"),
    (dict(min_params="2M", max_params="1M"), "min_params"),
    (dict(max_params="lots"), "max_params"),
    (dict(num_actors=0), "num_actors"),
    (dict(cpus_per_actor=0), "cpus_per_actor"),
    (dict(gpus_per_actor=1.5), "gpus_per_actor"),
    (dict(candidates_per_call=0), "candidates_per_call"),
    (dict(eval_mode="fast"), "eval_mode"),
    (dict(call_timeout_s=0), "call_timeout_s"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(SearchConfigError, match=field):
        SearchConfig(**kwargs)


def test_config_defaults_follow_the_paper_and_round_trip():
    config = SearchConfig()
    assert (config.population, config.parents, config.mutants, config.crossovers, config.m_prob,
            config.generations) == (50, 10, 25, 25, 0.2, 20)
    assert SearchConfig(max_params="0.29M").max_params == 290_000
    again = SearchConfig.from_dict(SearchConfig(gpus_per_actor=0.25, max_params="1M").to_dict())
    assert again == SearchConfig(gpus_per_actor=0.25, max_params=1_000_000)
    with pytest.raises(SearchConfigError, match="unknown search setting"):
        SearchConfig.from_dict({"populaton": 3})
    assert config.batch_size_for(50, 4) == 4 and SearchConfig(candidates_per_call=3).batch_size_for(50, 4) == 3


def brute_force_front(params, acc, keys):
    """The classic front of (accuracy up, params down): dominated points and tie losers out."""
    keep = []
    for i in range(len(params)):
        dominated = any(
            params[j] <= params[i] and acc[j] >= acc[i] and (params[j] < params[i] or acc[j] > acc[i])
            for j in range(len(params))
        )
        tie_loser = any(params[j] == params[i] and acc[j] == acc[i] and keys[j] < keys[i] for j in range(len(params)))
        keep.append(not dominated and not tie_loser)
    return np.array(keep)


@pytest.mark.parametrize("seed", range(5))
def test_the_accuracy_front_is_the_classic_pareto_front(seed):
    rng = np.random.default_rng(seed)
    n = 60
    params = rng.integers(0, 15, n)  # few distinct values: many ties
    acc = rng.integers(0, 10, n) / 10
    keys = [f"k{i:03d}" for i in rng.permutation(n)]
    ranks = [(-a, p, k) for a, p, k in zip(acc, params, keys)]  # the accuracy fitness's order
    assert np.array_equal(pareto_mask(params, ranks), brute_force_front(params, acc, keys))


@pytest.mark.parametrize("fitness", list(Fitness))
def test_the_front_follows_the_fitness_and_holds_the_winner(fitness):
    # Loss and accuracy disagree: "b" has the lowest loss, "c" the best accuracy at 20 params.
    frame = pd.DataFrame({"key": list("abcdef"), "params": [10, 20, 20, 30, 40, 50],
                          "val_acc": [0.5, 0.6, 0.7, 0.65, 0.8, 0.8], "val_loss": [0.9, 0.3, 0.8, 0.5, 0.4, 0.2]})
    front = pareto_front(frame, fitness)
    winner = ranked(frame, fitness).iloc[0]["key"]
    assert winner in set(front["key"]) and front["params"].is_monotonic_increasing
    if fitness is Fitness.LOSS:
        assert (winner, list(front["key"])) == ("f", ["a", "b", "f"])
        assert front["val_loss"].is_monotonic_decreasing
    else:
        assert (winner, list(front["key"])) == ("e", ["a", "c", "e"])
        assert front["val_acc"].is_monotonic_increasing
    for budget in range(0, 60, 5):  # the front answers every smaller budget: its best that fits
        fits = frame[frame["params"] <= budget]
        answer = best_under(front, budget)
        assert (answer is None) if fits.empty else answer["key"] == ranked(fits, fitness).iloc[0]["key"]
