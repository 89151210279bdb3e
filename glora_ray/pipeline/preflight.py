"""Every check that needs no training, run before anything is written or any compute starts."""
from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..backbone import BackboneError, create_backbone
from ..budget import Budget
from ..data import EMBEDDED_DATASETS, validate_dataset
from ..data.digits import write_digits_dataset
from . import layout
from .config import PipelineConfig, PipelineConfigError

EVAL_SPLITS = ("val200", "test")


def _check_backbone_weights(cfg: PipelineConfig) -> None:
    """Checkpoint file and (offline) hub cache: loads the weights once on the CPU."""
    if cfg.backbone.pretrained or cfg.backbone.checkpoint_path:
        create_backbone(cfg.backbone, num_classes=2)


def _check_output(cfg: PipelineConfig) -> None:
    config_uri = storage.join(cfg.out, layout.CONFIG_FILE)
    if storage.exists(config_uri):
        stored = storage.read_json(config_uri)
        if not cfg.resume:
            raise PipelineConfigError(f"--out {cfg.out} already holds a run; drop --no-resume to continue it, "
                                      f"or choose another --out")
        stored_identity, identity = stored.get("identity", {}), json.loads(json.dumps(cfg.identity(), default=str))
        differing = sorted(_differences(stored_identity, identity))
        if differing:
            raise PipelineConfigError(
                f"--out {cfg.out} holds a different run's results (differs in {', '.join(differing[:6])}); "
                f"choose another --out"
            )
    elif not storage.is_empty_dir(cfg.out):
        raise PipelineConfigError(f"--out {cfg.out} is not empty and holds no glora-ray run ({layout.CONFIG_FILE}); "
                                  f"choose an empty or new folder")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def preflight(cfg: PipelineConfig) -> dict[str, tuple[int, int]]:
    """Every check that needs no training, in order of cost; returns each dataset's budget."""
    _check_output(cfg)
    try:
        cfg.backbone.validate()  # model name and checkpoint path: before anything builds a model
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    for dataset in cfg.datasets:
        if dataset in EMBEDDED_DATASETS and cfg.write_embedded_data:
            write_digits_dataset(cfg.data_root)
        validate_dataset(cfg.data_root, dataset, (cfg.train.split, *EVAL_SPLITS))
    from .run import spec_for  # run.py imports this module

    budgets = {}
    for dataset in cfg.datasets:
        counter = spec_for(cfg, dataset).build_empty().counter
        budgets[dataset] = Budget(cfg.search.min_params, cfg.search.max_params).resolve(counter)
    try:
        _check_backbone_weights(cfg)
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    return budgets
