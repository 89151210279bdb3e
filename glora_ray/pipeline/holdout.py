"""Stage 3's single test evaluation: merged subnets over a streamed split (no full decode in memory)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..checkpoint import load_supernet
from ..data import DataConfig
from ..search.evaluator import default_device


@torch.inference_mode()
def split_accuracies(checkpoint_dir: str, genes_list: Sequence[np.ndarray], data: DataConfig, split: str = "test",
                     batch_size: int = 128, classes: Sequence[int] | None = None) -> list[float]:
    """Top-1 accuracy on ``split`` of each subnet, merged into a plain model (what is exported).

    ``classes``: predict only among these (docs/method.md §8: ImageNet-A and -R hold 200 of the
    1000 classes, and the standard protocol restricts the logits to them).
    """
    supernet, _ = load_supernet(checkpoint_dir)
    device = default_device()  # a GPU when Ray gave this task one (it hides the others)
    loader = DataLoader(data.lazy(split), batch_size=batch_size, shuffle=False, num_workers=data.loader_workers)
    allowed = None if classes is None else torch.as_tensor(sorted(classes), dtype=torch.int64, device=device)
    accuracies = []
    for genes in genes_list:
        model = supernet.merged(genes).eval().requires_grad_(False).to(device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for images, labels in loader:
            logits = model(images.to(device, non_blocking=True))
            correct += (predictions(logits, allowed) == labels.to(device)).sum()
        accuracies.append(int(correct.item()) / len(loader.dataset))
        del model
    return accuracies


def predictions(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted class of each row; with ``allowed``, the best among those classes only."""
    if allowed is None:
        return logits.argmax(dim=-1)
    return allowed[logits[:, allowed].argmax(dim=-1)]
