"""Stage 2 end to end: evaluators, the Ray actor pool with faults, Parquet output, exact resume."""
import hashlib
import re
import shutil
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from glora_ray import InfeasibleBudgetError, sample_within_budget
from glora_ray.search import (
    ActorStartError, AllActorsDiedError, EvalMode, Evaluator, Fitness, ResumeMismatchError, SearchConfig,
    evaluate_subnet, pareto_front, plan_actor_count, read_pareto, read_population, read_result, run_search,
    without_timing,
)
from glora_ray.search.pool import ActorSettings, CandidateCrashError, EvaluatorPool
from glora_ray.search.results import (FORMAT_VERSION, MANIFEST_FILE, PARETO_FILE, POPULATION_DIR, RESULT_FILE,
                                      ResultStore)
from glora_ray.search.runner import commit_generation, open_store, plan_generation
from helpers import injected_faults


def digest(arrays) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


# -- evaluation without Ray ------------------------------------------------------------------

def test_merged_evaluation_equals_the_supernet_and_never_writes_shared_weights(problem):
    shared = {k: v.copy() for k, v in problem.state.items()}
    for array in shared.values():
        array.flags.writeable = False  # as the object store hands them out
    before = digest(shared)
    merged = Evaluator(problem.spec, shared, problem.images, problem.labels, batch_size=24, threads=1)
    unmerged = Evaluator(problem.spec, shared, problem.images, problem.labels, batch_size=64,
                         mode=EvalMode.SUPERNET, threads=1)
    rng = np.random.default_rng(5)
    subnets = [problem.net.sample_genes(rng) for _ in range(6)]
    a, b = merged.evaluate(subnets), unmerged.evaluate([problem.net.subnet_key(s) for s in subnets])
    assert [r.key for r in a] == [r.key for r in b] == [problem.net.subnet_key(s) for s in subnets]
    assert [r.val_acc for r in a] == [r.val_acc for r in b]
    assert len({r.val_acc for r in a}) > 1  # the teacher makes subnets distinguishable
    assert all(r.total == 64 and r.val_acc == r.correct / 64 and r.seconds > 0 for r in a)
    assert [evaluate_subnet(problem.net, s, problem.images, problem.labels, batch_size=20) for s in subnets] == \
        [r.val_acc for r in a]
    assert digest(shared) == before
    # The mean cross-entropy of each subnet's logits, whatever the batching and the mode.
    for subnet, x, y in zip(subnets, a, b):
        with torch.inference_mode():
            logits = problem.net.merged(subnet).eval()(torch.from_numpy(problem.images))
        want = F.cross_entropy(logits.float(), torch.from_numpy(problem.labels)).item()
        assert x.val_loss == pytest.approx(want, rel=1e-5) and y.val_loss == pytest.approx(want, rel=1e-5)
    assert len({r.val_loss for r in a}) == len(a)  # finer-grained than the accuracies
    # The supernet's own frozen weights are views of the shared arrays, not copies.
    assert merged.supernet.model.blocks[0].attn.qkv.base.weight.data_ptr() == \
        shared["model.blocks.0.attn.qkv.base.weight"].ctypes.data


