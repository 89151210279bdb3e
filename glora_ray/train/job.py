"""Stage 1 as a Ray Train job: ``train_supernet`` runs ``SupernetTraining`` on TorchTrainer workers.

Checkpoints: every ``checkpoint_every`` epochs (and at the last), rank 0 writes the training
state (adapters, head, optimizer, scheduler, step, epoch, history) and all ranks call
``ray.train.report``; the last one also holds the finished supernet (``save_supernet``).
Rerunning with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint
(Ray Train hands it to ``ray.train.get_checkpoint``); a worker failure (a lost node among them)
restarts the worker group from it on the nodes that remain or arrive, up to ``max_failures``
times.  Afterwards the driver copies the finished supernet to ``<storage_path>/<run_name>/supernet``,
which ``load_supernet`` reads.  ``storage_path`` is a local path or a URI (``s3://``, ``gs://``,
``file://``, any pyarrow or fsspec filesystem): Ray Train's checkpoints, local mode's own and the
finished supernet all go through it, so workers on any node reach them.  Each epoch's history
entry names the Ray node of every rank (``nodes``): where the training ran, attempt by attempt.

A training whose loss or adapter weights stop being finite stops at that step (``loop``), is not
retried, and leaves nothing behind: the driver removes the run's folder and raises
``TrainingDiverged``, so a rerun (with a lower lr, or again) starts afresh.
"""
from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import faults, storage
from ..checkpoint import (CheckpointMismatchError, SupernetSpec, adapters_readable, describe_names, nonfinite_tensors,
                          read_spec, save_supernet)
from ..errors import DamagedFileError, GLoRARayError, NoSpaceError, TrainingDiverged
from ..data.verify import check_decodable
from ..data.vtab import DataConfig
from ..identity import identity_changes, result_identity, with_identity
from ..progress import StageClock
from ..runtime import init_ray, is_verbose
from .config import TrainConfig, TrainConfigError
from .resume import newest_intact, repair_run
from .sampling import StepSubnets
from .loop import EpochStats, SupernetTraining, load_training_state, steps_per_epoch

SUPERNET_DIR = "supernet"
HISTORY_FILE = "history.json"
TRAIN_CONFIG_FILE = "train_config.json"  # the settings a finished supernet was trained with
RUN_SPEC_FILE = "run_spec.json"
log = logging.getLogger(__name__)
# Local mode (num_workers=0) persists nothing through Ray, so its checkpoints go here.
LOCAL_CHECKPOINTS_DIR = "local_checkpoints"
_LOCAL_CHECKPOINT_PREFIX = "checkpoint_epoch_"


@dataclass
class TrainResult:
    checkpoint_dir: str  # save_supernet output: what load_supernet reads
    history: list[dict[str, Any]]  # one entry per epoch, from the first epoch of the run
    resumed_from_step: int | None  # step the final attempt started from; None if from scratch
    final_step: int
    run_dir: str  # <storage_path>/<run_name>
    spec: SupernetSpec
    ray_checkpoint_path: str | None  # the last Ray Train checkpoint


def prepare_spec(spec: SupernetSpec, data: DataConfig, train: TrainConfig) -> SupernetSpec:
    """A copy of ``spec`` that records the data and agrees with it; absolute paths for workers."""
    data.check()
    if spec.num_classes != data.num_classes:
        raise TrainConfigError(
            f"spec.num_classes={spec.num_classes} but dataset {data.name!r} has {data.num_classes} classes"
        )
    if spec.backbone.img_size != data.img_size:
        raise TrainConfigError(
            f"backbone img_size={spec.backbone.img_size} but data img_size={data.img_size}; they must agree"
        )
    if spec.dataset and not data.same_dataset(spec.dataset):
        raise CheckpointMismatchError(f"spec.dataset={spec.dataset!r} but training data is {data.name!r}")
    backbone = spec.backbone
    if backbone.checkpoint_path is not None:
        backbone = replace(backbone, checkpoint_path=_absolute(backbone.checkpoint_path))
    extra = {**spec.extra, "data": absolute_data(data).to_dict(), "train_split": train.split}
    return replace(spec, backbone=backbone, dataset=data.name, extra=extra)


