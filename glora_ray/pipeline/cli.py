"""Command line of pipelines/vtab.py: a preset, overridden option by option."""
from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import signal
import sys
from dataclasses import fields, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..backbone import PACKAGED_WEIGHTS, BackboneConfig, packaged_weights
from ..errors import GLoRARayError, NoSpaceError
from ..precision import AUTO as PRECISION_AUTO, Precision
from ..progress import StageWatch
from ..search.config import AUTO_MERGE as MERGE_AUTO, Fitness, MergeStrategy, SearchConfig
from ..train.config import SubnetSampling, TrainConfig
from ..space import TENSORS, SearchSpace

from .baselines import BASELINES
from .lock import OutputLock
from .preflight import check_output_location
from .stopping import install_stop_handlers, restore_handlers, shutdown_ray, stop_signal
from .config import (ALL_DATASETS, EXPORTS, PREPROCESSINGS, PRESETS, PipelineConfig, PipelineConfigError, expand_datasets,
                     preset)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 4}}'; got {text!r}")
    return value


# -- where each option lands ------------------------------------------------------------------
# An option sets the field its dest names: a PipelineConfig field first, else the one nested
# section whose dataclass has a field of that name.  _RENAMED lists the options named otherwise,
# _BY_HAND those config_from_args and shared_fields combine themselves; build_parser refuses an
# option that lands nowhere, so none can be forgotten.  Section None: PipelineConfig itself.
Target = tuple[str | None, str]
_SECTIONS = {"backbone": BackboneConfig, "train": TrainConfig, "search": SearchConfig}
_TOP_FIELDS = frozenset(f.name for f in fields(PipelineConfig)) - {"backbone", "train", "search", "datasets", "seeds"}
_RENAMED: dict[str, tuple[Target, ...]] = {
    "model": (("backbone", "name"),), "checkpoint": (("backbone", "checkpoint_path"),),
    "seed": (("train", "seed"), ("backbone", "init_seed"), ("search", "seed")),
    "train_workers": (("train", "num_workers"),), "train_cpus": (("train", "cpus_per_worker"),),
    "train_precision": (("train", "precision"),), "actors": (("search", "num_actors"),),
    "actor_cpus": (("search", "cpus_per_actor"),), "actor_gpus": (("search", "gpus_per_actor"),),
    "search_precision": (("search", "precision"),), "wait_for_resources": ((None, "wait_for_resources_s"),),
}
# --forms-A .. --forms-E: the kinds each support tensor may take (SearchSpace forms).
_FORM_OPTIONS = {f"forms_{t}": t for t in TENSORS}
_BY_HAND = frozenset({"help", "preset", "datasets", "seeds", "train_gpus", *_FORM_OPTIONS})


def option_targets(dest: str) -> tuple[Target, ...]:
    """The configuration fields the option ``dest`` sets; () for one handled by hand or none."""
    if dest in _RENAMED:
        return _RENAMED[dest]
    if dest in _TOP_FIELDS:
        return ((None, dest),)
    owners = [name for name, cls in _SECTIONS.items() if dest in {f.name for f in fields(cls)}]
    return ((owners[0], dest),) if len(owners) == 1 else ()


