import numpy as np
import pytest
import timm
import torch
from torch import nn

from glora_ray import GLoRALinear, GLoRARayError, GLoRARayTypeError, SearchSpace, SearchSpaceError, Supernet
from helpers import randomize_adapters, tiny_supernet, tiny_vit


def test_vit_base_has_48_layers_and_spec_count():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    net = Supernet(model, SearchSpace((4,)))
    assert net.num_layers == 48
    assert net.head_name == "head"
    assert net.num_params(net.largest_subnet()) == 1_603_776
    assert net.counter.max_params == 1_603_776
    assert net.head_num_params == 768 * 100 + 100
    suffixes = {n.split(".", 2)[2] for n in net.layer_names}
    assert suffixes == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}


def test_targets_select_layers_like_peft():
    net = Supernet(tiny_vit(), SearchSpace((2,)), targets=["qkv", "fc2"])
    assert all(n.endswith((".qkv", ".fc2")) for n in net.layer_names) and net.num_layers == 4
    net = Supernet(tiny_vit(), SearchSpace((2,)), targets=r"blocks\.0\..*")
    assert net.num_layers == 4 and all(n.startswith("blocks.0.") for n in net.layer_names)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        Supernet(tiny_vit(), SearchSpace((2,)), targets=["nothing_here"])


def test_only_adapters_and_head_train():
    net = tiny_supernet()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".glora." in n or n.startswith("model.head.") for n in trainable)
    assert "model.head.weight" in trainable
    n_adapter = sum(p.numel() for n, p in net.named_parameters() if ".glora." in n)
    assert sum(p.numel() for p in net.trainable_parameters()) == n_adapter + net.head_num_params


def test_supernet_count_matches_gradients_of_a_sampled_subnet():
    # An MLP with non-zero biases: in a fresh ViT zero biases leave D nothing to scale.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 9), nn.GELU(), nn.Linear(9, 4))
    net = Supernet(model, SearchSpace((4, 2)))
    randomize_adapters(net)
    rng = np.random.default_rng(0)
    x = torch.randn(7, 6)
    for _ in range(20):
        genes = net.sample_genes(rng)
        net.set_subnet(genes)
        net.zero_grad(set_to_none=True)
        out = net(x)
        out.square().sum().backward()
        touched = sum(int((p.grad != 0).sum()) for n, p in net.named_parameters() if ".glora." in n and p.grad is not None)
        assert touched == net.num_params(genes) == net.num_params()


def test_set_subnet_accepts_every_encoding():
    net = tiny_supernet()
    rng = np.random.default_rng(1)
    subnet = net.sample_subnet(rng)
    genes = net.to_genes(subnet)
    key = net.subnet_key(subnet)
    for form in (subnet, genes, list(genes), key):
        net.set_subnet(form)
        assert net.current_subnet() == subnet
    with pytest.raises(SearchSpaceError):
        net.set_subnet(genes[:-1])


def test_vit_end_to_end_merged_equals_unmerged_and_loads_in_timm():
    net = tiny_supernet(ranks=(4, 2))
    randomize_adapters(net, seed=3)
    net.eval()
    frozen = {k: v.clone() for k, v in net.model.state_dict().items() if ".glora." not in k}
    x = torch.randn(3, 3, 16, 16)
    rng = np.random.default_rng(7)
    for _ in range(4):
        subnet = net.sample_genes(rng)
        net.set_subnet(subnet)
        with torch.no_grad():
            want = net(x)
            plain = net.merged(subnet).eval()
            got = plain(x)
            fresh = tiny_vit()
            fresh.load_state_dict(net.merged_state_dict(subnet), strict=True)
            again = fresh.eval()(x)
        assert not any(isinstance(m, GLoRALinear) for m in plain.modules())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    # Merging did not touch the supernet's frozen weights (nor unwrap its layers).
    assert all(isinstance(net.layer(n), GLoRALinear) for n in net.layer_names)
    after = net.model.state_dict()
    assert frozen and all(torch.equal(v, after[k]) for k, v in frozen.items()), "a frozen weight changed"