def _absolute(location: str) -> str:
    """A local path made absolute (workers do not share the driver's working directory); a URI as it is."""
    local = storage.local_path(location)
    return location if local is None else local


def trained_supernet_dir(storage_path: str, run_name: str) -> str:
    """Where the run ``run_name`` under ``storage_path`` keeps its finished supernet (what
    ``TrainResult.checkpoint_dir`` names): derived, never stored, so a moved output still finds it."""
    return storage.join(_absolute(storage_path), run_name, SUPERNET_DIR)


def absolute_data(data: DataConfig) -> DataConfig:
    return replace(data, root=_absolute(data.root))


def check_cluster_fits(train: TrainConfig) -> None:
    """Refuse a worker group the running cluster can never hold: Ray Train would wait forever.

    Only checked against an already initialised Ray (``train.wait_for_resources`` skips it, for
    clusters that autoscale).  Inside a Tune trial, the trial's own reservation counts against
    what is left for the workers.
    """
    import ray

    if train.wait_for_resources or not ray.is_initialized():
        return
    total = ray.cluster_resources()
    for resource, per_worker in train.resources_per_worker().items():
        wanted, have = per_worker * train.num_workers, total.get(resource, 0.0)
        if wanted > have:
            raise TrainConfigError(
                f"{train.num_workers} worker(s) x {per_worker} {resource} = {wanted} {resource}, but the Ray "
                f"cluster has {have}; lower num_workers / cpus_per_worker / gpus_per_worker "
                f"(or set wait_for_resources=True on an autoscaling cluster)"
            )


def _check_rerun(run_dir: str, spec: SupernetSpec) -> None:
    """Refuse to resume a run that was started for another model/space/data; record a new one's spec."""
    uri = storage.join(run_dir, RUN_SPEC_FILE)
    if storage.exists(uri):
        SupernetSpec.from_dict(storage.read_json(uri)).check_matches(spec, f"run {run_dir}")
    else:
        storage.write_json(uri, spec.to_dict())


def train_supernet(
    spec: SupernetSpec,
    data: DataConfig,
    train: TrainConfig,
    storage_path: str,
    run_name: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a supernet with Ray Train; resume a run of the same name; return where it is saved.

    Everything that can be checked without training is checked here first: the settings, the
    dataset (every line, path, label and training image) and the backbone (weights readable or,
    offline, cached).  An initialised Ray (or a Tune trial's) is used as it is, otherwise
    ``glora_ray.runtime.init_ray`` starts one.  ``progress`` (picklable: it runs in the rank-0
    worker) receives one line per epoch; by default the worker logs it.
    """
    train.validate()
    spec = prepare_spec(spec, data, train)
    data = absolute_data(data)
    _check_before_ray(spec, data, train)
    storage_path = _absolute(storage_path)
    run_dir = storage.join(storage_path, run_name)
    final_dir = trained_supernet_dir(storage_path, run_name)
    finished = _finished(final_dir, spec, train, run_dir, progress or log.warning)
    if finished is not None:
        return finished  # a rerun of a completed run: no worker group to start
    if train.num_workers > 0:
        init_ray()
        check_cluster_fits(train)
    _check_rerun(run_dir, spec)
    # A damaged newest checkpoint (or Ray Train's record of it): resume from the newest intact one.
    resume_from = repair_run(run_dir, spec, progress or log.warning) if train.num_workers > 0 else None
    trainer = _trainer(spec, data, train, storage_path, run_name, run_dir, progress, resume_from)
    result = trainer.fit()
    outcome = result.return_value or {}
    if outcome.get("bad_input") is not None:
        raise outcome["bad_input"]
    if outcome.get("no_space"):
        raise NoSpaceError(f"training run {run_dir}: {outcome['no_space']}")
    if outcome.get("diverged"):
        _forget_diverged_run(run_dir)
        raise TrainingDiverged(diverged_message(outcome["diverged"], data.name, run_name, train),
                               **{k: outcome["diverged"].get(k) for k in ("epoch", "step")},
                               what=outcome["diverged"].get("what", ""))
    return _install_result(result, spec, train, run_dir, final_dir, outcome)


def _check_before_ray(spec: SupernetSpec, data: DataConfig, train: TrainConfig) -> None:
    """The training list (every line, path, label; every image decodes), a full batch per worker,
    the backbone (real weights loaded once here, so an unreadable file or an offline hub fails
    now, not in every worker after Ray starts), a fixed subnet's key, a sandwich's budget, and an
    ``init_from`` supernet of the same spec."""
    counts = data.validate((train.split,))
    check_decodable(data.samples(train.split), data.list_path(train.split))
    if steps_per_epoch(counts[train.split], train, train.world_size) < 1:
        raise TrainConfigError(
            f"{counts[train.split]} images in {train.split!r} give no full batch of {train.batch_size} "
            f"(global) over {train.world_size} worker(s)"
        )
    spec.backbone.validate()
    # Otherwise the empty structure: the architecture builds and the targets match its layers.
    structure = spec.build() if spec.backbone.loads_weights else spec.build_empty()
    if train.fixed_subnet is not None:
        structure.to_genes(train.fixed_subnet)  # a key of this space and these layers, before Ray starts
    else:
        StepSubnets.from_config(structure.counter, train)  # a sandwich needs the budget: refused now
    if train.init_from is not None:
        read_spec(train.init_from).check_matches(spec, f"init_from {train.init_from}")


def _trainer(spec: SupernetSpec, data: DataConfig, train: TrainConfig, storage_path: str, run_name: str,
             run_dir: str, progress: Callable[[str], None] | None, resume_from: str | None) -> Any:
    """The Ray Train V2 ``TorchTrainer`` of this run (resumed by name and storage path)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    local_mode = train.num_workers == 0
    filesystem, path = storage.resolve(storage_path)  # the filesystem the driver resolved, for every worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.to_dict(),
            "data": data.to_dict(),
            "train": train.to_dict(),
            "local_checkpoints": storage.join(run_dir, LOCAL_CHECKPOINTS_DIR) if local_mode else None,
            "resume_from": resume_from,
            "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=train.resources_per_worker(),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
            # Ray Train's per-report lines only when asked for (--verbose).
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
        ),
    )


