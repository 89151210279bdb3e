"""Numeric precision and memory layout of training and evaluation on a device (docs/method.md §9).

``fp32``: full float32, TF32 off for matmuls and convolutions.  ``tf32``: float32 tensors whose
CUDA matmuls and convolutions may use TensorFloat-32 (CUDA only: the CPU has no TF32).
``bf16``: ``torch.autocast`` to bfloat16 (matmuls and convolutions in bf16; softmax, norms and
losses stay float32), on CUDA and on CPUs that support it.  The weights stay float32 in every
case, so a checkpoint does not depend on the precision it was trained in.

Memory layout of training: channels-last (NHWC) for convolutional backbones, on CUDA (cuDNN's
tensor core kernels want it) and on CPUs (oneDNN's convolutions are faster in it: a supernet
step of EfficientNet-Lite0 at 64 px took 0.72x the time on the 2-core box, bench/README.md).
"""
from __future__ import annotations

import contextlib
import enum
from typing import Iterator

import torch
from torch import nn

from .errors import GLoRARayError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"


AUTO = "auto"


def parse_precision(value: Precision | str, field: str, *, allow_auto: bool = False,
                    error: type[GLoRARayError] = GLoRARayError) -> Precision | str:
    """``value`` as a ``Precision`` (or ``"auto"`` where allowed); else ``error`` naming ``field``."""
    if allow_auto and value == AUTO:
        return AUTO
    try:
        return Precision(value)
    except ValueError:
        valid = ([AUTO] if allow_auto else []) + [p.value for p in Precision]
        raise error(f"{field}={value!r} is not a precision; valid values: {valid}") from None


def resolve_precision(value: Precision | str, device: torch.device | str, field: str = "precision",
                      *, error: type[GLoRARayError] = GLoRARayError) -> Precision:
    """The precision to use on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere; tf32 needs CUDA."""
    device = torch.device(device)
    precision = parse_precision(value, field, allow_auto=True, error=error)
    if precision == AUTO:
        return Precision.BF16 if device.type == "cuda" else Precision.FP32
    if precision is Precision.TF32 and device.type != "cuda":
        raise error(f"{field}='tf32' needs a CUDA device (TF32 is a GPU matmul format), but this runs on "
                    f"{device}; use 'fp32' or 'bf16'")
    return precision


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA, through whichever API this torch has
    (mixing torch's legacy and new precision APIs is an error in recent versions)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        value = "tf32" if enabled else "ieee"
        matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _tf32_flags() -> tuple:
    """The current matmul and convolution settings, to restore later."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _restore_tf32_flags(flags: tuple) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = flags
    else:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextlib.contextmanager
def matmul_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """TF32 on (``tf32``) or off (``fp32``, ``bf16``) for CUDA float32 matmuls inside the block;
    the previous setting is restored after.  Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    before = _tf32_flags()
    set_tf32(precision is Precision.TF32)
    try:
        yield
    finally:
        _restore_tf32_flags(before)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16``; a no-op otherwise."""
    if precision is Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def compute_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """Both: the matmul setting and, for bf16, autocast (an evaluation's forward passes)."""
    with matmul_precision(precision, device), autocast(precision, device):
        yield


def is_convolutional(model: nn.Module) -> bool:
    """True when ``model`` has a convolution with overlapping windows (kernel larger than stride
    in some dimension): a CNN.  A ViT's patch embedding (kernel == stride) does not count."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(k > s for k, s in zip(module.kernel_size, module.stride)):
            return True
    return False


def memory_format(model: nn.Module, channels_last: bool | None = None) -> torch.memory_format:
    """``channels_last`` for a CNN on any device (cuDNN's tensor cores and oneDNN both run NHWC
    convolutions faster), else the default layout; ``channels_last`` True / False forces it."""
    if channels_last is None:
        channels_last = is_convolutional(model)
    return torch.channels_last if channels_last else torch.contiguous_format
