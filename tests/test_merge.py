"""Issue 14: merge strategies (equal results, small actors), precision options, GPU training paths on CPU."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glora_ray import TENSORS, GLoRAConv2d, GLoRALinear, SearchSpace
from glora_ray.errors import GLoRARayError
from glora_ray.layers.support import LowRank
from glora_ray.precision import Precision, is_convolutional, memory_format, resolve_precision
from glora_ray.search import Evaluator, SearchConfig, SearchConfigError
from glora_ray.search.merge import MergeStrategy
from glora_ray.train import SupernetTraining, TrainConfigError
from helpers import make_spec, quick, randomize_adapters, spec_support


def evaluators(problem, **kw):
    return {s: Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=24, threads=1,
                         merge=s, **kw) for s in MergeStrategy}


@torch.inference_mode()
def logits(evaluator, genes, images):
    evaluator.model.load(genes)
    return evaluator.model(images)


def test_merge_strategies_agree_and_just_in_time_equals_per_candidate_bit_for_bit(problem):
    shared = {k: v.copy() for k, v in problem.state.items()}
    for array in shared.values():
        array.flags.writeable = False  # as the object store hands them out
    evs = evaluators(problem.__class__(problem.spec, problem.net, shared, problem.images, problem.labels))
    rng = np.random.default_rng(3)
    subnets = [problem.net.sample_genes(rng) for _ in range(6)] + [problem.net.largest_subnet()]
    # Every other layer with A and B both none: just in time runs those on the shared W0 itself.
    space, skipping = problem.net.space, subnets[0].reshape(problem.net.num_layers, len(TENSORS)).copy()
    skipping[::2, :2] = [space.choices(t).index("none") for t in ("A", "B")]
    subnets.append(skipping.reshape(-1))
    x = evs[MergeStrategy.PER_CANDIDATE].images[:24]
    # Merging takes the candidate explicitly: no GLoRA layer's own choice is changed by it.
    held = {s: [layer.choices for layer in ev.supernet.layers()] for s, ev in evs.items()}
    for genes in subnets:
        reference = logits(evs[MergeStrategy.PER_CANDIDATE], genes, x)
        assert torch.equal(logits(evs[MergeStrategy.JUST_IN_TIME], genes, x), reference)
        torch.testing.assert_close(logits(evs[MergeStrategy.BATCHED], genes, x), reference, rtol=1e-5, atol=1e-5)
    assert {s: [layer.choices for layer in ev.supernet.layers()] for s, ev in evs.items()} == held
    accuracies = {s: [r.val_acc for r in ev.evaluate(subnets)] for s, ev in evs.items()}
    assert accuracies[MergeStrategy.JUST_IN_TIME] == accuracies[MergeStrategy.PER_CANDIDATE]
    assert len(set(accuracies[MergeStrategy.PER_CANDIDATE])) > 1
    # Just in time: between forward passes the plain model holds no merged weight, and the
    # shared weights stay shared.
    jit = evs[MergeStrategy.JUST_IN_TIME]
    adapted = [jit.model.plain.get_submodule(n) for n in jit.supernet.layer_names]
    assert all(m.weight is None and not list(m.parameters(recurse=False)) for m in adapted)
    assert jit.supernet.model.blocks[0].attn.qkv.base.weight.data_ptr() == \
        shared["model.blocks.0.attn.qkv.base.weight"].ctypes.data
    # While a layer runs, its merged weight lives in the one buffer every layer reuses (no
    # weight-sized allocation per layer and batch), or is W0 itself where A and B are none.
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()), prepend=False)
             for m in adapted]
    try:
        logits(jit, subnets[-1], x)  # every other layer with A and B none
    finally:
        for hook in hooks:
            hook.remove()
    w0 = {shared[f"model.{n}.base.weight"].ctypes.data for n in jit.supernet.layer_names}
    assert len(seen) == len(adapted) and set(seen) - w0 == {jit.model.merger.weight_buffer.data_ptr()}
    none_ab = (skipping[:, :2] == [space.choices(t).index("none") for t in ("A", "B")]).all(axis=1)
    assert seen.count(jit.model.merger.weight_buffer.data_ptr()) == (~none_ab).sum() > 0


@pytest.mark.parametrize("base", [nn.Linear(48, 40), nn.Conv2d(8, 12, 3, groups=2)], ids=["linear", "conv"])
def test_fused_merge_keeps_the_bits_of_the_stepwise_merge(base):
    # The merge fuses its first op per case (one pass fewer); the weights must not change by a bit.
    layer = (GLoRALinear if isinstance(base, nn.Linear) else GLoRAConv2d)(base, SearchSpace((4, 2)))
    randomize_adapters(layer, 0)
    w0 = layer.weight_2d()
    for a_name, b_name in itertools.product(layer.space.choices("A"), layer.space.choices("B")):
        layer.set_choice({"A": a_name, "B": b_name, "C": "none", "D": "none", "E": "none"})
        a, b = layer.terms()[:2]
        with torch.no_grad():  # step by step in the formula's order: W0 + W0 * A first, then + B
            stepwise = w0.clone()
            if a is not None:
                stepwise.addcmul_(w0, a.matrix())
            if isinstance(b, LowRank):
                stepwise.addmm_(b.down, b.up)
            elif b is not None:
                stepwise += b.matrix()
        fused = layer.merged_weight_2d()
        assert torch.equal(fused, stepwise), (a_name, b_name)
        assert fused.data_ptr() != w0.data_ptr()
        # Into a caller's buffer (the just-in-time merge reuses one): the same bits, written there.
        buffer = torch.full_like(w0, float("nan"))
        assert layer.merged_weight_2d(out=buffer).data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, fused), (a_name, b_name)
        # Both follow docs/method.md §1 (W0 + W0 * A + B), read from the raw support tensors.
        a_spec, b_spec = (spec_support(layer.glora, t, n) for t, n in (("A", a_name), ("B", b_name)))
        want = w0 + (0 if a_spec is None else w0 * a_spec) + (0 if b_spec is None else b_spec)
        torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6, msg=f"{a_name}, {b_name}")
        assert torch.equal(fused, w0) == (a_name == b_name == "none")  # non-zero adapters: the check can fail


@pytest.mark.parametrize("base", [nn.Linear(48, 40), nn.Conv2d(8, 12, 3)], ids=["linear", "conv"])
def test_a_mixed_precision_forward_builds_the_kernel_in_the_weights_precision(base):
    # Under bf16 autocast the rebuilt kernel W0 + W0 * A + B is built in float32 and rounded once
    # by the layer's own op: the same output with and without autograd, for every A and B.
    layer = (GLoRALinear if isinstance(base, nn.Linear) else GLoRAConv2d)(base, SearchSpace((4, 2)))
    randomize_adapters(layer, 0)
    x = torch.randn(2, 48) if isinstance(base, nn.Linear) else torch.randn(2, 8, 6, 6)
    for a_name, b_name in itertools.product(layer.space.choices("A"), layer.space.choices("B")):
        layer.set_choice({"A": a_name, "B": b_name, "C": "none", "D": "none", "E": "none"})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                inference = layer(x)
            training = layer(x)
        assert torch.equal(inference, training.detach()), (a_name, b_name)


def test_cpu_default_is_just_in_time_and_bf16_evaluation_stays_close(problem):
    fp32 = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=64, threads=1)
    bf16 = Evaluator(problem.spec, problem.state, problem.images, problem.labels, batch_size=64, threads=1,
                     precision="bf16")
    assert fp32.merge_strategy is MergeStrategy.JUST_IN_TIME and bf16.precision is Precision.BF16
    genes = problem.net.sample_genes(np.random.default_rng(4))
    with torch.inference_mode():
        bf16._select(genes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = bf16.model(bf16.images).float()
        reference = logits(fp32, genes, fp32.images)
    assert not torch.equal(low, reference)  # autocast really ran
    assert float((low - reference).norm() / reference.norm()) < 5e-2
    # evaluate() scores exactly those bf16 logits, not the fp32 ones.
    labels = torch.from_numpy(problem.labels)
    scored, plain = bf16.evaluate([genes])[0], fp32.evaluate([genes])[0]
    assert scored.val_acc == float((low.argmax(-1) == labels).float().mean())
    assert scored.val_loss == pytest.approx(F.cross_entropy(low, labels).item(), rel=1e-6)
    assert plain.val_loss == pytest.approx(F.cross_entropy(reference, labels).item(), rel=1e-6)
    assert scored.val_loss != plain.val_loss


def test_precision_options_are_validated_with_the_valid_values(problem):
    with pytest.raises(SearchConfigError, match=r"precision='fp16' .*\['fp32', 'tf32', 'bf16'\]"):
        SearchConfig(precision="fp16")
    with pytest.raises(SearchConfigError, match="'tf32' is a GPU format.*gpus_per_actor"):
        SearchConfig(precision="tf32")
    assert SearchConfig(precision="tf32", gpus_per_actor=1).to_dict()["precision"] == "tf32"
    assert SearchConfig(precision="bf16").result_identity()["precision"] == "bf16"
    with pytest.raises(SearchConfigError, match="merge_strategy='fast' is not one of"):
        SearchConfig(merge_strategy="fast")
    with pytest.raises(GLoRARayError, match="'tf32' needs a CUDA device"):
        Evaluator(problem.spec, problem.state, problem.images, problem.labels, device="cpu", precision="tf32")
    with pytest.raises(TrainConfigError, match=r"precision='half' .*\['auto', 'fp32', 'tf32', 'bf16'\]"):
        quick(precision="half").validate()
    with pytest.raises(TrainConfigError, match="channels_last"):
        quick(channels_last="yes").validate()
    assert resolve_precision("auto", "cpu") is Precision.FP32
    assert resolve_precision("auto", "cuda") is Precision.BF16


def test_channels_last_only_for_convolutional_backbones():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    patchify = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4))  # a ViT's patch embedding
    assert is_convolutional(cnn) and not is_convolutional(patchify)
    assert memory_format(cnn) is torch.channels_last
    assert memory_format(cnn, channels_last=False) is torch.contiguous_format
    assert memory_format(patchify) is torch.contiguous_format
    assert memory_format(patchify, channels_last=True) is torch.channels_last


def test_bf16_and_channels_last_training_run_on_the_cpu():
    from glora_ray.data import ArrayDataset

    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.standard_normal((128, 3, 16, 16), dtype=np.float32), rng.integers(0, 10, 128))
    with pytest.raises(TrainConfigError, match="'tf32' needs a CUDA device"):
        SupernetTraining(make_spec().build(), dataset, quick(precision="tf32"), "cpu")
    cfg = quick(epochs=2, batch_size=32, precision="bf16", channels_last=True)
    training = SupernetTraining(make_spec().build(), dataset, cfg, "cpu").setup()
    head = training.supernet.head.weight.detach().clone()
    assert training.precision is Precision.BF16 and training.layout is torch.channels_last
    assert training.supernet.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert not training.optimizer.param_groups[0]["fused"]  # fused AdamW on CUDA only
    history = training.run().history
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert training.supernet.head.weight.dtype == torch.float32 and not torch.equal(training.supernet.head.weight, head)
    # The same training in fp32: bf16 autocast really ran (other losses), and stayed close to it.
    fp32 = SupernetTraining(make_spec().build(), dataset, quick(epochs=2, batch_size=32, precision="fp32",
                                                                channels_last=True), "cpu").setup()
    reference = [h["loss"] for h in fp32.run().history]
    losses = [h["loss"] for h in history]
    assert losses != reference and losses == pytest.approx(reference, rel=1e-2)
