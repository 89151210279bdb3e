"""Command line of pipelines/vtab.py: a preset, overridden option by option."""
from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import signal
import sys
from dataclasses import MISSING, fields, is_dataclass, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..backbone import packaged_weights
from ..errors import GLoRARayError, NoSpaceError
from ..options import GROUPS, JOB, Option, declared
from ..progress import StageWatch
from ..train.config import TrainConfig
from .lock import OutputLock
from .preflight import check_output_location
from .stopping import install_stop_handlers, restore_handlers, shutdown_ray, stop_signal
from .config import PRESETS, PipelineConfig, PipelineConfigError, preset

VTAB_DESCRIPTION = (
    "GLoRA on VTAB-1k: for each dataset train a supernet (Ray Train), search it under a "
    "parameter budget (Ray actors), test the winner once, merge and export it. With no "
    "arguments: the embedded default (bundled digits, a pretrained EfficientNet-Lite0 from a pip "
    "package, local Ray, offline)."
)


# -- the parser, generated from the options declared on the configuration fields (glora_ray.options)
Path = tuple[str, ...]  # a field's path from PipelineConfig: ("train", "num_workers"), ("forms", "A")


def declared_options(config_cls: type, values: Mapping[str, Any]) -> list[tuple[Path, Option]]:
    """Every option of ``config_cls`` and of its nested settings (the dataclasses ``values`` holds,
    a preset), in declaration order, with the path of the field it sets."""
    found: list[tuple[Path, Option]] = []
    for spec in fields(config_cls):
        nested = values.get(spec.name)
        if is_dataclass(nested):
            found += [((spec.name, *path), opt) for path, opt in declared_options(type(nested), {})]
        elif (opt := declared(spec.metadata)) is not None:
            found.append(((spec.name,), opt))
    return found


def _field_defaults(config_cls: type) -> dict[str, Any]:
    """The defaults of ``config_cls``'s fields that have one (what a preset leaves as it is)."""
    defaults = {f.name: f.default for f in fields(config_cls) if f.default is not MISSING}
    return {**defaults, **{f.name: f.default_factory() for f in fields(config_cls) if f.default_factory is not MISSING}}


def _dest(path: Path) -> str:
    return ".".join(path)


def _option_paths(options: Sequence[tuple[Path, Option]]) -> dict[str, Path]:
    """Each option's argparse dest and the path of the field it sets (one per key of a mapping field)."""
    paths: dict[str, Path] = {}
    for path, opt in options:
        for key in opt.per_key or (None,):
            key_path = path if key is None else (*path, key)
            paths[_dest(key_path)] = key_path
    return paths


def _preset_value(values: Mapping[str, Any], path: Path, opt: Option) -> Any:
    """The value the preset gives the field at ``path``, as --help shows it."""
    value: Any = values
    for name in path:
        value = value.get(name) if isinstance(value, Mapping) else getattr(value, name)
    if value is None:
        return opt.unset or "none"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, dict) else value


def _add_option(group, flag: str, dest: str, help_text: str, settings: Mapping[str, Any]) -> None:
    settings = dict(settings)
    if settings.get("action") in ("store_true", "store_false"):
        settings["default"] = None  # not given: the preset's value stays
    else:  # named after the flag, as argparse names an option's value when its dest is the flag's
        settings.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
    group.add_argument(flag, dest=dest, help=help_text, **settings)