def test_evaluator_rejects_bad_validation_arrays(problem):
    with pytest.raises(ValueError, match="equally long"):
        Evaluator(problem.spec, problem.state, problem.images, problem.labels[:10])
    with pytest.raises(ValueError, match="outside the model's 5 classes"):
        Evaluator(problem.spec, problem.state, problem.images, problem.labels + 5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Evaluator(problem.spec, problem.state, problem.images[0], problem.labels)


def test_actor_count_fits_the_cluster():
    two_cpus = {"CPU": 2.0}
    with pytest.warns(UserWarning, match="using 2 actors"):
        assert plan_actor_count(SearchConfig(num_actors=3), two_cpus) == 2
    assert plan_actor_count(SearchConfig(num_actors=1), two_cpus) == 1
    assert plan_actor_count(SearchConfig(), two_cpus) == 2
    assert plan_actor_count(SearchConfig(cpus_per_actor=0.5), two_cpus) == 4
    assert plan_actor_count(SearchConfig(population=3, parents=2, mutants=1, crossovers=1, cpus_per_actor=0.5), two_cpus) == 3
    assert plan_actor_count(SearchConfig(gpus_per_actor=0.25), {"CPU": 16.0, "GPU": 1.0}) == 4
    with pytest.raises(ActorStartError, match="gpus_per_actor=0.5.*0 GPUs"):
        plan_actor_count(SearchConfig(gpus_per_actor=0.5), two_cpus)


def test_bad_inputs_fail_before_any_actor_starts(problem, tmp_path):
    config = SearchConfig(population=4, parents=2, mutants=1, crossovers=1, generations=1)
    with pytest.raises(InfeasibleBudgetError, match="outside what this space reaches"):
        run_search(problem.spec, problem.state, problem.images, problem.labels,
                   replace(config, min_params=10**9, max_params=2 * 10**9), tmp_path, "r", "synthetic")
    broken = dict(problem.state)
    broken.pop("model.head.bias")
    with pytest.raises(ValueError, match="missing \\['model.head.bias'\\]"):
        run_search(problem.spec, broken, problem.images, problem.labels, config, tmp_path, "r", "synthetic")
    with pytest.raises(ValueError, match="run_id"):
        run_search(problem.spec, problem.state, problem.images, problem.labels, config, tmp_path, "", "synthetic")


# -- the search on Ray -----------------------------------------------------------------------

SEARCH = dict(population=8, parents=3, mutants=3, crossovers=3, generations=3, candidates_per_call=2,
              eval_batch_size=32, seed=11)


@dataclass
class Run:
    out: str
    result: object
    lines: list
    shared_before: str
    shared_after: str


def search(problem, out, progress=None, state=None, **overrides):
    config = SearchConfig(**{**SEARCH, **overrides})
    lines = []
    result = run_search(problem.spec, problem.state if state is None else state, problem.images, problem.labels,
                        config, str(out), "run-a", "synthetic", progress=progress or lines.append)
    return result, lines


@pytest.fixture(scope="module")
def baseline(ray_local, problem, tmp_path_factory):
    """One uninterrupted run on one actor; the others must reproduce it."""
    ray = ray_local
    out = tmp_path_factory.mktemp("baseline")
    ref = ray.put(problem.state)
    before = digest(ray.get(ref))
    result, lines = search(problem, out, state=ref, num_actors=1)
    return Run(str(out), result, lines, before, digest(ray.get(ref)))


def assert_same_run(out_a, out_b):
    a, b = read_population(out_a), read_population(out_b)
    pd.testing.assert_frame_equal(without_timing(a), without_timing(b))
    pd.testing.assert_frame_equal(read_pareto(out_a), read_pareto(out_b))
    assert read_result(out_a) == read_result(out_b)


def test_search_writes_generations_front_and_result(baseline, problem):
    result, frame = baseline.result, read_population(baseline.out)
    assert baseline.shared_after == baseline.shared_before  # the shared weights were never written
    assert result.generations_done == 3 and result.evaluations == len(frame) == 3 * 8
    assert frame["key"].is_unique  # nothing evaluated twice
    lo, hi = result.budget
    assert frame["params"].between(lo, hi).all()
    assert (frame["run_id"] == "run-a").all() and (frame["seed"] == 11).all() and (frame["actor"] == "actor-0").all()
    assert set(frame.loc[frame["generation"] == 0, "origin"]) == {"random"}
    assert set(frame.loc[frame["generation"] > 0, "origin"]) == {"mutation", "crossover", "random"}
    assert frame["val_acc"].nunique() > 3 and (frame["eval_seconds"] > 0).all()
    assert frame["val_loss"].dtype == np.float64 and (frame["val_loss"] > 0).all() and frame["val_loss"].is_unique

    ranked = frame.sort_values(["val_acc", "params", "key"], ascending=[False, True, True])
    top = ranked.iloc[0]
    assert (result.best.key, result.best.params, result.best.val_acc, result.best.val_loss) == \
        (top["key"], top["params"], top["val_acc"], top["val_loss"])
    assert [t.key for t in result.top] == list(ranked["key"][:3]) and result.top[0] == result.best
    assert problem.net.subnet_key(result.best.genes) == result.best.key
    expected_front = pareto_front(frame, Fitness.ACCURACY)
    assert list(result.pareto["key"]) == list(expected_front["key"]) == list(read_pareto(baseline.out)["key"])
    stored = read_result(baseline.out)
    assert stored["finished"] and stored["best"]["key"] == result.best.key and stored["evaluations"] == 24
    assert stored["best"]["val_loss"] == result.best.val_loss and stored["config"]["fitness"] == "accuracy"
    assert result.population_path.endswith(POPULATION_DIR)

    assert len(baseline.lines) == 3
    assert all("best val_acc" in line and "front" in line and "evaluations" in line and "candidates/s" in line
               for line in baseline.lines)
    # Where each generation's candidates came from: in the progress line and the commit record.
    store = ResultStore(baseline.out)
    for g, line in enumerate(baseline.lines):
        commit = store.read_generation(g).commit
        counts = frame.loc[frame["generation"] == g, "origin"].value_counts().to_dict()
        assert {k: v for k, v in commit["origins"].items() if v} == counts
        wanted = {"mutation": 3, "crossover": 3} if g else {"mutation": 0, "crossover": 0}
        assert commit["wanted"] == wanted and set(commit["repaired"]) == {"mutation", "crossover"}
        assert (f"mutation {counts.get('mutation', 0)}/{wanted['mutation']}, crossover "
                f"{counts.get('crossover', 0)}/{wanted['crossover']}, random {counts.get('random', 0)}") in line


def test_two_actors_give_the_same_result(baseline, problem, tmp_path):
    result, _ = search(problem, tmp_path, num_actors=2)
    assert result.actors == 2
    assert set(read_population(tmp_path)["actor"]) == {"actor-0", "actor-1"}
    assert_same_run(baseline.out, tmp_path)


def test_an_actor_killed_mid_generation_loses_no_candidate(baseline, problem, tmp_path):
    # actor-0 ends its process at the start of its second call: that batch is lost in flight.
    with injected_faults(evaluate={"on_call": 2, "actors": [0]}):
        result = run_search(problem.spec, problem.state, problem.images, problem.labels,
                            SearchConfig(**SEARCH, num_actors=2), str(tmp_path), "run-a", "synthetic")
    # The death was noticed and a replacement started; it joins in the background, so whether
    # it evaluates anything before the last generation depends on its start-up time.
    assert len(result.pool.deaths) == 1 and result.pool.deaths[0].startswith("actor-0: ")
    assert result.pool.replacements_started == 1
    assert set(read_population(tmp_path)["actor"]) <= {"actor-0", "actor-1", "actor-2"}
    assert result.evaluations == 24
    assert_same_run(baseline.out, tmp_path)


def test_all_actors_dying_fails_loudly_and_a_rerun_resumes_exactly(baseline, problem, tmp_path):
    # Both actors end at their 4th call: with 4 calls per generation neither survives
    # generation 1 or 2, and no replacement is allowed.
    with injected_faults(evaluate={"on_call": 4}), \
            pytest.raises(AllActorsDiedError, match="candidates of this generation are not evaluated"):
        run_search(problem.spec, problem.state, problem.images, problem.labels,
                   SearchConfig(**SEARCH, num_actors=2, max_actor_replacements=0), str(tmp_path), "run-a",
                   "synthetic")
    done = len(read_population(tmp_path)["generation"].unique())
    assert 1 <= done < 3
    assert not [p for p in (tmp_path / POPULATION_DIR).iterdir() if p.name.startswith(".")]

    result, lines = search(problem, tmp_path, num_actors=1)
    assert result.resumed_generations == done and result.generations_done == 3
    assert lines[0].startswith("[run-a] resuming") and len(lines) == 1 + 3 - done
    assert_same_run(baseline.out, tmp_path)


def test_a_finished_run_is_not_recomputed_and_other_settings_are_refused(baseline, problem, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(baseline.out, out)
    written = [*(out / POPULATION_DIR).iterdir(), out / RESULT_FILE, out / PARETO_FILE]
    before = {p: p.stat().st_mtime_ns for p in written}
    result, lines = search(problem, out, num_actors=2)
    assert result.actors == 0 and lines == ["[run-a] resuming: 3 complete generations, 24 evaluations found in "
                                            f"{out}/{POPULATION_DIR}"]
    assert {p: p.stat().st_mtime_ns for p in written} == before  # nothing rewritten
    assert_same_run(baseline.out, out)

    with pytest.raises(ResumeMismatchError, match="config.m_prob=0.2; this command has 0.3"):
        search(problem, out, m_prob=0.3)
    with pytest.raises(ResumeMismatchError, match="holds 3 generations; generations=2 cannot undo them"):
        search(problem, out, generations=2)
    shuffled = replace(problem, labels=np.roll(problem.labels, 1))
    with pytest.raises(ResumeMismatchError, match="val_sha256"):
        search(shuffled, out)
    with pytest.raises(ResumeMismatchError, match="run_id='run-a'; this command has 'run-b'"):
        run_search(problem.spec, problem.state, problem.images, problem.labels, SearchConfig(**SEARCH), str(out),
                   "run-b", "synthetic", progress=None)
    # A store of an older results format is refused as such, not as other settings.
    manifest = ResultStore(out).read_json(MANIFEST_FILE)
    ResultStore(out).write_json({**manifest, "format": FORMAT_VERSION - 1}, MANIFEST_FILE)
    with pytest.raises(ResumeMismatchError, match=f"results format {FORMAT_VERSION - 1}; this version writes format "
                                                  f"{FORMAT_VERSION}"):
        search(problem, out)


def test_more_generations_extend_a_finished_run(baseline, problem, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(baseline.out, out)
    result, _ = search(problem, out, num_actors=2, generations=4)
    frame = read_population(out)
    assert result.generations_done == 4 and len(frame) == 32 and frame["key"].is_unique
    first_three = frame[frame["generation"] < 3].reset_index(drop=True)
    pd.testing.assert_frame_equal(without_timing(first_three), without_timing(read_population(baseline.out)))
    assert result.best.val_acc >= baseline.result.best.val_acc


def test_a_candidate_that_keeps_killing_actors_is_an_error(ray_local, problem):
    ray = ray_local
    refs = [ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels)]
    key = problem.net.subnet_key(problem.net.largest_subnet())
    with injected_faults(evaluate={"on_call": 1}):
        pool = EvaluatorPool(problem.spec, *refs, 1, ActorSettings(32, EvalMode.MERGED, 1, 1.0, 0.0),
                             max_replacements=3, max_candidate_retries=0)
        try:
            with pytest.raises(CandidateCrashError, match=f"candidate '{key}'.*died 1 times"):
                pool.evaluate([key], batch_size=1)
            assert pool.deaths and pool.deaths[0].startswith("actor-0")
        finally:
            pool.shutdown()


def test_a_hung_actor_is_ended_and_its_batch_resubmitted(ray_local, problem):
    # actor-0 never returns from its first call: call_timeout_s ends it, and its batch goes to
    # the replacement (actor-1), which the plan leaves alone.
    ray = ray_local
    refs = [ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels)]
    rng = np.random.default_rng(3)
    keys = list(dict.fromkeys(problem.net.subnet_key(problem.net.sample_genes(rng)) for _ in range(3)))
    with injected_faults(evaluate={"on_call": 1, "actors": [0], "action": "hang"}):
        pool = EvaluatorPool(problem.spec, *refs, 1, ActorSettings(32, EvalMode.MERGED, 1, 1.0, 0.0),
                             max_replacements=1, max_candidate_retries=1, call_timeout_s=5.0)
        try:
            results = pool.evaluate(keys, batch_size=len(keys))
        finally:
            pool.shutdown()
    assert pool.deaths == ["actor-0: killed after call_timeout_s=5.0"]
    assert sorted(results) == sorted(keys) and {r.actor for r in results.values()} == {"actor-1"}
    want = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=32, threads=1)
    assert [results[key].val_acc for key in keys] == [r.val_acc for r in want.evaluate(keys)]


