"""Merged biases of bias-less layers folded into the BatchNorm that reads them (docs/method.md §7)."""

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from glora_ray import SearchSpace, Supernet, load_merged_state_dict
from glora_ray.backbone import BackboneConfig
from glora_ray.checkpoint import SupernetSpec
from glora_ray.data import DataConfig
from glora_ray.data.vtab import preprocess_image
from helpers import logged, randomize_adapters


def randomize_norm_statistics(model, seed):
    """Non-trivial running statistics, so a wrong running mean shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)


def tiny_cnn(seed, num_classes=3):
    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    randomize_norm_statistics(model, seed)
    return model


def with_e_and_c(net, genes):
    """``genes`` with E and C (the terms that give a bias-less layer a bias) chosen on every layer."""
    layers = net.decode(genes)
    return net.to_genes({n: {**c, "C": "vector", "E": "vector"} for n, c in layers.items()})


@pytest.fixture(scope="module")
def cnn_supernet():
    net = Supernet(tiny_cnn(1), SearchSpace((4, 2)), layer_types=("conv2d",))
    randomize_adapters(net, seed=5)
    return net.eval()


def test_cnn_merged_state_loads_strictly_into_plain_timm(cnn_supernet):
    net = cnn_supernet
    norm_state = {k: v.clone() for k, v in net.model.state_dict().items() if "running" in k or "num_batches" in k}
    assert all(net.layer(n).base.bias is None for n in net.layer_names)  # timm's convs: none has a bias
    plan = net.fold_plan()
    assert len(plan.into_norm) == net.num_layers and not plan.kept and not plan.cancelled
    assert plan.into_norm["conv_stem"] == "bn1" and plan.into_norm["blocks.0.0.conv_dw"] == "blocks.0.0.bn1"
    assert net.fold_plan() is plan  # traced once
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(0)
    for genes in (net.largest_subnet(), with_e_and_c(net, net.sample_genes(rng))):
        state = net.merged_state_dict(genes)
        assert net.added_bias_keys(state) == []
        fresh = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
        fresh.load_state_dict(state, strict=True)
        net.set_subnet(genes)
        with torch.no_grad():
            want, got, again = net(x), fresh.eval()(x), net.merged(genes).eval()(x)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-5 * scale and (again - want).abs().max() <= 1e-5 * scale
        # The fold matters: the same weights without it (bias dropped, running means kept) differ.
        unfolded = {k: v for k, v in state.items() if not k.endswith("running_mean")}
        fresh.load_state_dict({**unfolded, **{k: v for k, v in norm_state.items() if k.endswith("running_mean")}})
        with torch.no_grad():
            assert (fresh(x) - want).abs().max() > 1e-2 * scale
    after = net.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in norm_state.items()), "a supernet statistic changed"
    assert not net.training and all(not m.training for m in net.modules())


def test_evaluator_merge_path_gives_the_export_accuracy(cnn_supernet):
    from glora_ray.search.evaluator import MergedModel

    net = cnn_supernet
    evaluator_model = MergedModel(net, tiny_cnn(8))  # adds biases internally; the export folds them
    genes = with_e_and_c(net, net.sample_genes(np.random.default_rng(3)))
    evaluator_model.load(genes)
    exported = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    exported.load_state_dict(net.merged_state_dict(genes), strict=True)
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    with torch.no_grad():
        evaluated, plain = evaluator_model(x), exported(x)
    assert (evaluated - plain).abs().max() <= 1e-4 * plain.abs().max()  # two float orders, 49 layers deep
    assert torch.equal(evaluated.argmax(-1) == labels, plain.argmax(-1) == labels)


def test_export_of_a_cnn_loads_with_plain_load_state_dict(cnn_supernet, tmp_path):
    from glora_ray.pipeline.export import export_winner

    net = cnn_supernet
    spec = SupernetSpec(BackboneConfig(name="tf_efficientnet_lite0", img_size=32), num_classes=3, ranks=(4, 2),
                        dataset="digits")
    genes = with_e_and_c(net, net.largest_subnet())
    data = DataConfig(str(tmp_path), "digits", 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    paths = export_winner(net, spec, genes, str(tmp_path), data, val_acc=0.5)
    import json

    record = json.loads((tmp_path / "subnet.json").read_text())
    assert record["loader"] == "load_state_dict" and record["added_bias_keys"] == []
    assert record["preprocessing"] == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                       "crop": None}
    model = timm.create_model(record["model"], **record["create_model_kwargs"]).eval()
    model.load_state_dict(load_file(paths.merged_uri), strict=True)
    net.set_subnet(genes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        assert (model(x) - want).abs().max() <= 1e-5 * want.abs().max()

    # The loader beside the export, in a process that never imports glora_ray: model and transform.
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    script = ("import sys, torch; from PIL import Image; from load_winner import load_winner; "
              f"model, transform = load_winner({str(tmp_path)!r}); "
              f"logits = model(transform(Image.open({str(image)!r})).unsqueeze(0)); "
              "assert 'glora_ray' not in sys.modules; torch.save(logits.detach(), sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = preprocess_image(Image.open(image), 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
    with torch.no_grad():
        want = net(torch.from_numpy(pixels)[None])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-4, atol=1e-5)


class Branches(nn.Module):
    """Every way a bias-less layer's output can reach (or miss) a BatchNorm."""

    def __init__(self):
        super().__init__()
        conv = lambda: nn.Conv2d(4, 4, 1, bias=False)  # noqa: E731
        self.stem, self.bn_stem = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.to_plain_norm, self.bn_plain = conv(), nn.BatchNorm2d(4, affine=False)
        self.through_identity, self.identity, self.bn_identity = conv(), nn.Identity(), nn.BatchNorm2d(4)
        self.to_batch_stats, self.bn_batch = conv(), nn.BatchNorm2d(4, track_running_stats=False)
        self.also_residual, self.bn_residual = conv(), nn.BatchNorm2d(4)
        self.act_first, self.bn_after_act = conv(), nn.BatchNorm2d(4)
        self.shared_a, self.shared_b, self.bn_shared = conv(), conv(), nn.BatchNorm2d(4)
        self.with_bias, self.bn_with_bias = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.bn_fc = nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn_stem(self.stem(x))
        x = self.bn_plain(self.to_plain_norm(x))
        x = self.bn_identity(self.identity(self.through_identity(x)))
        x = self.bn_batch(self.to_batch_stats(x))
        y = self.also_residual(x)
        x = self.bn_residual(y) + y
        x = self.bn_after_act(torch.relu(self.act_first(x)))
        x = self.bn_shared(self.shared_a(x)) + self.bn_shared(self.shared_b(x))
        x = self.bn_with_bias(self.with_bias(x))
        return self.head(self.bn_fc(self.fc(x.mean(dim=(2, 3)))))


