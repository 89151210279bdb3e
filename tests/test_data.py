"""VTAB-1k data: registry, parsing, VTAB preprocessing (docs/method.md §4), every bad-input case, the digits writer."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glora_ray.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    VTAB_DATASETS,
    DataConfig,
    DataError,
    ListDataset,
    VTABDataset,
    canonical_dataset_name,
    load_split_arrays,
    validate_dataset,
    write_digits_dataset,
)
from glora_ray.data.digits import main as digits_main
from glora_ray.data.verify import check_decodable
from glora_ray.data.vtab import list_file, read_split

SPEC_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}
SPEC_GROUPS = {
    "natural": {"cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"},
    "specialized": {"patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"},
    "structured": {"clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"},
}
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (40, 80, 160), (200, 10, 90)]


def write_vtab(root, dataset="kitti", folder=None, n_per_split=6, num_classes=4):
    """A tiny VTAB-1k folder with real image files: RGB PNG, grey PNG, RGBA PNG and JPEG."""
    base = root / (folder or dataset)
    (base / "images" / "sub dir").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_per_split):
        color = COLORS[i % len(COLORS)]
        if i % 4 == 1:
            image, name = Image.new("L", (7, 5), color[0]), f"images/g{i}.png"
        elif i % 4 == 2:
            image, name = Image.new("RGBA", (9, 9), color + (255,)), f"images/sub dir/a {i}.png"
        elif i % 4 == 3:
            image, name = Image.new("RGB", (12, 10), color), f"images/j{i}.jpg"
        else:
            image, name = Image.new("RGB", (10, 12), color), f"images/c{i}.png"
        image.save(base / name)
        paths.append(name)
    for split in SPLITS:
        lines = [f"{p} {i % num_classes}" for i, p in enumerate(paths)]
        (base / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_registry_is_spec_section_4():
    assert {n: i.num_classes for n, i in VTAB_DATASETS.items()} == SPEC_CLASSES
    for group, names in SPEC_GROUPS.items():
        assert {n for n, i in VTAB_DATASETS.items() if i.group == group} == names
    assert DATASETS["digits"].num_classes == 10 and DATASETS["digits"].group is None
    assert "digits" not in VTAB_DATASETS and set(DATASETS) == set(VTAB_DATASETS) | {"digits", "digits_orientation",
                                                                                      "digits_count"}
    assert DATASETS["digits_orientation"].num_classes == 4 and DATASETS["digits_orientation"].group is None


def test_canonical_names_accept_both_spellings():
    assert canonical_dataset_name("cifar100") == "cifar" == canonical_dataset_name("cifar")
    assert canonical_dataset_name("oxford_pet") == "oxford_iiit_pet" == canonical_dataset_name("oxford_iiit_pet")
    with pytest.raises(ValueError, match="valid names: .*caltech101.*cifar100 \\(= cifar\\)"):
        canonical_dataset_name("imagenet")


def decode_all(root, dataset, splits=SPLITS):
    for split in splits:
        check_decodable(read_split(root, dataset, split), list_file(root, dataset, split))


def test_parse_and_spec_preprocessing(tmp_path):
    write_vtab(tmp_path)
    assert validate_dataset(tmp_path, "kitti") == {s: 6 for s in SPLITS}
    decode_all(tmp_path, "kitti")
    ds = VTABDataset(tmp_path, "kitti", "train800", img_size=8)
    assert len(ds) == 6 and ds.num_classes == 4
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and label == 0
    # A solid colour stays solid under a bicubic resize: each channel is (c / 255 - mean) / std.
    expected = (np.array(COLORS[0]) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    grey, _ = ds[1]  # grey-scale becomes RGB: three equal channels before normalising
    raw = grey.numpy() * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[1], raw[2], atol=1e-5)
    x, y = load_split_arrays(tmp_path, "kitti", "val200", img_size=8)
    assert x.dtype == np.float32 and x.shape == (6, 3, 8, 8) and y.dtype == np.int64
    assert y.tolist() == [0, 1, 2, 3, 0, 1]
    np.testing.assert_array_equal(x[2], ds[2][0].numpy())


def test_preprocessing_matches_torchvision_resize_bicubic(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    (tmp_path / "eurosat" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(tmp_path / "eurosat/images/x.png")
    (tmp_path / "eurosat" / "train800.txt").write_text("images/x.png 3\n")
    reference = transforms.Compose([
        transforms.Resize((24, 24), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])(Image.open(tmp_path / "eurosat/images/x.png").convert("RGB"))
    ours, label = VTABDataset(tmp_path, "eurosat", "train800", img_size=24)[0]
    assert label == 3
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_alias_folder_on_disk(tmp_path):
    write_vtab(tmp_path, dataset="cifar", folder="cifar100", num_classes=100)
    assert validate_dataset(tmp_path, "cifar", ("train800",)) == {"train800": 6}
    assert len(VTABDataset(tmp_path, "cifar100", "test", img_size=4)) == 6
    cfg = DataConfig(str(tmp_path), "cifar100", img_size=4)
    assert cfg.name == "cifar" and cfg.num_classes == 100


def _edit_line(base, split, number, text):
    path = base / f"{split}.txt"
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("images/c0.png", "cannot parse"),
        ("images/c0.png three", "cannot parse"),
        ("images/missing.png 1", "does not exist"),
        ("images/c0.png 4", "label 4 out of range 0..3"),
        ("images/c0.png -1", "label -1 out of range 0..3"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, problem):
    base = write_vtab(tmp_path)
    path = _edit_line(base, "val200", 3, bad_line)
    validate_dataset(tmp_path, "kitti", ("train800",))  # other splits are unaffected
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        validate_dataset(tmp_path, "kitti")


def test_every_bad_line_is_counted(tmp_path):
    base = write_vtab(tmp_path)
    for number in (1, 2, 4):
        path = _edit_line(base, "test", number, "nonsense")
    with pytest.raises(DataError, match="3 bad line") as info:
        validate_dataset(tmp_path, "kitti", ("test",))
    assert all(f"{path}:{n}:" in str(info.value) for n in (1, 2, 4))


def test_missing_root_folder_and_list(tmp_path):
    with pytest.raises(DataError, match="data root .*nowhere.* does not exist"):
        validate_dataset(tmp_path / "nowhere", "kitti")
    with pytest.raises(DataError, match="dataset folder for 'oxford_iiit_pet' not found; tried .*oxford_pet"):
        validate_dataset(tmp_path, "oxford_pet")
    base = write_vtab(tmp_path)
    os.remove(base / "val200.txt")
    with pytest.raises(DataError, match=re.escape(repr(str(base / "val200.txt"))) + " is missing"):
        validate_dataset(tmp_path, "kitti")
    with pytest.raises(DataError, match="unknown split 'train'"):
        validate_dataset(tmp_path, "kitti", ("train",))
    (base / "test.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no samples"):
        validate_dataset(tmp_path, "kitti", ("test",))


def test_undecodable_image_fails_validation_with_its_line(tmp_path):
    base = write_vtab(tmp_path)
    (base / "images" / "c4.png").write_bytes(b"not a png at all")
    validate_dataset(tmp_path, "kitti")  # the path exists: only opening it finds the problem
    with pytest.raises(DataError, match=re.escape(f"{base / 'train800.txt'}:5: cannot decode")):
        decode_all(tmp_path, "kitti", ("train800",))
    with pytest.raises(DataError, match=":5: cannot decode"):
        load_split_arrays(tmp_path, "kitti", "train800", img_size=4)


def test_digits_writer_layout_counts_and_real_images(tmp_path, capsys):
    from sklearn.datasets import load_digits

    folder = write_digits_dataset(tmp_path)
    assert folder == tmp_path / "digits"
    decode_all(tmp_path, "digits")
    assert validate_dataset(tmp_path, "digits") == {
        "train800": 800, "val200": 200, "train800val200": 1000, "test": 797,
    }
    splits = {}
    for split in SPLITS:
        lines = (folder / f"{split}.txt").read_text().splitlines()
        splits[split] = {line.rpartition(" ")[0] for line in lines}
    assert not splits["train800"] & splits["val200"] and not splits["train800val200"] & splits["test"]
    assert splits["train800val200"] == splits["train800"] | splits["val200"]
    assert len(splits["train800val200"] | splits["test"]) == 1797
    # Real images: each PNG holds the sklearn digit it names, scaled 0..16 -> 0..255.
    digits = load_digits()
    for name in sorted(splits["val200"])[:20]:
        index, label = int(Path(name).stem), int(Path(name).parent.name)
        pixels = np.asarray(Image.open(folder / name))
        assert pixels.shape == (8, 8) and label == digits.target[index]
        np.testing.assert_array_equal(pixels, np.rint(digits.images[index] * 255 / 16).astype(np.uint8))
    # Stratified: every class close to its share.
    _, y = load_split_arrays(tmp_path, "digits", "train800", img_size=8)
    assert np.bincount(y, minlength=10).min() >= 75 and np.bincount(y).max() <= 85

    # Idempotent: a second call keeps the folder as it is.
    stamp = os.stat(folder / "train800.txt").st_mtime_ns
    assert write_digits_dataset(tmp_path) == folder
    assert os.stat(folder / "train800.txt").st_mtime_ns == stamp
    assert digits_main([str(tmp_path)]) == 0
    assert "test.txt: 797" in capsys.readouterr().out
    # Another seed would be a different dataset: refused, not silently mixed.
    with pytest.raises(DataError, match="not the digits dataset for seed 1"):
        write_digits_dataset(tmp_path, seed=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits")]  # no staging left


def test_data_config_round_trip_and_checks(tmp_path):
    cfg = DataConfig(str(tmp_path), "oxford_pet", img_size=32, in_memory=False)
    again = DataConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.name == "oxford_iiit_pet" and again.info.group == "natural"
    with pytest.raises(DataError, match="img_size must be positive"):
        DataConfig(str(tmp_path), "kitti", img_size=0).check()
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        DataConfig(str(tmp_path), "mnist").check()
    write_vtab(tmp_path)
    lazy = DataConfig(str(tmp_path), "kitti", img_size=4, in_memory=False).build("test")
    eager = DataConfig(str(tmp_path), "kitti", img_size=4).build("test")
    assert isinstance(lazy, ListDataset) and len(eager) == len(lazy) == 6
    torch.testing.assert_close(lazy[3][0], eager[3][0])
    assert lazy[3][1] == eager[3][1] == 3


def test_the_orientation_task_turns_each_digit_by_its_label(tmp_path):
    from glora_ray.data.digits import DIGITS_ORIENTATION, _load_digits, embedded_images

    folder = write_digits_dataset(tmp_path, name=DIGITS_ORIENTATION)
    counts = validate_dataset(tmp_path, DIGITS_ORIENTATION)
    assert counts["train800"] == 800 and counts["val200"] == 200 and counts["test"] == 797
    images, labels = embedded_images(DIGITS_ORIENTATION)
    originals, _ = _load_digits()
    assert sorted(np.bincount(labels)) == [449, 449, 449, 450]  # balanced quarter turns
    for index in (0, 7, 1234):
        np.testing.assert_array_equal(images[index], np.rot90(originals[index], labels[index]))
    first = (folder / "train800.txt").read_text().splitlines()[0].rsplit(" ", 1)
    index = int(Path(first[0]).stem)
    assert int(first[1]) == labels[index]
    # the same seed, the same folder: kept; it is not the digits dataset
    assert write_digits_dataset(tmp_path, name=DIGITS_ORIENTATION) == folder
    with pytest.raises(DataError, match="no embedded dataset"):
        embedded_images("digits_colour")
