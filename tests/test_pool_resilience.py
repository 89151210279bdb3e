"""The evaluator pool carries on when a replacement actor fails to start, and fails only when
no actor is left (glora_ray/search/pool.py, with glora_ray.faults' start and evaluate points)."""
import numpy as np
import pytest

from glora_ray.search import AllActorsDiedError, EvalMode, Evaluator
from glora_ray.search.pool import ActorSettings, EvaluatorPool
from helpers import injected_faults, logged

SETTINGS = ActorSettings(32, EvalMode.MERGED, 1, 1.0, 0.0)


def keys_of(problem, count, seed=3):
    rng = np.random.default_rng(seed)
    return list(dict.fromkeys(problem.net.subnet_key(problem.net.sample_genes(rng)) for _ in range(count)))


@pytest.mark.slow
def test_actors_that_fail_to_start_are_dropped_and_the_live_ones_work_on(ray_local, problem):
    ray = ray_local
    refs = [ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels)]
    keys = keys_of(problem, 6)
    # actor-1 fails at the first start: the pool starts with actor-0 alone.  actor-0 ends its
    # process in its first call; its first replacement (actor-2) fails to start, the second
    # (actor-3) starts and evaluates everything.
    with injected_faults(evaluate={"on_call": 1, "actors": [0]}, start={"actors": [1, 2]}), logged() as records:
        pool = EvaluatorPool(problem.spec, *refs, 2, SETTINGS, max_replacements=2, max_candidate_retries=1)
        try:
            assert [slot.name for slot in pool.live] == ["actor-0"]
            results = pool.evaluate(keys, batch_size=2)
            live = [slot.name for slot in pool.live]
        finally:
            pool.shutdown()
    assert sorted(results) == sorted(keys) and {r.actor for r in results.values()} == {"actor-3"}
    assert live == ["actor-3"] and pool.deaths == ["actor-0: ActorDiedError"]
    assert [f.split(":")[0] for f in pool.stats.start_failures] == ["actor-1", "actor-2"]
    warnings = [r.getMessage() for r in records]
    assert any("actor-1: failed to start" in m for m in warnings)
    assert any("actor-2: failed to start" in m and "0 live actor" in m for m in warnings)
    assert set(pool.stats.actors) == {"actor-0", "actor-3"}
    assert all(info["pid"] > 0 and info["node_id"] for info in pool.stats.actors.values())
    assert pool.stats.calls == 1 and pool.stats.evaluate_s > 0 and pool.stats.start_s > 0
    want = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=32, threads=1)
    assert [results[key].val_acc for key in keys] == [r.val_acc for r in want.evaluate(keys)]


@pytest.mark.slow
def test_the_pool_fails_only_when_no_actor_is_left(ray_local, problem):
    ray = ray_local
    refs = [ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels)]
    keys = keys_of(problem, 4)
    # The only actor dies in its first call and both replacements fail to start.
    with injected_faults(evaluate={"on_call": 1, "actors": [0]}, start={"actors": [1, 2]}):
        pool = EvaluatorPool(problem.spec, *refs, 1, SETTINGS, max_replacements=2, max_candidate_retries=1)
        try:
            with pytest.raises(AllActorsDiedError, match="candidates of this generation are not evaluated"):
                pool.evaluate(keys, batch_size=2)
        finally:
            pool.shutdown()
    assert [f.split(":")[0] for f in pool.stats.start_failures] == ["actor-1", "actor-2"]
    assert pool.live == [] and pool.replacements_left == 0
