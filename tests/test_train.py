"""Stage 1: the Ray-free loop, local-mode jobs, and a real 2-worker DDP job on the digits."""
import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from glora_ray import storage as stored
from glora_ray.backbone import BackboneConfig, BackboneError
from glora_ray.checkpoint import CheckpointMismatchError, SupernetSpec, load_supernet, save_supernet
from glora_ray.data import DataConfig, DataError, write_digits_dataset
from glora_ray.errors import GLoRARayError
from glora_ray.train import (
    SupernetTraining,
    TrainConfig,
    TrainConfigError,
    WarmupCosine,
    build_scheduler,
    expected_epoch_digest,
    load_training_state,
    subnet_for_step,
    train_supernet,
)
from glora_ray.train.job import prepare_spec
from helpers import injected_faults, logged

# One 16x16 patch per 16-px digit and mean pooling: even a random frozen ViT then carries enough
# of the image for the head and adapters to learn in a few epochs.
TINY = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=16, drop_path_rate=0.1,
    model_kwargs=dict(patch_size=16, depth=2, embed_dim=64, num_heads=2, global_pool="avg"),
)


def make_spec(**overrides) -> SupernetSpec:
    return SupernetSpec(**{"backbone": copy.deepcopy(TINY), "num_classes": 10, "ranks": (4, 2), **overrides})


def quick(**overrides) -> TrainConfig:
    settings = dict(epochs=3, lr=1e-2, warmup_epochs=1, batch_size=64, checkpoint_every=1, num_workers=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    write_digits_dataset(root)
    return str(root)


@pytest.fixture(scope="module")
def data(digits_root) -> DataConfig:
    return DataConfig(digits_root, "digits", img_size=16)


@pytest.fixture(scope="module")
def train800(data):
    return data.build("train800")


def eval_outputs(supernet, subnets, x):
    supernet.eval()
    outputs = []
    with torch.no_grad():
        for genes in subnets:
            supernet.set_subnet(genes)
            outputs.append(supernet(x))
    return torch.stack(outputs)


# -- the pieces ---------------------------------------------------------------------------------
def test_subnet_per_step_is_a_function_of_seed_and_step():
    net = make_spec().build_empty()
    global_state = np.random.get_state()[1].copy()
    a = subnet_for_step(0, 5, net)
    np.testing.assert_array_equal(a, subnet_for_step(0, 5, net))
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)  # no global RNG
    assert not np.array_equal(a, subnet_for_step(0, 6, net))
    assert not np.array_equal(a, subnet_for_step(1, 5, net))
    per_layer = a.reshape(net.num_layers, -1)
    assert len({tuple(row) for row in per_layer}) > 1  # every layer draws its own choice
    steps = np.stack([subnet_for_step(0, s, net) for s in range(200)])
    for gene, card in enumerate(net.space.gene_cardinalities(net.num_layers)):
        assert set(steps[:, gene]) == set(range(card))  # every choice of every gene is drawn


def test_warmup_cosine_schedule_drives_the_optimizer():
    schedule = WarmupCosine.from_config(
        TrainConfig(epochs=10, warmup_epochs=2, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5), steps_per_epoch=5
    )
    assert schedule.lr_at(0) == pytest.approx(1e-6) and schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(50) == pytest.approx(1e-5) and schedule.lr_at(80) == pytest.approx(1e-5)
    assert schedule.lr_at(5) == pytest.approx((1e-6 + 1e-3) / 2)
    after = [schedule.lr_at(s) for s in range(10, 51)]
    assert all(x >= y for x, y in zip(after, after[1:]))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = build_scheduler(optimizer, schedule)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(step))
        optimizer.step()
        scheduler.step()


