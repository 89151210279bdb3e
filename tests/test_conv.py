"""GLoRAConv2d (docs/method.md §7) and supernets over convolutions."""
import numpy as np
import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from glora_ray import TENSORS, GLoRARayError, GLoRAConv2d, GLoRALinear, SearchSpace, Supernet, load_merged_state_dict
from helpers import offered_choices, randomize_adapters, spec_support, tiny_vit

# (name, constructor): every geometry the layer must reproduce.
CONVS = {
    "regular3x3_reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "pointwise": lambda: nn.Conv2d(16, 16, 1),  # LoRA B as two thin convs (cheaper than the kernel)
    "depthwise_strided_biasless": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
    "grouped_dilated_strided": lambda: nn.Conv2d(4, 8, (3, 2), stride=2, padding=(2, 1), dilation=2, groups=2),
    "tf_same_strided": lambda: Conv2dSame(4, 6, 3, stride=2),
}


def make_conv(name, space, seed=0):
    torch.manual_seed(seed)
    base = CONVS[name]()
    with torch.no_grad():
        if base.bias is not None:
            base.bias.normal_()
    layer = GLoRAConv2d(base, space)
    randomize_adapters(layer, seed)
    return layer


def spec_conv(layer, choice, x):
    """docs/method.md §7 written out: §1 over the (out, in/groups*kh*kw) view, run by the base's own forward."""
    s, base = layer.glora, layer.base
    w0 = base.weight.reshape(base.out_channels, -1)

    def support(tensor):
        value = spec_support(s, tensor, choice[tensor])
        return torch.zeros(()) if value is None else value

    A, B, C, D, E = (support(t) for t in TENSORS)
    b0 = base.bias if base.bias is not None else torch.zeros(base.out_channels)
    weight = (w0 + w0 * A + B).reshape(base.weight.shape)
    bias = b0 + b0 * D + E + (w0 @ C.expand(w0.shape[1], 1))[:, 0] * (choice["C"] != "none")
    return functional_call(base, {"weight": weight, "bias": bias}, (x,))


@pytest.mark.parametrize("name", list(CONVS))
def test_every_choice_matches_formula_merges_and_counts_its_gradients(name):
    space = SearchSpace((2,))
    layer = make_conv(name, space)
    base_before = {k: v.clone() for k, v in layer.base.state_dict().items()}
    with torch.no_grad():
        layer.base.weight.abs_().add_(0.1)  # no zero in W0, so W0 * A reaches every element of A
    x = torch.randn(1, layer.in_channels, 7, 6)
    kh, kw = layer.base.kernel_size
    assert (layer.d_in, layer.d_out) == (layer.in_channels // layer.groups * kh * kw, layer.out_channels)
    for choice in offered_choices(layer):  # without a bias, D is offered only as none (method §1.5)
        layer.set_choice(choice)
        layer.zero_grad(set_to_none=True)
        got = layer(x)
        if got.requires_grad:  # the all-none choice has nothing to train
            got.square().sum().backward()
        touched = sum(int((p.grad != 0).sum()) for p in layer.glora.parameters() if p.grad is not None)
        assert touched == layer.num_params() == layer.num_params(choice), choice  # every counted element learns
        with torch.no_grad():
            want = spec_conv(layer, choice, x)
            merged = layer.merged()
            merged_out = merged(x)
        assert type(merged) is type(layer.base)
        scale = want.abs().max().clamp_min(1e-12)
        assert (got - want).abs().max() / scale <= 1e-5, choice
        assert (merged_out - got).abs().max() / scale <= 1e-5, choice
    assert layer.base.weight.grad is None
    layer.base.weight.data.copy_(base_before["weight"])  # only the test itself changed W0
    assert all(torch.equal(v, layer.base.state_dict()[k]) for k, v in base_before.items()), "base changed"


@pytest.mark.parametrize("name", ["pointwise", "grouped_dilated_strided"])
def test_nested_ranks_and_fresh_layer(name):
    space = SearchSpace((4, 2))
    torch.manual_seed(3)
    base = CONVS[name]()
    fresh = GLoRAConv2d(base, space)
    x = torch.randn(1, base.in_channels, 7, 6)
    layer = make_conv(name, space, seed=2)
    with_rank4 = [c for c in space.iter_layer_choices() if "lora4" in c.values()]
    for choice in with_rank4:
        fresh.set_choice(choice)
        layer.set_choice(choice)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), base(x))  # every down factor, D and E start at zero
            got, want = layer(x), spec_conv(layer, choice, x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), choice


