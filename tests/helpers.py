"""Small shared builders for the tests."""
import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

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


def offered_choices(layer) -> list[dict[str, str]]:
    """Every choice the layer offers: the space's, less the forms of its inert tensors (D without a bias)."""
    return [c for c in layer.space.iter_layer_choices() if all(c[t] == "none" for t in layer.inert_tensors)]


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
    # The logger's own level too: left unset it defers to the root's WARNING (or to whatever an
    # earlier test set), and INFO records would be dropped before any handler saw them.
    previous = logger.level
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# -- shared setups (test modules import them from here, never from each other) ------------------

def tiny_spec():
    """The supernet spec of the shared tiny search problem (5 classes, ranks (4, 2))."""
    from glora_ray.backbone import BackboneConfig
    from glora_ray.checkpoint import SupernetSpec

    backbone = BackboneConfig("vit_tiny_patch16_224", img_size=16, drop_path_rate=0.0,
                              model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2))
    return SupernetSpec(backbone, num_classes=5, ranks=(4, 2), dataset="synthetic")


@dataclass
class Problem:
    """A search problem: spec, supernet, its numpy state and validation data (conftest's ``problem``)."""

    spec: object
    net: object
    state: dict
    images: object
    labels: object


# One 16x16 patch per 16-px digit and mean pooling: even a random frozen ViT then carries enough
# of the image for the head and adapters to learn in a few epochs.
def tiny_train_backbone():
    from glora_ray.backbone import BackboneConfig

    return BackboneConfig(name="vit_tiny_patch16_224", img_size=16, drop_path_rate=0.1,
                          model_kwargs=dict(patch_size=16, depth=2, embed_dim=64, num_heads=2, global_pool="avg"))


def make_spec(**overrides):
    """The training tests' supernet spec: the digits' 10 classes, ranks (4, 2)."""
    from glora_ray.checkpoint import SupernetSpec

    return SupernetSpec(**{"backbone": tiny_train_backbone(), "num_classes": 10, "ranks": (4, 2), **overrides})


def quick(**overrides):
    """A short training configuration (3 epochs, no DataLoader workers)."""
    from glora_ray.train import TrainConfig

    settings = dict(epochs=3, lr=1e-2, warmup_epochs=1, batch_size=64, checkpoint_every=1, num_workers=0)
    settings.update(overrides)
    return TrainConfig(**settings)


# -- the pipeline's command line on the tiny preset ----------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = json.dumps({"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2})


def tiny_args(data_root, out, *extra):
    """The tiny preset, smaller still, training in the driver's process (Ray Train's local mode):
    starting a worker group costs about 25 s a run on 2 cores.  Worker groups are exercised by
    test_train's DDP tests, test_pipeline's lr-sweep run and test_divergence's pipeline run
    (append ``--train-workers N``)."""
    return ["--preset", "tiny", "--train-workers", "0", "--data-root", str(data_root), "--out", str(out), "--img-size", "16",
            "--model-kwargs", TINY_MODEL,
            "--epochs", "3", "--warmup-epochs", "1", "--checkpoint-every", "3", "--train-cpus", "1",
            "--population", "8", "--parents", "3", "--mutants", "3", "--crossovers", "2", "--generations", "2",
            "--max-params", "6k", "--actors", "1", "--eval-batch-size", "100", *extra]


def load_entry_point(name: str = "vtab"):
    """``pipelines/<name>.py`` as a module (its ``main``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_entry", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the search algorithm without Ray: a ViT-B-sized space and a deterministic landscape ---------
VIT_B_DIMS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
SPACE = SearchSpace((8, 4))


def _vit_b_counter():
    from glora_ray import ParamCounter

    return ParamCounter(SPACE, VIT_B_DIMS)


COUNTER = _vit_b_counter()


def fitness(genes) -> float:
    """A deterministic landscape with ties: prefers small genes (large choices) in early layers."""
    import numpy as np

    weights = np.linspace(1.0, 0.0, genes.size)
    return float(np.round(1.0 / (1.0 + float(weights @ genes) / 50.0), 3))


def run(config, lo, hi, order_seed=None, counter=COUNTER, space=SPACE):
    """Drive an EvolutionPlanner to the end; ``order_seed`` shuffles the order results are told in."""
    import numpy as np

    from glora_ray.search import EvolutionPlanner

    planner = EvolutionPlanner(config, space, counter, lo, hi)
    populations = []
    for _ in range(config.generations):
        asked = planner.ask()
        if not asked:
            break
        populations.append([(c.candidate_id, c.key, c.origin, c.parent_ids) for c in asked])
        results = [(c.key, fitness(c.genes)) for c in asked]
        if order_seed is not None:
            np.random.default_rng(order_seed).shuffle(results)
        planner.tell(dict(results))
    return planner, populations