def test_train_config_checks():
    quick().validate()
    with pytest.raises(TrainConfigError, match="batch_size=63 .* over 2 worker"):
        quick(batch_size=63, num_workers=2).validate()
    with pytest.raises(TrainConfigError, match="never train on 'test'"):
        quick(split="test").validate()
    with pytest.raises(TrainConfigError, match="gpus_per_worker=0.5 needs use_gpu=True"):
        quick(gpus_per_worker=0.5).validate()
    with pytest.raises(TrainConfigError, match=r"unknown training setting\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1.0})
    assert quick(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2).resources_per_worker() == {
        "CPU": 2, "GPU": 0.25,
    }
    assert TrainConfig.from_dict(quick(lr=3e-3).to_dict()) == quick(lr=3e-3)


# -- the Ray-free loop --------------------------------------------------------------------------
def test_loop_learns_and_trains_only_adapters_and_head(train800):
    spec = make_spec()
    training = SupernetTraining(spec.build(), train800, quick(epochs=4), "cpu").setup()
    frozen = {k: v.clone() for k, v in training.supernet.state_dict().items() if ".glora." not in k
              and not k.startswith("model.head.")}
    adapters = {k: v.clone() for k, v in training.supernet.adapter_state_dict().items()}
    history = training.run().history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and training.state.step == 4 * 12
    assert history[-1]["loss"] < 0.6 * history[0]["loss"] and history[-1]["train_acc"] > 0.7
    after = training.supernet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    changed = [k for k, v in training.supernet.adapter_state_dict().items() if not torch.equal(adapters[k], v)]
    assert any(".glora.A_down" in k for k in changed) and "head.weight" in changed
    for h in history:
        assert h["subnet_digests"] == [expected_epoch_digest(0, h["step"] - h["steps"], h["steps"], training.supernet)]
        assert h["images"] == 12 * 64 and h["images_per_s"] > 0 and h["lr"] > 0


def test_resumed_loop_matches_an_uninterrupted_one_exactly(train800, tmp_path):
    spec, cfg = make_spec(), quick(epochs=3)
    full = SupernetTraining(spec.build(), train800, cfg, "cpu").setup()
    full.run()
    first = SupernetTraining(spec.build(), train800, cfg, "cpu").setup()
    first.run_epoch()
    first.save(tmp_path)
    resumed = SupernetTraining(spec.build(), train800, cfg, "cpu").setup(load_training_state(tmp_path))
    assert resumed.resumed_from_step == 12 and resumed.state.epoch == 1
    resumed.run()
    for key, value in full.supernet.adapter_state_dict().items():
        torch.testing.assert_close(resumed.supernet.adapter_state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert [h["loss"] for h in resumed.state.history] == [h["loss"] for h in full.state.history]


def test_saved_supernet_reproduces_outputs_and_refuses_a_mismatch(data, train800, tmp_path):
    spec = prepare_spec(make_spec(), data, quick())
    training = SupernetTraining(spec.build(), train800, quick(epochs=2), "cpu").setup()
    training.run()
    save_supernet(tmp_path / "sn", training.supernet, spec)
    loaded, loaded_spec = load_supernet(tmp_path / "sn", expected=spec)
    assert loaded_spec.dataset == "digits" and loaded_spec.extra["data"]["img_size"] == 16
    rng = np.random.default_rng(0)
    subnets = [training.supernet.largest_subnet()] + [training.supernet.sample_genes(rng) for _ in range(4)]
    x = torch.stack([train800[i][0] for i in range(6)])
    trained = eval_outputs(training.supernet, subnets, x)
    torch.testing.assert_close(eval_outputs(loaded, subnets, x), trained, rtol=0, atol=1e-6)
    untrained = eval_outputs(spec.build(), subnets, x)
    assert (untrained - trained).abs().max() > 0.1
    for wrong, field in [(dict(ranks=(8, 4)), "ranks"), (dict(dataset="cifar"), "dataset"),
                         (dict(num_classes=100), "num_classes"), (dict(forms={"B": ("lora", "none")}), "forms")]:
        expected = replace(spec, **wrong)
        with pytest.raises(CheckpointMismatchError, match=field):
            load_supernet(tmp_path / "sn", expected=expected)
    narrow = replace(spec, forms={"B": ("lora", "none")})
    assert SupernetSpec.from_dict(json.loads(json.dumps(narrow.to_dict()))).space == narrow.space != spec.space


# -- train_supernet without workers: local mode --------------------------------------------------
@pytest.mark.parametrize("where", ["path", "uri"])
def test_local_mode_job_saves_and_resumes_on_rerun(data, tmp_path, where):
    # A URI (an in-memory fsspec filesystem here; s3:// in test_cluster) holds the checkpoints too.
    storage = str(tmp_path / "runs") if where == "path" else f"memory://{tmp_path.name}/runs"
    threads = torch.get_num_threads()
    first = train_supernet(make_spec(), data, quick(epochs=2), storage, "local")
    assert torch.get_num_threads() == threads
    assert first.resumed_from_step is None and [h["epoch"] for h in first.history] == [0, 1]
    assert first.checkpoint_dir == f"{storage}/local/supernet"
    assert stored.read_json(stored.join(first.checkpoint_dir, "history.json")) == first.history
    assert [name for name, _ in stored.list_dir(f"{storage}/local/local_checkpoints")] == [
        "checkpoint_epoch_000001", "checkpoint_epoch_000002"]
    supernet, spec = load_supernet(first.checkpoint_dir, expected=first.spec)
    assert spec.dataset == "digits"

    second = train_supernet(make_spec(), data, quick(epochs=3), storage, "local")
    assert second.resumed_from_step == 24 and second.final_step == 36
    assert second.history[:2] == first.history and second.history[2]["epoch"] == 2
    # Rerunning the finished run returns it as stored: no training, no Ray checkpoint touched.
    third = train_supernet(make_spec(), data, quick(epochs=3), storage, "local")
    assert third.ray_checkpoint_path is None and third.history == second.history
    assert third.checkpoint_dir == second.checkpoint_dir
    # The same name for another space is refused before anything runs.
    with pytest.raises(CheckpointMismatchError, match="ranks"):
        train_supernet(make_spec(ranks=(8, 4)), data, quick(epochs=3), storage, "local")


def test_bad_input_fails_before_training(data, digits_root, tmp_path):
    storage = tmp_path / "runs"

    def refused(exc, match, spec=None, data_cfg=data, cfg=None):
        with pytest.raises(exc, match=match):
            train_supernet(spec or make_spec(), data_cfg, cfg or quick(), str(storage), "bad")
        assert not (storage / "bad").exists()  # refused before anything was written

    refused(TrainConfigError, "num_classes=5 but dataset 'digits' has 10", spec=make_spec(num_classes=5))
    refused(TrainConfigError, "img_size=16 but data img_size=32", data_cfg=DataConfig(digits_root, "digits", 32))
    refused(BackboneError, "unknown timm model", spec=make_spec(backbone=BackboneConfig(name="vit_nope", img_size=16)))
    missing = BackboneConfig(**{**TINY.to_dict(), "checkpoint_path": str(tmp_path / "vit.pth")})
    refused(BackboneError, "does not exist", spec=make_spec(backbone=missing))
    refused(TrainConfigError, "no full batch of 1024", cfg=quick(batch_size=1024))
    refused(DataError, "data root", data_cfg=DataConfig(str(tmp_path / "none"), "digits", 16))
    refused(GLoRARayError, "keys start with", cfg=quick(fixed_subnet="00"))  # a fixed subnet of another space
    # A broken list line in the training split names its file and line.
    root = tmp_path / "copy"
    write_digits_dataset(root)
    lines = (root / "digits" / "train800.txt").read_text().splitlines()
    lines[41] = lines[41].rpartition(" ")[0] + " 10"
    (root / "digits" / "train800.txt").write_text("\n".join(lines) + "\n")
    refused(DataError, r"train800\.txt:42: label 10 out of range 0\.\.9", data_cfg=DataConfig(str(root), "digits", 16))


# -- a real Ray Train job: 2 DDP workers on the CPU ---------------------------------------------
# One fit (each costs 15-25 s of Ray start-up on 2 cores, more while the box is busy): it fails in
# epoch 1 and FailureConfig restarts the worker group from the epoch-0 checkpoint.  Resuming a
# rerun of the same name goes through the same ray.train.get_checkpoint path (tested in local
# mode above, where the job keeps its own checkpoints).
@pytest.fixture(scope="module")
def ddp_run(ray_local, data, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("ddp"))
    cfg = quick(epochs=3, num_workers=2, max_failures=1)
    with injected_faults(train_step=15):
        return train_supernet(make_spec(), data, cfg, storage, "sn")


@pytest.mark.slow
def test_ddp_workers_learn_and_draw_identical_subnets(ddp_run):
    net = make_spec().build_empty()
    assert [h["epoch"] for h in ddp_run.history] == [0, 1, 2]
    for h in ddp_run.history:
        assert h["world_size"] == 2 and h["images"] == 12 * 64  # global batch 64 = 2 x 32
        expected = expected_epoch_digest(0, h["step"] - h["steps"], h["steps"], net)
        assert h["subnet_digests"] == [expected, expected]  # rank 0 and rank 1, every step
        assert h["lr"] > 0 and h["images_per_s"] > 0
    assert len({h["subnet_digests"][0] for h in ddp_run.history}) == 3
    assert ddp_run.history[-1]["loss"] < 0.6 * ddp_run.history[0]["loss"]
    assert ddp_run.history[-1]["train_acc"] > ddp_run.history[0]["train_acc"]


@pytest.mark.slow
def test_failed_worker_is_retried_from_its_checkpoint(ddp_run):
    # The injected failure hit step 15 (epoch 1); the retry started from the end of epoch 0.
    assert ddp_run.resumed_from_step == 12 and ddp_run.final_step == 36
    assert json.loads((Path(ddp_run.checkpoint_dir) / "history.json").read_text()) == ddp_run.history
    assert Path(ddp_run.ray_checkpoint_path).parent == Path(ddp_run.run_dir)


@pytest.mark.slow
def test_ddp_checkpoint_reloads_to_the_trained_supernet(ddp_run, train800):
    loaded, spec = load_supernet(ddp_run.checkpoint_dir, expected=ddp_run.spec)
    # The same adapters straight from the last Ray Train checkpoint that rank 0 wrote.
    reference = spec.build()
    reference.load_adapter_state_dict(load_training_state(ddp_run.ray_checkpoint_path)["adapters"])
    rng = np.random.default_rng(1)
    subnets = [loaded.largest_subnet()] + [loaded.sample_genes(rng) for _ in range(4)]
    x = torch.stack([train800[i][0] for i in range(8)])
    outputs = eval_outputs(loaded, subnets, x)
    torch.testing.assert_close(outputs, eval_outputs(reference, subnets, x), rtol=0, atol=0)
    assert (eval_outputs(spec.build(), subnets, x) - outputs).abs().max() > 0.1


@pytest.mark.slow
def test_a_deleted_newest_checkpoint_falls_back_to_the_intact_one(ddp_run, data, tmp_path):
    # Ray Train's record then names a folder that is gone (it refused to start at all before).
    import shutil

    run_dir = tmp_path / "sn"
    shutil.copytree(ddp_run.run_dir, run_dir)
    folders = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    shutil.rmtree(folders[-1])
    shutil.rmtree(run_dir / "supernet")  # as if killed before the end
    with logged() as records:
        resumed = train_supernet(make_spec(), data, quick(epochs=4, num_workers=2, max_failures=1), str(tmp_path), "sn")
    messages = [r.getMessage() for r in records]
    assert any("names checkpoint(s)" in m and f"resuming from the newest intact checkpoint, {folders[-2]}" in m
               for m in messages), messages
    assert resumed.resumed_from_step == 24 and [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == ddp_run.history[:2]  # the intact checkpoint's epochs, as trained


def test_a_worker_group_the_cluster_cannot_hold_is_refused(ray_local, data, tmp_path):
    # Ray Train would otherwise wait forever for resources that never come.
    storage = tmp_path / "runs"
    with pytest.raises(TrainConfigError, match="3 worker.* = 3 CPU, but the Ray cluster has 2"):
        train_supernet(make_spec(), data, quick(num_workers=3, batch_size=48), str(storage), "big")
    with pytest.raises(TrainConfigError, match="GPU, but the Ray cluster has 0"):
        train_supernet(make_spec(), data, quick(num_workers=1, use_gpu=True), str(storage), "gpu")
    assert not storage.exists()


# -- a frozen CNN backbone ------------------------------------------------------------------------
def _bn_buffers(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def test_an_epoch_leaves_batchnorm_statistics_bit_equal():
    """docs/method.md §7: training adapters on convolutions keeps the frozen backbone's norm layers
    in eval mode, so their running statistics do not move, while the adapters do."""
    from torch import nn

    from glora_ray.data import ArrayDataset
    from glora_ray.space import SearchSpace
    from glora_ray.supernet import Supernet

    def cnn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.standard_normal((32, 3, 8, 8), dtype=np.float32), rng.integers(0, 3, 32))
    supernet = Supernet(cnn(), SearchSpace((2,)), layer_types=("conv2d",), generator=torch.Generator().manual_seed(0))
    assert supernet.num_layers == 2
    statistics, adapters = _bn_buffers(supernet.model), copy.deepcopy(supernet.adapter_state_dict())
    training = SupernetTraining(supernet, dataset, quick(epochs=1, warmup_epochs=0, batch_size=8, lr=1e-2), "cpu")
    training.run()
    assert training.state.step == 4
    for key, value in _bn_buffers(supernet.model).items():
        assert torch.equal(value, statistics[key]), key
    assert any(not torch.equal(v, adapters[k]) for k, v in supernet.adapter_state_dict().items())
    # The check can fail: the same epoch with the norm layers in training mode moves them.
    plain_train = Supernet(cnn(), SearchSpace((2,)), layer_types=("conv2d",))
    nn.Module.train(plain_train)
    with torch.no_grad():
        plain_train(torch.from_numpy(dataset.images.numpy()[:8]))
    assert not torch.equal(_bn_buffers(plain_train.model)["1.running_mean"], statistics["1.running_mean"])
