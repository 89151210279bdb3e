"""Every random stream tagged by its purpose (glora_ray.streams, docs/method.md §2-§3)."""
import numpy as np

from glora_ray.budget import Budget
from glora_ray.pipeline.lr_sweep import scoring_subnets
from glora_ray.search import EvolutionPlanner, SearchConfig
from glora_ray.streams import Stream, entropy
from glora_ray.train import subnet_for_step
from helpers import make_spec


def test_no_two_purposes_ever_share_a_stream():
    # The generator states themselves (SeedSequence pads short entropy with zeros, so distinct
    # entropy lists can still give one state): unique per purpose over seeds and positions.
    positions = [(), *((p,) for p in range(300)), *((e, r) for e in range(20) for r in range(4))]
    owner: dict[tuple, Stream] = {}
    for purpose in Stream:
        for seed in range(3):
            for position in positions:
                state = tuple(np.random.SeedSequence(entropy(purpose, seed, *position)).generate_state(4))
                assert owner.setdefault(state, purpose) == purpose, (purpose, seed, position)


def test_the_lr_sweep_and_the_search_draw_no_subnet_a_training_step_draws():
    spec = make_spec()
    net = spec.build_empty()
    search = SearchConfig(population=8, parents=2, mutants=2, crossovers=2, seed=0)
    lo, hi = Budget(search.min_params, search.max_params).resolve(net.counter)
    steps = {net.subnet_key(subnet_for_step(0, step, net)) for step in range(64)}
    # Once, the sweep scored its trials with training step 8's stream ([seed, count]).
    sweep = {net.subnet_key(g) for g in scoring_subnets(spec, search, 8, 0)}
    first = {c.key for c in EvolutionPlanner(search, net.space, net.counter, lo, hi).ask()}
    assert len(sweep) == 8 and len(first) == 8
    assert not sweep & steps and not first & steps and not first & sweep
