"""VTAB-1k as the field stores it (docs/method.md §4): registry, list-file parsing, validation, datasets.

    <root>/<dataset>/images/...
    <root>/<dataset>/train800.txt  val200.txt  train800val200.txt  test.txt

Each list line is ``<path relative to <root>/<dataset>> <integer label>``.  Preprocessing is
The paper's (docs/method.md §4): resize straight to ``img_size`` x ``img_size`` (bicubic, no crop), RGB, ImageNet
mean/std, no augmentation; a backbone whose weights were trained with other values passes its
own (``DataConfig`` mean, std, interpolation).  Every problem with the input is a ``DataError`` naming the file
(and line) at fault, raised by ``validate_dataset`` before any training starts.
"""
from __future__ import annotations

from ..errors import GLoRARayError

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..splits import SPLITS

NATURAL, SPECIALIZED, STRUCTURED = "natural", "specialized", "structured"
GROUPS: tuple[str, ...] = (NATURAL, SPECIALIZED, STRUCTURED)
LIST_SUFFIX = ".txt"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Resize filters by timm's names (``pretrained_cfg["interpolation"]``); docs/method.md §4 uses bicubic.
RESAMPLING: Mapping[str, Image.Resampling] = MappingProxyType({
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
})
VTAB_INTERPOLATION = "bicubic"

# "<path> <label>": the label is the last whitespace-separated token, so a path may hold spaces.
_LINE = re.compile(r"(?P<path>\S(?:.*\S)?)\s+(?P<label>[+-]?\d+)")
_MAX_REPORTED_PROBLEMS = 5


class DataError(GLoRARayError):
    """Bad input data: a missing folder or file, an unparsable line, a bad path or label."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    group: str | None  # VTAB group; None for datasets outside VTAB-1k
    aliases: tuple[str, ...] = ()


def _registry(*infos: DatasetInfo) -> Mapping[str, DatasetInfo]:
    return MappingProxyType({info.name: info for info in infos})


VTAB_DATASETS: Mapping[str, DatasetInfo] = _registry(
    DatasetInfo("cifar", 100, NATURAL, aliases=("cifar100",)),
    DatasetInfo("caltech101", 102, NATURAL),
    DatasetInfo("dtd", 47, NATURAL),
    DatasetInfo("oxford_flowers102", 102, NATURAL),
    DatasetInfo("oxford_iiit_pet", 37, NATURAL, aliases=("oxford_pet",)),
    DatasetInfo("svhn", 10, NATURAL),
    DatasetInfo("sun397", 397, NATURAL),
    DatasetInfo("patch_camelyon", 2, SPECIALIZED),
    DatasetInfo("eurosat", 10, SPECIALIZED),
    DatasetInfo("resisc45", 45, SPECIALIZED),
    DatasetInfo("diabetic_retinopathy", 5, SPECIALIZED),
    DatasetInfo("clevr_count", 8, STRUCTURED),
    DatasetInfo("clevr_dist", 6, STRUCTURED),
    DatasetInfo("dmlab", 6, STRUCTURED),
    DatasetInfo("kitti", 4, STRUCTURED),
    DatasetInfo("dsprites_loc", 16, STRUCTURED),
    DatasetInfo("dsprites_ori", 16, STRUCTURED),
    DatasetInfo("smallnorb_azi", 18, STRUCTURED),
    DatasetInfo("smallnorb_ele", 9, STRUCTURED),
)
# Datasets in the same layout that ship with the package (see glora_ray.data.digits).
EMBEDDED_DATASETS: Mapping[str, DatasetInfo] = _registry(DatasetInfo("digits", 10, None),
                                                          DatasetInfo("digits_orientation", 4, None),
                                                          DatasetInfo("digits_count", 4, None))
DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({**VTAB_DATASETS, **EMBEDDED_DATASETS})
_ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: info.name for info in DATASETS.values() for alias in info.aliases}
)


def check_plain_name(name: str, what: str) -> str:
    """``name`` when it is one plain path component; it names ``<data-root>/<name>`` and, under
    ``--out``, the run's results, so a separator, ``..`` or an absolute path would escape both."""
    parts = PurePath(name).parts if isinstance(name, str) and name else ()
    if len(parts) != 1 or parts[0] in (".", "..") or PurePath(name).is_absolute() or "/" in name or "\\" in name:
        raise DataError(f"{what} {name!r} is not a plain name: give a dataset's folder name alone (no '/', no '..', "
                        f"not an absolute path); it names a folder under --data-root and one under --out")
    return name


