"""Issue 19's levers through the whole job on the tiny preset: a sandwich-trained supernet, a
loss-ranked search whose generation 0 holds the fixed adapters, and the winner retrained alone
(resumable, the supernet checkpoint untouched) before its single test."""
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from glora_ray import storage
from glora_ray.data import write_digits_dataset
from glora_ray.pipeline import layout
from glora_ray.pipeline.baselines import baseline, run_name as baseline_run_name
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.run import comparison_table, run_pipeline
from glora_ray.pipeline.stages import retrain_run_name
from glora_ray.pipeline.unit import spec_for
from helpers import tiny_args

LEVERS = ("--sandwich", "1", "--distill", "--subnet-sampling", "budget", "--fitness", "loss",
          "--seed-population", "lora", "ssf", "--retrain-epochs", "2", "--baselines", "lora")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lever_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("levers")
    write_digits_dataset(root / "data")
    cfg = parse_config(tiny_args(root / "data", root / "out", *LEVERS))
    frame = run_pipeline(cfg)
    return cfg, frame


def test_the_levers_reach_the_configuration():
    cfg = parse_config(tiny_args("/tmp/d", "/tmp/o", *LEVERS))
    assert (cfg.train.sandwich, cfg.train.distill, cfg.train.subnet_sampling) == (1, True, "budget")
    assert (cfg.search.fitness.value, cfg.seed_population, cfg.retrain_epochs) == ("loss", ("lora", "ssf"), 2)


def test_generation_0_holds_the_fixed_adapters_and_the_winner_is_the_lowest_val_loss(lever_run):
    cfg, frame = lever_run
    population = pd.read_parquet(storage.join(layout.search_uri(cfg.out, "digits"), "population"))
    structure = spec_for(cfg, "digits").build_empty()
    seeded = population[population["origin"] == "seeded"]
    assert list(seeded["key"]) == [structure.subnet_key(baseline(n).genes(structure)) for n in ("lora", "ssf")]
    assert set(seeded["generation"]) == {0}
    best = population.sort_values(["val_loss", "val_acc", "params", "key"], ascending=[True, False, True, True]).iloc[0]
    assert frame.loc[0, "key"] == best["key"]  # the stated rule: the lowest val cross-entropy
    assert population["val_loss"].notna().all()


def test_the_winner_is_retrained_alone_then_tested_and_exported(lever_run):
    cfg, frame = lever_run
    train_uri = Path(layout.train_uri(cfg.out, "digits"))
    key = frame.loc[0, "key"]
    retrained = train_uri / retrain_run_name(key) / "supernet"
    history = json.loads((retrained / "history.json").read_text())
    assert len(history) == 2 and all(h["passes"] == 1 for h in history)
    supernet_history = json.loads((train_uri / "supernet" / "supernet" / "history.json").read_text())
    assert all(h["passes"] == 3 for h in supernet_history)  # largest, smallest and one drawn subnet
    assert digest(retrained / "adapters.safetensors") != digest(train_uri / "supernet" / "supernet" / "adapters.safetensors")
    export = Path(layout.export_uri(cfg.out, "digits"))
    subnet = json.loads((export / "subnet.json").read_text())
    assert subnet["retrain_epochs"] == 2 and subnet["test_acc"] == frame.loc[0, "test_acc"]
    assert "search_val_acc" in subnet and subnet["val_acc"] == frame.loc[0, "val_acc"]
    table = comparison_table(cfg)
    glora, lora = (table[table["name"] == n].iloc[0] for n in ("glora", "lora"))
    images = 800 // 64 * 64  # one epoch's images (drop_last)
    assert glora["train_images"] == images * (3 * cfg.train.epochs + 2)  # 3 passes a step, then 2 plain epochs
    assert lora["train_images"] == images * cfg.train.epochs and lora["train_seconds"] > 0


def test_a_rerun_resumes_the_retraining_and_never_retrains_or_retests(lever_run):
    cfg, frame = lever_run
    train_uri = Path(layout.train_uri(cfg.out, "digits"))
    retrained = train_uri / retrain_run_name(frame.loc[0, "key"]) / "supernet"
    supernet_adapters = train_uri / "supernet" / "supernet" / "adapters.safetensors"
    test_file = Path(layout.export_uri(cfg.out, "digits")) / "test.json"
    before = {p: (digest(p), p.stat().st_mtime_ns) for p in (supernet_adapters, test_file)}
    history = (retrained / "history.json").read_text()
    (retrained / "history.json").unlink()  # as if the driver died before it recorded the finished retraining
    again = run_pipeline(cfg)
    assert (retrained / "history.json").read_text() == history  # resumed at its last checkpoint: no new epoch
    assert {p: (digest(p), p.stat().st_mtime_ns) for p in before} == before
    assert list(again["test_acc"]) == list(frame["test_acc"]) and list(again["key"]) == list(frame["key"])


def test_other_baseline_epochs_train_a_schedule_of_their_own(lever_run):
    # Last: it adds a baseline record.  LoRA at more epochs (e.g. at GLoRA's compute) on a finished
    # output is a fresh run of that length, never the finished one resumed and stretched.
    cfg, _ = lever_run
    train_uri = Path(layout.train_uri(cfg.out, "digits"))
    first = train_uri / baseline_run_name("lora", cfg.train.epochs) / "supernet"
    before, first_history = digest(first / "adapters.safetensors"), json.loads((first / "history.json").read_text())
    longer = cfg.train.epochs + 1
    run_pipeline(parse_config(tiny_args(cfg.data_root, cfg.out, *LEVERS, "--baseline-epochs", str(longer))))
    history = json.loads((train_uri / baseline_run_name("lora", longer) / "supernet" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(longer))
    # Its own cosine from the first epoch after warm-up: a resumed run would carry the old epochs.
    assert history[1]["lr"] != pytest.approx(first_history[1]["lr"])
    assert digest(first / "adapters.safetensors") == before
    record = json.loads((Path(layout.dataset_uri(cfg.out, "digits")) / "baselines" / "lora.json").read_text())
    assert record["epochs"] == longer