def _install_result(result: Any, spec: SupernetSpec, train: TrainConfig, run_dir: str, final_dir: str,
                    outcome: Mapping[str, Any]) -> TrainResult:
    """The last checkpoint's supernet installed in ``final_dir`` with its history and settings (the
    settings last: ``_finished`` takes a folder with them for complete)."""
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:  # a download when the checkpoint is remote
        storage.install_dir(Path(directory) / SUPERNET_DIR, final_dir)
        history = load_training_state(directory)["history"]
    read_spec(final_dir).check_matches(spec, final_dir)
    storage.write_json(storage.join(final_dir, HISTORY_FILE), history)
    storage.write_json(storage.join(final_dir, TRAIN_CONFIG_FILE), with_identity({}, result_identity(train)))
    return TrainResult(
        checkpoint_dir=final_dir,
        history=history,
        resumed_from_step=outcome.get("resumed_from_step"),
        final_step=history[-1]["step"] if history else 0,
        run_dir=run_dir,
        spec=spec,
        ray_checkpoint_path=result.checkpoint.path,
    )


def diverged_message(diverged: Mapping[str, Any], dataset: str, run_name: str, train: TrainConfig) -> str:
    """The one-line error for a diverged training: where, and what to try (docs/method.md §7)."""
    return (f"dataset {dataset!r}, training run {run_name!r}: {diverged['message']} (lr {train.lr:g}); nothing "
            f"from this training is kept, and a rerun starts it afresh; try a lower --lr, or narrower forms "
            f"(docs/method.md §7, e.g. --forms-B lora none)")


def _forget_diverged_run(run_dir: str) -> None:
    """Remove a diverged run's checkpoints and records, so no rerun resumes its state or its lr."""
    fs, path = storage.resolve(run_dir)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    log.debug("removed the diverged training run %s", run_dir)


