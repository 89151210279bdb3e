import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from glora_ray import TENSORS, GLoRALinear, GLoRARayError, GLoRARayTypeError, SearchSpace
from glora_ray.params import tensor_param_count
from helpers import offered_choices, randomize_adapters, spec_support

D_IN, D_OUT = 6, 5


def make_layer(space, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = GLoRALinear(nn.Linear(D_IN, D_OUT, bias=bias), space)
    randomize_adapters(layer, seed)
    return layer


def spec_forward(layer, choice, x):
    w0 = layer.base.weight
    b0 = layer.base.bias if layer.base.bias is not None else torch.zeros(D_OUT)
    A, B, C, D, E = (spec_support(layer.glora, t, choice[t]) for t in TENSORS)
    zero = torch.zeros(())
    w_eff = w0 + w0 * (A if A is not None else zero) + (B if B is not None else zero)
    b_eff = b0 + b0 * (D if D is not None else zero) + (E if E is not None else zero)
    if C is not None:
        b_eff = b_eff + (w0 @ C)[:, 0]
    return x @ w_eff.T + b_eff


def all_choices(space):
    return list(space.iter_layer_choices())


@pytest.mark.parametrize("bias", [True, False])
def test_every_choice_matches_spec_formula_and_merges(bias):
    space = SearchSpace((4, 2))
    layer = make_layer(space, bias=bias)
    w0_before = layer.base.weight.detach().clone()
    x = torch.randn(3, 4, D_IN)
    for choice in offered_choices(layer):
        layer.set_choice(choice)
        with torch.no_grad():
            got = layer(x)
            want = spec_forward(layer, choice, x)
            merged_out = layer.merged()(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"forward {choice}")
        rel = (merged_out - got).abs().max() / got.abs().max().clamp_min(1e-12)
        assert rel <= 1e-5, (choice, float(rel))
    assert torch.equal(layer.base.weight, w0_before), "merge must never write into the base weight"


def test_merge_uses_original_w0_for_prompt_c():
    # The classic bug: W @ C computed with the already-updated W. A, B and C all non-zero here.
    space = SearchSpace((2,))
    layer = make_layer(space)
    layer.set_choice({"A": "lora2", "B": "lora2", "C": "lora2", "D": "none", "E": "none"})
    weight, bias = layer.merged_weight_and_bias()
    c = layer.glora.C_down @ layer.glora.C_up
    expected_bias = layer.base.bias + (layer.base.weight @ c)[:, 0]
    torch.testing.assert_close(bias, expected_bias)
    wrong = layer.base.bias + (weight @ c)[:, 0]
    assert not torch.allclose(bias, wrong)


def test_bias_less_base_gets_bias_from_e_and_c_only():
    space = SearchSpace((2,))
    layer = make_layer(space, bias=False)
    assert layer.inert_tensors == {"D"} and make_layer(space).inert_tensors == set()
    with pytest.raises(GLoRARayError, match="'D': 'vector' cannot act on this layer .*no bias"):
        layer.set_choice({"A": "vector", "B": "none", "C": "none", "D": "vector", "E": "none"})
    assert layer.choice["D"] == "none"  # the largest choice it offers
    layer.set_choice({"A": "vector", "B": "none", "C": "none", "D": "none", "E": "none"})
    assert layer.merged().bias is None
    layer.set_choice({"A": "none", "B": "none", "C": "vector", "D": "none", "E": "scalar"})
    merged = layer.merged()
    assert merged.bias is not None
    x = torch.randn(2, D_IN)
    torch.testing.assert_close(merged(x), layer(x).detach(), rtol=1e-5, atol=1e-6)
    # E alone: the merged bias is E's value, in a tensor of its own (not a view of the support tensor).
    with torch.no_grad():
        layer.glora.E.copy_(torch.arange(D_OUT, dtype=torch.float32))
    layer.set_choice({"A": "none", "B": "none", "C": "none", "D": "none", "E": "vector"})
    merged = layer.merged()
    with torch.no_grad():
        layer.glora.E.add_(10.0)
    assert torch.equal(merged.bias, torch.arange(D_OUT, dtype=torch.float32))


def test_fresh_layer_equals_base_for_every_choice():
    space = SearchSpace((4, 2))
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT)
    layer = GLoRALinear(base, space)
    x = torch.randn(4, D_IN)
    for choice in all_choices(space):
        layer.set_choice(choice)
        torch.testing.assert_close(layer(x), base(x))


def test_param_count_equals_elements_that_receive_gradient():
    space = SearchSpace((4, 2))
    layer = make_layer(space)
    x = torch.randn(8, D_IN)
    for choice in all_choices(space):
        layer.set_choice(choice)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        if out.requires_grad:  # the all-none choice has nothing to train
            out.square().sum().backward()
        touched = sum(int((p.grad != 0).sum()) for p in layer.glora.parameters() if p.grad is not None)
        assert touched == layer.num_params(), choice
        assert layer.base.weight.grad is None


def test_spec_counts_per_tensor():
    space = SearchSpace((4,))
    c = {t: dict(zip(space.choices(t), space.choice_objects(t))) for t in TENSORS}
    assert tensor_param_count("A", c["A"]["lora4"], 768, 2304) == 4 * (768 + 2304)
    assert tensor_param_count("B", c["B"]["vector"], 768, 2304) == 2304
    assert tensor_param_count("C", c["C"]["lora4"], 768, 2304) == 4 * 768 + 4
    assert tensor_param_count("C", c["C"]["vector"], 768, 2304) == 768
    assert tensor_param_count("D", c["D"]["scalar"], 768, 2304) == 1
    assert tensor_param_count("E", c["E"]["none"], 768, 2304) == 0
    layer = GLoRALinear(nn.Linear(768, 2304), space)
    assert layer.num_params() == 32_260  # qkv of ViT-B, all-largest, docs/method.md §1


