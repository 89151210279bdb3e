"""Every check that needs no training, run before anything is written or any compute starts.

``preflight`` needs no Ray: the output location, the model and its ``--model-kwargs`` (built on
the meta device), the data (list files, then every image opened), the batch size against the
training split, the budget, the backbone weights.  ``check_cluster`` follows once Ray is up: the
resources asked for against what the cluster has in total.  Both raise only ``GLoRARayError``
subclasses with one-line messages (docs/method.md §6: nothing fails after compute started that
could have been found before).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from .. import storage
from ..backbone import BackboneError, create_backbone, empty_backbone
from ..budget import Budget
from ..data import EMBEDDED_DATASETS
from ..data.digits import write_digits_dataset
from ..data.disjoint import RoleList, check_disjoint
from ..data.verify import check_images, sample_refs
from ..data.vtab import DataError
from ..errors import DamagedFileError, GLoRARayError, one_line
from ..identity import IDENTITY, identity_changes
from ..params import ParamCounter
from ..search.results import POPULATION_DIR
from ..space import TENSORS, Kind
from ..train.loop import steps_per_epoch
from . import layout
from .lock import LOCK_FILE
from .config import PipelineConfig, PipelineConfigError, check_same_run
from .unit import TrainingUnit, spec_for, vtab_unit

log = logging.getLogger(__name__)
# timm.create_model arguments the pipeline sets from other options: never from --model-kwargs.
_SET_ELSEWHERE = {"img_size": "--img-size", "num_classes": "the dataset's class count",
                  "pretrained": "--pretrained / --checkpoint", "drop_path_rate": "the backbone's drop_path_rate"}
_WAIT_POLL_S = 5.0  # seconds between looks at an autoscaling cluster


def _check_backbone_weights(cfg: PipelineConfig) -> None:
    """Checkpoint file and (offline) hub cache: loads the weights once on the CPU."""
    if cfg.backbone.loads_weights:
        create_backbone(cfg.backbone, num_classes=2)


def check_output_location(out: str) -> None:
    """``--out`` names a folder (new or existing) on a filesystem that is there and writable."""
    try:
        fs, path = storage.resolve(out)
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException, storage.StorageError) as err:  # unknown scheme, missing driver, no credentials
        raise PipelineConfigError(f"--out {out}: its filesystem is not available ({one_line(err)})") from err
    if info.type == pafs.FileType.File:
        raise PipelineConfigError(f"--out {out} is a file; give a folder (new or empty) or a URI")
    if not isinstance(fs, pafs.LocalFileSystem):
        return  # object stores have no folders to create or permissions to probe without writing
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PipelineConfigError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    try:  # os.access says yes to root even where nothing can be made (read-only or virtual mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".glora-ray-probe-", dir=existing))
    except OSError as err:
        raise PipelineConfigError(f"--out {out}: cannot create anything in {existing} ({one_line(err)})") from err


def _check_output(cfg: PipelineConfig) -> None:
    check_output_location(cfg.out)
    config_uri = storage.join(cfg.out, layout.CONFIG_FILE)
    if storage.exists(config_uri):
        stored = read_run_record(config_uri, type(cfg))
        if not cfg.resume:
            raise PipelineConfigError(f"--out {cfg.out} already holds a run; drop --no-resume to continue it, "
                                      f"or choose another --out")
        check_same_run(cfg, stored, f"--out {cfg.out}")
    elif not _empty_but_lock(cfg.out):
        raise PipelineConfigError(f"--out {cfg.out} is not empty and holds no glora-ray run ({layout.CONFIG_FILE}); "
                                  f"choose an empty or new folder")


def read_run_record(uri: str, config_type: type[PipelineConfig] = PipelineConfig) -> dict:
    """A run's ``config.json``, refused in one line when it is cut short, not the record the job
    writes, or edited so that its identity no longer follows from its settings."""
    remedy = ("restore the file, or choose another --out for a new run (the results beside it were made with "
              "the settings it recorded)")
    stored = storage.read_json(uri, dict, remedy)
    if not all(isinstance(stored.get(part), dict) for part in ("config", IDENTITY, "extent")):
        raise DamagedFileError(f"{uri} is damaged (it lacks the config, identity or extent of a run); {remedy}")
    try:
        recorded = config_type.from_dict(stored["config"])
    except (GLoRARayError, KeyError, TypeError, ValueError):
        recorded = None  # e.g. its data has moved since: the identity is compared with this run's below
    edits = [] if recorded is None else identity_changes(stored, recorded.identity())
    if edits:
        name, have, want = edits[0]
        raise DamagedFileError(f"{uri} was edited: its identity has {name}={have!r}, its settings give {want!r}; "
                               f"{remedy}")
    return stored


def _empty_but_lock(out: str) -> bool:
    """``out`` is missing or empty, this driver's lock file aside (``lock.LOCK_FILE``)."""
    local = storage.local_path(out)
    if local is None or not os.path.isdir(local):
        return storage.is_empty_dir(out)
    return not [name for name in os.listdir(local) if name != LOCK_FILE]


