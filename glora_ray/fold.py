"""Folding the bias a merge gives a bias-less layer into the BatchNorm that reads its output.

A merged layer gains a bias ``c`` when its base has none and E or C is chosen (docs/method.md
§1.6).  When the layer's output goes straight into a BatchNorm, and nowhere else, the plain
architecture can absorb it (docs/method.md §7): in evaluation mode
``BN(x + c) = BN(x)`` with the running mean ``μ`` replaced by ``μ - c``, and a BatchNorm that
normalises with batch statistics cancels a per-channel constant by itself.

Which norm reads which output is found by running the model once on an example input and
recording every torch function that receives each bias-less adapted layer's output tensor (the
very object): a fold is planned only when that tensor's one consumer is ``F.batch_norm``,
normalising over the layer's channels, and that norm reads no other tensor.  Nothing is guessed
from names or module order.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layers import GLoRAConv2d, GLoRALayer

logger = logging.getLogger(__name__)

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
# A fold target meaning: read by a BatchNorm that uses batch statistics, so the bias cancels.
_BATCH_STATISTICS = object()


@dataclass(frozen=True)
class FoldPlan:
    """Where the merged bias of each bias-less adapted layer goes.

    ``into_norm``: layer name -> name of the BatchNorm whose running mean absorbs the bias.
    ``cancelled``: layers read only by a BatchNorm using batch statistics (the bias has no effect).
    ``kept``: the other bias-less layers; their merged bias stays, and a state holding it loads
    into the plain model with ``glora_ray.load_merged_state_dict``.
    """

    into_norm: Mapping[str, str] = field(default_factory=dict)
    cancelled: frozenset[str] = frozenset()
    kept: tuple[str, ...] = ()

    def fold_state(self, state: MutableMapping[str, torch.Tensor]) -> None:
        """Move the planned biases of a merged state dict into their norms (new tensors only)."""
        for layer, norm in self.into_norm.items():
            bias = state.pop(f"{layer}.bias", None)
            if bias is not None:
                key = f"{norm}.running_mean"
                state[key] = state[key] - bias.to(state[key].dtype)
        for layer in self.cancelled:
            state.pop(f"{layer}.bias", None)

    def fold_module(self, plain: nn.Module) -> None:
        """The same on a plain model built by ``Supernet.merged`` (which owns its tensors)."""
        for layer, norm in self.into_norm.items():
            module = plain.get_submodule(layer)
            if module.bias is not None:
                bn = plain.get_submodule(norm)
                bn.running_mean = bn.running_mean - module.bias.detach().to(bn.running_mean.dtype)
                module.register_parameter("bias", None)
        for layer in self.cancelled:
            plain.get_submodule(layer).register_parameter("bias", None)


def default_example_input(model: nn.Module) -> torch.Tensor | None:
    """One zero image of the size the model was built for: timm's configured ``input_size``, with
    the patch embedding's ``img_size`` where it fixes one (ViTs); None for a model without either."""
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = config.get("input_size") if isinstance(config, Mapping) else None
    if size is None or len(size) != 3:
        return None
    channels, height, width = size
    fixed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed_size is not None:
        height, width = fixed_size
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.zeros(1, channels, height, width, device=device, dtype=dtype)


class _ConsumerRecorder(TorchFunctionMode):
    """Records each torch function call that receives a watched tensor and returns a tensor
    (metadata such as ``.shape`` or ``.dim()`` returns none and reads no values)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (output kept alive, layer)
        self.uses: dict[int, list[tuple[object, tuple, dict]]] = {}
        self.norm_inputs: dict[int, list[torch.Tensor]] = {}  # id(running_mean or None) -> inputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.batch_norm:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs).arguments
            self.norm_inputs.setdefault(id(bound.get("running_mean")), []).append(bound["input"])
        if self.watched and any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                entry = self.watched.get(id(leaf))
                if entry is not None and entry[0] is leaf:
                    self.uses[id(leaf)].append((func, args, kwargs))
        return out

    def watch(self, tensor: torch.Tensor, layer: str) -> None:
        self.watched[id(tensor)] = (tensor, layer)
        self.uses[id(tensor)] = []


def _fold_target(layer: GLoRALayer, output: torch.Tensor, uses: list, norm_names: Mapping[int, str]) -> str | object | None:
    """The name of the norm this one output's bias folds into, ``_BATCH_STATISTICS``, or None."""
    if len(uses) != 1 or uses[0][0] is not F.batch_norm:
        return None
    _, args, kwargs = uses[0]
    bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    # The norm's channels must be the layer's: dim 1 of a conv output, or of a 2-D linear output.
    channels_on_dim1 = output.dim() >= 2 and output.shape[1] == layer.d_out and (
        isinstance(layer, GLoRAConv2d) or output.dim() == 2)
    if arguments["input"] is not output or not channels_on_dim1:
        return None
    running_mean = arguments["running_mean"]
    if running_mean is None:
        return _BATCH_STATISTICS if arguments["training"] else None
    if arguments["training"]:
        return None
    return norm_names.get(id(running_mean))