def _check_routes(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest not in _BY_HAND and not option_targets(action.dest):
            raise RuntimeError(f"option {action.option_strings} sets no configuration field: name it after one, "
                               f"or route it in glora_ray.pipeline.cli._RENAMED")


# What None means, where the preset leaves a value open.
_OPEN = {"targets": "every nn.Linear but the head", "lr": "the paper's Table 4 value per dataset",
         "min_params": "what the space reaches", "max_params": "what the space reaches",
         "actors": "fill the cluster", "checkpoint": "none",
         "channels_last": "automatic: on for a convolutional backbone",
         "num_classes": "counted from the training labels", "baseline_epochs": "the supernet's epochs"}


def _preset_value(values: dict[str, Any], dest: str) -> Any:
    """The value the preset gives the option ``dest`` (what it is when the option is not given)."""
    targets = option_targets(dest)
    if targets and targets[0][0] is not None:
        section, name = targets[0]
        value = getattr(values[section], name)
    elif targets and (dest in values or dest in _OPEN):  # a run-level field the preset sets or leaves open
        value = values.get(dest)
    elif dest == "datasets":
        value = values[dest]
    elif dest in _FORM_OPTIONS:
        kinds = SearchSpace(values["ranks"], values.get("forms")).kinds[_FORM_OPTIONS[dest]]
        value = tuple(k.value for k in kinds)
    elif dest == "train_gpus":
        train = values["train"]
        value = (1 if train.gpus_per_worker is None else train.gpus_per_worker) if train.use_gpu else 0
    else:
        return argparse.SUPPRESS
    if value is None:
        return _OPEN.get(dest, "none")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, dict) else value


VTAB_DESCRIPTION = (
    "GLoRA on VTAB-1k: for each dataset train a supernet (Ray Train), search it under a "
    "parameter budget (Ray actors), test the winner once, merge and export it. With no "
    "arguments: the embedded default (bundled digits, a pretrained EfficientNet-Lite0 from a pip "
    "package, local Ray, offline)."
)
VTAB_DATASETS_HELP = (f"dataset names (both VTAB spellings accepted), '{ALL_DATASETS}' for the 19 VTAB-1k datasets, "
                      f"or the folder name of an own dataset under --data-root in the same layout")
VTAB_DATA_ROOT_HELP = "folder holding <dataset>/{images,train800.txt,val200.txt,test.txt,...}"


