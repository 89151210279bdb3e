"""Stage 1: supernet training (docs/method.md §2), as a Ray Train job around a Ray-free loop."""
from .config import TrainConfig, TrainConfigError, TrainConfigTypeError
from .job import TrainResult, train_loop_per_worker, train_supernet
from .loop import (
    EpochStats,
    SupernetTraining,
    TrainingState,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    expected_epoch_digest,
    load_training_state,
    make_loader,
    subnet_digest,
    subnet_for_step,
    train_epoch,
)

__all__ = [
    "EpochStats",
    "SupernetTraining",
    "TrainConfig",
    "TrainConfigError",
    "TrainConfigTypeError",
    "TrainResult",
    "TrainingState",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "expected_epoch_digest",
    "load_training_state",
    "make_loader",
    "subnet_digest",
    "subnet_for_step",
    "train_epoch",
    "train_loop_per_worker",
    "train_supernet",
]
