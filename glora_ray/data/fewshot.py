"""Few-shot and domain-generalization data in NOAH's layout (docs/method.md §8).

    <root>/few-shot/<dataset>/images/...
    <root>/few-shot/<dataset>/annotations/train_meta.list.num_shot_<K>.seed_<S>
    <root>/few-shot/<dataset>/annotations/val_meta.list  test_meta.list
    <root>/domain-generalization/<target>/images/...  annotations/val_meta.list

A line is ``<path relative to images/> <label>``, split at the last whitespace (paths may hold
spaces); ``parse_list_file`` reads it.  ImageNet's own lists (16-shot training, a held-out list to
search on, its validation set) sit under ``few-shot/imagenet``; the four target sets' labels are in
ImageNet's 1000-class index.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from .custom import count_classes
from .vtab import DataError, DatasetInfo, ListFile, parse_list_file

FEW_SHOT_DIR = "few-shot"
DOMAIN_DIR = "domain-generalization"
IMAGES_DIR = "images"
ANNOTATIONS_DIR = "annotations"
VAL_LIST = "val_meta.list"
TEST_LIST = "test_meta.list"
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
SEEDS: tuple[int, ...] = (0, 1, 2)

FEWSHOT_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({info.name: info for info in (
    DatasetInfo("food101", 101, None),
    DatasetInfo("oxford-flowers102", 102, None),
    DatasetInfo("stanford-cars", 196, None),
    DatasetInfo("oxford-pets", 37, None),
    DatasetInfo("fgvc-aircraft", 100, None),
)})

IMAGENET = "imagenet"
IMAGENET_CLASSES = 1000
DOMAIN_SHOTS = 16  # the paper's protocol: ImageNet 16-shot
DEFAULT_SEARCH_LIST = "unofficial_val_list_4_shot16seed0"  # NOAH's held-out ImageNet list
IMAGENET_TEST_LIST = VAL_LIST  # ImageNet's validation set: the source accuracy
DOMAIN_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition")
# Target sets that hold a subset of the classes (200 each): predictions are restricted to them.
SUBSET_TARGETS: frozenset[str] = frozenset({"imagenet-adversarial", "imagenet-rendition"})


def shot_list_name(shots: int, seed: int) -> str:
    return f"train_meta.list.num_shot_{shots}.seed_{seed}"


@dataclass(frozen=True)
class NoahFolder:
    """One dataset folder in NOAH's layout: ``images/`` and ``annotations/``."""

    path: Path

    @property
    def images(self) -> Path:
        return self.path / IMAGES_DIR

    def list_file(self, name: str) -> ListFile:
        """The list ``annotations/<name>``, whose image paths start in ``images/``."""
        return ListFile(str(self.path / ANNOTATIONS_DIR / name), str(self.images))

    def require(self, what: str) -> "NoahFolder":
        for folder in (self.path, self.images, self.path / ANNOTATIONS_DIR):
            if not folder.is_dir():
                raise DataError(f"{what}: folder {str(folder)!r} is missing; NOAH's layout is "
                                f"{self.path}/{{{IMAGES_DIR}, {ANNOTATIONS_DIR}}}/")
        return self


def fewshot_folder(root: str | Path, dataset: str) -> NoahFolder:
    return NoahFolder(Path(root).absolute() / FEW_SHOT_DIR / dataset)


def domain_folder(root: str | Path, target: str) -> NoahFolder:
    return NoahFolder(Path(root).absolute() / DOMAIN_DIR / target)


def resolve_fewshot_name(name: str, root: str | Path) -> str:
    """One of the five few-shot datasets, or an own dataset's folder under ``<root>/few-shot``."""
    if name in FEWSHOT_DATASETS or fewshot_folder(root, name).path.is_dir():
        return name
    raise DataError(
        f"unknown few-shot dataset {name!r}: not one of {', '.join(FEWSHOT_DATASETS)}, and "
        f"{str(fewshot_folder(root, name).path)!r} is no folder; an own dataset is a folder under "
        f"<data root>/{FEW_SHOT_DIR} in NOAH's layout"
    )


def require_list(entry: ListFile, what: str) -> ListFile:
    """A list that must exist (a requested shot or seed, a target set): its absence is bad input."""
    if not Path(entry.path).is_file():
        raise DataError(f"{what}: list file {entry.path!r} is missing")
    return entry


def fewshot_classes(root: str | Path, dataset: str, shots: Sequence[int], seeds: Sequence[int],
                    num_classes: int | None = None) -> int:
    """The class count: given, known for the five datasets, or counted from every training list (must agree)."""
    if num_classes is not None:
        return num_classes
    if dataset in FEWSHOT_DATASETS:
        return FEWSHOT_DATASETS[dataset].num_classes
    folder = fewshot_folder(root, dataset).require(f"few-shot dataset {dataset!r}")
    counts = {}
    for k in shots:
        for s in seeds:
            entry = require_list(folder.list_file(shot_list_name(k, s)), f"{dataset} {k}-shot seed {s}")
            counts[entry.path] = count_classes(entry.path, entry.images)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{Path(p).name}: {k}" for p, k in counts.items())
        raise DataError(f"few-shot dataset {dataset!r}: its training lists count different classes ({listed}); "
                        f"give the class count with --num-classes")
    return next(iter(counts.values()))


def classes_present(entry: ListFile, num_classes: int) -> tuple[int, ...]:
    """The sorted labels a list uses (ImageNet-A/-R: their 200 of the 1000 classes)."""
    samples = parse_list_file(entry.path, num_classes, check_exists=False, images=entry.images)
    return tuple(sorted({s.label for s in samples}))