def build_parser(config_cls: type = PipelineConfig, preset_name: str = "default", prog: str = "pipelines/vtab.py",
                 description: str = VTAB_DESCRIPTION, presets: Callable[[str], dict[str, Any]] = preset,
                 help_overrides: Mapping[str, str | None] | None = None) -> argparse.ArgumentParser:
    """The options ``config_cls`` declares; ``--help`` shows the values ``presets`` gives ``preset_name``
    (or the --preset given).  ``help_overrides``: a pipeline's own help for a field (by its path,
    e.g. ``data_root``), None to leave that option out."""
    values = {**_field_defaults(config_cls), **presets(preset_name if preset_name in PRESETS else "default")}
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(f"{description} Option values shown are those of preset {preset_name!r}; "
                     f"--preset NAME --help shows another's."),
    )
    groups: dict[str, Any] = {name: parser.add_argument_group(name) for name in GROUPS}
    groups[JOB].add_argument(
        "--preset", choices=sorted(PRESETS), default="default",
        help="starting values: 'default' (embedded: pretrained EfficientNet-Lite0 on the bundled digits, minutes on "
             "a laptop), 'tiny' (a random-init small ViT, the cheapest run: tests) or 'paper' (the paper's protocol)")
    exclusive: dict[str, Any] = {}
    overrides = help_overrides or {}
    for path, opt in declared_options(config_cls, values):
        help_text = overrides.get(_dest(path), opt.help)
        if help_text is None:
            continue
        group = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        if opt.exclusive is not None:
            group = exclusive.get(opt.exclusive) or exclusive.setdefault(opt.exclusive, group.add_mutually_exclusive_group())
        elif opt.negation is not None:  # an option and its negation exclude each other
            group = group.add_mutually_exclusive_group()
        keys = opt.per_key or {None: opt.argparse}
        for key, settings in keys.items():
            key_path = path if key is None else (*path, key)
            shown = str(_preset_value(values, key_path, opt)).replace("%", "%%")
            text = help_text.format(key=key, choices=", ".join(settings.get("choices", ()))) if key else help_text
            _add_option(group, opt.flag_for(path[-1], key), _dest(key_path), f"{text} (preset: {shown})".lstrip(), settings)
        if opt.negation is not None:
            flag, negation_help = opt.negation
            group.add_argument(flag, dest=_dest(path), action="store_false", help=negation_help)
    return parser


def config_from_args(args: argparse.Namespace, config_cls: type = PipelineConfig,
                     presets: Callable[[str], dict[str, Any]] = preset) -> Any:
    """The preset's values, replaced by every option the user gave (and what each implies)."""
    values = presets(args.preset)
    options = declared_options(config_cls, values)
    paths = _option_paths(options)
    given = {dest: value for dest, value in vars(args).items() if value is not None and dest in paths}
    _check_exclusions(given, options)
    changes: dict[str, Any] = {}
    for dest, value in given.items():
        *outer, name = paths[dest]
        target = changes
        for part in outer:
            target = target.setdefault(part, {})
        target[name] = value  # lists as argparse gives them: each config normalises its own fields
    _implied_changes(changes, values)
    settings = dict(values)
    for name, value in changes.items():
        current = values.get(name)
        if is_dataclass(current):
            settings[name] = replace(current, **value)
        elif isinstance(current, dict) and isinstance(value, dict):
            settings[name] = {**current, **value}
        else:
            settings[name] = value
    known = {f.name for f in fields(config_cls)}
    return config_cls(**{name: value for name, value in settings.items() if name in known})


def _check_exclusions(given: Mapping[str, Any], options: Sequence[tuple[Path, Option]]) -> None:
    flags = {_dest(path): opt.flag_for(path[-1]) for path, opt in options}
    for path, opt in options:
        other = next((d for d, f in flags.items() if f == opt.excludes), None)
        if _dest(path) in given and other in given:
            raise PipelineConfigError(f"{opt.excludes} and {flags[_dest(path)]} exclude each other: give one of them")


def _implied_changes(changes: dict[str, Any], values: Mapping[str, Any]) -> None:
    """What a given option implies beyond its own field (each rule says why)."""
    backbone = changes.setdefault("backbone", {})
    given = set(backbone)
    # One source of weights: the one given replaces the preset's.
    for source, others in (("checkpoint_path", {"pretrained": False, "weights": None}),
                           ("weights", {"pretrained": False, "checkpoint_path": None}),
                           ("pretrained", {"checkpoint_path": None, "weights": None})):
        if source in given:
            backbone.update(others)
    if "weights" in given and "name" not in given:  # packaged weights name their model
        backbone["name"] = packaged_weights(backbone["weights"]).model
    if "name" in backbone and "model_kwargs" not in given:
        backbone["model_kwargs"] = {}  # the preset's reductions belong to the preset's model
    train = changes.setdefault("train", {})
    gpus = train.get("gpus_per_worker")
    if gpus is not None:  # a GPU count says whether training uses GPUs at all
        train.update(use_gpu=gpus > 0, gpus_per_worker=gpus if gpus > 0 else None)
    if "lr_sweep" in changes and "lr" not in changes:
        changes["lr"] = None  # a sweep replaces the preset's lr
    _check_local_training(train, values["train"], "lr_sweep" in changes)