def canonical_dataset_name(name: str) -> str:
    """The registry name of ``name``, accepting the other spellings (``cifar100``, ``oxford_pet``)."""
    if name in DATASETS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    valid = sorted(DATASETS) + sorted(f"{a} (= {c})" for a, c in _ALIASES.items())
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(valid)}")


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS[canonical_dataset_name(name)]


def is_registered(name: str) -> bool:
    """Whether ``name`` (or one of its other spellings) is in the registry."""
    return name in DATASETS or name in _ALIASES


def dataset_dir(root: str | Path, dataset: str) -> Path:
    """``<root>/<dataset>``, under whichever accepted spelling exists on disk."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist or is not a directory")
    # A user's own dataset (outside the registry) has one spelling: its folder name.
    info = dataset_info(dataset) if is_registered(dataset) else DatasetInfo(dataset, 0, None)
    spellings = dict.fromkeys((dataset, info.name, *info.aliases))  # ordered, unique
    for spelling in spellings:
        candidate = root / spelling
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(root / s) for s in spellings)
    raise DataError(f"dataset folder for {info.name!r} not found; tried {tried}")


def list_file(root: str | Path, dataset: str, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; VTAB-1k splits are {list(SPLITS)}")
    path = dataset_dir(root, dataset) / f"{split}{LIST_SUFFIX}"
    if not path.is_file():
        name = canonical_dataset_name(dataset) if is_registered(dataset) else dataset
        raise DataError(f"list file {str(path)!r} is missing (split {split!r} of {name!r})")
    return path


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    source: str  # "<list file>:<line>", for error messages
    list_file: Path | None = None  # the list file and line that name this sample
    line: int | None = None


def raise_problems(path: Path, problems: list[str]) -> None:
    """One ``DataError`` naming ``path`` and the first problems found in it (none: nothing)."""
    if not problems:
        return
    shown = "\n  ".join(problems[:_MAX_REPORTED_PROBLEMS])
    more = len(problems) - _MAX_REPORTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(f"{path}: {len(problems)} bad line(s):\n  {shown}{tail}")


def parse_list_file(path: str | Path, num_classes: int | None, check_exists: bool = True,
                    images: str | Path | None = None) -> list[Sample]:
    """Parse one list file; every bad line is reported as ``<file>:<line>: <problem>``.

    Paths are relative to ``images``, by default the list file's folder (``<root>/<dataset>``);
    blank lines are skipped.  ``num_classes`` None: any label >= 0 (the classes are not known yet).
    """
    path = Path(path)
    base = path.parent if images is None else Path(images)
    samples: list[Sample] = []
    problems: list[str] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list file {str(path)!r}: {err}") from err
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        match = _LINE.fullmatch(line)
        if match is None:
            problems.append(f"{where}: cannot parse {raw!r}; expected '<relative image path> <integer label>'")
            continue
        label = int(match.group("label"))
        relative = PurePath(match.group("path"))
        if relative.is_absolute() or ".." in relative.parts:  # the dataset is the folder the lists describe
            problems.append(f"{where}: image path {str(relative)!r} leaves {str(base)!r}; list paths are relative to "
                            f"it, without '..'")
            continue
        image = base / relative
        if num_classes is None and label < 0:
            problems.append(f"{where}: label {label} is negative; labels are 0..K-1")
            continue
        if num_classes is not None and not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} out of range 0..{num_classes - 1}")
            continue
        if check_exists and not image.is_file():
            problems.append(f"{where}: image {str(image)!r} does not exist")
            continue
        samples.append(Sample(image, label, where, path, number))
    raise_problems(path, problems)
    if not samples:
        raise DataError(f"list file {str(path)!r} holds no samples")
    return samples


def read_split(root: str | Path, dataset: str, split: str, check_exists: bool = True) -> list[Sample]:
    return parse_list_file(list_file(root, dataset, split), dataset_info(dataset).num_classes, check_exists)


def validate_dataset(
    root: str | Path,
    dataset: str,
    splits: Sequence[str] = SPLITS,
) -> dict[str, int]:
    """Pre-flight check of a dataset: raises ``DataError`` naming the file and line at fault.

    Checks the root and dataset folders, each list file, every line, every image path and label
    (``verify.check_decodable`` also opens the images).  Returns the sample count of each split.
    """
    if isinstance(splits, str):
        splits = (splits,)
    counts: dict[str, int] = {}
    for split in splits:
        counts[split] = len(read_split(root, dataset, split))
    return counts


# -- preprocessing --------------------------------------------------------------------------
def preprocess_image(
    image: Image.Image,
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = VTAB_INTERPOLATION,
) -> np.ndarray:
    """docs/method.md §4: RGB, resize straight to img_size (no crop), normalise -> (3, H, W) float32."""
    rgb = image.convert("RGB").resize((img_size, img_size), RESAMPLING[interpolation])
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_sample(sample: Sample, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                interpolation: str = VTAB_INTERPOLATION) -> np.ndarray:
    try:
        with Image.open(sample.path) as image:
            return preprocess_image(image, img_size, mean, std, interpolation)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{sample.source}: cannot decode image {str(sample.path)!r}: {err}") from err


def load_split_arrays(
    root: str | Path,
    dataset: str,
    split: str,
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = VTAB_INTERPOLATION,
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split, preprocessed: images (N, 3, H, W) float32 and labels (N,) int64."""
    return decode_samples(read_split(root, dataset, split), img_size, mean, std, interpolation)


