"""Issue 19: a fixed-subnet training (a retrained winner, a baseline) epoch by epoch.

Reruns finished training runs of the job (``<out>/seed=S/<dataset>/train/retrain-<hash>`` or
``.../baseline-<name>-<N>ep``) in this process with the schedule's length and learning rate of
your choice, from the start they had (the winner from its supernet weights), and after every epoch
scores the subnet, merged as it is exported, on val200 (accuracy and cross-entropy) and on test.
Reported per run: the final test accuracy, and the test accuracy at the epoch that val200 would
choose (lowest loss, or highest accuracy, the later epoch on a tie): does early stopping on the
200 validation images help, and how does the schedule's length move the result?  The test
accuracy of every epoch is an analysis, never a choice: the pipeline tests its winner once.
Ray-free; the library code is the job's own (with the recorded settings and ``--epochs``
unchanged, the last epoch is the run the job trained).

    python -m bench.retrain_curves ~/glora-ray/results/x/seed=0/digits/train/retrain-* --epochs 10
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EXIT_CANNOT_MEASURE, REPO_ROOT, machine_info, prepare_environment, publish, say  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/retrain_curves.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("runs", nargs="+", help="training run folders of a finished job (fixed-subnet runs)")
    parser.add_argument("--epochs", type=int, help="the schedule's length (default: each run's own)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="the run's learning rate times this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="runs", help="result file suffix")
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "bench" / "results"))
    return parser


def recorded_run(folder: str, epochs: int | None = None, lr_scale: float = 1.0):
    """The spec, data and training settings the job recorded for the run in ``folder``, with the
    schedule's length (None: the run's own) and learning rate to rerun it with, checked."""
    from glora_ray.checkpoint import SupernetSpec, read_spec
    from glora_ray.data import DataConfig
    from glora_ray.errors import GLoRARayError
    from glora_ray.train import TrainConfig
    from glora_ray.train.job import RUN_SPEC_FILE, SUPERNET_DIR, TRAIN_CONFIG_FILE

    run_spec = Path(folder) / RUN_SPEC_FILE
    if not run_spec.is_file():
        raise GLoRARayError(f"{folder}: no {RUN_SPEC_FILE}; name a training run folder of a finished job "
                            f"(<out>/seed=S/<dataset>/train/retrain-<hash> or baseline-<name>-<N>ep)")
    spec = SupernetSpec.from_dict(json.loads(run_spec.read_text()))
    train = TrainConfig.from_dict(json.loads((Path(folder) / SUPERNET_DIR / TRAIN_CONFIG_FILE).read_text()))
    if train.fixed_subnet is None:
        raise GLoRARayError(f"{folder}: a supernet training (no fixed_subnet); name a retraining or a baseline run")
    read_spec(Path(folder) / SUPERNET_DIR)  # the run finished: its supernet was written
    train = replace(train, epochs=epochs or train.epochs, lr=train.lr * lr_scale)
    train.validate()  # e.g. a length at or below the warm-up
    return spec, DataConfig.from_dict(spec.extra["data"]), train


def chosen_epoch(curve: list[dict[str, float]], score: str) -> dict[str, float]:
    """The epoch val200 would choose: the lowest ``val_loss`` or the highest ``val_acc``, the later on a tie."""
    sign = -1.0 if score == "val_loss" else 1.0
    return max(curve, key=lambda row: (sign * row[score], row["epoch"]))


def curve_of(folder: str, spec, data, train, device: str) -> dict[str, Any]:
    """Retrain the run in ``folder`` (``recorded_run``'s settings) and score it after every epoch."""
    import torch
    import torch.nn.functional as F

    from glora_ray.train.loop import SupernetTraining

    training = SupernetTraining(spec.build(), data.build(train.split), train, device, init_spec=spec).setup()
    splits = {name: tuple(torch.from_numpy(a) for a in data.arrays(split))
              for name, split in (("val", "val200"), ("test", "test"))}

    @torch.inference_mode()
    def scores() -> dict[str, tuple[float, float]]:
        """(cross-entropy, accuracy) of each split, the subnet merged once."""
        model = training.supernet.merged(training.fixed_genes).eval()
        out = {}
        for name, (images, labels) in splits.items():
            logits = torch.cat([model(images[i:i + 100].to(device))
                                for i in range(0, len(images), 100)]).float().cpu()
            out[name] = float(F.cross_entropy(logits, labels)), float((logits.argmax(dim=1) == labels).double().mean())
        return out

    curve = []

    def after_epoch(_, stats) -> None:
        scored = scores()
        (val_loss, val_acc), (_, test_acc) = scored["val"], scored["test"]
        curve.append({"epoch": stats.epoch + 1, "train_loss": stats.loss, "train_acc": stats.train_acc,
                      "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc})
        say(f"{Path(folder).name} epoch {stats.epoch + 1}: val loss {val_loss:.3f} acc {val_acc:.3f}, test {test_acc:.4f}")

    training.run(on_epoch_end=after_epoch)
    by_loss, by_acc = chosen_epoch(curve, "val_loss"), chosen_epoch(curve, "val_acc")
    return {"run": folder, "key": train.fixed_subnet, "epochs": train.epochs, "lr": train.lr,
            "init_from": train.init_from, "curve": curve, "final_test_acc": curve[-1]["test_acc"],
            "by_val_loss": {"epoch": by_loss["epoch"], "test_acc": by_loss["test_acc"]},
            "by_val_acc": {"epoch": by_acc["epoch"], "test_acc": by_acc["test_acc"]}}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Fixed-subnet training epoch by epoch: {result['tag']}", "",
             f"- epochs {result['epochs'] or 'as recorded'}, lr x {result['lr_scale']:g}; "
             f"{result['machine']['cpu']}, {result['date_utc']} UTC",
             f"- command: `python -m bench.retrain_curves {' '.join(result['argv'])}`", "",
             "| run | epochs | final test % | val-loss epoch | its test % | val-acc epoch | its test % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        lines.append(f"| {_short(run['run'])} | {run['epochs']} | {run['final_test_acc'] * 100:.2f} "
                     f"| {run['by_val_loss']['epoch']} | {run['by_val_loss']['test_acc'] * 100:.2f} "
                     f"| {run['by_val_acc']['epoch']} | {run['by_val_acc']['test_acc'] * 100:.2f} |")
    mean = result["mean"]
    lines.append(f"| mean | | {mean['final'] * 100:.2f} | | {mean['by_val_loss'] * 100:.2f} | "
                 f"| {mean['by_val_acc'] * 100:.2f} |")
    return "\n".join(lines) + "\n"


def _short(folder: str) -> str:
    """``seed=S/<dataset>/train/<run>``: what tells the runs of one output apart."""
    return "/".join(Path(folder).parts[-4:])


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    import torch

    from glora_ray.errors import GLoRARayError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.lr_scale > 0:
        parser.error(f"--lr-scale must be > 0, got {args.lr_scale}")
    try:
        # Every folder read and checked before the first training.
        recorded = [(folder, recorded_run(folder, args.epochs, args.lr_scale)) for folder in args.runs]
        runs = [curve_of(folder, *settings, args.device) for folder, settings in recorded]
    except GLoRARayError as err:
        print(f"cannot measure: {err}", file=sys.stderr)
        return EXIT_CANNOT_MEASURE
    result = {"bench": "retrain_curves", "tag": args.tag, "argv": list(argv if argv is not None else sys.argv[1:]),
              "epochs": args.epochs, "lr_scale": args.lr_scale, "runs": runs,
              "mean": {"final": float(np.mean([r["final_test_acc"] for r in runs])),
                       "by_val_loss": float(np.mean([r["by_val_loss"]["test_acc"] for r in runs])),
                       "by_val_acc": float(np.mean([r["by_val_acc"]["test_acc"] for r in runs]))},
              "machine": machine_info(torch.device(args.device)),
              "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    publish(args.results_dir, f"retrain_curves_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
