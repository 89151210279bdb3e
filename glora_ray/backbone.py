"""Backbones: a timm model by name, with weights from the hub or a local checkpoint file."""
from __future__ import annotations

from .errors import GLoRARayError

import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
# Where timm's pretrained weights come from; probed once so an offline machine fails at once.
_HUB_HOST, _HUB_PORT = "huggingface.co", 443


class BackboneError(GLoRARayError):
    """An unknown model, an unreadable checkpoint, or weights that cannot be had offline."""


@dataclass
class BackboneConfig:
    """Which timm model to build and where its frozen weights come from.

    ``pretrained`` loads timm's hub weights (online, or already in the local cache);
    ``checkpoint_path`` loads a local file instead (.npz as the original ViT-B_16.npz,
    .pth/.pt/.bin, .safetensors).  Neither: random init from ``init_seed`` (tests).
    """

    name: str = "vit_base_patch16_224.orig_in21k"
    pretrained: bool = False
    checkpoint_path: str | None = None
    img_size: int = 224
    drop_path_rate: float = 0.1
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackboneConfig":
        return cls(**data)

    def validate(self) -> None:
        """Cheap checks that need no weights: run before any expensive work."""
        import timm

        arch = self.name.partition(".")[0]  # timm's "<arch>.<pretrained tag>" convention
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise BackboneError(f"unknown timm model {self.name!r}; similar names: {close}")
        if self.checkpoint_path is not None:
            path = Path(self.checkpoint_path)
            if not path.is_file():
                raise BackboneError(f"checkpoint file {str(path)!r} does not exist")
            if path.suffix not in CHECKPOINT_SUFFIXES:
                raise BackboneError(f"checkpoint {str(path)!r}: suffix {path.suffix!r} not one of {CHECKPOINT_SUFFIXES}")
        if self.img_size <= 0:
            raise BackboneError(f"img_size must be positive, got {self.img_size}")


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((_HUB_HOST, _HUB_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline_already() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Only the local cache, no retries: huggingface_hub reads HF_HUB_OFFLINE once, at import,
    so setting the environment variable later is not enough; set its module flag too."""
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def plain_model_kwargs(cfg: BackboneConfig, num_classes: int) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild this architecture (no training-only ones)."""
    import timm

    kwargs: dict[str, Any] = dict(num_classes=num_classes, **cfg.model_kwargs)
    try:
        with torch.device("meta"):
            timm.create_model(cfg.name, pretrained=False, img_size=cfg.img_size, **kwargs)
    except TypeError as err:
        # Convolutional models take any input size and have no img_size argument.
        if "img_size" not in str(err):
            raise
        return kwargs
    return {**kwargs, "img_size": cfg.img_size}


def _timm_model(cfg: BackboneConfig, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    kwargs = plain_model_kwargs(cfg, num_classes)
    return timm.create_model(cfg.name, pretrained=pretrained, drop_path_rate=cfg.drop_path_rate, **kwargs)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader error means the same thing to the user
        raise BackboneError(f"cannot read checkpoint {path!r}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"checkpoint {path!r} holds {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``model``; the classifier head is kept when shapes differ."""
    if path.endswith(".npz"):
        if not hasattr(model, "load_pretrained"):
            raise BackboneError(f"{type(model).__name__} cannot load .npz checkpoints ({path!r})")
        try:
            model.load_pretrained(path)  # timm's loader for the original JAX ViT checkpoints
        except Exception as err:
            raise BackboneError(f"cannot load .npz checkpoint {path!r}: {err}") from err
        return
    state = _read_state_dict(path)
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()}
    # A new head for the target classes: drop the checkpoint's if its shape differs.
    state = {k: v for k, v in state.items() if not (k in head_keys and k in own and v.shape != own[k].shape)}
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise BackboneError(
            f"checkpoint {path!r}: {k!r} has shape {tuple(state[k].shape)}, model expects {tuple(own[k].shape)} "
            f"(is it for a different architecture or image size?)"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"checkpoint {path!r} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def create_backbone(cfg: BackboneConfig, num_classes: int) -> nn.Module:
    """Build the backbone with a fresh ``num_classes`` head; fails fast when weights are unreachable."""
    cfg.validate()
    from_hub = cfg.pretrained and cfg.checkpoint_path is None
    # Offline: allow only what is already cached, so the hub client does not retry for a minute.
    offline = from_hub and not _hub_offline_already() and not hub_reachable()
    # Random parts (head, adapters' neighbours, or the whole model in tests) come from init_seed.
    with _hub_offline() if offline else nullcontext(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        try:
            model = _timm_model(cfg, num_classes, pretrained=from_hub)
        except BackboneError:
            raise
        except Exception as err:
            if cfg.pretrained:
                raise BackboneError(
                    f"cannot load pretrained weights for {cfg.name!r} ({type(err).__name__}: {err}); offline, "
                    f"pass a local checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) instead"
                ) from err
            raise
    if cfg.checkpoint_path is not None:
        load_backbone_weights(model, cfg.checkpoint_path)
    return model


def empty_backbone(cfg: BackboneConfig, num_classes: int) -> nn.Module:
    """The architecture on the meta device: no memory, no weights; for assigning shared tensors."""
    with torch.device("meta"):
        return _timm_model(cfg, num_classes, pretrained=False)