def sample_labels(samples: Sequence[Sample]) -> np.ndarray:
    """The samples' labels as one int64 array."""
    return np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))


def decode_samples(
    samples: Sequence[Sample],
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = VTAB_INTERPOLATION,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples preprocessed: images (N, 3, H, W) float32 and labels (N,) int64."""
    images = np.empty((len(samples), 3, img_size, img_size), dtype=np.float32)
    for i, sample in enumerate(samples):
        images[i] = load_sample(sample, img_size, mean, std, interpolation)
    return images, sample_labels(samples)


class ListDataset(Dataset):
    """Parsed list-file samples, decoded lazily: item -> (float tensor (3, H, W), int label)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        img_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = VTAB_INTERPOLATION,
    ):
        self.img_size = img_size
        self.mean, self.std, self.interpolation = tuple(mean), tuple(std), interpolation
        self.samples = list(samples)

    @property
    def labels(self) -> np.ndarray:
        return sample_labels(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return torch.from_numpy(load_sample(sample, self.img_size, self.mean, self.std, self.interpolation)), sample.label


class VTABDataset(ListDataset):
    """One split of a VTAB-1k folder, decoded lazily."""

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        img_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = VTAB_INTERPOLATION,
    ):
        super().__init__(read_split(root, dataset, split), img_size, mean, std, interpolation)
        self.info = dataset_info(dataset)
        self.split = split

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