def _job_options(parser: argparse.ArgumentParser, datasets_help: str | None, data_root_help: str,
                 repeat_seeds: bool) -> None:
    """What runs where: datasets, output, seeds, baselines, logging."""
    g = parser.add_argument_group("job")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting values: 'default' (embedded: pretrained EfficientNet-Lite0 on the bundled digits, "
                        "minutes on a laptop), 'tiny' (a random-init small ViT, the cheapest run: tests) or 'paper' "
                        "(the paper's protocol)")
    if datasets_help is not None:
        g.add_argument("--datasets", nargs="+", metavar="NAME", help=datasets_help)
    g.add_argument("--num-classes", type=int, help="classes of every dataset outside the registry")
    g.add_argument("--data-root", help=data_root_help)
    g.add_argument("--out", help="output path or URI (s3://..., gs://..., file://...)")
    g.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="refuse to continue: fail if --out already holds results (default: continue them)")
    g.add_argument("--seed", type=int, help="seeds backbone init, adapters, training and search")
    g.add_argument("--max-concurrent-datasets", type=int, help="datasets run at once (default: what the cluster holds)")
    g.add_argument("--wait-for-resources", type=float, metavar="SECONDS",
                   help="when the cluster lacks the CPUs/GPUs asked for, wait this long for it to autoscale "
                        "(default: refuse at once)")
    g.add_argument("--test-pareto", action="store_true", default=None, help="also test every Pareto-front subnet")
    g.add_argument("--baselines", nargs="+", choices=sorted(BASELINES), metavar="NAME",
                   help="fixed adapters trained like the supernet and tested once beside the winner: "
                        + "; ".join(f"{b.name}: {b.description}" for b in BASELINES.values()))
    g.add_argument("--baseline-epochs", type=int, metavar="N",
                   help="train the --baselines for N epochs (default: the supernet's --epochs)")
    if repeat_seeds:
        g.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="repeat supernet, search and baselines per seed under <out>/seed=<s>/ and report "
                            "mean ± std per configuration (excludes --seed)")
    g.add_argument("--verbose", action="store_true", default=None,
                   help="also show Ray's own log lines (worker output, Train reports, warnings)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The backbone, its weights and the GLoRA space over it."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224.orig_in21k")
    weights = g.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", default=None, help="timm hub weights (online or cached)")
    weights.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init (tests, smoke runs)")
    weights.add_argument("--checkpoint", help="local backbone weights: .npz (ViT-B_16.npz), .pth/.pt/.bin, .safetensors; "
                         "timm's layout or efficientnet_pytorch's (told by the key names)")
    weights.add_argument("--weights", choices=sorted(PACKAGED_WEIGHTS),
                         help="weights shipped by an installed pip package, found through it (offline); sets --model "
                         "unless given. " + "; ".join(f"{w.name}: {w.model}, {w.description}, from pip package "
                                                      f"{w.distribution}" for w in PACKAGED_WEIGHTS.values()))
    g.add_argument("--img-size", type=int)
    g.add_argument("--model-kwargs", type=_json_object, help="extra timm.create_model arguments as JSON, e.g. '{\"depth\": 4}'")
    g.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks of the space, e.g. 8 4")
    for tensor, kinds in SearchSpace().kinds.items():
        g.add_argument(f"--forms-{tensor}", nargs="+", choices=[k.value for k in kinds], metavar="FORM",
                       help=f"forms support tensor {tensor} may take, 'none' included: any of "
                       f"{', '.join(k.value for k in kinds)} (lora: at every rank of --ranks)")
    g.add_argument("--targets", nargs="+", help="adapted layers by name or suffix (default: every layer of "
                   "--layer-types but the head)")
    g.add_argument("--layer-types", nargs="+", metavar="TYPE",
                   help="module types GLoRA adapts: linear, conv2d (default: the preset's; 'linear' for ViTs)")
    g.add_argument("--preprocessing", choices=PREPROCESSINGS,
                   help="image mean/std and resize filter: 'backbone' (the model's pretrained config in timm) or "
                   "'vtab' (ImageNet mean/std, bicubic: the paper's protocol)")


def _budget_options(parser: argparse.ArgumentParser) -> None:
    """The search's parameter budget."""
    g = parser.add_argument_group("budget (adapter parameters; 0.29M, 800k or an integer)")
    g.add_argument("--min-params")
    g.add_argument("--max-params")


def _training_options(parser: argparse.ArgumentParser) -> None:
    """Stage 1: supernet training."""
    g = parser.add_argument_group("stage 1: supernet training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, split over the workers")
    g.add_argument("--lr", type=float, help="supernet lr")
    g.add_argument("--lr-sweep", type=float, nargs="+", metavar="LR",
                   help="run one Ray Tune trial per lr and keep the best by validation accuracy (paper: 1e-4 5e-4)")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--checkpoint-every", type=int, help="epochs between training checkpoints")
    g.add_argument("--train-workers", type=int, help="Ray Train workers (data-parallel); 0: train in the "
                   "job's own process (Ray Train's local mode, no worker group to start)")
    g.add_argument("--train-cpus", type=int, help="CPUs per training worker")
    g.add_argument("--train-gpus", type=float, help="GPUs per training worker (0: CPU training)")
    g.add_argument("--train-precision", choices=[PRECISION_AUTO] + [p.value for p in Precision],
                   help="forward passes of training: 'auto' is bf16 autocast on CUDA and fp32 elsewhere; 'fp32' "
                   "turns mixed precision off; 'tf32' needs --train-gpus; weights and optimizer stay fp32")
    g.add_argument("--subnet-sampling", choices=[s.value for s in SubnetSampling],
                   help="the subnets a step trains: 'uniform' (every form equally likely: the paper) or 'budget' "
                   "(drawn within the search's --min-params/--max-params window, where the search reads)")
    g.add_argument("--sandwich", type=int, metavar="N",
                   help="the sandwich rule: each step also trains the largest and the smallest subnet within the "
                   "budget besides N drawn ones, gradients accumulated (0: off; costs N + 2 passes per step)")
    distill = g.add_mutually_exclusive_group()
    distill.add_argument("--distill", dest="distill", action="store_true", default=None,
                         help="in-place distillation: a sandwich's subnets learn the largest one's soft labels")
    distill.add_argument("--no-distill", dest="distill", action="store_false", help="true labels for every subnet")
    layout = g.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="channels-last activations and weights in training")
    layout.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="the contiguous (NCHW) layout in training, also for a CNN")