def _trace(model: nn.Module, layers: Mapping[str, GLoRALayer], biasless: list[str], example: torch.Tensor):
    """One forward of ``model`` in eval mode recording where each bias-less layer's outputs go:
    (recorder, outputs by layer, ids of the tensors the model returns), or None when the example
    does not fit the model (nothing is folded then, with a warning)."""
    recorder = _ConsumerRecorder()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in biasless}

    def hook_for(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                outputs[name].append(output)
                recorder.watch(output, name)
        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [layers[name].register_forward_hook(hook_for(name)) for name in biasless]
    try:
        model.eval()
        with torch.no_grad(), recorder:
            final = model(example)
    except Exception as err:  # a model the example does not fit: fold nothing, say why
        logger.warning("tracing %s on an input of shape %s failed (%s: %s): the merged biases of its %d bias-less "
                       "adapted layers stay (pass example_input to Supernet.fold_plan)", type(model).__name__,
                       tuple(example.shape), type(err).__name__, err, len(biasless), exc_info=True)
        return None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return recorder, outputs, {id(t) for t in tree_leaves(final) if isinstance(t, torch.Tensor)}


def plan_bias_folds(model: nn.Module, layers: Mapping[str, GLoRALayer],
                    example_input: torch.Tensor | None = None) -> FoldPlan:
    """Trace ``model`` once on ``example_input`` (default: ``default_example_input``) in eval mode,
    without gradients, and plan the folds of every bias-less layer of ``layers``.

    Nothing of the model changes: every module gets its training flag back, and in eval mode no
    BatchNorm updates its statistics.
    """
    biasless = [name for name, layer in layers.items() if layer.base.bias is None]
    if not biasless:
        return FoldPlan()
    example = example_input if example_input is not None else default_example_input(model)
    if example is None:
        logger.warning("no example input to trace %s: the merged biases of its %d bias-less adapted layers stay "
                       "(pass example_input to Supernet.fold_plan to fold them into their BatchNorms)",
                       type(model).__name__, len(biasless))
        return FoldPlan(kept=tuple(biasless))
    norm_names = {id(module.running_mean): name for name, module in model.named_modules()
                  if isinstance(getattr(module, "running_mean", None), torch.Tensor)}
    traced = _trace(model, layers, biasless, example)
    if traced is None:
        return FoldPlan(kept=tuple(biasless))
    recorder, outputs, returned = traced
    running_means = {name: key for key, name in norm_names.items()}
    into_norm, cancelled, kept = {}, set(), []
    for name in biasless:
        targets = {
            None if id(out) in returned else _fold_target(layers[name], out, recorder.uses[id(out)], norm_names)
            for out in outputs[name]
        }
        target = targets.pop() if len(targets) == 1 else None
        if target is _BATCH_STATISTICS:
            cancelled.add(name)
        elif target is not None and all(  # the norm reads this layer's outputs and nothing else
                recorder.watched.get(id(x), (None, None))[1] == name for x in recorder.norm_inputs[running_means[target]]):
            into_norm[name] = target
        else:
            kept.append(name)
    if kept:
        logger.warning("%d bias-less adapted layers of %s feed no BatchNorm alone (e.g. %s): a subnet choosing E or C "
                       "there merges to an extra bias; load such a state with glora_ray.load_merged_state_dict",
                       len(kept), type(model).__name__, kept[:3])
    return FoldPlan(into_norm=into_norm, cancelled=frozenset(cancelled), kept=tuple(kept))