class ArrayDataset(Dataset):
    """Preprocessed arrays held in memory (decoded once, not every epoch)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass(frozen=True)
class ListFile:
    """One split stored outside the VTAB-1k layout: its list file, and the folder its paths start in."""

    path: str
    images: str


@dataclass
class DataConfig:
    """Where a dataset lives and how it is preprocessed (defaults: docs/method.md §4's VTAB protocol;
    a pretrained backbone passes its own mean, std and interpolation).

    ``in_memory`` decodes a split once into arrays (800 images at 224 px: 0.5 GB per worker);
    otherwise images are decoded every epoch, by ``loader_workers`` DataLoader processes.

    A dataset outside the registry (a user's own, few-shot, domain generalization) gives its
    ``class_count``; its name is then taken as it is.  ``lists`` names the list file of each split
    stored elsewhere than ``<root>/<dataset>/<split>.txt`` (NOAH's layout, docs/method.md §8).
    """

    root: str
    dataset: str
    img_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = VTAB_INTERPOLATION
    in_memory: bool = True
    loader_workers: int = 0
    class_count: int | None = None  # a dataset outside the registry: labels 0..class_count-1
    lists: dict[str, ListFile] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.dataset if self.class_count is not None else canonical_dataset_name(self.dataset)

    @property
    def info(self) -> DatasetInfo:
        if self.class_count is not None:
            return DatasetInfo(self.dataset, self.class_count, None)
        return dataset_info(self.dataset)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def same_dataset(self, name: str) -> bool:
        """Whether ``name`` means this dataset (registry names in any accepted spelling)."""
        if self.class_count is not None:
            return name == self.dataset
        return is_registered(name) and canonical_dataset_name(name) == self.name

    def list_path(self, split: str) -> Path:
        if split in self.lists:
            return Path(self.lists[split].path)
        return list_file(self.root, self.dataset, split)

    def samples(self, split: str, check_exists: bool = True) -> list[Sample]:
        """The parsed list of ``split``: every line checked (label range, image present)."""
        if split in self.lists:
            entry = self.lists[split]
            if not Path(entry.path).is_file():
                raise DataError(f"list file {entry.path!r} is missing (split {split!r} of {self.name!r})")
            return parse_list_file(entry.path, self.num_classes, check_exists, images=entry.images)
        return parse_list_file(list_file(self.root, self.dataset, split), self.num_classes, check_exists)

    def check_classes(self, split: str) -> int:
        """The classes the training list ``split`` holds; a ``DataError`` when fewer than two: a
        one-class head learns nothing and scores 100 % on any test list (docs/method.md §4)."""
        labels = sorted({s.label for s in self.samples(split, check_exists=False)})
        if self.num_classes < 2 or len(labels) < 2:
            raise DataError(
                f"dataset {self.name!r} has a single class: its {split} list {str(self.list_path(split))!r} holds only "
                f"label {labels[0]}" + (f" of {self.num_classes} classes" if self.num_classes > 1 else "")
                + "; a classifier needs at least two classes")
        return len(labels)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole split preprocessed: images (N, 3, H, W) float32 and labels (N,) int64."""
        return decode_samples(self.samples(split), self.img_size, self.mean, self.std, self.interpolation)

    def lazy(self, split: str) -> ListDataset:
        """The split decoded image by image, as it is read."""
        return ListDataset(self.samples(split), self.img_size, self.mean, self.std, self.interpolation)

    def check(self) -> None:
        """Field checks that touch no file."""
        if self.class_count is None:
            canonical_dataset_name(self.dataset)
        elif self.class_count < 1:
            raise DataError(f"class_count of {self.dataset!r} must be >= 1, got {self.class_count}")
        if self.img_size <= 0:
            raise DataError(f"img_size must be positive, got {self.img_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"mean and std need 3 values each (std > 0), got mean={self.mean}, std={self.std}")
        if self.interpolation not in RESAMPLING:
            raise DataError(f"interpolation {self.interpolation!r} is not one of {sorted(RESAMPLING)}")
        if self.loader_workers < 0:
            raise DataError(f"loader_workers must be >= 0, got {self.loader_workers}")

    def validate(self, splits: Iterable[str] = SPLITS) -> dict[str, int]:
        """Pre-flight check of ``splits`` (see ``validate_dataset``); returns their sample counts."""
        self.check()
        if isinstance(splits, str):
            splits = (splits,)
        return {split: len(self.samples(split)) for split in splits}

    def build(self, split: str) -> Dataset:
        return ArrayDataset(*self.arrays(split)) if self.in_memory else self.lazy(split)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataConfig":
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        if "lists" in data:
            data["lists"] = {split: ListFile(**dict(entry)) for split, entry in data["lists"].items()}
        return cls(**data)
