import numpy as np
import pytest

from glora_ray import Budget, InfeasibleBudgetError, ParamCounter, SearchSpace, parse_param_count, sample_within_budget

VIT_B_DIMS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


@pytest.fixture(scope="module")
def counter():
    return ParamCounter(SearchSpace((8, 4)), VIT_B_DIMS)


def test_parse_param_count():
    assert parse_param_count("0.29M") == 290_000
    assert parse_param_count("800k") == 800_000
    assert parse_param_count(" 1.5e3 ") == 1500
    assert parse_param_count(12) == 12
    with pytest.raises(ValueError, match="0.29M"):
        parse_param_count("lots")


def test_reachable_range(counter):
    assert counter.min_params == 0
    per_block = 8 * (768 + 2304) * 2 + 8 * 768 + 8 + 2304 * 2  # qkv at rank 8
    assert counter.max_params > 12 * per_block
    genes = np.zeros(48 * 5, dtype=np.int8)
    assert counter.count(genes) == counter.max_params


def test_infeasible_budget_is_refused_with_the_reachable_range(counter):
    with pytest.raises(InfeasibleBudgetError) as err:
        Budget.parse(min_params="100M").resolve(counter)
    assert f"{counter.max_params:,}" in str(err.value) and "100,000,000" in str(err.value)
    with pytest.raises(InfeasibleBudgetError, match="above"):
        Budget(500, 100).resolve(counter)


@pytest.mark.parametrize("window", [(0, 10), (290_000, 300_000), (850_000, 870_000)])
def test_sampling_respects_budget_and_is_seeded(counter, window):
    lo, hi = Budget(*window).resolve(counter)
    draws = [sample_within_budget(np.random.default_rng(s), counter, lo, hi) for s in range(20)]
    assert all(lo <= counter.count(g) <= hi for g in draws)
    assert len({g.tobytes() for g in draws}) > 1
    again = sample_within_budget(np.random.default_rng(0), counter, lo, hi)
    assert np.array_equal(again, draws[0])


@pytest.mark.parametrize("where", ["top", "bottom", "middle"])
def test_sliver_budgets_never_hang(counter, where):
    mid = counter.max_params // 3
    lo, hi = {"top": (counter.max_params, counter.max_params), "bottom": (0, 0), "middle": (mid, mid + 1)}[where]
    genes = sample_within_budget(np.random.default_rng(1), counter, lo, hi)
    assert lo <= counter.count(genes) <= hi


def test_count_many_matches_count(counter):
    rng = np.random.default_rng(5)
    batch = np.stack([SearchSpace((8, 4)).sample_genes(rng, 48) for _ in range(10)])
    assert list(counter.count_many(batch)) == [counter.count(g) for g in batch]
