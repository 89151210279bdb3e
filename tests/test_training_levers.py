"""Issue 19's training levers, Ray-free: subnets drawn within the budget, the sandwich rule,
in-place distillation and a training that starts from a trained supernet (stage-3 retraining)."""
import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glora_ray.checkpoint import SupernetSpec, save_supernet
from glora_ray.space import Kind
from glora_ray.train import SupernetTraining, TrainConfig, TrainConfigError, subnet_for_step
from glora_ray.train.loop import build_optimizer, build_scheduler, WarmupCosine, soft_cross_entropy, train_epoch
from glora_ray.train.loop import training_compute
from glora_ray.train.sampling import StepSubnets, edge_subnets
from helpers import make_spec, tiny_supernet

WINDOW_FRACTION = (0.2, 0.35)  # of the space's reachable maximum: a window well inside the range


def window_of(counter) -> tuple[int, int]:
    top = counter.max_params
    return int(top * WINDOW_FRACTION[0]), int(top * WINDOW_FRACTION[1])


def batches(n: int = 2, size: int = 8, classes: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=gen), torch.randint(0, classes, (size,), generator=gen))
            for _ in range(n)]


def one_epoch(net, cfg: TrainConfig, data) -> None:
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, WarmupCosine.from_config(cfg, len(data)))
    subnets = StepSubnets.from_config(net.counter, cfg)
    train_epoch(net, data, optimizer, scheduler, 0, cfg.seed, "cpu", subnets=subnets, distill=cfg.distill)


def test_budget_sampling_draws_every_subnet_within_the_window_from_seed_and_step():
    net = tiny_supernet()
    lo, hi = window_of(net.counter)
    draws = StepSubnets.from_config(net.counter, TrainConfig(subnet_sampling="budget", budget=(lo, hi)))
    counts = [net.counter.count(draws.for_step(step)[0]) for step in range(60)]
    assert all(lo <= c <= hi for c in counts)
    # What every worker draws: a fresh sampler, asked for step 7 alone, draws what this one drew.
    fresh = StepSubnets.from_config(net.counter, TrainConfig(subnet_sampling="budget", budget=(lo, hi)))
    assert net.counter.count(fresh.for_step(7)[0]) == counts[7]
    np.testing.assert_array_equal(fresh.for_step(7)[0], draws.for_step(7)[0])
    assert any(not np.array_equal(draws.for_step(7)[0], draws.for_step(s)[0]) for s in range(8, 12))
    uniform = [net.counter.count(subnet_for_step(0, step, net)) for step in range(60)]
    assert sum(not lo <= c <= hi for c in uniform) > 20  # the paper's draws mostly miss this window


def test_uniform_sampling_is_the_papers_draw():
    net = tiny_supernet()
    draws = StepSubnets.from_config(net.counter, TrainConfig())
    for step in (0, 3, 11):
        np.testing.assert_array_equal(draws.for_step(step)[0], subnet_for_step(0, step, net))


def test_a_sandwich_step_trains_the_largest_and_smallest_subnet_within_the_budget_and_n_drawn_ones():
    net = tiny_supernet()
    lo, hi = window_of(net.counter)
    draws = StepSubnets.from_config(net.counter, TrainConfig(sandwich=2, subnet_sampling="budget", budget=(lo, hi)))
    step = draws.for_step(5)
    assert len(step) == 4 and draws.per_step == 4
    counts = [net.counter.count(g) for g in step]
    assert all(lo <= c <= hi for c in counts)
    assert counts[0] >= hi - (hi - lo) * 0.05 and counts[1] <= lo + (hi - lo) * 0.05  # the window's edges
    largest, smallest = edge_subnets(net.counter, lo, hi, seed=0)
    np.testing.assert_array_equal(step[0], largest)
    np.testing.assert_array_equal(step[1], smallest)
    np.testing.assert_array_equal(draws.for_step(6)[0], largest)  # fixed for the run