def _finished(final_dir: str, spec: SupernetSpec, train: TrainConfig, run_dir: str,
              warn: Callable[[str], None]) -> TrainResult | None:
    """The stored result of this exact run when it already completed every epoch, else None."""
    history_uri, settings_uri = storage.join(final_dir, HISTORY_FILE), storage.join(final_dir, TRAIN_CONFIG_FILE)
    if not (storage.exists(history_uri) and storage.exists(settings_uri)):
        return None
    try:
        settings, history = storage.read_json(settings_uri, dict), storage.read_json(history_uri, list)
    except DamagedFileError as err:
        warn(f"{err}; the finished supernet is installed again from the last training checkpoint")
        return None
    if identity_changes(settings, result_identity(train)):
        return None  # other settings (e.g. more epochs): let Ray Train resume from its checkpoint
    if not history or history[-1]["epoch"] != train.epochs - 1:
        return None
    if not adapters_readable(final_dir):  # cut short after it was installed: install it again
        warn(f"{final_dir}: the finished supernet cannot be read; it is installed again from the last training "
             f"checkpoint")
        return None
    read_spec(final_dir).check_matches(spec, final_dir)
    return TrainResult(checkpoint_dir=final_dir, history=history, resumed_from_step=history[-1]["step"],
                       final_step=history[-1]["step"], run_dir=run_dir, spec=spec, ray_checkpoint_path=None)


# -- inside the workers -----------------------------------------------------------------------
def _local_checkpoints(directory: str | None) -> list[str]:
    """Local mode's checkpoint folders under ``directory`` (a path or URI), oldest first."""
    if directory is None:
        return []
    return [storage.join(directory, name) for name, is_dir in storage.list_dir(directory)
            if is_dir and name.startswith(_LOCAL_CHECKPOINT_PREFIX)]