def test_an_overdue_call_that_answers_anyway_keeps_its_results_and_its_actor_is_not_reused(ray_local, problem,
                                                                                         monkeypatch):
    # The race: the pool kills an actor whose call ran past call_timeout_s, but the call answers
    # before the kill takes effect.  Made deterministic by a kill that never lands (recorded, not
    # sent) and a first call that sleeps past the timeout: its results count, and the next batch
    # goes to the replacement, not to the actor being killed.
    import glora_ray.search.pool as pool_module

    ray = ray_local
    killed, kill = [], ray.kill
    monkeypatch.setattr(pool_module.ray, "kill", lambda handle, no_restart=True: killed.append(handle))
    refs = [ray.put(problem.state), ray.put(problem.images), ray.put(problem.labels)]
    rng = np.random.default_rng(4)
    keys = list(dict.fromkeys(problem.net.subnet_key(problem.net.sample_genes(rng)) for _ in range(4)))[:4]
    with injected_faults(evaluate={"on_call": 1, "actors": [0], "action": "sleep", "seconds": 4}):
        pool = EvaluatorPool(problem.spec, *refs, 1, ActorSettings(32, EvalMode.MERGED, 1, 1.0, 0.0),
                             max_replacements=1, max_candidate_retries=0, call_timeout_s=1.0)
        first = pool.live[0].handle
        try:
            results = pool.evaluate(keys, batch_size=2)  # two batches, one actor at the start
        finally:
            pool.shutdown()
            for handle in killed:  # the kills the test held back
                kill(handle, no_restart=True)
    assert pool.deaths == ["actor-0: killed after call_timeout_s=1.0 (its last call still answered)"]
    assert killed[0] == first and sorted(results) == sorted(keys)
    assert [results[key].actor for key in keys] == ["actor-0", "actor-0", "actor-1", "actor-1"]
    want = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=32, threads=1)
    assert [results[key].val_acc for key in keys] == [r.val_acc for r in want.evaluate(keys)]


