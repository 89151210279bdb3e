"""Fixed one-for-all adapters (LoRA, SSF, BitFit, a linear probe) as constant subnets of our space.

Every baseline puts the same choice in every adapted layer (docs/method.md §1), so it trains with
the supernet's own Ray Train job, data, epochs and learning rate, only with
``TrainConfig.fixed_subnet`` set (docs/method.md §2), is counted by the same ``ParamCounter`` as
the search (docs/method.md §3) and is tested once, like the searched winner.

Per dataset, ``<out>/<dataset>/baselines/<name>.json`` records a finished baseline (its subnet,
count, val200 accuracy and the accuracy on every test list of the unit: a domain unit's target
sets too): present means trained and tested, never again (a record lacking one of the unit's test
lists is redone: its finished training is found and kept, and it is scored once).  Training runs
are ``<out>/<dataset>/train/baseline-<name>-<epochs>ep`` (resumable Ray Train runs; one per length,
so ``--baseline-epochs`` on a finished output trains a schedule of its own instead of extending
the other one).
"""
from __future__ import annotations

import enum
import logging
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import storage
from ..checkpoint import SupernetSpec
from ..data import DataConfig
from ..errors import GLoRARayError
from ..identity import identity_changes, with_identity
from ..space import TENSORS, Choice, Kind, SearchSpace
from ..supernet import Supernet
from ..train import TrainConfig, train_supernet
from ..train.job import trained_supernet_dir
from ..train.loop import training_compute

log = logging.getLogger(__name__)

BASELINES_DIR = "baselines"
RUN_NAME_PREFIX = "baseline-"
# The splits a baseline is scored on: val200 (as the search scores its candidates) and test, once.
VAL_SPLIT, TEST_SPLIT = "val200", "test"

# (genes, split) -> accuracy of each subnet of ``genes`` on ``split``, with the given checkpoint.
SplitEvaluator = Callable[[str, Sequence[np.ndarray], str], list[float]]


class BaselineError(GLoRARayError):
    """A baseline name that is not in the table."""


class Form(enum.Enum):
    """The form a baseline gives one support tensor in every layer; tensors not named are none."""

    LARGEST_LORA = "largest lora"  # lora<r> at the space's largest rank
    VECTOR = "vector"

    def choice(self, space: SearchSpace) -> Choice:
        if self is Form.LARGEST_LORA:
            return Choice(Kind.LORA, space.max_rank)
        return Choice(Kind.VECTOR)


@dataclass(frozen=True)
class Baseline:
    """A fixed adapter: one form per named support tensor, the same in every adapted layer."""

    name: str
    forms: Mapping[str, Form]
    description: str

    def layer_choice(self, space: SearchSpace) -> dict[str, str]:
        """The choice of every layer, e.g. {"A": "none", "B": "lora8", "C": "none", ...}."""
        none = Choice(Kind.NONE)
        return {t: (self.forms[t].choice(space) if t in self.forms else none).name for t in TENSORS}

    def genes(self, supernet: Supernet) -> np.ndarray:
        layer = supernet.space.encode_layer(self.layer_choice(supernet.space), f"baseline {self.name!r}")
        return supernet.to_genes(np.tile(layer, supernet.num_layers))


BASELINES: Mapping[str, Baseline] = MappingProxyType({b.name: b for b in (
    Baseline("lora", MappingProxyType({"B": Form.LARGEST_LORA}),
             "LoRA: W + B_down B_up at the space's largest rank, every other tensor none"),
    Baseline("ssf", MappingProxyType({"A": Form.VECTOR, "E": Form.VECTOR}),
             "SSF: a scale per output (W + W*A, A a vector) and a shift (E a vector)"),
    Baseline("bitfit", MappingProxyType({"E": Form.VECTOR}),
             "BitFit: a trainable offset on every bias (E a vector)"),
    Baseline("head", MappingProxyType({}),
             "linear probe: every support tensor none, only the classifier head trains"),
)})


def baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]
    except KeyError:
        raise BaselineError(f"unknown baseline {name!r}; baselines: {sorted(BASELINES)}") from None


def check_baseline_names(names: Sequence[str], space: SearchSpace | None = None) -> tuple[str, ...]:
    """The names as a tuple, each known, given once and (with ``space``) a subnet of that space."""
    names = tuple(names)
    for name in names:
        fixed = baseline(name)
        if space is not None:
            wanted = fixed.layer_choice(space)
            missing = {t: c for t, c in wanted.items() if c not in space.choices(t)}
            if missing:
                raise BaselineError(
                    f"baseline {name!r} needs {missing}, which the space {space!r} does not have; "
                    f"keep those forms (--forms-{next(iter(missing))}) or leave this baseline out")
    if len(set(names)) != len(names):
        raise BaselineError(f"baselines: {list(names)} names a baseline twice")
    return names


