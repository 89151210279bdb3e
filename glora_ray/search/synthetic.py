"""A synthetic search problem: random adapters, Gaussian images, labels from a teacher subnet.

For benchmarks and tests, where no dataset is at hand: with non-zero adapters different
subnets compute different functions, and labels from one random "teacher" subnet give subnets
closer to it higher accuracies, so a search has a signal (docs/method.md §3) and runs compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import SupernetSpec, numpy_state
from ..supernet import Supernet


@torch.no_grad()
def randomize_adapters(supernet: Supernet, seed: int, scale: float = 0.02) -> Supernet:
    """Non-zero values for the support tensors that start at zero (down factors, D, E), so that
    merging changes the weights; at 0.02 a subnet changes the logits by about their own size."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in supernet.named_parameters():
        if ".glora." in name and (name.endswith("_down") or name.endswith(".D") or name.endswith(".E")):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return supernet


@dataclass
class SyntheticProblem:
    spec: SupernetSpec
    supernet: Supernet
    state: dict[str, np.ndarray]  # checkpoint.numpy_state of ``supernet``
    images: np.ndarray  # (N, 3, H, W) float32, standard normal
    labels: np.ndarray  # int64, the teacher subnet's predictions

    @property
    def weight_bytes(self) -> int:
        return int(sum(v.nbytes for v in self.state.values()))


def synthetic_problem(spec: SupernetSpec, count: int, seed: int = 0, batch_size: int = 64) -> SyntheticProblem:
    """``spec.build()`` with random adapters, ``count`` images and their teacher labels, all from ``seed``."""
    supernet = randomize_adapters(spec.build(), seed).eval()
    size = spec.backbone.img_size
    images = np.random.default_rng(seed).standard_normal((count, 3, size, size), dtype=np.float32)
    supernet.set_subnet(supernet.sample_genes(np.random.default_rng(seed + 1)))
    with torch.inference_mode():
        labels = torch.cat([supernet(torch.from_numpy(images[i:i + batch_size])).argmax(-1)
                            for i in range(0, count, batch_size)]).numpy().astype(np.int64)
    return SyntheticProblem(spec, supernet, numpy_state(supernet), images, labels)