def test_counts_over_the_kernel_view():
    space = SearchSpace((4,))
    depthwise = GLoRAConv2d(nn.Conv2d(32, 32, 3, groups=32), space)
    largest = {"A": "lora4", "B": "lora4", "C": "lora4", "D": "vector", "E": "vector"}
    # d_in = 9: a rank-4 LoRA costs 4 * (9 + 32); C: 4 * 9 + 4; D, E: 32 each.
    assert depthwise.num_params(largest) == 2 * 4 * (9 + 32) + (4 * 9 + 4) + 2 * 32
    vectors = {"A": "vector", "B": "vector", "C": "vector", "D": "vector", "E": "vector"}
    assert depthwise.num_params(vectors) == 32 + 32 + 9 + 32 + 32
    linear_view = GLoRALinear(nn.Linear(9, 32), space)
    for choice in (largest, vectors):
        assert depthwise.num_params(choice) == linear_view.num_params(choice)


class ConvWeights(TorchFunctionMode):
    """Records the weight of every conv2d call."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.conv2d:
            self.weights.append(args[1])
        return func(*args, **(kwargs or {}))


def _conv_weights(layer, choice, x):
    layer.set_choice(choice)
    with ConvWeights() as recorder, torch.no_grad():
        layer(x)
    return recorder.weights


def test_per_row_a_and_b_never_rebuild_the_kernel():
    layer = GLoRAConv2d(nn.Conv2d(16, 16, 3, padding=1, groups=2), SearchSpace((4,)))
    x = torch.randn(1, 16, 6, 6)
    none = {t: "none" for t in TENSORS}
    w0 = layer.base.weight
    # Vector A scales the base output; scalar B is a window sum over each group: (groups, 1, kh, kw).
    weights = _conv_weights(layer, {**none, "A": "vector", "B": "scalar", "C": "vector"}, x)
    assert weights[0] is w0 and [tuple(w.shape) for w in weights[1:]] == [(2, 1, 3, 3)]
    # LoRA B beside the base: two thin convs, rank 4 per group, then a grouped 1x1.
    weights = _conv_weights(layer, {**none, "A": "scalar", "B": "lora4"}, x)
    assert weights[0] is w0 and [tuple(w.shape) for w in weights[1:]] == [(8, 8, 3, 3), (16, 4, 1, 1)]
    # A LoRA A needs the rebuilt kernel, and B is folded into it: one conv, not with W0.
    weights = _conv_weights(layer, {**none, "A": "lora4", "B": "vector"}, x)
    assert len(weights) == 1 and weights[0] is not w0 and weights[0].shape == w0.shape
    # Depthwise: a rank-4 LoRA beside the base would cost more than the kernel, so it is folded.
    depthwise = GLoRAConv2d(nn.Conv2d(8, 8, 3, groups=8), SearchSpace((4,)))
    weights = _conv_weights(depthwise, {**none, "B": "lora4"}, torch.randn(1, 8, 5, 5))
    assert len(weights) == 1 and weights[0] is not depthwise.base.weight


def tiny_cnn(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def test_layer_types_select_convs_by_type_and_name():
    space = SearchSpace((2,))
    with pytest.raises(GLoRARayError, match="match no nn.Linear"):  # the default adapts Linear layers only
        Supernet(tiny_cnn(), space)
    convs = Supernet(tiny_cnn(), space, layer_types=("conv2d",))
    assert convs.num_layers == 49 and all(isinstance(convs.layer(n), GLoRAConv2d) for n in convs.layer_names)
    both = Supernet(tiny_cnn(), space, layer_types=(nn.Conv2d, "linear"))
    assert both.layer_names == convs.layer_names  # the head, the only Linear, is never adapted
    depthwise = Supernet(tiny_cnn(), space, targets=r".*conv_dw", layer_types=("conv2d",))
    assert depthwise.num_layers == 16 and all(n.endswith("conv_dw") for n in depthwise.layer_names)
    dims = [(l.d_in, l.d_out) for l in depthwise.layers()]
    assert depthwise.counter.dims == dims and dims[0] == (9, 32)


def test_cnn_merged_equals_unmerged_and_loads_into_plain_timm():
    net = Supernet(tiny_cnn(seed=1), SearchSpace((4, 2)), layer_types=("conv2d",))
    randomize_adapters(net, seed=5)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    for genes in (net.largest_subnet(), net.sample_genes(np.random.default_rng(0))):
        net.set_subnet(genes)
        with torch.no_grad():
            want = net(x)
            plain = net.merged(genes).eval()
            fresh = tiny_cnn(seed=9)
            load_merged_state_dict(fresh, net.merged_state_dict(genes))
            got, again = plain(x), fresh.eval()(x)
        assert not any(isinstance(m, GLoRAConv2d) for m in plain.modules())
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale and (again - want).abs().max() <= 1e-4 * scale


def test_backbone_norm_statistics_never_change_in_training():
    net = Supernet(tiny_cnn(seed=2), SearchSpace((2,)), layer_types=("conv2d",))
    stats = {k: v.clone() for k, v in net.model.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(stats) == 3 * 49
    adapters_before = {k: v.clone() for k, v in net.adapter_state_dict().items()}
    optimizer = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    net.train()
    assert net.training and net.head.training
    for _ in range(3):
        net.set_subnet(net.sample_genes(rng))
        loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = net.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items()), "a running statistic changed"
    assert any(not torch.equal(v, net.adapter_state_dict()[k]) for k, v in adapters_before.items())
    # The same steps on the plain model in train mode do move them: the check can fail.
    plain = tiny_cnn(seed=2).train()
    plain(torch.randn(4, 3, 32, 32))
    assert not torch.equal(plain.bn1.running_mean, stats["bn1.running_mean"])


@pytest.mark.parametrize("strategy", ["per_candidate", "just_in_time", "batched"])
def test_every_merge_strategy_computes_the_subnet_on_a_cnn(strategy):
    # Just in time is the default on the CPU, where the embedded default (Lite0's convolutions, none
    # of them with a bias) is searched; batched groups the kernels by shape, depthwise ones included.
    from glora_ray.search.evaluator import MergedModel

    net = Supernet(tiny_cnn(seed=4), SearchSpace((2,)), targets=r"blocks\.[01]\..*|conv_stem", layer_types=("conv2d",))
    randomize_adapters(net, seed=6)
    net.eval()
    assert all(layer.base.bias is None for layer in net.layers())
    merged, reference = MergedModel(net, tiny_cnn(seed=8), strategy), MergedModel(net, tiny_cnn(seed=8))
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(1)
    for genes in (net.sample_genes(rng), net.sample_genes(rng), net.largest_subnet()):
        merged.load(genes)
        reference.load(genes)
        net.set_subnet(genes)
        with torch.no_grad():
            want, got = net(x), merged(x)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
            if strategy == "just_in_time":  # the same function as a per-candidate merge, bit for bit
                assert torch.equal(got, reference(x))


def test_no_searched_subnet_of_efficientnet_lite0_holds_a_parameter_that_changes_nothing():
    # docs/method.md §1.5: every counted tensor of a subnet acts.  Lite0's 49 convolutions have no
    # bias, so D is offered there only as none; in a ViT's biased linears D acts like the others.
    for net, x in ((Supernet(tiny_cnn(seed=5), SearchSpace((4, 2)), layer_types=("conv2d",)), torch.randn(2, 3, 32, 32)),
                   (Supernet(tiny_vit(), SearchSpace((4, 2))), torch.randn(2, 3, 16, 16))):
        randomize_adapters(net, seed=7)
        net.eval()
        inputs = {}  # a random input of each adapted layer's shape (real activations may be 0 at random init)
        hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, torch.randn_like(args[0])))
                 for name, layer in zip(net.layer_names, net.layers())]
        rng = np.random.default_rng(2)
        subnets = [net.decode(g) for g in [net.largest_subnet(), *(net.sample_genes(rng) for _ in range(3))]]
        for subnet in subnets:
            net.set_subnet(subnet)
            with torch.no_grad():
                net(x)
                for name, choice in subnet.items():
                    layer, out = net.layer(name), net.layer(name)(inputs[name])
                    for tensor in (t for t in TENSORS if choice[t] != "none"):  # each counted tensor, off
                        layer.set_choice({**choice, tensor: "none"})
                        assert not torch.equal(layer(inputs[name]), out), (name, tensor, choice[tensor])
                        layer.set_choice(choice)
        for hook in hooks:
            hook.remove()
        d_forms = {choice["D"] for subnet in subnets for choice in subnet.values()}
        biased = all(layer.base.bias is not None for layer in net.layers())
        assert d_forms == ({"vector", "scalar", "none"} if biased else {"none"}), d_forms