@dataclass
class BaselineOutcome:
    """One baseline of one dataset: what it is, its count and its single test."""

    name: str
    key: str
    params: int
    head_params: int
    lr: float
    epochs: int
    seed: int
    val_acc: float
    test_acc: float
    checkpoint_dir: str
    # Training compute (train.loop.training_compute); NaN in records written before it was kept.
    train_images: float = float("nan")
    train_seconds: float = float("nan")
    # Every test list of the unit by name (the first is ``test_acc``).
    tests: dict[str, float] = field(default_factory=dict)
    # What decided this record (glora_ray.identity): the subnet, lr, epochs and seed.
    identity: dict[str, Any] = field(default_factory=dict)


def record_uri(dataset_uri: str, name: str) -> str:
    return storage.join(dataset_uri, BASELINES_DIR, f"{name}.json")


def run_name(name: str, epochs: int) -> str:
    """The baseline's Ray Train run.  The length is part of it: resuming a run of another length
    would splice two cosine schedules and record the result as the new length."""
    return f"{RUN_NAME_PREFIX}{name}-{epochs}ep"


def _inputs(key: str, train: TrainConfig) -> dict[str, Any]:
    """What decides a baseline's results (its record's identity)."""
    return {"key": key, "lr": train.lr, "epochs": train.epochs, "seed": train.seed}


def _stored(uri: str, key: str, train: TrainConfig, tests: Sequence[str]) -> BaselineOutcome | None:
    """The finished record of this exact baseline (same subnet, lr, epochs, seed, each of ``tests``
    scored), else None."""
    if not storage.exists(uri):
        return None
    try:
        record = BaselineOutcome(**storage.read_json(uri, dict))
    except (GLoRARayError, TypeError) as err:  # damaged: trained already, so only tested again
        log.warning("%s cannot be read (%s); the baseline is tested again", uri, err)
        return None
    if identity_changes(asdict(record), _inputs(key, train)) or set(tests) - set(record.tests):
        return None
    return record


def run_baselines(
    names: Sequence[str],
    spec: SupernetSpec,
    data: DataConfig,
    train: TrainConfig,
    train_uri: str,
    dataset_uri: str,
    evaluate: SplitEvaluator,
    progress: Callable[[str], None] = log.info,
    tests: Sequence[str] = (TEST_SPLIT,),
) -> list[BaselineOutcome]:
    """Train each named baseline like the supernet (``train``: its lr, epochs, seed), then score it
    once on val200 and on each of ``tests`` (names ``evaluate`` knows; the first is the record's
    ``test_acc``).  A baseline with a record of the same inputs and tests is neither retrained nor
    retested.  ``progress`` (picklable: training's rank-0 worker calls it too)
    takes the progress lines."""
    structure = spec.build_empty()  # meta device: layers and counter, no weights
    outcomes = []
    for name in check_baseline_names(names):
        genes = baseline(name).genes(structure)
        key, params = structure.subnet_key(genes), structure.num_params(genes)
        uri = record_uri(dataset_uri, name)
        stored = _stored(uri, key, train, tests)
        if stored is not None:  # where the output is now, which may have moved since
            outcomes.append(replace(stored, checkpoint_dir=trained_supernet_dir(train_uri, run_name(name, train.epochs))))
            continue
        progress(f"baseline {name}: training {params:,} adapter params, lr {train.lr:g}, {train.epochs} epochs")
        trained = train_supernet(spec, data, train.for_fixed_subnet(key), train_uri, run_name(name, train.epochs),
                                 progress=progress)
        val_acc = evaluate(trained.checkpoint_dir, [genes], VAL_SPLIT)[0]
        scores = {t: evaluate(trained.checkpoint_dir, [genes], t)[0] for t in tests}
        test_acc = scores[tests[0]]
        outcome = BaselineOutcome(
            name=name, key=key, params=params, head_params=structure.head_num_params, lr=train.lr,
            epochs=train.epochs, seed=train.seed, val_acc=val_acc, test_acc=test_acc,
            checkpoint_dir=trained.checkpoint_dir, **training_compute(trained.history), tests=scores,
        )
        storage.write_json(uri, with_identity(asdict(outcome), _inputs(key, train)))
        progress(f"baseline {name}: val {val_acc:.4f}, test {test_acc:.4f} (tested once)")
        outcomes.append(outcome)
    return outcomes


def stored_outcomes(unit_uri: str, names: Sequence[str]) -> list[BaselineOutcome]:
    """The finished baselines ``names`` of one unit, as their records hold them (tables, figures)."""
    return [BaselineOutcome(**storage.read_json(record_uri(unit_uri, name), dict)) for name in names]