# -- seeded generation 0, repaired offspring, loss fitness ------------------------------------

def narrow_window(problem, fraction=0.03):
    counter = problem.spec.build_empty().counter
    mid = (counter.min_params + counter.max_params) // 2
    half = int(fraction * (counter.max_params - counter.min_params)) // 2
    return counter, mid - half, mid + half


def drive(problem, evaluator, out, initial, **overrides):
    """A search evaluated in this process (no Ray): plan, evaluate, commit, until done."""
    config = SearchConfig(**{**SEARCH, **overrides})
    search = open_store(problem.spec, problem.state, problem.images, problem.labels, config, str(out), "run-s",
                        "synthetic", initial)
    while candidates := plan_generation(search):
        commit_generation(search, {r.key: r for r in evaluator.evaluate([c.key for c in candidates])})
    return search.result(actors=0), search


def test_seeded_search_with_repair_resumes_exactly(problem, tmp_path):
    counter, lo, hi = narrow_window(problem)
    rng = np.random.default_rng(4)
    inside = [sample_within_budget(rng, counter, lo, hi) for _ in range(2)]
    largest = problem.net.largest_subnet()
    assert counter.count(largest) > hi
    initial = [problem.net.subnet_key(inside[0]), largest, inside[1]]  # keys and gene arrays both work
    settings = dict(min_params=lo, max_params=hi, max_draw_tries=3)
    evaluator = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=32, threads=1)

    whole, search = drive(problem, evaluator, tmp_path / "whole", initial, **settings)
    frame = read_population(tmp_path / "whole")
    gen0 = frame[frame["generation"] == 0]
    assert list(gen0["key"][:2]) == [problem.net.subnet_key(g) for g in inside]
    assert list(gen0["origin"]) == ["seeded"] * 2 + ["random"] * 6
    assert problem.net.subnet_key(largest) not in set(frame["key"])
    assert frame["params"].between(lo, hi).all()
    draws = search.planner.draws
    assert sum(d.repaired_mutation + d.repaired_crossover for d in draws) > 0  # repair was exercised
    assert all(d.mutation >= 2 for d in draws[1:])  # the offspring quota is (nearly) met
    assert ResultStore(tmp_path / "whole").read_json("run.json")["identity"]["initial"] == [
        problem.net.subnet_key(g) for g in (inside[0], largest, inside[1])]

    # Two generations, then a rerun to three: the replay redraws the seeds and repairs exactly.
    drive(problem, evaluator, tmp_path / "parts", initial, **settings, generations=2)
    resumed, again = drive(problem, evaluator, tmp_path / "parts", initial, **settings)
    assert again.resumed == 2 and resumed.generations_done == 3
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    assert [t.key for t in resumed.top] == [t.key for t in whole.top]
    with pytest.raises(ResumeMismatchError, match=r"initial"):
        drive(problem, evaluator, tmp_path / "parts", initial[:1], **settings)