def _search_options(parser: argparse.ArgumentParser) -> None:
    """Stage 2: the evolutionary search and its actors."""
    g = parser.add_argument_group("stage 2: evolutionary search")
    g.add_argument("--population", type=int)
    g.add_argument("--parents", type=int)
    g.add_argument("--mutants", type=int)
    g.add_argument("--crossovers", type=int)
    g.add_argument("--m-prob", type=float, help="per-gene mutation probability")
    g.add_argument("--generations", type=int)
    g.add_argument("--fitness", choices=[f.value for f in Fitness],
                   help="what ranks candidates (docs/method.md §3.1): 'accuracy' on the search list (the paper; "
                   "ties to fewer parameters) or 'loss', its mean cross-entropy (ties to higher accuracy)")
    g.add_argument("--seed-population", nargs="+", choices=sorted(BASELINES), metavar="NAME",
                   help="fixed adapters generation 0 starts from where they fit the budget (any of "
                   f"{', '.join(sorted(BASELINES))}); random subnets fill the rest")
    g.add_argument("--actors", type=int, help="evaluator actors")
    g.add_argument("--actor-cpus", type=float, help="CPUs per evaluator actor")
    g.add_argument("--actor-gpus", type=float, help="GPUs per evaluator actor (fractions share a GPU)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--search-precision", choices=[p.value for p in Precision],
                   help="forward passes of the evaluation: 'fp32', 'tf32' (needs --actor-gpus) or 'bf16' autocast")
    g.add_argument("--merge-strategy", choices=[MERGE_AUTO] + [m.value for m in MergeStrategy],
                   help="how an actor merges a candidate (docs/method.md §9): 'auto' is just_in_time on CPUs "
                   "(small actors) and batched on CUDA; per_candidate merges once per candidate (faster on "
                   "small inputs, a private copy of the adapted weights per actor)")


def _winner_options(parser: argparse.ArgumentParser) -> None:
    """Stage 3: the winner."""
    g = parser.add_argument_group("stage 3: the winner")
    g.add_argument("--export", nargs="+", choices=EXPORTS, metavar="KIND",
                   help="exports besides the merged winner: 'peft', a PEFT LoRA adapter with a rank per layer "
                   "(<dataset>/export/peft; for a winner of LoRA forms only, e.g. a search with --forms-A none "
                   "--forms-B lora none --forms-C none --forms-D none --forms-E none)")
    g.add_argument("--retrain-epochs", type=int, metavar="N",
                   help="train the winner alone for N epochs from its supernet weights, with the supernet's "
                   "schedule, before its single test (0: test the supernet's weights as they are)")


