"""Smoke test of bench/: every benchmark runs on the tiny setting and prints JSON whose numbers
agree with each other.

No timing thresholds (a shared machine makes any of them flaky).  What is checked instead is what
a wrong summary would break: each ratio is the median of its per-round ratios, each rate is the
images (or candidates) over the median time, the counts are those of the tiny preset, the
correctness figures are those the engine guarantees (e.g. the just-in-time and per-candidate
merges agree bit for bit on the CPU), and every check the script reports agrees with its numbers.

The Ray benchmarks start their own Ray instances, so they run
as subprocesses, never in this process where the session's ``ray_local`` may live.  They are
marked slow and start only when one of their tests runs (``-m "not slow"`` starts none); the
Ray-free ones run here, in-process.
"""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import eval_cost, train_step  # noqa: E402
from bench.common import EXIT_CANNOT_MEASURE, last_json_line  # noqa: E402

RAY_BENCHES = {
    "search_throughput": ["--size", "tiny"],
    "actor_memory": ["--size", "tiny", "--actors", "1", "--modes", "merged", "--controls", "private_copy"],
}
TIMEOUT_S = 600  # a hang fails the test instead of blocking the suite
# The tiny preset (bench/common.py), written out: the counts every result must show.
TINY_VAL_IMAGES, TINY_EVAL_BATCH, TINY_EVAL_REPEATS = 32, 16, 3
TINY_TRAIN_BATCH, TINY_TRAIN_STEPS, TINY_TRAIN_REPEATS = 8, 2, 2
TINY_POPULATION, TINY_GENERATIONS = 6, 2
# The tiny ViT's adapted layers (embed 32, MLP 128, depth 2): plain LoRA-4 on B costs 4 * (d_in + d_out) each.
TINY_VIT_LORA4_PARAMS = 4 * sum(d_in + d_out for d_in, d_out in [(32, 96), (32, 32), (32, 128), (128, 32)] * 2)
REL = 1e-4  # the JSON keeps 6 significant digits


@pytest.fixture(scope="module")
def ray_runs(request, tmp_path_factory):
    """Start at once the Ray benchmarks whose tests this session runs; each test waits for its own."""
    selected = {item.name.removeprefix("test_") for item in request.session.items
                if getattr(item, "module", None) is request.module}
    folder = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # each bench starts its own Ray, never joins this process's
    runs = {}
    try:
        for name, argv in RAY_BENCHES.items():
            if name not in selected:
                continue
            log = open(folder / f"{name}.log", "w")
            command = [sys.executable, "-m", f"bench.{name}", *argv, "--json-out", str(folder / f"{name}.json")]
            runs[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log,
                          folder)
        yield runs
    finally:
        for process, log, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


def finished(runs, name):
    process, log, folder = runs[name]
    try:
        code = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"bench.{name} did not finish in {TIMEOUT_S} s")
    log.flush()
    output = (folder / f"{name}.log").read_text()
    assert code == 0, f"bench.{name} exited {code}:\n{output[-3000:]}"
    result = last_json_line(output)
    assert result == json.loads((folder / f"{name}.json").read_text())
    return result


def positive(value) -> bool:
    value = value["median"] if isinstance(value, dict) else value
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def assert_common(result, bench):
    assert result["bench"] == bench and result["size"] == "tiny"
    assert {"cpu", "torch", "timm", "date_utc"} <= set(result["machine"])
    assert all(c["ok"] for c in result["checks"].values()), result["checks"]