def _resume_payload(checkpoint, resume_from: str | None, local_dir: str | None, spec: SupernetSpec,
                    warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The training state to resume from: Ray Train's checkpoint, else the intact one the driver
    chose (``resume.repair_run``), else local mode's newest intact one."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload, where = load_training_state(directory), str(checkpoint.path)
    else:
        where = resume_from or newest_intact(_local_checkpoints(local_dir), spec, warn)
        if where is None:
            return None
        payload = load_training_state(where)
    SupernetSpec.from_dict(payload["meta"]["spec"]).check_matches(spec, f"checkpoint {where}")
    bad = nonfinite_tensors(payload["adapters"])
    if bad:  # written before divergence was caught: resuming it would train NaN on
        raise TrainingDiverged(f"checkpoint {where} holds non-finite weights ({describe_names(bad)})",
                               epoch=int(payload["epoch"]), what="non-finite weights in its checkpoint")
    return payload


class _Reporter:
    """Checkpoints through Ray Train every N epochs and at the end (rank 0 writes); progress lines
    every epoch.  Only checkpoint epochs report: Ray Train V2 keeps no metrics without a checkpoint,
    and each report is a barrier through the controller (about 2 s on 2 CPU cores, which made
    a one-step few-shot epoch ten times slower)."""

    def __init__(self, training: SupernetTraining, spec: SupernetSpec, rank: int, local_dir: str | None,
                 progress: Callable[[str], None] | None):
        self.training, self.spec, self.rank, self.local_dir = training, spec, rank, local_dir
        self.progress = progress or log.info
        self.clock = StageClock(training.cfg.epochs - training.state.epoch)

    def epoch_end(self, training: SupernetTraining, stats: EpochStats) -> None:
        if training.finished or training.state.epoch % training.cfg.checkpoint_every == 0:
            self.checkpoint(stats)
        if self.rank == 0:
            self.progress(f"epoch {stats.epoch + 1}/{training.cfg.epochs}: loss {stats.loss:.4f}, train acc "
                          f"{stats.train_acc:.4f}, {stats.images_per_s:.0f} images/s | {self.clock.step()}")

    def checkpoint(self, stats: EpochStats | None) -> None:
        import ray.train

        metrics = self._metrics(stats)
        if self.rank != 0:
            ray.train.report(metrics)  # a barrier: every rank reports each checkpoint
            return
        if self.local_dir is not None:  # local mode: the job's own checkpoint folders, on a path or URI
            directory = storage.join(self.local_dir, f"{_LOCAL_CHECKPOINT_PREFIX}{self.training.state.epoch:06d}")
            try:
                self._write(directory)
            except OSError:
                storage.delete_dir(directory)  # never a half-written checkpoint to resume from
                raise
            filesystem, path = storage.resolve(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint(path, filesystem=filesystem))
            self._prune_local()
            return
        with tempfile.TemporaryDirectory(prefix="glora-ckpt-") as directory:
            self._write(directory)
            # Synchronous upload: the directory may go once report returns.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def _metrics(self, stats: EpochStats | None) -> dict[str, Any]:
        state = self.training.state
        if stats is None:
            return {"epoch": state.epoch - 1, "step": state.step}
        return {k: v for k, v in stats.to_dict().items() if k != "subnet_digests"}

    def _write(self, directory: str) -> None:
        self.training.save(directory)
        if self.training.finished:
            save_supernet(storage.join(directory, SUPERNET_DIR), self.training.supernet, self.spec)

    def _prune_local(self) -> None:
        for old in _local_checkpoints(self.local_dir)[: -self.training.cfg.keep_checkpoints]:
            storage.delete_dir(old)


def train_loop_per_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """The function Ray Train runs on every worker (and in the driver in local mode)."""
    import ray.train
    import ray.train.torch

    spec = SupernetSpec.from_dict(config["spec"])
    data = DataConfig.from_dict(config["data"])
    train = TrainConfig.from_dict(config["train"])
    local_dir = config.get("local_checkpoints") or None
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # whatever Ray assigned: never a hard-coded cuda
    threads = torch.get_num_threads()
    # As many compute threads as CPUs this worker reserved: no oversubscription on a small box.
    torch.set_num_threads(train.cpus_per_worker)
    # The loop reseeds torch's RNG every epoch; in local mode that RNG is the caller's, so fork it.
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            return _train_worker(spec, data, train, device, rank, world_size, local_dir, config.get("resume_from"),
                                 config.get("progress"))
    except TrainingDiverged as err:
        # Returned, not raised: Ray Train would retry a worker's error max_failures times, each
        # resuming the last checkpoint of this lr only to diverge again.  The driver raises it.
        return {"diverged": {"message": str(err), "epoch": err.epoch, "step": err.step, "what": err.what}}
    except GLoRARayError as err:
        # Bad input found in a worker (a checkpoint of another run, say) is returned, not retried:
        # the driver raises it as itself, one line.
        return {"bad_input": err}
    except Exception as err:  # noqa: BLE001 - a full disk is returned like a divergence; the rest raises
        no_space = NoSpaceError.found_in(err)
        if no_space is None:
            raise
        return {"no_space": str(no_space)}
    finally:
        torch.set_num_threads(threads)


def _rank_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (the host name outside Ray)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    if world_size == 1 or not dist.is_initialized():
        return [node]
    nodes: list[str | None] = [None] * world_size
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _train_worker(
    spec: SupernetSpec,
    data: DataConfig,
    train: TrainConfig,
    device: torch.device,
    rank: int,
    world_size: int,
    local_dir: str | None,
    resume_from: str | None,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    resume = _resume_payload(ray.train.get_checkpoint(), resume_from, local_dir, spec, progress or log.warning)
    training = SupernetTraining(
        spec.build(),
        data.build(train.split),
        train,
        device,
        world_size=world_size,
        rank=rank,
        loader_workers=data.loader_workers,
        prepare_model=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True}
        ),
        # Our DistributedSampler (seeded, drop_last) stays; Ray only adds the device move.
        prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        meta={"spec": spec.to_dict(), "data": data.to_dict(), "train": train.to_dict()},
        init_spec=spec,
        nodes=_rank_nodes(world_size),
    ).setup(resume)
    reporter = _Reporter(training, spec, rank, local_dir, progress)
    already_done = training.finished
    resumed = resume is not None
    training.run(on_epoch_end=reporter.epoch_end, on_step=lambda step: faults.at_train_step(step, resumed))
    if already_done:
        # A rerun of a finished run: report its final state (with the supernet) once more.
        reporter.checkpoint(None)
    return {"resumed_from_step": training.resumed_from_step, "final_step": training.state.step,
            "world_size": world_size}
