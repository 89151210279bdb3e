"""Command line of pipelines/vtab.py: a preset, overridden option by option."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .config import ALL_DATASETS, PRESETS, PipelineConfig, expand_datasets, preset


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 4}}'; got {text!r}")
    return value


VTAB_DESCRIPTION = (
    "GLoRA on VTAB-1k: for each dataset train a supernet (Ray Train), search it under a "
    "parameter budget (Ray actors), test the winner once, merge and export it. With no "
    "arguments: the embedded default (bundled digits, a small ViT, local Ray, offline)."
)
VTAB_DATASETS_HELP = (f"dataset names (both VTAB spellings accepted), '{ALL_DATASETS}' for the 19 VTAB-1k datasets, "
                      f"or the folder name of an own dataset under --data-root in the same layout")
VTAB_DATA_ROOT_HELP = "folder holding <dataset>/{images,train800.txt,val200.txt,test.txt,...}"


def build_parser(prog: str = "pipelines/vtab.py", description: str = VTAB_DESCRIPTION,
                 datasets_help: str | None = VTAB_DATASETS_HELP,
                 data_root_help: str = VTAB_DATA_ROOT_HELP) -> argparse.ArgumentParser:
    """The options every pipeline shares; ``datasets_help`` None leaves out --datasets."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("job")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting values: 'default' (embedded, minutes on a laptop) or 'paper' (SPEC protocol)")
    if datasets_help is not None:
        g.add_argument("--datasets", nargs="+", metavar="NAME", help=datasets_help)
    g.add_argument("--num-classes", type=int,
                   help="classes of every dataset outside the registry (default: counted from its training labels)")
    g.add_argument("--data-root", help=data_root_help)
    g.add_argument("--out", help="output path or URI (s3://..., gs://..., file://...)")
    g.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="refuse to continue: fail if --out already holds results (default: continue them)")
    g.add_argument("--seed", type=int, help="seeds backbone init, adapters, training and search")
    g.add_argument("--max-concurrent-datasets", type=int, help="datasets run at once (default: what the cluster holds)")
    g.add_argument("--test-pareto", action="store_true", default=None, help="also test every Pareto-front subnet")

    g = parser.add_argument_group("model")
    g.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224.orig_in21k")
    weights = g.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", default=None, help="timm hub weights (online or cached)")
    weights.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init (tests, smoke runs)")
    weights.add_argument("--checkpoint", help="local backbone weights: .npz (ViT-B_16.npz), .pth/.pt/.bin, .safetensors")
    g.add_argument("--img-size", type=int)
    g.add_argument("--model-kwargs", type=_json_object, help="extra timm.create_model arguments as JSON, e.g. '{\"depth\": 4}'")
    g.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks of the space, e.g. 8 4")
    g.add_argument("--targets", nargs="+", help="adapted layers by name or suffix (default: every nn.Linear but the head)")

    g = parser.add_argument_group("budget (adapter parameters; 0.29M, 800k or an integer)")
    g.add_argument("--min-params")
    g.add_argument("--max-params")

    g = parser.add_argument_group("stage 1: supernet training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, split over the workers")
    g.add_argument("--lr", type=float, help="supernet lr (default: the paper's Table 4 value per dataset)")
    g.add_argument("--lr-sweep", type=float, nargs="+", metavar="LR",
                   help="run one Ray Tune trial per lr and keep the best by validation accuracy (paper: 1e-4 5e-4)")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--checkpoint-every", type=int, help="epochs between training checkpoints")
    g.add_argument("--train-workers", type=int, help="Ray Train workers (data-parallel)")
    g.add_argument("--train-cpus", type=int, help="CPUs per training worker")
    g.add_argument("--train-gpus", type=float, help="GPUs per training worker (0: CPU training)")

    g = parser.add_argument_group("stage 2: evolutionary search")
    g.add_argument("--population", type=int)
    g.add_argument("--parents", type=int)
    g.add_argument("--mutants", type=int)
    g.add_argument("--crossovers", type=int)
    g.add_argument("--m-prob", type=float, help="per-gene mutation probability")
    g.add_argument("--generations", type=int)
    g.add_argument("--actors", type=int, help="evaluator actors (default: fill the cluster)")
    g.add_argument("--actor-cpus", type=float, help="CPUs per evaluator actor")
    g.add_argument("--actor-gpus", type=float, help="GPUs per evaluator actor (fractions share a GPU)")
    g.add_argument("--eval-batch-size", type=int)
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The preset's values, replaced by every option the user gave."""
    values = preset(args.preset)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return PipelineConfig(datasets=expand_datasets(given.get("datasets", values["datasets"])),
                          **shared_fields(given, values))


