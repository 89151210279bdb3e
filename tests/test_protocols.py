"""Own datasets, few-shot and domain generalization: readers and checks (fast), then both pipelines once."""
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from glora_ray import storage
from glora_ray.data import DataError, ListFile
from glora_ray.data.custom import CUSTOM_GROUP, count_classes
from glora_ray.data.embedded import write_digits_domain, write_digits_fewshot
from glora_ray.data.fewshot import DOMAIN_TARGETS, shot_list_name
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.comparison import COMPARISON_FILE
from glora_ray.pipeline.domain import CLASSES_FILE, TABLE_FILE, domain_units, parse_domain_config
from glora_ray.pipeline.fewshot import FIGURE_FILE, RESULTS_FILE, curves, fewshot_units, parse_fewshot_config
from glora_ray.pipeline.holdout import predictions
from glora_ray.pipeline.protocol import check_units
from glora_ray.pipeline.run import preflight
from glora_ray.pipeline.unit import vtab_unit

from helpers import tiny_args

REPO = Path(__file__).resolve().parents[1]


def image(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (shade, 255 - shade, 0)).save(path)


def write_list(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name} {label}\n" for name, label in lines))


def own_vtab(root: Path, name: str = "my data", labels=(0, 1, 2, 0, 1, 2)) -> Path:
    """An own dataset in the VTAB-1k layout, image paths with spaces."""
    base = root / name
    lines = []
    for i, label in enumerate(labels):
        image(base / "images" / f"class {label}" / f"img {i}.png", 40 * i)
        lines.append((f"images/class {label}/img {i}.png", label))
    for split in ("train800", "val200", "test", "train800val200"):
        write_list(base / f"{split}.txt", lines)
    return base


def noah(root: Path, dataset: str, classes: int = 3, shots=(1, 2), seeds=(0,), label_shift: int = 0) -> Path:
    """A few-shot dataset in NOAH's layout: image folders and names with spaces."""
    base = root / "few-shot" / dataset
    per_class = max(shots) + 2
    samples = []
    for label in range(classes):
        for i in range(per_class):
            name = f"class {label}/photo {i}.jpg.png"
            image(base / "images" / name, 10 * i + label)
            samples.append((name, label + label_shift))
    for k in shots:
        for s in seeds:
            chosen = [(n, lab) for n, lab in samples if int(n.split("photo ")[1].split(".")[0]) in range(s % 2, s % 2 + k)]
            write_list(base / "annotations" / shot_list_name(k, s), chosen)
    write_list(base / "annotations" / "val_meta.list", samples[::2])
    write_list(base / "annotations" / "test_meta.list", samples[1::2])
    return base