def _check_local_training(train: dict[str, Any], preset_train: TrainConfig, sweeps: bool) -> None:
    """A preset that trains in the job's process (Ray Train's local mode) starts one worker when
    asked for what only a worker has: a GPU of its own, or a Tune trial per lr; refuses settings
    that local mode would ignore."""
    gpus = train.get("gpus_per_worker") or 0
    if (gpus > 0 or sweeps) and "num_workers" not in train and preset_train.num_workers == 0:
        train["num_workers"] = 1
    if train.get("num_workers", preset_train.num_workers) != 0:
        return
    # In-process training reserves nothing: --train-cpus is only the torch threads there, and a
    # GPU would never be assigned.
    if gpus > 0:
        raise PipelineConfigError(f"--train-gpus {gpus:g} needs a training worker, but training runs in the job's own "
                                  f"process (--train-workers 0), which is given no GPU: give --train-workers N")
    if train.get("cpus_per_worker", 0) > (os.cpu_count() or 1):
        raise PipelineConfigError(f"--train-cpus {train['cpus_per_worker']}: training runs in the job's own process "
                                  f"(--train-workers 0), where it is the number of threads, but this machine has "
                                  f"{os.cpu_count()} CPUs; give at most that, or --train-workers N to train on "
                                  f"workers of that size")


Config = TypeVar("Config")


def _chosen_preset(argv: Sequence[str] | None) -> str:
    """--preset alone, before the full parser exists (its help shows that preset's values)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset", default="default")
    return early.parse_known_args(argv)[0].preset


def parse_with(build: Callable[[str], argparse.ArgumentParser], make: Callable[[argparse.Namespace], Config],
               argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv`` with the parser ``build`` makes for the chosen preset, then build the configuration;
    a bad value exits with the parser's usage message naming it."""
    parser = build(_chosen_preset(argv))
    args = parser.parse_args(argv)
    try:
        return make(args)
    except GLoRARayError as err:  # bad values: one line naming the option, exit 2 (no usage screen)
        parser.exit(2, f"error: {err}\n")
        raise  # unreachable: parser.exit exits


def parse_config(argv: Sequence[str] | None = None) -> PipelineConfig:
    return parse_with(lambda name: build_parser(PipelineConfig, name), config_from_args, argv)


def run_main(parse: Callable[[Sequence[str] | None], Config], run: Callable[[Config], Any],
             argv: Sequence[str] | None = None) -> int:
    """A pipeline's entry point: progress lines to stdout; exit status 2 with a one-line message for bad
    input (a ``GLoRARayError``); anything else is a bug or a failure after compute started: its traceback.

    One driver per output folder (``OutputLock``, taken before any check or compute).  SIGTERM and
    SIGINT stop the job cleanly (``stopping``): Ray shut down, one line naming the stage that was
    stopped, exit status 143 / 130; the same command resumes.
    """
    config = parse(argv)
    show_progress(getattr(config, "verbose", False))
    package = logging.getLogger("glora_ray")
    stages = StageWatch()
    package.addHandler(stages)
    previous = install_stop_handlers()
    out = getattr(config, "out", None)
    lock = OutputLock(out) if out is not None else None
    try:
        if lock is not None:
            check_output_location(out)  # a clear message before the lock tries to make the folder
            lock.acquire()
        run(config)
    except GLoRARayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk is one line too; anything else keeps its traceback
        no_space = NoSpaceError.found_in(err)
        if no_space is None:
            raise
        print(f"error: {no_space}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # RunStopped (SIGTERM, SIGINT) or Python's own Ctrl-C
        signum = stop_signal(stop)
        shutdown_ray()
        sys.stdout.flush()
        print(f"stopped by {signal.Signals(signum).name} during {stages.describe()}; run the same command to "
              f"resume", file=sys.stderr)
        return 128 + signum
    finally:
        if lock is not None:
            lock.release()
        package.removeHandler(stages)
        restore_handlers(previous)
    return 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (it may be replaced later)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; stdout is looked up instead
        pass


def show_progress(verbose: bool = False) -> None:
    """Print the package's progress lines (INFO) to stdout, with the time of day; once per process."""
    package = logging.getLogger("glora_ray")
    if not any(isinstance(h, _StdoutHandler) for h in package.handlers):
        package.addHandler(_StdoutHandler())
    package.setLevel(logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