def test_fresh_supernet_equals_backbone():
    backbone = tiny_vit(seed=4).eval()
    net = Supernet(tiny_vit(seed=4), SearchSpace((4, 2))).eval()
    x = torch.randn(2, 3, 16, 16)
    net.set_subnet(net.sample_genes(np.random.default_rng(0)))
    torch.testing.assert_close(net(x), backbone(x))


def test_adapter_state_saves_without_backbone_and_reloads(tmp_path):
    net = tiny_supernet(seed=1)
    randomize_adapters(net, seed=9)
    path = tmp_path / "adapters.safetensors"
    net.save_adapters(path, metadata={"model": "tiny"})
    state = net.adapter_state_dict()
    assert all(".glora." in k or k.startswith("head.") for k in state)
    assert not any(k.endswith("base.weight") for k in state)
    other = tiny_supernet(seed=1)
    meta = other.load_adapters(path)
    assert meta["model"] == "tiny"
    x = torch.randn(2, 3, 16, 16)
    subnet = net.sample_genes(np.random.default_rng(2))
    net.set_subnet(subnet), other.set_subnet(subnet)
    torch.testing.assert_close(other.eval()(x), net.eval()(x))
    with pytest.raises(SearchSpaceError, match="space"):
        Supernet(tiny_vit(seed=1), SearchSpace((8,))).load_adapters(path)


def test_arbitrary_model_without_timm_head_api():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    net = Supernet(model, SearchSpace((2,)))
    assert net.head_name == "4" and net.layer_names == ("0", "2")
    randomize_adapters(net)
    genes = net.sample_genes(np.random.default_rng(0))
    net.set_subnet(genes)
    x = torch.randn(5, 4)
    torch.testing.assert_close(net.merged(genes)(x), net(x), rtol=1e-5, atol=1e-6)


# -- misuse: refused with a GLoRARayError naming the argument and what is valid ----------------
def test_wrapping_a_supernet_is_refused():
    space = SearchSpace((2,))
    with pytest.raises(GLoRARayTypeError, match="already a Supernet"):
        Supernet(Supernet(tiny_vit(), space), space)


def test_adapting_one_model_twice_is_refused():
    model, space = tiny_vit(), SearchSpace((2,))
    Supernet(model, space)
    with pytest.raises(GLoRARayError, match="already holds GLoRA layers.*blocks.0.attn.qkv"):
        Supernet(model, space)
    assert not any(n.endswith(".base.base") for n, _ in model.named_modules())


def test_unknown_head_is_refused_naming_the_real_one():
    with pytest.raises(GLoRARayError, match=r"head 'nope' is not a module of VisionTransformer.*'head'"):
        Supernet(tiny_vit(), SearchSpace((2,)), head="nope")


def test_a_key_from_another_space_is_refused():
    small = Supernet(tiny_vit(), SearchSpace((4, 2)))
    large = Supernet(tiny_vit(), SearchSpace((8, 4)))
    key = small.subnet_key(small.largest_subnet())
    assert key.startswith("r4r2:") and np.array_equal(small.to_genes(key), small.largest_subnet())
    with pytest.raises(SearchSpaceError, match=r"not made for SearchSpace\(ranks=\(8, 4\)\).*'r8r4:'"):
        large.to_genes(key)
    with pytest.raises(SearchSpaceError, match="not made for"):
        large.set_subnet(key)


def test_unknown_layer_types_are_refused_naming_the_valid_ones():
    with pytest.raises(GLoRARayError, match=r"'conv3d' is not adaptable; valid are names \['conv2d', 'linear'\]"):
        Supernet(tiny_vit(), SearchSpace((2,)), layer_types=("conv3d",))
    with pytest.raises(GLoRARayTypeError, match="LayerNorm cannot be adapted"):
        Supernet(tiny_vit(), SearchSpace((2,)), layer_types=(nn.LayerNorm,))
    with pytest.raises(GLoRARayTypeError, match="non-empty sequence"):
        Supernet(tiny_vit(), SearchSpace((2,)), layer_types="linear")