# -- own datasets in the VTAB-1k layout --------------------------------------------------------
def test_own_vtab_dataset_counts_its_classes(tmp_path, capsys):
    own_vtab(tmp_path)
    cfg = parse_config(["--datasets", "my data", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    unit = vtab_unit(cfg, "my data")
    assert cfg.datasets == ("my data",) and unit.group == CUSTOM_GROUP and unit.data.num_classes == 3
    assert unit.data.validate(unit.splits) == {"train800": 6, "val200": 6, "test": 6}
    given = parse_config(["--datasets", "my data", "--num-classes", "7", "--data-root", str(tmp_path)])
    assert vtab_unit(given, "my data").data.num_classes == 7
    with pytest.raises(SystemExit):
        parse_config(["--datasets", "no such", "--data-root", str(tmp_path)])
    assert "unknown dataset 'no such'" in capsys.readouterr().err


@pytest.mark.parametrize("labels, problem", [((0, 2, 2), "no sample of class\\(es\\) 1"), ((-1, 0), ":1: label -1 is negative")])
def test_own_dataset_labels_must_be_0_to_k_minus_1(tmp_path, labels, problem):
    base = own_vtab(tmp_path, "bad", labels)
    with pytest.raises(DataError, match=problem) as err:
        count_classes(base / "train800.txt")
    assert str(base / "train800.txt") in str(err.value) and "0..K-1" in str(err.value)


def test_own_dataset_outside_the_count_is_refused_before_compute(tmp_path):
    own_vtab(tmp_path, "mine", (0, 1, 2, 3))
    cfg = parse_config(tiny_args(tmp_path, tmp_path / "out", "--datasets", "mine", "--num-classes", "3"))
    with pytest.raises(DataError, match=r"train800.txt:4: label 3 out of range 0..2"):
        preflight(cfg)


# -- few-shot -------------------------------------------------------------------------------------
def test_fewshot_units_read_noah_lists_with_spaces(tmp_path):
    noah(tmp_path, "my birds", classes=3, shots=(1, 2), seeds=(0, 1))
    cfg = parse_fewshot_config(["--datasets", "my birds", "--shots", "1", "2", "--seeds", "0", "1",
                                "--data-root", str(tmp_path), "--batch-size", "4"])
    units = fewshot_units(cfg)
    assert [(u.extra["shots"], u.extra["seed"]) for u in units] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    one_shot = units[0]
    assert one_shot.data.num_classes == 3 and one_shot.path == "my birds/shots-1/seed-0"
    samples = one_shot.data.samples("train")
    assert [s.label for s in samples] == [0, 1, 2] and samples[0].path.name == "photo 0.jpg.png"
    assert samples[0].path.parent == tmp_path / "few-shot" / "my birds" / "images" / "class 0"
    # A 1-shot list of 3 images is smaller than the batch of 4: it trains on one batch of 3.
    assert one_shot.batch_size == 3 and units[2].batch_size is None
    assert one_shot.train_config(cfg.train).split == "train"


def test_fewshot_line_splits_at_the_last_space(tmp_path):
    base = noah(tmp_path, "pets", classes=2, shots=(1,))
    write_list(base / "annotations" / "odd.list", [("class 1/photo 0.jpg.png", 1)])
    entry = ListFile(str(base / "annotations" / "odd.list"), str(base / "images"))
    from glora_ray.data import parse_list_file

    (sample,) = parse_list_file(entry.path, 2, images=entry.images)
    assert sample.label == 1 and sample.path == base / "images" / "class 1" / "photo 0.jpg.png"


@pytest.mark.parametrize("argv, problem", [
    (["--shots", "4"], "train_meta.list.num_shot_4.seed_0' is missing"),
    (["--seeds", "7"], "1-shot seed 7"),
])
def test_fewshot_missing_list_is_named(tmp_path, argv, problem):
    noah(tmp_path, "cars", shots=(1,))
    cfg = parse_fewshot_config(["--datasets", "cars", "--data-root", str(tmp_path), "--shots", "1", *argv])
    with pytest.raises(DataError, match=problem):
        fewshot_units(cfg)


def test_fewshot_labels_outside_the_class_count_and_missing_images_are_refused(tmp_path):
    # oxford-pets has 37 classes: a label of 40 is out of range (named with file and line).
    noah(tmp_path, "oxford-pets", classes=2, shots=(1,), label_shift=36)
    cfg = parse_fewshot_config(tiny_args(tmp_path, tmp_path / "out", "--datasets", "oxford-pets", "--shots", "1",
                                         "--seeds", "0"))
    with pytest.raises(DataError, match=r"num_shot_1.seed_0:2: label 37 out of range 0..36"):
        check_units(cfg, fewshot_units(cfg))
    base = noah(tmp_path / "b", "oxford-pets", classes=2, shots=(1,))
    (base / "images" / "class 1" / "photo 1.jpg.png").unlink()
    cfg = parse_fewshot_config(tiny_args(tmp_path / "b", tmp_path / "out", "--datasets", "oxford-pets",
                                         "--shots", "1", "--seeds", "0"))
    with pytest.raises(DataError, match=r"val_meta.list:3: image .*photo 1.jpg.png' does not exist"):
        check_units(cfg, fewshot_units(cfg))
    assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"


def test_fewshot_curves_average_datasets_per_seed_then_over_seeds():
    frame = pd.DataFrame({"dataset": ["a", "a", "b", "b"], "shots": [1, 1, 1, 1], "seed": [0, 1, 0, 1],
                          "test_acc": [0.2, 0.4, 0.6, 0.8]})
    stats = curves(frame).set_index("dataset")
    assert list(stats.index) == ["average", "a", "b"]
    assert stats.loc["average", "mean"] == pytest.approx(0.5)
    assert stats.loc["average", "std"] == pytest.approx(pd.Series([0.4, 0.6]).std())
    assert stats.loc["a", "mean"] == pytest.approx(0.3) and stats.loc["b", "count"] == 2


# -- domain generalization ----------------------------------------------------------------------
def noah_domain(root: Path, classes: int = 4) -> None:
    noah(root, "imagenet", classes=classes, shots=(16,), seeds=(0,))
    (root / "few-shot" / "imagenet" / "annotations" / "val_meta.list").rename(
        root / "few-shot" / "imagenet" / "annotations" / "unofficial_val_list_4_shot16seed0")
    (root / "few-shot" / "imagenet" / "annotations" / "test_meta.list").rename(
        root / "few-shot" / "imagenet" / "annotations" / "val_meta.list")
    for t, target in enumerate(DOMAIN_TARGETS):
        base = root / "domain-generalization" / target
        kept = [c for c in range(classes) if c % 2 == t % 2] if target in ("imagenet-adversarial", "imagenet-rendition") \
            else list(range(classes))
        for c in kept:
            image(base / "images" / f"n0{c} shifted" / "x 1.png", c)
        write_list(base / "annotations" / "val_meta.list", [(f"n0{c} shifted/x 1.png", c) for c in kept])


def test_domain_units_restrict_subset_targets_to_their_classes(tmp_path):
    noah_domain(tmp_path)
    cfg = parse_domain_config(["--data-root", str(tmp_path), "--num-classes", "4", "--seeds", "0"])
    assert not cfg.write_embedded_domain, "a given --data-root is never overwritten by the stand-in"
    (unit,), restricted = domain_units(cfg)
    assert restricted == {"imagenetv2": None, "imagenet-sketch": None, "imagenet-adversarial": [0, 2],
                          "imagenet-rendition": [1, 3]}
    assert [t.name for t in unit.tests] == ["imagenet", *DOMAIN_TARGETS]
    assert unit.tests[3].classes == (0, 2) and unit.tests[1].classes is None
    assert unit.data.validate(unit.splits)["train"] == 16 * 4
    (tmp_path / "domain-generalization" / "imagenet-sketch" / "annotations" / "val_meta.list").unlink()
    with pytest.raises(DataError, match="target set 'imagenet-sketch'.*val_meta.list' is missing"):
        domain_units(cfg)
    with pytest.raises(SystemExit):
        parse_domain_config(["--target-sets", "imagenet-c"])


def test_restricted_predictions_choose_among_the_allowed_classes():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 9.0]])
    assert predictions(logits).tolist() == [0, 3]
    assert predictions(logits, torch.tensor([1, 2])).tolist() == [2, 1]