def branches_supernet():
    torch.manual_seed(0)
    model = Branches()
    randomize_norm_statistics(model, 0)
    net = Supernet(model, SearchSpace((2,)), layer_types=("conv2d", "linear"))
    randomize_adapters(net, seed=1)
    return net.eval()


def test_fold_plan_follows_the_tensors_not_the_names():
    net = branches_supernet()
    x = torch.randn(4, 3, 5, 5)
    with logged("glora_ray.fold") as records:
        untraced = net.fold_plan()  # not a timm model: no input size to trace with
    assert any("no example input" in r.getMessage() for r in records)
    assert len(untraced.kept) == 9 and not untraced.into_norm
    with logged("glora_ray.fold") as records:
        plan = net.fold_plan(example_input=x[:2])
    assert plan.into_norm == {"stem": "bn_stem", "to_plain_norm": "bn_plain", "through_identity": "bn_identity",
                              "fc": "bn_fc"}
    assert plan.cancelled == {"to_batch_stats"}  # batch statistics cancel a per-channel constant
    assert set(plan.kept) == {"also_residual", "act_first", "shared_a", "shared_b"}  # "with_bias" has its own
    assert any("load_merged_state_dict" in r.getMessage() for r in records)
    genes = with_e_and_c(net, net.largest_subnet())
    state = net.merged_state_dict(genes)
    assert sorted(net.added_bias_keys(state)) == sorted(f"{n}.bias" for n in plan.kept)
    fresh = Branches().eval()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(state, strict=True)
    load_merged_state_dict(fresh, state)
    net.set_subnet(genes)
    with torch.no_grad():
        want = net(x)
        for got in (fresh(x), net.merged(genes).eval()(x)):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # No E or C where no fold exists: the state loads strictly into the unmodified class.
    layers = net.decode(genes)
    kept_plain = net.to_genes({n: {**c, "C": "none", "E": "none"} if n in plan.kept else c for n, c in layers.items()})
    state = net.merged_state_dict(kept_plain)
    assert net.added_bias_keys(state) == []
    Branches().load_state_dict(state, strict=True)