def shared_fields(given: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """PipelineConfig's fields but ``datasets``: a preset's ``values`` replaced by the options ``given``."""

    backbone = values["backbone"]
    backbone_changes = {k: given[a] for a, k in (("model", "name"), ("pretrained", "pretrained"),
                                                    ("checkpoint", "checkpoint_path"), ("img_size", "img_size"),
                                                    ("model_kwargs", "model_kwargs"), ("seed", "init_seed")) if a in given}
    if "checkpoint" in given:
        backbone_changes["pretrained"] = False
    if "model" in given and "model_kwargs" not in given:
        backbone_changes["model_kwargs"] = {}  # the preset's reductions belong to the preset's model
    backbone = replace(backbone, **backbone_changes)

    train_changes = {k: given[a] for a, k in (("epochs", "epochs"), ("batch_size", "batch_size"),
                                                ("warmup_epochs", "warmup_epochs"), ("weight_decay", "weight_decay"),
                                                ("checkpoint_every", "checkpoint_every"), ("train_workers", "num_workers"),
                                                ("train_cpus", "cpus_per_worker"), ("seed", "seed")) if a in given}
    if "train_gpus" in given:
        train_changes["use_gpu"] = given["train_gpus"] > 0
        train_changes["gpus_per_worker"] = given["train_gpus"] if given["train_gpus"] > 0 else None
    train = replace(values["train"], **train_changes)

    search_changes = {k: given[a] for a, k in (("population", "population"), ("parents", "parents"),
                                                 ("mutants", "mutants"), ("crossovers", "crossovers"),
                                                 ("m_prob", "m_prob"), ("generations", "generations"),
                                                 ("actors", "num_actors"), ("actor_cpus", "cpus_per_actor"),
                                                 ("actor_gpus", "gpus_per_actor"), ("eval_batch_size", "eval_batch_size"),
                                                 ("min_params", "min_params"), ("max_params", "max_params"),
                                                 ("seed", "seed")) if a in given}
    search = replace(values["search"], **search_changes)

    # A sweep replaces the preset's fixed lr; an explicit --lr replaces both.
    lr = given.get("lr", None if "lr_sweep" in given else values["lr"])
    return dict(
        data_root=given.get("data_root", values["data_root"]),
        out=given.get("out", values["out"]),
        backbone=backbone,
        train=train,
        search=search,
        ranks=given.get("ranks", values["ranks"]),
        targets=given.get("targets"),
        lr=lr,
        lr_sweep=given.get("lr_sweep", ()),
        test_pareto=given.get("test_pareto", False),
        resume=given.get("resume", True),
        max_concurrent_datasets=given.get("max_concurrent_datasets"),
        num_classes=given.get("num_classes", values.get("num_classes")),
    )


Config = TypeVar("Config")


def parse_with(parser: argparse.ArgumentParser, make: Callable[[argparse.Namespace], Config],
               argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv`` and build the configuration; a bad value exits with the parser's usage message."""
    args = parser.parse_args(argv)
    try:
        return make(args)
    except ValueError as err:  # every config error class derives from ValueError
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def parse_config(argv: Sequence[str] | None = None) -> PipelineConfig:
    return parse_with(build_parser(), config_from_args, argv)


def run_main(parse: Callable[[Sequence[str] | None], Config], run: Callable[[Config], Any],
             argv: Sequence[str] | None = None) -> int:
    """A pipeline's entry point: exit status 2 with a one-line message for bad input found before compute."""
    import sys

    config = parse(argv)
    try:
        run(config)
    except ValueError as err:  # every bad-input error (GLoRARayError) derives from ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