# -- both pipelines, end to end on the embedded digits ----------------------------------------------
def load_entry(name):
    spec = importlib.util.spec_from_file_location(f"{name}_entry", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a_count_of(accuracy: float, images: int) -> bool:
    """Whether ``accuracy`` is some number of correct images out of ``images`` (and in 0..1)."""
    correct = accuracy * images
    return 0.0 <= accuracy <= 1.0 and abs(correct - round(correct)) < 1e-6


@pytest.mark.slow
def test_embedded_layouts_and_both_pipelines_end_to_end(tmp_path, ray_local):
    # As cheap as a whole run gets: 1 shot, 1 seed, 1 epoch, 1 generation, training in Ray Train's
    # local mode (no worker group to start); the VTAB pipeline's tests cover Train workers.
    data = tmp_path / "data root"
    write_digits_fewshot(data)
    write_digits_domain(data)
    annotations = data / "few-shot" / "digits" / "annotations"
    one_shot = (annotations / shot_list_name(1, 0)).read_text().splitlines()
    assert len(one_shot) == 10 and all(" " in line.rsplit(" ", 1)[0] for line in one_shot)  # spaces in paths
    assert len((data / "few-shot" / "digits" / "annotations" / shot_list_name(16, 2)).read_text().splitlines()) == 160

    fewshot_out = tmp_path / "fewshot out"
    argv = tiny_args(data, fewshot_out, "--shots", "1", "--seeds", "0", "--generations", "1", "--epochs", "1",
                     "--warmup-epochs", "0", "--checkpoint-every", "1", "--train-workers", "0", "--baselines", "head")
    assert load_entry("fewshot").main(argv) == 0
    results = pd.read_parquet(fewshot_out / RESULTS_FILE)
    # GLoRA's row, then the baseline's (Figure 2 draws a curve for each).
    assert list(results[["method", "dataset", "shots", "seed"]].itertuples(index=False, name=None)) == [
        ("glora", "digits", 1, 0), ("head", "digits", 1, 0)]
    frame = results[results["method"] == "glora"]
    # Scored once on the whole test list (797 digits), not on a batch or on the val list.
    test_images = len((annotations / "test_meta.list").read_text().splitlines())
    assert test_images == 797 and a_count_of(frame["test_acc"].iloc[0], test_images)
    assert 0 < frame["params"].iloc[0] <= 6_000
    figure = fewshot_out / FIGURE_FILE
    assert figure.stat().st_size > 5_000 and figure.read_bytes()[:4] == b"\x89PNG"
    test_record = json.loads((fewshot_out / "digits" / "shots-1" / "seed-0" / "export" / "test.json").read_text())
    assert test_record["test_acc"] == frame["test_acc"].iloc[0]
    # A unit's baselines train on its K-shot list and are scored on its val and test lists.
    unit_dir = fewshot_out / "digits" / "shots-1" / "seed-0"
    comparison = pd.read_parquet(unit_dir / COMPARISON_FILE)
    assert list(comparison["name"]) == ["glora", "head"] and comparison["test_acc"].iloc[0] == frame["test_acc"].iloc[0]
    head = json.loads((unit_dir / "baselines" / "head.json").read_text())
    assert a_count_of(head["test_acc"], test_images) and head["params"] == 0
    # A rerun resumes: nothing trained, searched or tested again, the same rows.
    done = [p for part in ("train", "search/population", "baselines") for p in (unit_dir / part).rglob("*")
            if p.is_file()]
    done.append(unit_dir / "export" / "test.json")
    stamps = {p: p.stat().st_mtime_ns for p in done}
    assert load_entry("fewshot").main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(fewshot_out / RESULTS_FILE).drop(columns="wall_seconds"),
                                  results.drop(columns="wall_seconds"))
    assert [p for p, stamp in stamps.items() if not p.exists() or p.stat().st_mtime_ns != stamp] == []

    domain_out = tmp_path / "domain out"
    argv = tiny_args(data, domain_out, "--num-classes", "10", "--generations", "1", "--epochs", "1",
                     "--warmup-epochs", "0", "--checkpoint-every", "1", "--batch-size", "32", "--train-workers", "0",
                     "--baselines", "head")
    assert load_entry("domain").main(argv) == 0
    table = pd.read_parquet(domain_out / TABLE_FILE)
    assert list(table.columns[:4]) == ["method", "seed", "params", "val_acc"]
    assert list(table.columns[4:9]) == ["imagenet", *DOMAIN_TARGETS]
    assert list(table["method"]) == ["glora", "head"]  # the baseline tested on every target set too
    # Each column is scored on its own list: the held-out digits, or that target set's images.
    sizes = {"imagenet": test_images, **{t: len((data / "domain-generalization" / t / "annotations" / "val_meta.list")
                                              .read_text().splitlines()) for t in DOMAIN_TARGETS}}
    assert sizes["imagenet-adversarial"] < test_images  # a subset of the classes
    for column, images in sizes.items():
        assert all(a_count_of(acc, images) for acc in table[column]), (column, images, list(table[column]))
    classes = storage.read_json(str(domain_out / CLASSES_FILE))["restricted_to_classes_present"]
    assert classes["imagenet-adversarial"] == [1, 3, 5, 7, 9] and classes["imagenetv2"] is None
