"""Smoke test of bench/: every benchmark runs on the tiny setting and prints sane JSON.

No timing thresholds: only that each script measures, exits 0, and reports positive ratios and
passing checks.  The Ray benchmarks start their own Ray instances, so they run as subprocesses
(never in this process, where the session's ``ray_local`` may live); they are started together
when this module begins and run while the Ray-free ones run here, in-process.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import eval_cost, gpu_check, train_step  # noqa: E402
from bench.common import EXIT_CANNOT_MEASURE, last_json_line  # noqa: E402

RAY_BENCHES = {
    "search_throughput": ["--size", "tiny"],
    "actor_memory": ["--size", "tiny", "--actors", "1", "--modes", "merged", "--controls", "private_copy"],
    "multinode": ["--size", "tiny"],
}
TIMEOUT_S = 600  # a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module", autouse=True)
def ray_runs(tmp_path_factory):
    """Start the Ray benchmarks at once; each test below waits for its own."""
    folder = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = {}
    for name, argv in RAY_BENCHES.items():
        log = open(folder / f"{name}.log", "w")
        command = [sys.executable, "-m", f"bench.{name}", *argv, "--json-out", str(folder / f"{name}.json")]
        runs[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, folder)
    yield runs
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
    assert result["family"] == family and ("conv2d" in result["settings"]["model"]) == (family == "cnn")
    ratios = result["ratios"]
    assert set(ratios) == {"merged_over_backbone", "unmerged_over_backbone", "merge_share_of_merged",
                           "implied_merged_over_backbone"}
    assert all(positive(r) for r in ratios.values())
    assert all(len(s) == 3 for s in result["seconds_per_round"].values())
    assert 0 < ratios["merge_share_of_merged"]["median"] < 2
    assert set(result["images_per_s"]) == {"backbone", "merged", "unmerged"}
    assert all(positive(v) for v in result["images_per_s"].values())
    assert result["correctness"]["max_logits_relative_error"] < 1e-4
    assert isinstance(result["goals"]["merged_over_backbone_le_1_05"], bool)


@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_train_step(capsys, family):
    layouts = ["--layouts", "auto,contiguous"] if family == "cnn" else []
    result = run_in_process(train_step.main, ["--size", "tiny", "--device", "cpu", "--family", family, *layouts],
                            capsys)
    assert_common(result, "train_step")
    assert result["family"] == family
    assert result["settings"]["channels_last"] is (family == "cnn")  # auto: channels-last for a CNN
    extra = {"supernet_contiguous"} if family == "cnn" else set()
    assert set(result["ratios"]) == {"supernet_over_lora", "supernet_over_head", "lora_over_head",
                                     *(f"{name}_over_supernet" for name in extra)}
    assert all(positive(r) for r in result["ratios"].values())
    assert set(result["images_per_s"]) == {"supernet", "lora", "head", *extra}
    assert all(positive(v) for v in result["images_per_s"].values())


def test_gpu_check_smoke_runs_without_a_gpu(capsys):
    summary = run_in_process(gpu_check.main, ["--smoke", "--no-tf32", "--eval-repeats", "1", "--train-repeats", "1"],
                             capsys)
    assert summary["bench"] == "gpu_check" and summary["exit_status"] == 0 and not summary["skipped"]
    assert set(summary["stages"]) == {"eval_cost_fp32", "train_step_fp32", "train_step_cnn_fp32", "eval_cost_bf16",
                                      "precision_all"}
    assert all(stage["exit_status"] == 0 for stage in summary["stages"].values())
    assert positive(summary["stages"]["eval_cost_fp32"]["ratios"]["merged_over_backbone"])
    assert summary["correctness"]["max_logits_relative_error"] < summary["correctness"]["tolerance"]
    ranking = summary["stages"]["precision_all"]["ranking"]["against_fp32"]["bf16"]
    assert 0 <= ranking["top10_agree"] <= 10


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
    assert set(result["runs"]) == {"1", "2"}
    for run in result["runs"].values():
        assert run["candidates"] > 0 and positive(run["candidates_per_s"]) and positive(run["eval_s_per_candidate"])
        assert 0 < run["actor_utilisation"] <= 1.0
    assert positive(result["ratios"]["speedup_2_over_1"]) and positive(result["ratios"]["efficiency_2"])


@pytest.mark.slow
def test_actor_memory(ray_runs):
    result = finished(ray_runs, "actor_memory")
    assert_common(result, "actor_memory")
    assert result["weight_bytes"] > 0 and result["baseline_uss"] > 0
    assert [(row["mode"], row["actors"]) for row in result["actors"]] == [("merged", 1)]
    assert all(u > 0 for u in result["actors"][0]["uss_per_actor"])
    assert set(result["controls"]) == {"private_copy"}
    assert {"extra_over_weights_merged_1", "merged_layers_over_weights"} <= set(result["ratios"])


@pytest.mark.slow
def test_multinode(ray_runs):
    result = finished(ray_runs, "multinode")
    assert_common(result, "multinode")  # includes: spread, nothing on the head, same results
    assert set(result["checks"]) == {"same_results", "none_on_head", "spread"}
    assert len(result["placement"]) == 2 and sorted(result["nodes_used"]) == ["worker-1", "worker-2"]
    assert sum(result["candidates_per_node"].values()) == result["evaluations"] > 0
