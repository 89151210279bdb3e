"""Backbones from local checkpoint files (.pth/.pt, .safetensors, the original JAX .npz) and
the errors for unknown models, missing or corrupt files, and pretrained weights offline."""

import numpy as np
import pytest
import torch

from glora_ray import backbone as backbone_module
from glora_ray.backbone import BackboneConfig, BackboneError, create_backbone

TINY = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_config(**overrides) -> BackboneConfig:
    fields = dict(name="vit_tiny_patch16_224", img_size=16, drop_path_rate=0.0, model_kwargs=dict(TINY))
    fields.update(overrides)
    return BackboneConfig(**fields)


def assert_same_weights(a, b, skip_prefix=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if skip_prefix is None or not key.startswith(skip_prefix):
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def export_jax_vit_npz(model, path) -> None:
    """Write a timm ViT in the layout of the original Google release (ViT-B_16.npz)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[rows].T.reshape(dim, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[rows].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        )
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


@pytest.fixture(scope="module")
def source():
    return create_backbone(tiny_config(init_seed=1), num_classes=10)


def test_pth_and_pt_round_trip_and_head_reset(tmp_path, source):
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(tiny_config(checkpoint_path=str(path), init_seed=2), num_classes=10)
    assert_same_weights(loaded, source)
    # A new head for another class count: the checkpoint's head is dropped, the rest loads.
    fresh = create_backbone(tiny_config(init_seed=2), num_classes=5)
    reset = create_backbone(tiny_config(checkpoint_path=str(path), init_seed=2), num_classes=5)
    assert reset.head.weight.shape == (5, 32)
    torch.testing.assert_close(reset.head.weight, fresh.head.weight)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(reset.state_dict()[key], value, rtol=0, atol=0)
    # Wrapped state dicts ({"model": ...}, DDP's "module." prefix) load too, as .pt.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    assert_same_weights(create_backbone(tiny_config(checkpoint_path=str(wrapped)), num_classes=10), source)


def test_safetensors_round_trip(tmp_path, source):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert_same_weights(create_backbone(tiny_config(checkpoint_path=str(path), init_seed=3), 10), source)


def test_original_jax_npz_layout(tmp_path, source):
    path = tmp_path / "ViT-tiny.npz"
    export_jax_vit_npz(source, path)
    other = create_backbone(tiny_config(init_seed=4), num_classes=10)
    with pytest.raises(AssertionError):
        assert_same_weights(other, source)  # the check below can fail
    loaded = create_backbone(tiny_config(checkpoint_path=str(path), init_seed=4), num_classes=10)
    assert_same_weights(loaded, source)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    # Another class count keeps the fresh head and loads everything else.
    reset = create_backbone(tiny_config(checkpoint_path=str(path), init_seed=4), num_classes=3)
    torch.testing.assert_close(reset.head.weight, create_backbone(tiny_config(init_seed=4), 3).head.weight)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(reset.state_dict()[key], value, rtol=0, atol=0)


def test_unknown_model_name():
    with pytest.raises(BackboneError, match="unknown timm model 'vit_tinyy_patch16_224'.*similar names"):
        tiny_config(name="vit_tinyy_patch16_224").validate()
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone(tiny_config(name="no_such_net"), num_classes=10)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(tiny_config(checkpoint_path=str(tmp_path / "nope.pth")), 10)
    other = tmp_path / "weights.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(BackboneError, match=r"suffix '\.ckpt' not one of"):
        create_backbone(tiny_config(checkpoint_path=str(other)), 10)


@pytest.mark.parametrize("suffix, message", [
    (".pth", "cannot read checkpoint"),
    (".safetensors", "cannot read checkpoint"),
    (".npz", "cannot load .npz checkpoint"),
])
def test_corrupt_files(tmp_path, suffix, message):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    with pytest.raises(BackboneError, match=message) as err:
        create_backbone(tiny_config(checkpoint_path=str(path)), 10)
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


def test_pickled_objects_are_refused_in_our_words(tmp_path):
    import argparse

    path = tmp_path / "objects.pth"
    torch.save({"args": argparse.Namespace(lr=1.0), "weight": torch.zeros(2)}, path)
    with pytest.raises(BackboneError, match="holds? Python objects besides tensors") as err:
        create_backbone(tiny_config(checkpoint_path=str(path)), 10)
    assert "weights_only" not in str(err.value)


def test_checkpoint_of_another_architecture(tmp_path, source):
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    wider = tiny_config(checkpoint_path=str(path), model_kwargs=dict(TINY, embed_dim=48))
    with pytest.raises(BackboneError, match="has shape .* model expects"):
        create_backbone(wider, 10)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}, partial)
    with pytest.raises(BackboneError, match=r"does not fit .*missing \['blocks\.1\."):
        create_backbone(tiny_config(checkpoint_path=str(partial)), 10)


@pytest.fixture
def connections(monkeypatch):
    """Every network connection attempted (and refused): failing fast means attempting none."""
    import socket

    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled by the test")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("name lookup disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    return attempts


def test_pretrained_offline_fails_fast_with_offline_env(connections):
    with pytest.raises(BackboneError, match="pass a local checkpoint file"):
        create_backbone(tiny_config(pretrained=True), num_classes=10)
    assert connections == []


def test_pretrained_unreachable_hub_fails_fast_without_offline_env(monkeypatch, connections):
    """No HF_HUB_OFFLINE at import time: the hub client would retry for about a minute unless
    create_backbone switches it to its cache itself (the env variable alone is read too early)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone_module, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(BackboneError, match="cannot load pretrained weights for 'vit_tiny_patch16_224'"):
        create_backbone(tiny_config(pretrained=True), num_classes=10)
    assert connections == []  # the hub client went to its cache, no retries
    assert constants.HF_HUB_OFFLINE is False  # restored for the rest of the process


def test_a_fresh_head_can_start_at_zero():
    model = create_backbone(tiny_config(head_init="zeros"), num_classes=10)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert create_backbone(tiny_config(), num_classes=10).head.weight.any()  # timm's init otherwise
    with pytest.raises(BackboneError, match=r"head_init 'ones' is not one of \['timm', 'zeros'\]"):
        tiny_config(head_init="ones").validate()