def _largest_lora_columns(net, genes) -> list[torch.Tensor]:
    """Per layer where ``genes`` give A or B its largest LoRA: the last column of that down factor,
    which no other form reads (docs/method.md §1.3)."""
    columns = []
    for layer, choices in zip(net.layers(), net.layer_choices(genes)):
        for tensor, choice in zip("AB", choices[:2]):
            if choice.kind is Kind.LORA and choice.rank == net.space.max_rank:
                columns.append(getattr(layer.glora, f"{tensor}_down")[:, -1])
    return columns


def test_the_sandwich_step_updates_the_largest_subnets_tensors():
    net = tiny_supernet()
    lo, hi = window_of(net.counter)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, lr=1e-2, sandwich=1, subnet_sampling="budget", budget=(lo, hi))
    largest, _ = edge_subnets(net.counter, lo, hi, seed=0)
    columns = _largest_lora_columns(net, largest)
    assert len(columns) >= 3 and all(bool((c == 0).all()) for c in columns)  # zero-initialised
    one_epoch(net, cfg, batches(n=1))
    assert all(bool((c != 0).any()) for c in columns)
    # One plain step draws one random subnet, which leaves some of these tensors untouched.
    plain = tiny_supernet()
    one_epoch(plain, replace(cfg, sandwich=0, subnet_sampling="uniform"), batches(n=1))
    assert not all(bool((c != 0).any()) for c in _largest_lora_columns(plain, largest))


def test_in_place_distillation_teaches_the_other_subnets_the_largest_ones_soft_labels():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(labels, 5).float()), F.cross_entropy(logits, labels))
    net_a, net_b = tiny_supernet(), tiny_supernet()
    lo, hi = window_of(net_a.counter)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, lr=1e-2, sandwich=1, subnet_sampling="budget", budget=(lo, hi))
    data = batches(n=2)
    one_epoch(net_a, cfg, data)
    one_epoch(net_b, replace(cfg, distill=True), data)
    a, b = net_a.adapter_state_dict(), net_b.adapter_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the soft labels changed what was learnt
    with pytest.raises(TrainConfigError, match="distill=True needs a sandwich"):
        TrainConfig(distill=True).validate()
    with pytest.raises(TrainConfigError, match="set budget="):
        StepSubnets.from_config(net_a.counter, TrainConfig(sandwich=2))


def test_fixed_subnet_trainings_drop_the_supernets_sampling_settings():
    cfg = TrainConfig(sandwich=2, distill=True, subnet_sampling="budget", budget=(10, 20))
    fixed = cfg.for_fixed_subnet("r4r2:000", epochs=7)
    assert (fixed.fixed_subnet, fixed.epochs, fixed.sandwich, fixed.distill, fixed.subnet_sampling, fixed.budget) == (
        "r4r2:000", 7, 0, False, "uniform", None)
    assert cfg.needs_budget and not fixed.needs_budget


def test_training_compute_counts_every_pass_of_a_sandwich():
    history = [{"images": 64, "passes": 4, "seconds": 1.5}, {"images": 64, "passes": 4, "seconds": 0.5}]
    assert training_compute(history) == {"train_images": 512.0, "train_seconds": 2.0}


def test_a_training_started_from_a_supernet_checkpoint_leaves_that_checkpoint_untouched(tmp_path):
    spec = make_spec(num_classes=5)
    trained = spec.build()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in trained.adapter_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
    save_supernet(tmp_path / "supernet", trained, spec)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "supernet").iterdir()}

    data = [(images, labels) for images, labels in batches(n=2, size=8)]
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    genes = trained.largest_subnet()
    cfg = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, num_workers=0, init_from=str(tmp_path / "supernet"),
                      fixed_subnet=trained.subnet_key(genes))
    training = SupernetTraining(spec.build(), dataset, cfg, "cpu", init_spec=spec).setup()
    start = training.supernet.adapter_state_dict()
    assert all(torch.equal(start[k], v) for k, v in trained.adapter_state_dict().items())  # starts from it
    training.run()
    assert any(not torch.equal(training.supernet.adapter_state_dict()[k], v) for k, v in trained.adapter_state_dict().items())
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "supernet").iterdir()}
    other = SupernetSpec(**{**spec.__dict__, "ranks": (2,)})
    with pytest.raises(Exception, match="ranks"):
        SupernetTraining(other.build(), dataset, replace(cfg, fixed_subnet=None), "cpu", init_spec=other).setup()