def test_loss_fitness_and_seeds_on_ray(ray_local, problem, tmp_path):
    rng = np.random.default_rng(8)
    seeds = [problem.net.sample_genes(rng) for _ in range(2)]
    lines = []
    result = run_search(problem.spec, problem.state, problem.images, problem.labels,
                        SearchConfig(**{**SEARCH, "generations": 2, "fitness": "loss"}), str(tmp_path), "run-l",
                        "synthetic", progress=lines.append, initial=seeds)
    frame = read_population(tmp_path)
    assert list(frame["origin"][:2]) == ["seeded", "seeded"]
    assert list(frame["key"][:2]) == [problem.net.subnet_key(g) for g in seeds]
    ranked = frame.sort_values(["val_loss", "val_acc", "params", "key"], ascending=[True, False, True, True])
    assert [t.key for t in result.top] == list(ranked["key"][:3])
    assert result.best.key == ranked["key"].iloc[0] and result.best.val_loss == frame["val_loss"].min()
    stored = read_result(tmp_path)
    assert stored["best"]["val_loss"] == result.best.val_loss and stored["config"]["fitness"] == "loss"
    assert re.search(r"seeded 2, mutation 0/0, crossover 0/0, random 6 \|", lines[0])
    assert re.search(r"\| mutation \d/3, crossover \d/3, random \d \|", lines[1])
