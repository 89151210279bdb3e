"""What a run's results depend on: one definition for the pipeline, training and search."""
from dataclasses import replace

import pytest

from glora_ray.identity import (IDENTITY, differences, identity_changes, identity_digest, result_extent,
                                result_identity, with_identity)
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.config import PipelineConfigError, check_same_run, run_record
from glora_ray.search import SearchConfig
from glora_ray.train import TrainConfig


def test_a_record_keeps_its_inputs_and_a_rerun_compares_them():
    inputs = {"key": "abc", "lr": 1e-3, "sizes": (1, 2)}
    record = with_identity({"test_acc": 0.5}, inputs)
    assert record["test_acc"] == 0.5 and record[IDENTITY] == {"key": "abc", "lr": 1e-3, "sizes": [1, 2]}
    assert identity_changes(record, inputs) == []  # tuples as JSON keeps them: the same inputs
    assert identity_changes(record, {**inputs, "lr": 2e-3}) == [("lr", 1e-3, 2e-3)]
    # A record without inputs (written before, or damaged) differs in every one: it is redone.
    assert [name for name, _, _ in identity_changes({"test_acc": 0.5}, inputs)] == ["key", "lr", "sizes"]
    assert identity_changes(None, inputs) and identity_changes({IDENTITY: "garbage"}, inputs)
    assert identity_digest(inputs) == identity_digest({"sizes": [1, 2], "lr": 1e-3, "key": "abc"}) != \
        identity_digest({**inputs, "lr": 2e-3})


def test_execution_settings_are_not_part_of_the_identity():
    train = result_identity(TrainConfig())
    assert set(train) == {"epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr",
                          "seed", "split", "precision", "channels_last",
                          "fixed_subnet",  # a fixed adapter (baseline) is another run
                          # which subnets a step trains, and where a retraining starts
                          "subnet_sampling", "budget", "sandwich", "distill", "init_from",
                          # workers draw their own masks and batch statistics; a GPU has other kernels
                          "num_workers", "use_gpu"}
    search = result_identity(SearchConfig())
    assert set(search) == {"population", "parents", "mutants", "crossovers", "m_prob", "min_params", "max_params",
                           "seed", "max_draw_tries", "eval_batch_size", "eval_mode", "precision", "fitness",
                           "merge_strategy"}  # batched merges sum in another order
    assert search["eval_mode"] == "merged"  # enums by value: the identity is plain JSON
    assert result_extent(SearchConfig(generations=7)) == {"generations": 7}
    assert SearchConfig().result_identity() == search


def test_differences_name_nested_fields_with_both_values():
    a, b = parse_config(["--preset", "tiny", ]), parse_config(["--preset", "tiny", "--seed", "4", "--m-prob", "0.5", "--actors", "3", "--generations", "9"])
    assert differences(a.identity(), b.identity()) == [
        ("backbone.init_seed", 0, 4), ("search.m_prob", 0.2, 0.5), ("search.seed", 0, 4), ("train.seed", 0, 4)]
    assert result_extent(b) == {"search": {"generations": 9}}


def test_a_stored_run_continues_only_with_execution_changes_or_a_longer_search():
    stored = run_record(parse_config(["--preset", "tiny", "--out", "/tmp/run", "--generations", "5"]))
    for argv in (["--checkpoint-every", "1"], ["--actors", "4", "--actor-cpus", "0.5"],
                 ["--train-cpus", "1"], ["--test-pareto"], ["--max-concurrent-datasets", "1"], ["--verbose"],
                 ["--baselines", "lora", "head"], ["--seeds", "0", "1"],
                 ["--generations", "8"], ["--out", "/elsewhere"]):
        check_same_run(parse_config(["--preset", "tiny", "--out", "/tmp/run", "--generations", "5", *argv]), stored, "--out /tmp/run")
    with pytest.raises(PipelineConfigError, match=r"train\.epochs: stored 10, now 3"):
        check_same_run(parse_config(["--preset", "tiny", "--generations", "5", "--epochs", "3"]), stored, "--out /tmp/run")
    with pytest.raises(PipelineConfigError, match=r"search\.generations: stored 5, now 4.*may only grow"):
        check_same_run(parse_config(["--preset", "tiny", "--generations", "4"]), stored, "--out /tmp/run")
    cfg = parse_config(["--preset", "tiny", ])
    assert replace(cfg, out="/x").identity() == cfg.identity()  # a run may move


def test_precision_layout_and_merge_options_reach_the_configs_and_the_identity():
    cfg = parse_config(["--preset", "tiny", "--train-precision", "fp32", "--channels-last", "--search-precision", "bf16",
                        "--merge-strategy", "per_candidate"])
    assert (cfg.train.precision, cfg.train.channels_last) == ("fp32", True)
    assert (cfg.search.precision.value, cfg.search.merge_strategy) == ("bf16", "per_candidate")
    tiny = parse_config(["--preset", "tiny"])
    assert (tiny.train.precision, tiny.train.channels_last, tiny.search.merge_strategy) == ("auto", None, "auto")
    assert {name for name, _, _ in differences(tiny.identity(), cfg.identity())} == {
        "train.channels_last", "search.precision", "search.merge_strategy"}  # auto: fp32 on CPUs
    assert parse_config(["--preset", "tiny", "--no-channels-last"]).train.channels_last is False
    with pytest.raises(PipelineConfigError, match="'tf32' is a GPU format.*--train-gpus"):
        replace(tiny, train=replace(tiny.train, precision="tf32"))


def test_auto_is_recorded_as_what_it_resolves_to_where_the_run_executes():
    cpu = parse_config(["--preset", "tiny"])
    assert (cpu.identity()["train"]["precision"], cpu.identity()["search"]["merge_strategy"]) == ("fp32", "just_in_time")
    assert cpu.identity() == parse_config(["--preset", "tiny", "--train-precision", "fp32",
                                           "--merge-strategy", "just_in_time"]).identity()
    gpu = parse_config(["--preset", "tiny", "--train-gpus", "1", "--actor-gpus", "0.5"])
    assert (gpu.train.precision, gpu.search.merge_strategy) == ("auto", "auto")  # the settings keep "auto"
    assert (gpu.identity()["train"]["precision"], gpu.identity()["search"]["merge_strategy"]) == ("bf16", "batched")
    # The same command moved to GPUs is another run, named by every field that changes its numbers.
    stored = run_record(replace(cpu, out="/tmp/run"))
    with pytest.raises(PipelineConfigError) as refused:
        check_same_run(replace(gpu, out="/tmp/run"), stored, "--out /tmp/run")
    for name in ("train.precision: stored 'fp32', now 'bf16'", "train.use_gpu: stored False, now True",
                 "search.merge_strategy: stored 'just_in_time', now 'batched'"):
        assert name in str(refused.value)


def test_the_worker_count_is_another_run():
    stored = run_record(parse_config(["--preset", "tiny", "--out", "/tmp/run"]))
    with pytest.raises(PipelineConfigError, match=r"train\.num_workers: stored \d+, now 2"):
        check_same_run(parse_config(["--preset", "tiny", "--out", "/tmp/run", "--train-workers", "2"]), stored,
                       "--out /tmp/run")