def assert_ratio(stat, numerator, denominator, rounds):
    """A ratio of two interleaved variants, recomputed from their per-round seconds."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    assert len(numerator) == len(denominator) == stat["rounds"] == rounds
    assert stat["median"] == pytest.approx(statistics.median(per_round), rel=REL)
    assert stat["low"] == pytest.approx(min(per_round), rel=REL) and stat["high"] == pytest.approx(max(per_round), rel=REL)
    assert stat["low"] <= stat["median"] <= stat["high"]
    assert stat["of_minimums"] == pytest.approx(min(numerator) / min(denominator), rel=REL)


def assert_rates(result, per_call: int, rounds: int):
    """Every variant timed ``rounds`` times, with positive seconds; its rate is ``per_call`` over
    the median; each ``<a>_over_<b>`` ratio recomputes from the rounds of a and b."""
    seconds = result["seconds_per_round"]
    assert all(len(s) == rounds and all(positive(x) for x in s) for s in seconds.values()), seconds
    for name, rate in result["images_per_s"].items():
        assert rate == pytest.approx(per_call / statistics.median(seconds[name]), rel=REL), name
    for name, stat in result["ratios"].items():
        if isinstance(stat, dict):
            numerator, denominator = name.split("_over_")
            assert_ratio(stat, seconds[numerator], seconds[denominator], rounds)


def run_in_process(main, argv, capsys):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return last_json_line(out)


# -- Ray-free, in this process ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_eval_cost(capsys, family):
    result = run_in_process(eval_cost.main, ["--size", "tiny", "--device", "cpu", "--family", family], capsys)
    assert_common(result, "eval_cost")
    settings = result["settings"]
    assert result["family"] == family and ("conv2d" in settings["model"]) == (family == "cnn")
    assert (settings["val_images"], settings["repeats"], settings["subnets"]) == (TINY_VAL_IMAGES, TINY_EVAL_REPEATS, 4)
    assert settings["precision"] == "fp32" and settings["merge_strategy"] == "just_in_time"  # the CPU's default
    assert set(result["seconds_per_round"]) == {"backbone", "merged", "unmerged", "merge"}
    assert set(result["images_per_s"]) == {"backbone", "merged", "unmerged"}
    # merge_share_of_merged is named the other way round: merge over merged.
    ratios, seconds = result["ratios"], result["seconds_per_round"]
    share = ratios.pop("merge_share_of_merged")
    assert_ratio(share, seconds["merge"], seconds["merged"], TINY_EVAL_REPEATS)
    implied = ratios.pop("implied_merged_over_backbone")
    assert implied == pytest.approx(1 / (1 - share["median"]), rel=REL)
    assert set(ratios) == {"merged_over_backbone", "unmerged_over_backbone"}
    assert_rates(result, TINY_VAL_IMAGES, TINY_EVAL_REPEATS)
    for name, median in result["seconds_median"].items():
        assert median == pytest.approx(statistics.median(seconds[name]), rel=REL), name
    assert result["goals"]["merged_over_backbone_le_1_05"] is (ratios["merged_over_backbone"]["median"] <= 1.05)
    # fp32: merged and unmerged logits agree far inside the tolerance, and the check says so.
    correctness = result["correctness"]
    assert correctness["tolerance"] == 1e-4 and 0 <= correctness["max_logits_relative_error"] < 1e-5
    assert result["checks"]["merged_matches_unmerged"]["ok"]


@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_train_step(capsys, family):
    layouts = ["--layouts", "auto,contiguous"] if family == "cnn" else []
    result = run_in_process(train_step.main, ["--size", "tiny", "--device", "cpu", "--family", family, *layouts],
                            capsys)
    assert_common(result, "train_step")
    settings = result["settings"]
    assert result["family"] == family
    assert settings["channels_last"] is (family == "cnn")  # auto: channels-last for a CNN
    assert (settings["batch_size"], settings["steps_per_epoch"], settings["repeats"]) == (
        TINY_TRAIN_BATCH, TINY_TRAIN_STEPS, TINY_TRAIN_REPEATS)
    extra = {"supernet_contiguous"} if family == "cnn" else set()
    assert set(result["ratios"]) == {"supernet_over_lora", "supernet_over_head", "lora_over_head",
                                     *(f"{name}_over_supernet" for name in extra)}
    assert set(result["images_per_s"]) == set(result["seconds_per_round"]) == {"supernet", "lora", "head", *extra}
    assert_rates(result, TINY_TRAIN_BATCH * TINY_TRAIN_STEPS, TINY_TRAIN_REPEATS)
    for name, ms in result["step_ms_median"].items():
        assert ms == pytest.approx(statistics.median(result["seconds_per_round"][name]) / TINY_TRAIN_STEPS * 1e3,
                                   rel=REL), name
    # The three trainings are what they say: plain LoRA-4 on B in every adapted layer, the head alone.
    trained = result["trained"]
    assert trained["head"] == "0 adapter params" and trained["lora"].endswith("adapter params (B = lora4)")
    if family == "vit":
        assert trained["lora"].startswith(f"{TINY_VIT_LORA4_PARAMS:,} adapter params")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU")
def test_a_missing_gpu_is_a_clear_error_not_a_measurement(capsys):
    assert eval_cost.main(["--size", "tiny", "--device", "cuda"]) == EXIT_CANNOT_MEASURE
    captured = capsys.readouterr()
    assert "cannot measure" in captured.err and "CUDA is not available" in captured.err
    assert not captured.out.strip().startswith("{")


# -- Ray, in subprocesses -------------------------------------------------------------------------

@pytest.mark.slow
def test_search_throughput(ray_runs):
    result = finished(ray_runs, "search_throughput")
    assert_common(result, "search_throughput")  # includes: 1 and 2 actors found the same population
    assert result["settings"]["actor_counts"] == [1, 2] and result["settings"]["repeats"] == 1
    assert set(result["runs"]) == {"1", "2"}
    for n, run in result["runs"].items():
        # Every generation evaluates a whole population of new candidates.
        assert (run["candidates"], run["generations"]) == (TINY_POPULATION * TINY_GENERATIONS, TINY_GENERATIONS)
        assert positive(run["window_s"]) and positive(run["eval_s_per_candidate"])
        assert run["candidates_per_s"] == pytest.approx(run["candidates"] / run["window_s"], rel=REL)
        busy = run["eval_s_per_candidate"] * run["candidates"]
        assert run["actor_utilisation"] == pytest.approx(busy / (int(n) * run["window_s"]), rel=REL)
        assert 0 < run["actor_utilisation"] <= 1.0
        overhead = run["overhead_actor_s_per_candidate"]
        assert overhead == pytest.approx(int(n) * run["window_s"] / run["candidates"] - run["eval_s_per_candidate"],
                                         rel=1e-3, abs=1e-6)
        assert run["pool_overhead_actor_s_per_candidate"] + run["driver_actor_s_per_candidate"] == pytest.approx(
            overhead, rel=1e-3, abs=1e-6)
        assert result["ratios"]["overhead_over_eval"][n] == pytest.approx(overhead / run["eval_s_per_candidate"],
                                                                          rel=1e-3)
    # One round: the speed-up is the ratio of the two rates, the efficiency that over 2 actors.
    speedup = result["ratios"]["speedup_2_over_1"]
    rates = {n: run["candidates_per_s"] for n, run in result["runs"].items()}
    assert speedup["rounds"] == 1 and speedup["median"] == pytest.approx(rates["2"] / rates["1"], rel=1e-3)
    assert result["ratios"]["efficiency_2"] == pytest.approx(speedup["median"] / 2, rel=REL)


@pytest.mark.slow
def test_actor_memory(ray_runs):
    result = finished(ray_runs, "actor_memory")
    assert_common(result, "actor_memory")
    weights, baseline = result["weight_bytes"], result["baseline_uss"]
    assert weights > 0 and baseline > 0 and 0 < result["merged_layer_bytes"] < weights
    assert [(row["mode"], row["actors"]) for row in result["actors"]] == [("merged", 1)]
    (row,) = result["actors"]
    assert len(row["uss_per_actor"]) == 1 and row["uss_median"] == row["uss_per_actor"][0] > 0
    assert set(result["controls"]) == {"private_copy"}
    private = result["controls"]["private_copy"]["uss_median"]
    ratios = result["ratios"]
    assert ratios["baseline_over_weights"] == pytest.approx(baseline / weights, rel=REL)
    assert ratios["merged_layers_over_weights"] == pytest.approx(result["merged_layer_bytes"] / weights, rel=REL)
    assert ratios["extra_over_weights_merged_1"] == pytest.approx((row["uss_median"] - baseline) / weights, rel=REL)
    assert ratios["extra_over_weights_private_copy_1"] == pytest.approx((private - baseline) / weights, rel=REL)
    assert ratios["sharing_saves_over_weights"] == pytest.approx(
        ratios["extra_over_weights_private_copy_1"] - ratios["extra_over_weights_merged_1"], rel=1e-3, abs=1e-3)
    # Tiny weights vanish next to an actor's baseline: the sharing check says it was skipped, not passed.
    assert weights < 64 * 2**20 and result["checks"]["zero_copy_sharing"]["detail"].startswith("skipped")
