"""Command line of pipelines/vtab.py: a preset, overridden option by option."""
from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..backbone import PACKAGED_WEIGHTS, packaged_weights
from ..errors import GLoRARayError
from ..precision import AUTO as PRECISION_AUTO, Precision
from ..search.config import Fitness
from ..search.merge import AUTO as MERGE_AUTO, MergeStrategy
from ..train.config import SubnetSampling
from ..space import TENSORS, SearchSpace

from .baselines import BASELINES
from .config import ALL_DATASETS, PREPROCESSINGS, PRESETS, PipelineConfig, PipelineConfigError, expand_datasets, preset


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 4}}'; got {text!r}")
    return value


# Options that set one field of the preset's nested settings: option dest -> field name.
_BACKBONE_OPTIONS = {"model": "name", "pretrained": "pretrained", "checkpoint": "checkpoint_path", "weights": "weights",
                     "img_size": "img_size", "model_kwargs": "model_kwargs", "seed": "init_seed"}
_TRAIN_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "warmup_epochs": "warmup_epochs",
                  "weight_decay": "weight_decay", "checkpoint_every": "checkpoint_every", "train_workers": "num_workers",
                  "train_cpus": "cpus_per_worker", "seed": "seed", "train_precision": "precision",
                  "channels_last": "channels_last", "subnet_sampling": "subnet_sampling", "sandwich": "sandwich",
                  "distill": "distill"}
_SEARCH_OPTIONS = {"population": "population", "parents": "parents", "mutants": "mutants", "crossovers": "crossovers",
                   "m_prob": "m_prob", "generations": "generations", "actors": "num_actors",
                   "actor_cpus": "cpus_per_actor", "actor_gpus": "gpus_per_actor", "eval_batch_size": "eval_batch_size",
                   "min_params": "min_params", "max_params": "max_params", "seed": "seed",
                   "search_precision": "precision", "merge_strategy": "merge_strategy", "fitness": "fitness"}
# --forms-A .. --forms-E: the kinds each support tensor may take (SearchSpace forms).
_FORM_OPTIONS = {f"forms_{t}": t for t in TENSORS}
_TOP_OPTIONS = ("datasets", "data_root", "out", "ranks", "targets", "lr", "layer_types", "preprocessing",
                "num_classes", "seed_population", "retrain_epochs", "baseline_epochs")
# What None means, where the preset leaves a value open.
_OPEN = {"targets": "every nn.Linear but the head", "lr": "the paper's Table 4 value per dataset",
         "min_params": "what the space reaches", "max_params": "what the space reaches",
         "actors": "fill the cluster", "checkpoint": "none",
         "channels_last": "automatic: on for a convolutional backbone",
         "num_classes": "counted from the training labels", "baseline_epochs": "the supernet's epochs"}


def _preset_value(values: dict[str, Any], dest: str) -> Any:
    """The value the preset gives the option ``dest`` (what it is when the option is not given)."""
    if dest in _TOP_OPTIONS:
        value = values.get(dest)
    elif dest in _BACKBONE_OPTIONS and dest != "seed":
        value = getattr(values["backbone"], _BACKBONE_OPTIONS[dest])
    elif dest in _TRAIN_OPTIONS:
        value = getattr(values["train"], _TRAIN_OPTIONS[dest])
    elif dest in _SEARCH_OPTIONS:
        value = getattr(values["search"], _SEARCH_OPTIONS[dest])
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

    g = parser.add_argument_group("budget (adapter parameters; 0.29M, 800k or an integer)")
    g.add_argument("--min-params")
    g.add_argument("--max-params")

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

    g = parser.add_argument_group("stage 3: the winner")
    g.add_argument("--retrain-epochs", type=int, metavar="N",
                   help="train the winner alone for N epochs from its supernet weights, with the supernet's "
                   "schedule, before its single test (0: test the supernet's weights as they are)")
    for action in parser._actions:  # the preset's value after each option's help
        value = _preset_value(values, action.dest)
        if value is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} (preset: {str(value).replace('%', '%%')})".lstrip()
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

    backbone_changes = {field: given[dest] for dest, field in _BACKBONE_OPTIONS.items() if dest in given}
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
    backbone = replace(values["backbone"], **backbone_changes)

    train_changes = {field: given[dest] for dest, field in _TRAIN_OPTIONS.items() if dest in given}
    if "train_gpus" in given:
        train_changes["use_gpu"] = given["train_gpus"] > 0
        train_changes["gpus_per_worker"] = given["train_gpus"] if given["train_gpus"] > 0 else None
    train = replace(values["train"], **train_changes)
    search = replace(values["search"], **{field: given[dest] for dest, field in _SEARCH_OPTIONS.items() if dest in given})

    # A sweep replaces the preset's fixed lr; an explicit --lr replaces both.
    lr = given.get("lr", None if "lr_sweep" in given else values["lr"])
    return dict(
        data_root=given.get("data_root", values["data_root"]),
        out=given.get("out", values["out"]),
        backbone=backbone,
        train=train,
        search=search,
        ranks=given.get("ranks", values["ranks"]),
        forms={**values.get("forms", {}), **{t: tuple(given[dest]) for dest, t in _FORM_OPTIONS.items() if dest in given}},
        targets=given.get("targets", values["targets"]),
        layer_types=given.get("layer_types", values["layer_types"]),
        preprocessing=given.get("preprocessing", values["preprocessing"]),
        lr=lr,
        lr_sweep=given.get("lr_sweep", ()),
        test_pareto=given.get("test_pareto", False),
        resume=given.get("resume", True),
        max_concurrent_datasets=given.get("max_concurrent_datasets"),
        baselines=tuple(given.get("baselines", ())),
        wait_for_resources_s=given.get("wait_for_resources", 0.0),
        verbose=given.get("verbose", False),
        num_classes=given.get("num_classes", values.get("num_classes")),
        seed_population=tuple(given.get("seed_population", values.get("seed_population", ()))),
        retrain_epochs=given.get("retrain_epochs", values.get("retrain_epochs", 0)),
        baseline_epochs=given.get("baseline_epochs", values.get("baseline_epochs")),
    )


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
    except GLoRARayError as err:  # bad values: a usage error naming the option
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def parse_config(argv: Sequence[str] | None = None) -> PipelineConfig:
    return parse_with(build_parser, config_from_args, argv)


def run_main(parse: Callable[[Sequence[str] | None], Config], run: Callable[[Config], Any],
             argv: Sequence[str] | None = None) -> int:
    """A pipeline's entry point: progress lines to stdout; exit status 2 with a one-line message for bad
    input (a ``GLoRARayError``); anything else is a bug or a failure after compute started: its traceback."""
    config = parse(argv)
    show_progress(getattr(config, "verbose", False))
    try:
        run(config)
    except GLoRARayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