def test_weight_entanglement():
    space = SearchSpace((4, 2))
    layer = make_layer(space)
    s = layer.glora
    term = {t: dict(zip(space.choices(t), (s.term(t, c) for c in space.choice_objects(t)))) for t in TENSORS}
    for tensor in ("A", "B"):
        vec, sca = term[tensor]["vector"], term[tensor]["scalar"]
        assert torch.equal(sca.value, vec.value[0]), "a scalar is element 0 of its vector"
        lora4, lora2 = term[tensor]["lora4"], term[tensor]["lora2"]
        assert torch.equal(lora2.down, lora4.down[:, :2]) and torch.equal(lora2.up, lora4.up[:2])
        assert lora4.down.data_ptr() == getattr(s, f"{tensor}_down").data_ptr(), "slices share storage"
    for tensor in ("D", "E"):
        assert torch.equal(term[tensor]["scalar"].value, term[tensor]["vector"].value[0])
    # A gradient reaches only the slice the choice uses.
    layer.set_choice({"A": "lora2", "B": "none", "C": "none", "D": "none", "E": "none"})
    layer(torch.randn(3, D_IN)).sum().backward()
    assert (s.A_down.grad[:, 2:] == 0).all() and (s.A_up.grad[2:] == 0).all()
    assert (s.A_down.grad[:, :2] != 0).any()


def test_non_lora_a_never_builds_a_full_delta_matrix():
    space = SearchSpace((4,))
    big_in, big_out, tokens = 256, 512, 4
    layer = GLoRALinear(nn.Linear(big_in, big_out), space)
    x = torch.randn(tokens, big_in)

    def flops(choice):
        layer.set_choice(choice)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            layer(x)
        return counter.get_total_flops()

    base_flops = 2 * tokens * big_in * big_out
    cheap = {"A": "vector", "B": "lora4", "C": "vector", "D": "vector", "E": "vector"}
    dense = {"A": "lora4", "B": "lora4", "C": "vector", "D": "vector", "E": "vector"}
    # W0 @ C is a matrix-vector product (2*in*out); B as LoRA is two thin matmuls.
    thin = 2 * tokens * 4 * (big_in + big_out)
    assert flops(cheap) <= base_flops + thin + 2 * big_in * big_out
    assert flops(dense) > flops(cheap) + big_in * big_out  # LoRA A needs the (out, in) product


def test_merged_layer_is_plain_and_carries_dtype():
    space = SearchSpace((2,))
    layer = make_layer(space)
    plain = layer.merged({"A": "lora2", "B": "scalar", "C": "none", "D": "scalar", "E": "vector"})
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32
    assert plain.weight.device.type == "cpu"


@pytest.mark.parametrize("a,b", list(itertools.product(["vector", "scalar"], ["vector", "scalar"])))
def test_vector_and_scalar_paths_broadcast_like_spec(a, b):
    space = SearchSpace((2,))
    layer = make_layer(space, seed=5)
    choice = {"A": a, "B": b, "C": "none", "D": "none", "E": "none"}
    layer.set_choice(choice)
    x = torch.randn(2, 3, D_IN)
    torch.testing.assert_close(layer(x), spec_forward(layer, choice, x), rtol=1e-5, atol=1e-6)


# -- misuse: refused with a GLoRARayError naming the argument and what is valid ----------------
def test_set_choice_genes_refuses_a_negative_gene():
    layer = make_layer(SearchSpace((4, 2)))
    with pytest.raises(GLoRARayError, match=r"tensor 'E': gene -1 out of range 0..2 \(vector, scalar, none\)"):
        layer.set_choice_genes([0, 0, 0, 0, -1])


def test_set_choice_genes_refuses_a_wrong_gene_count():
    layer = make_layer(SearchSpace((4, 2)))
    with pytest.raises(GLoRARayError, match=r"genes must be 5 integers .*got shape \(7,\)"):
        layer.set_choice_genes([0] * 7)


def test_set_choice_genes_refuses_a_gene_beyond_the_choices():
    layer = make_layer(SearchSpace((4, 2)))
    with pytest.raises(GLoRARayError, match=r"tensor 'A': gene 9 out of range 0..4 \(lora4, lora2, vector, scalar, none\)"):
        layer.set_choice_genes([9, 0, 0, 0, 0])
    assert layer.choice == SearchSpace((4, 2)).largest_layer_choice()  # unchanged by the refused call


def test_layer_refuses_a_tuple_as_space():
    with pytest.raises(GLoRARayTypeError, match=r"space must be a glora_ray.SearchSpace .*got tuple \(8, 4\)"):
        GLoRALinear(nn.Linear(D_IN, D_OUT), (8, 4))


def test_layer_refuses_a_wrong_base():
    with pytest.raises(GLoRARayTypeError, match="base must be a torch.nn.Linear, got Conv2d"):
        GLoRALinear(nn.Conv2d(3, 4, 3), SearchSpace((2,)))
    with pytest.raises(GLoRARayTypeError, match="already a GLoRALinear"):
        GLoRALinear(make_layer(SearchSpace((2,))), SearchSpace((2,)))
