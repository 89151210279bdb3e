"""Fixed-adapter baselines: the table, their genes and counts, fixed-subnet training, the comparison."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from dataclasses import replace
from torch.utils.data import TensorDataset

from glora_ray.errors import GLoRARayError, GLoRARayTypeError
from glora_ray.pipeline.baselines import BASELINES, BaselineError, BaselineOutcome, baseline, check_baseline_names
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.comparison import aggregate, comparison_rows, format_comparison
from glora_ray.pipeline.config import PipelineConfigError
from glora_ray.pipeline.plots import comparison_png
from glora_ray.train import SupernetTraining, TrainConfig, TrainConfigError, subnet_digest
from helpers import tiny_supernet


# (d_in, d_out) of the adapted layers of helpers.tiny_vit (embed 32, MLP ratio 4, depth 2), by hand.
TINY_VIT_DIMS = [(32, 96), (32, 32), (32, 128), (128, 32)] * 2


def test_each_baseline_is_one_choice_in_every_layer_counted_by_the_search_counter():
    net = tiny_supernet(ranks=(4, 2))
    dims = TINY_VIT_DIMS
    assert net.num_layers == len(dims)
    expected = {  # docs/method.md §1 counts, by hand
        "lora": sum(4 * (d_in + d_out) for d_in, d_out in dims),
        "ssf": sum(2 * d_out for _, d_out in dims),
        "bitfit": sum(d_out for _, d_out in dims),
        "head": 0,
    }
    assert set(BASELINES) >= set(expected)
    for name, params in expected.items():
        genes = baseline(name).genes(net)
        layers = net.decode(genes)
        assert len({tuple(sorted(c.items())) for c in layers.values()}) == 1  # the same in every layer
        assert net.num_params(genes) == net.counter.count(genes) == params, name
        net.set_subnet(genes)
        assert net.num_params() == params  # the layers' own count agrees
    choice = next(iter(net.decode(baseline("lora").genes(net)).values()))
    assert choice == {"A": "none", "B": "lora4", "C": "none", "D": "none", "E": "none"}
    assert baseline("ssf").layer_choice(net.space) == {"A": "vector", "B": "none", "C": "none", "D": "none",
                                                        "E": "vector"}
    assert set(baseline("head").layer_choice(net.space).values()) == {"none"}
    assert baseline("lora").layer_choice(tiny_supernet(ranks=(2, 8)).space)["B"] == "lora8"


def test_unknown_or_repeated_baselines_are_refused_with_the_valid_names():
    with pytest.raises(BaselineError, match=r"unknown baseline 'adapter'.*'bitfit'"):
        check_baseline_names(["lora", "adapter"])
    with pytest.raises(BaselineError, match="twice"):
        check_baseline_names(["lora", "lora"])
    cfg = parse_config(["--baselines", "lora", "head", "--seeds", "0", "2"])
    assert cfg.baselines == ("lora", "head") and cfg.seeds == (0, 2)
    runs = cfg.seed_runs()
    assert [s for s, _ in runs] == [0, 2] and runs[1][1].out.endswith("seed=2")
    assert runs[1][1].train.seed == runs[1][1].search.seed == runs[1][1].backbone.init_seed == 2
    assert cfg.identity() == parse_config([]).identity()  # baselines and seeds may be added later
    with pytest.raises(SystemExit):
        parse_config(["--seed", "1", "--seeds", "0", "1"])
    with pytest.raises(PipelineConfigError, match="seeds must be distinct"):
        replace(cfg, seeds=(1, 1))
    with pytest.raises(BaselineError, match="unknown baseline"):
        replace(cfg, baselines=("lora", "adapter"))


def test_forms_options_narrow_the_space_and_baselines_outside_it_are_refused():
    cfg = parse_config(["--preset", "tiny", "--forms-B", "lora", "none", "--forms-E", "vector", "none"])
    assert cfg.forms == {"B": ("lora", "none"), "E": ("vector", "none")}
    assert parse_config(["--preset", "tiny", "--forms-C", "lora", "vector", "none"]).forms == {}  # all: full space
    assert cfg.identity() != parse_config(["--preset", "tiny"]).identity()  # another space, another run
    parse_config(["--preset", "tiny", "--forms-B", "lora", "none", "--baselines", "lora", "ssf", "bitfit", "head"])
    with pytest.raises(BaselineError, match=r"baseline 'ssf' needs \{'A': 'vector'\}.*--forms-A"):
        replace(parse_config(["--preset", "tiny", "--forms-A", "lora", "none"]), baselines=("lora", "ssf"))
    with pytest.raises(SystemExit):  # argparse knows each tensor's forms
        parse_config(["--preset", "tiny", "--forms-C", "scalar", "none"])


def test_fixed_subnet_trains_that_subnet_every_step():
    generator = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(64, 3, 16, 16, generator=generator), torch.randint(10, (64,), generator=generator))
    net = tiny_supernet(ranks=(4, 2), num_classes=10)
    key = net.subnet_key(baseline("lora").genes(net))
    before = {k: v.clone() for k, v in net.adapter_state_dict().items()}
    cfg = TrainConfig(epochs=1, warmup_epochs=0, batch_size=16, lr=1e-2, num_workers=0, fixed_subnet=key)
    training = SupernetTraining(net, images, cfg, "cpu").setup()
    stats = training.run_epoch()
    assert stats.subnet_digests == [subnet_digest([key] * stats.steps)]
    changed = {k for k, v in net.adapter_state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".glora.B_" in k or k.startswith("head.") for k in changed), changed
    with pytest.raises(GLoRARayTypeError, match="fixed_subnet must be a subnet key .*got list"):
        TrainConfig(fixed_subnet=["B"]).validate()
    with pytest.raises(TrainConfigError, match="fixed_subnet must be a subnet key"):
        TrainConfig(fixed_subnet="").validate()
    # Checked against the supernet's space and layers when training is set up, not at the first step.
    with pytest.raises(GLoRARayError, match="keys start with 'r4r2:'"):
        SupernetTraining(net, images, TrainConfig(batch_size=16, fixed_subnet="00"), "cpu")
    with pytest.raises(GLoRARayError, match="expected 40 genes"):
        SupernetTraining(net, images, TrainConfig(batch_size=16, fixed_subnet="r4r2:00"), "cpu")


def _outcome(name, params, val, test, seed):
    return BaselineOutcome(name=name, key="k" + name, params=params, head_params=10, lr=1e-3, epochs=1, seed=seed,
                           val_acc=val, test_acc=test, checkpoint_dir="-")


def test_comparison_table_aggregate_and_plot():
    tables = []
    for seed in (0, 1):
        front = pd.DataFrame({"key": ["f1", "f0"], "params": [900, 100], "val_acc": [0.8, 0.5],
                              "test_acc": [0.7 + seed / 10, 0.4]})
        winner = {"key": "f1", "params": 900 + seed, "val_acc": 0.8, "test_acc": 0.7 + seed / 10}
        tables.append(comparison_rows("digits", seed, winner, front,
                                      [_outcome("lora", 1000, 0.6, 0.5 + seed / 10, seed),
                                       _outcome("head", 0, 0.3, 0.2, seed)]))
    frame = pd.concat(tables, ignore_index=True)
    assert list(frame.loc[frame["seed"] == 0, "name"]) == ["glora", "pareto-0", "pareto-1", "lora", "head"]
    means = aggregate(frame).set_index("name")
    assert list(means.index) == ["glora", "lora", "head"] and (means["seeds"] == 2).all()
    assert means.loc["glora", "params"] == 900.5
    assert means.loc["lora", "test_acc"] == pytest.approx(0.55)
    assert means.loc["lora", "test_acc_std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    text = format_comparison(frame)
    assert "55.00 ± 7.07" in text and "pareto-1" in text
    png = comparison_png(frame)
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_bench_pairs_glora_with_each_baseline_by_seed():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.compare_baselines import markdown, mean_interval, paired_differences

    glora_test = {0: 0.70, 1: 0.80, 2: 0.72}  # seed 2: a tie, which "at least as good" counts
    table = pd.concat([comparison_rows("digits", seed, {"key": "w", "params": 500, "val_acc": 0.8,
                                                        "test_acc": glora_test[seed]},
                                       None, [_outcome("lora", 1000, 0.6, 0.72, seed)]) for seed in glora_test])
    (pair,) = paired_differences(table, ["lora"])
    assert pair["per_seed"] == pytest.approx([-0.02, 0.08, 0.0]) and pair["seeds"] == 3
    assert pair["glora_wins"] == 1 and pair["glora_at_least"] == 2
    assert pair["test_diff_mean"] == pytest.approx(0.02) and pair["baseline_params"] == 1000
    # t(0.975, 2 degrees of freedom) = 4.303: the mean +- 4.303 * std / sqrt(3), which holds 0
    assert pair["test_diff_ci95"] == pytest.approx([0.02 - 0.13144, 0.02 + 0.13144], abs=1e-4)
    assert mean_interval(0.02, float("nan"), 1) is None  # one seed: no interval
    setting = {"backbone": "vit", "weights": "random init", "ranks": [4, 2], "adapted_layers": 8, "datasets": ["digits"],
               "seeds": [0, 1, 2], "epochs": 1, "lr": 1e-3, "budget": {}, "population": 8, "generations": 2}
    result = {"tag": "t", "setting": setting, "argv": [], "wall_seconds_this_invocation": 1.0, "paired": [pair],
              "machine": {"cpu": "x", "torch": "t", "ray": "r", "date_utc": "d"},
              "mean": json.loads(aggregate(table).to_json(orient="records")),
              "rows": json.loads(table.to_json(orient="records"))}
    text = markdown(result)
    assert "| digits | lora | 500 | 1,000 | +2.00 ± 5.29 | 1/3 seeds | 2/3 seeds | -11.14 to +15.14 |" in text and "random init" in text
    assert "levers:" not in text  # a result written before issue 19 has none
    assert "| digits | lora | 1,000 | 60.00 ± 0.00 | 72.00 ± 0.00 | 3 | - | - |" in text  # compute not recorded
    setting.update(subnet_sampling="budget", sandwich=2, distill=False, fitness="accuracy",
                   seed_population=["lora"], retrain_epochs=0)
    assert ("- levers: subnet sampling budget, sandwich 2, distill False, fitness accuracy, generation 0 seeded "
            "with ['lora'], retrain 0 epochs") in markdown(result)