def build_parser(preset_name: str = "default", prog: str = "pipelines/vtab.py", description: str = VTAB_DESCRIPTION,
                 datasets_help: str | None = VTAB_DATASETS_HELP, data_root_help: str = VTAB_DATA_ROOT_HELP,
                 presets: Callable[[str], dict[str, Any]] = preset,
                 repeat_seeds: bool = True) -> argparse.ArgumentParser:
    """The options every pipeline shares; ``--help`` shows the values ``presets`` gives ``preset_name``
    (or the --preset given).  ``datasets_help`` None leaves out --datasets; ``repeat_seeds`` False
    leaves out VTAB's --seeds (the few-shot and domain jobs' --seeds name their lists' seeds)."""
    values = presets(preset_name if preset_name in PRESETS else "default")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(f"{description} Option values shown are those of preset {preset_name!r}; "
                     f"--preset NAME --help shows another's."),
    )
    _job_options(parser, datasets_help, data_root_help, repeat_seeds)
    for add_options in (_model_options, _budget_options, _training_options, _search_options, _winner_options):
        add_options(parser)
    for action in parser._actions:  # the preset's value after each option's help
        value = _preset_value(values, action.dest)
        if value is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} (preset: {str(value).replace('%', '%%')})".lstrip()
    _check_routes(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The preset's values, replaced by every option the user gave."""
    values = preset(args.preset)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "seed" in given and "seeds" in given:
        raise PipelineConfigError("--seed and --seeds exclude each other: give one seed or a list of seeds")
    return PipelineConfig(datasets=expand_datasets(given.get("datasets", values["datasets"])),
                          seeds=tuple(given.get("seeds", ())), **shared_fields(given, values))


def shared_fields(given: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """PipelineConfig's fields but ``datasets`` and ``seeds``: a preset's ``values`` replaced by the
    options ``given``."""

    routed: dict[str | None, dict[str, Any]] = {None: {}, **{section: {} for section in _SECTIONS}}
    for dest, value in given.items():
        for section, name in option_targets(dest):
            routed[section][name] = value
    backbone_changes = routed["backbone"]
    # One source of weights: the one given replaces the preset's.
    for source, others in (("checkpoint", {"pretrained": False, "weights": None}),
                           ("weights", {"pretrained": False, "checkpoint_path": None}),
                           ("pretrained", {"checkpoint_path": None, "weights": None})):
        if source in given:
            backbone_changes.update(others)
    if "weights" in given and "model" not in given:
        backbone_changes["name"] = packaged_weights(given["weights"]).model
        given["model"] = backbone_changes["name"]  # a new model: the preset's reductions do not apply
    if "model" in given and "model_kwargs" not in given:
        backbone_changes["model_kwargs"] = {}  # the preset's reductions belong to the preset's model
    train_changes = routed["train"]
    if "train_gpus" in given:
        train_changes["use_gpu"] = given["train_gpus"] > 0
        train_changes["gpus_per_worker"] = given["train_gpus"] if given["train_gpus"] > 0 else None
    # A preset that trains in the job's process (Ray Train's local mode) starts one worker when asked
    # for what only a worker has: a GPU of its own, or a Tune trial per lr.
    needs_worker = given.get("train_gpus", 0) > 0 or "lr_sweep" in given
    if needs_worker and "train_workers" not in given and values["train"].num_workers == 0:
        train_changes["num_workers"] = 1
    if train_changes.get("num_workers", values["train"].num_workers) == 0:
        # In-process training (Ray Train's local mode) reserves nothing: there --train-cpus is only
        # the torch threads, and a GPU would never be assigned.
        if given.get("train_gpus", 0) > 0:
            raise PipelineConfigError(f"--train-gpus {given['train_gpus']:g} needs a training worker, but training runs "
                                      f"in the job's own process (--train-workers 0), which is given no GPU: give "
                                      f"--train-workers N")
        if given.get("train_cpus", 0) > (os.cpu_count() or 1):
            raise PipelineConfigError(f"--train-cpus {given['train_cpus']}: training runs in the job's own process "
                                      f"(--train-workers 0), where it is the number of threads, but this machine has "
                                      f"{os.cpu_count()} CPUs; give at most that, or --train-workers N to train on "
                                      f"workers of that size")

    run = {name: values[name] for name in _TOP_FIELDS if name in values}  # the preset's, then the options'
    run.update(routed[None])
    run["lr"] = given.get("lr", None if "lr_sweep" in given else values["lr"])  # a sweep replaces the preset's lr
    run["forms"] = {**values.get("forms", {}), **{t: tuple(given[dest]) for dest, t in _FORM_OPTIONS.items()
                                                 if dest in given}}
    for name in ("baselines", "seed_population", "lr_sweep", "export"):
        if name in run:
            run[name] = tuple(run[name])
    return dict(backbone=replace(values["backbone"], **backbone_changes), train=replace(values["train"], **train_changes),
                search=replace(values["search"], **routed["search"]), **run)


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
    return parse_with(build_parser, config_from_args, argv)


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
