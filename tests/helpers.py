"""Small shared builders for the tests."""
import contextlib
import json
import logging
import os

import timm
import torch

from glora_ray import SearchSpace, Supernet


def tiny_vit(num_classes: int = 5, img_size: int = 16, depth: int = 2, embed_dim: int = 32, seed: int = 0):
    """A reduced-depth ViT small enough for 2 CPU cores."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size,
        patch_size=8, depth=depth, embed_dim=embed_dim, num_heads=2,
    )


def randomize_adapters(supernet_or_layer, seed: int = 0) -> None:
    """Give every support tensor non-zero values, so no term of the formula hides behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in supernet_or_layer.named_parameters():
            if ".glora." in f".{name}" or name.startswith("glora."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def tiny_supernet(ranks=(4, 2), seed: int = 0, **vit_kw) -> Supernet:
    return Supernet(tiny_vit(seed=seed, **vit_kw), SearchSpace(ranks))


def spec_support(support, tensor: str, name: str):
    """docs/method.md §1's value of one support tensor, read from the raw stored tensors (None for none)."""
    if name == "none":
        return None
    if tensor in ("D", "E"):
        full = getattr(support, tensor)
        return full if name == "vector" else full[0]
    down, up = getattr(support, f"{tensor}_down"), getattr(support, f"{tensor}_up")
    if name == "scalar":
        return down[0, 0]
    if name == "vector":
        return down[:, 0:1]
    rank = int(name.removeprefix("lora"))
    return down[:, :rank] @ up[:rank, :]

@contextlib.contextmanager
def injected_faults(**plan):
    """Faults for the code inside the block, in this process and every Ray worker (glora_ray.faults)."""
    from glora_ray import faults

    path = os.environ[faults.ENV_VAR]
    with open(path, "w") as handle:
        json.dump(plan, handle)
    try:
        yield
    finally:
        os.remove(path)


class _Records(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged(logger_name: str = "glora_ray", level: int = logging.WARNING):
    """The records of ``logger_name`` at ``level`` or above, read at the logger itself: the CLI's
    progress handler stops propagation to the root, and pytest >= 9.2 attaches caplog to such
    loggers too, so caplog sees a record once, twice or not at all depending on what ran before."""
    handler, logger = _Records(level), logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
