"""A training that diverges (issue 21): stopped at its step with one line, nothing kept, never
searched, resumed, chosen by the lr sweep or reported as a result."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from glora_ray.backbone import BackboneConfig
from glora_ray.checkpoint import NonFiniteCheckpointError, SupernetSpec, load_supernet, save_supernet
from glora_ray.data import DataConfig, write_digits_dataset
from glora_ray.errors import GLoRARayError, TrainingDiverged
from glora_ray.pipeline.lr_sweep import choose_trial, trial_record
from glora_ray.train import TrainConfig, train_supernet
from glora_ray.train.job import LOCAL_CHECKPOINTS_DIR

TINY = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=16, drop_path_rate=0.1,
    model_kwargs=dict(patch_size=16, depth=2, embed_dim=64, num_heads=2, global_pool="avg"),
)


def make_spec() -> SupernetSpec:
    return SupernetSpec(backbone=copy.deepcopy(TINY), num_classes=10, ranks=(4, 2))


def quick(**overrides) -> TrainConfig:
    # Local mode (no Ray worker group): the cheapest real training job.
    settings = dict(epochs=1, lr=1e-2, warmup_epochs=0, batch_size=64, checkpoint_every=1, num_workers=0)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("data")
    write_digits_dataset(root)
    return DataConfig(str(root), "digits", img_size=16)


def test_divergence_is_bad_input():
    assert issubclass(TrainingDiverged, GLoRARayError)  # the CLI's one line and exit status 2


def test_a_diverging_training_stops_at_its_step_and_leaves_nothing(data, tmp_path):
    # Step 1's loss is finite; its update at lr 1e30 makes step 2's NaN, where training stops.
    storage = tmp_path / "runs"
    with pytest.raises(TrainingDiverged) as caught:
        train_supernet(make_spec(), data, quick(lr=1e30), str(storage), "sn")
    message = str(caught.value)
    assert "\n" not in message
    for part in ("dataset 'digits'", "'sn'", "epoch 1, step 2 of the run", "loss nan", "lr 1e+30", "--lr",
                 "docs/method.md §7"):
        assert part in message, message
    assert (caught.value.epoch, caught.value.step) == (1, 2)
    assert not (storage / "sn").exists()  # no checkpoint, no record: nothing a rerun could resume


def test_a_rerun_after_divergence_starts_afresh(data, tmp_path):
    # One healthy epoch is checkpointed; extending the run at a huge lr diverges in epoch 2, which
    # removes the run, checkpoint of epoch 1 included: the corrected rerun trains from step 0.
    storage = str(tmp_path / "runs")
    first = train_supernet(make_spec(), data, quick(epochs=1), storage, "sn")
    assert (Path(first.run_dir) / LOCAL_CHECKPOINTS_DIR).is_dir()
    with pytest.raises(TrainingDiverged, match="epoch 2, step 14 of the run"):
        train_supernet(make_spec(), data, quick(epochs=2, lr=1e30), storage, "sn")
    assert not Path(first.run_dir).exists()
    again = train_supernet(make_spec(), data, quick(epochs=2), storage, "sn")
    assert again.resumed_from_step is None and [h["epoch"] for h in again.history] == [0, 1]
    assert all(math.isfinite(h["loss"]) for h in again.history)


def test_a_supernet_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    spec = make_spec()
    supernet = spec.build()
    save_supernet(tmp_path / "good", supernet, spec)
    load_supernet(tmp_path / "good")  # finite: loads
    name = next(iter(supernet.adapter_state_dict()))
    with torch.no_grad():
        supernet.model.get_parameter(name).view(-1)[0] = float("nan")  # keyed as in supernet.model
    save_supernet(tmp_path / "bad", supernet, spec)
    with pytest.raises(NonFiniteCheckpointError, match=f"{tmp_path / 'bad'}: .*non-finite weights .*{name}"):
        load_supernet(tmp_path / "bad")


def test_the_lr_sweep_never_chooses_a_diverged_trial():
    healthy = trial_record({"val_acc": 0.2, "lr": 1e-3, "final_loss": 2.0, "checkpoint_dir": "/a", "diverged": ""})
    diverged = trial_record({"val_acc": math.nan, "lr": 1e30, "final_loss": math.nan, "checkpoint_dir": "",
                             "diverged": "training diverged at epoch 1"})
    assert diverged["val_acc"] is None and diverged["checkpoint_dir"] is None
    assert choose_trial([healthy, diverged]) is healthy
    with pytest.raises(TrainingDiverged, match="every learning rate diverged"):
        choose_trial([diverged])


# -- the whole job ------------------------------------------------------------------------------
def pipeline_args(data_root, out, lr: str, workers: int = 0) -> list[str]:
    return ["--preset", "tiny", "--train-workers", str(workers), "--data-root", str(data_root), "--out", str(out), "--img-size", "16",
            "--model-kwargs", '{"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}',
            "--lr", lr, "--epochs", "1", "--warmup-epochs", "0", "--train-cpus", "1",
            "--population", "4", "--parents", "2", "--mutants", "1", "--crossovers", "1", "--generations", "1",
            "--max-params", "6k", "--actors", "1", "--eval-batch-size", "100"]


@pytest.mark.slow
def test_a_diverged_pipeline_exits_2_keeps_nothing_and_a_corrected_rerun_runs(data, tmp_path, capsys, ray_local):
    import pandas as pd

    from glora_ray.pipeline import layout
    from helpers import load_entry_point

    entry, out = load_entry_point(), tmp_path / "out"
    # Diverging in a Ray Train worker group (the worker reports it, the driver says it) ...
    assert entry.main(pipeline_args(data.root, out, "1e30", workers=1)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: dataset 'digits'") and "--lr" in errors[0], errors
    assert not out.exists() or not list(out.iterdir())  # nothing searched, tested, exported or recorded
    # ... then the same --out with a lower lr (in-process training, quicker): a fresh run, not a refusal nor a resumed NaN checkpoint.
    assert entry.main(pipeline_args(data.root, out, "2e-3")) == 0
    first = pd.read_parquet(out / layout.SUMMARY_FILE)
    assert first["test_acc"].notna().all()
    # Issue 21 item 5: a resumed (here already finished) run adds its seconds to the first run's.
    assert entry.main(pipeline_args(data.root, out, "2e-3")) == 0
    resumed = pd.read_parquet(out / layout.SUMMARY_FILE)
    runs = json.loads((out / "digits" / "wall_time.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0] == pytest.approx(first["wall_seconds"].iloc[0])
    assert resumed["wall_seconds"].iloc[0] == pytest.approx(sum(runs))
    assert resumed["wall_seconds"].iloc[0] > first["wall_seconds"].iloc[0]