def _probe_folder(folder: str, what: str) -> None:
    """``folder`` can be made (or written, when it exists): a file on its path, or a parent where
    nothing can be made, is refused naming it."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "the folder itself" if existing == folder else f"a folder above {folder}"
        raise PipelineConfigError(f"{what}: {existing} is a file, where {kind} must be; remove or rename it")
    try:  # os.access says yes to root even where nothing can be made (read-only or virtual mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".glora-ray-probe-", dir=existing))
    except OSError as err:
        raise PipelineConfigError(f"{what}: cannot write in {existing} ({one_line(err)}), so {folder} "
                                  f"cannot be written") from err


def unit_folders(out: str, unit_path: str) -> list[str]:
    """Every folder a unit under ``out`` writes into (``layout``, the search's population folder)."""
    search = layout.search_uri(out, unit_path)
    return [layout.dataset_uri(out, unit_path), layout.train_uri(out, unit_path), search,
            storage.join(search, POPULATION_DIR), layout.export_uri(out, unit_path)]


def check_unit_folders(out: str, units: Sequence[tuple[str, str]]) -> None:
    """Every output folder of every unit, given as (run output, unit path), can be written (or
    made): found here, not after a generation's compute (docs/method.md §6).  Local only: an
    object store has no folders to probe."""
    for run_out, unit_path in units:
        for folder in unit_folders(run_out, unit_path):
            local = storage.local_path(folder)
            if local is not None:
                _probe_folder(os.path.normpath(local), f"--out {out}")


def _check_model(cfg: PipelineConfig) -> None:
    """``--model-kwargs`` that timm accepts for this model: built on the meta device (no memory)."""
    backbone = cfg.backbone
    for key, where in _SET_ELSEWHERE.items():
        if key in backbone.model_kwargs and not (key == "img_size" and backbone.model_kwargs[key] == backbone.img_size):
            raise PipelineConfigError(
                f"--model-kwargs sets {key}={backbone.model_kwargs[key]!r}, which {where} sets"
                + (f" (here {backbone.img_size})" if key == "img_size" else "") + f"; drop {key} from --model-kwargs"
            )
    try:
        empty_backbone(backbone, num_classes=2)
    except Exception as err:  # noqa: BLE001 - timm rejects bad arguments with any exception type
        raise PipelineConfigError(
            f"--model {backbone.name} does not build with --model-kwargs {json.dumps(backbone.model_kwargs)} "
            f"and --img-size {backbone.img_size} ({one_line(err)})"
        ) from err


def smallest_choice_costs(counter: ParamCounter, layer_names: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """The cheapest non-empty choice of any layer, and the cheapest one that is not a scalar:
    ``{"any": (cost, description), "per_feature": (cost, description)}`` (docs/method.md §1)."""
    space = counter.space
    found: dict[str, tuple[int, str]] = {}
    for li, name in enumerate(layer_names):
        for ti, tensor in enumerate(TENSORS):
            for gi, choice in enumerate(space.choice_objects(tensor)):
                cost = int(counter.table[li, ti, gi])
                if choice.kind is Kind.NONE or cost < 0:  # < 0: a form this layer does not offer
                    continue
                what = f"{choice.name} on {tensor} of {name}"
                for kind in ("any",) + (() if choice.kind is Kind.SCALAR else ("per_feature",)):
                    if kind not in found or cost < found[kind][0]:
                        found[kind] = (cost, what)
    return found


def budget_warning(counter: ParamCounter, layer_names: tuple[str, ...], max_params: int) -> str | None:
    """Why a budget of ``max_params`` is almost surely not what was meant, or None (docs/method.md §3)."""
    smallest = smallest_choice_costs(counter, layer_names)
    if "any" not in smallest:
        return None
    cost, what = smallest["any"]
    if max_params < cost:
        return (f"max_params={max_params:,} holds no non-empty choice in any layer (the smallest, {what}, "
                f"costs {cost:,}): the search can only return the empty subnet")
    if "per_feature" in smallest and max_params < smallest["per_feature"][0]:
        cost, what = smallest["per_feature"]
        return (f"max_params={max_params:,} is below the smallest non-empty vector or LoRA choice of any layer "
                f"({what}, {cost:,} parameters): the search can only combine scalars")
    return None


def _check_unit_batch(cfg: PipelineConfig, unit: TrainingUnit, train_size: int) -> None:
    """docs/method.md §2 drops the last partial batch: a batch larger than a worker's share trains
    nothing.  A unit whose batch was fitted to a short list (few-shot) can only fail on the workers."""
    train = unit.train_config(cfg.train)
    world = train.world_size
    if steps_per_epoch(train_size, train, world) >= 1:
        return
    if unit.batch_size is None:
        raise PipelineConfigError(
            f"--batch-size {train.batch_size} is larger than {unit.name}'s {train.split} split "
            f"({train_size} images over {world} worker(s)), so an epoch would hold no full batch; "
            f"use at most {world * (train_size // world)}")
    train_list = unit.data.list_path(unit.train_split)
    raise DataError(f"{train_list}: {train_size} image(s) give no full batch over {world} training worker(s); "
                    f"use fewer --train-workers")


def check_units(cfg: PipelineConfig, units: Sequence[TrainingUnit] | Callable[[], Sequence[TrainingUnit]],
                run_outs: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Every check of a run that needs no training and no Ray, in order of cost, for all three
    pipelines; returns each unit's parameter budget (docs/method.md §8).

    ``units`` may be a function that builds them: it is called after the job's own checks (an own
    dataset's unit reads its labels).  ``run_outs``: the output folders the units are written under
    (VTAB's one per seed; default ``--out``).  Each distinct list file is read once: every line
    parsed, every label in range, every image present; a unit's training, search and test lists
    share no image (``data.disjoint``); last, every image they name is opened once.  Writes nothing
    to ``--out``.
    """
    _check_output(cfg)
    if "peft" in cfg.export and importlib.util.find_spec("peft") is None:
        raise PipelineConfigError("--export peft needs the peft package: pip install -e '.[peft]'")
    try:
        cfg.backbone.validate()  # model name and checkpoint path: before anything builds a model
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    _check_model(cfg)
    units = list(units() if callable(units) else units)
    counts: dict[Path, int] = {}
    for unit in units:
        for split in unit.splits:
            path = unit.data.list_path(split)
            if path not in counts:
                counts[path] = unit.data.validate((split,))[split]
        unit.data.check_classes(unit.train_split)
        _check_unit_batch(cfg, unit, counts[unit.data.list_path(unit.train_split)])
        roles = [("training", unit.train_split), ("search", unit.search_split),
                 *(("test" if t.name == "test" else f"{t.name} test", t.split) for t in unit.tests)]
        check_disjoint([RoleList(role, unit.data.list_path(split), unit.data.samples(split, check_exists=False))
                        for role, split in roles], unit.name)
    check_unit_folders(cfg.out, [(out, unit.path) for out in (run_outs or [cfg.out]) for unit in units])
    budgets: dict[str, tuple[int, int]] = {}
    by_classes: dict[int, tuple[int, int]] = {}
    for unit in units:
        classes = unit.data.num_classes
        if classes not in by_classes:
            supernet = spec_for(cfg, unit.data).build_empty()
            by_classes[classes] = Budget(cfg.search.min_params, cfg.search.max_params).resolve(supernet.counter)
            warning = budget_warning(supernet.counter, supernet.layer_names, by_classes[classes][1])
            if warning is not None:
                log.warning("%s: %s", unit.name, warning)
        budgets[unit.name] = by_classes[classes]
    try:
        _check_backbone_weights(cfg)
    except BackboneError as err:
        raise PipelineConfigError(str(err)) from err
    # Last: the costliest check, every image the units' lists name, opened once.
    lists = {unit.data.list_path(split): (unit, split) for unit in units for split in unit.splits}
    refs = [ref for unit, split in lists.values() for ref in sample_refs(unit.data.samples(split))]
    log.info("preflight: %d image(s) of %d unit(s) open", check_images(refs), len(units))
    return budgets


def preflight(cfg: PipelineConfig) -> dict[str, tuple[int, int]]:
    """The VTAB job's ``check_units``: one unit per dataset, under every seed's output folder; the
    embedded digits dataset is written to the data root if missing."""
    def vtab_units() -> list[TrainingUnit]:
        for dataset in cfg.datasets:
            if dataset in EMBEDDED_DATASETS and cfg.write_embedded_data:
                write_digits_dataset(cfg.data_root, name=dataset)
        return [vtab_unit(cfg, dataset) for dataset in cfg.datasets]

    return check_units(cfg, vtab_units, [run.out for _, run in cfg.seed_runs()])


# -- once Ray is up ------------------------------------------------------------------------------
def resource_shortfalls(cfg: PipelineConfig, resources: Mapping[str, float]) -> list[str]:
    """What the run asks for that ``resources`` (a cluster's totals) can never give; [] if it fits."""
    have = {name: float(resources.get(name, 0.0)) for name in ("CPU", "GPU")}
    short = []
    train = cfg.train
    if train.num_workers > 0:  # 0: Ray Train's local mode, inside the dataset's driver task
        for name, per_worker in train.resources_per_worker().items():
            wanted = per_worker * train.num_workers
            if wanted > have.get(name, 0.0) + 1e-9:
                short.append(f"stage 1 asks {train.num_workers} worker(s) x {per_worker:g} {name} = {wanted:g} {name} "
                             f"(--train-workers, --train-{name.lower()}s)")
    actor = {"CPU": cfg.search.cpus_per_actor, "GPU": cfg.search.gpus_per_actor}
    for name, wanted in actor.items():
        if wanted > have[name] + 1e-9:
            short.append(f"each evaluator actor asks {wanted:g} {name} (--actor-{name.lower()}s)")
    if short:
        short.append(f"the Ray cluster has {have['CPU']:g} CPU and {have['GPU']:g} GPU in total")
    return short


def _demand(cfg: PipelineConfig) -> list[dict[str, float]]:
    """The run's resource bundles, for an autoscaler to scale up to."""
    bundles = [dict(cfg.train.resources_per_worker()) for _ in range(cfg.train.num_workers)]
    actor = {"CPU": float(cfg.search.cpus_per_actor)}
    if cfg.search.gpus_per_actor > 0:
        actor["GPU"] = float(cfg.search.gpus_per_actor)
    return bundles + [actor]


def check_cluster(
    cfg: PipelineConfig,
    cluster_resources: Callable[[], Mapping[str, float]] | None = None,
    wait_s: float | None = None,
    request: Callable[[list[dict[str, float]]], None] | None = None,
) -> None:
    """Refuse, before any training, resources the cluster cannot give; or wait up to ``wait_s``
    seconds for an autoscaling cluster to grow (``request`` tells its autoscaler what is wanted).

    Defaults: Ray's ``cluster_resources``, ``cfg.wait_for_resources_s``, Ray's ``request_resources``.
    """
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources
    wait_s = cfg.wait_for_resources_s if wait_s is None else wait_s
    short = resource_shortfalls(cfg, cluster_resources())
    if short and wait_s > 0:
        if request is None:
            from ray.autoscaler.sdk import request_resources

            def request(bundles: list[dict[str, float]]) -> None:
                request_resources(bundles=bundles)
        request(_demand(cfg))
        deadline = time.monotonic() + wait_s
        try:
            while short and time.monotonic() < deadline:
                log.info("waiting up to %.0f s more for the cluster: %s", deadline - time.monotonic(), "; ".join(short))
                time.sleep(min(_WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
                short = resource_shortfalls(cfg, cluster_resources())
        finally:
            request([])  # the running job holds what it needs from here on
    if short:
        hint = (f"after waiting {wait_s:g} s" if wait_s > 0
                else "lower these, or pass --wait-for-resources SECONDS on an autoscaling cluster")
        raise PipelineConfigError(f"resources: {'; '.join(short)}; {hint}")
