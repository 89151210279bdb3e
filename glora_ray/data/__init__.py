"""Data: VTAB-1k folders (docs/method.md §4) and the embedded offline digits dataset in the same layout."""
from .vtab import (
    DATASETS,
    EMBEDDED_DATASETS,
    GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    VTAB_DATASETS,
    ArrayDataset,
    DataConfig,
    DataError,
    DatasetInfo,
    ListDataset,
    ListFile,
    Sample,
    VTABDataset,
    canonical_dataset_name,
    dataset_dir,
    dataset_info,
    load_split_arrays,
    parse_list_file,
    preprocess_image,
    read_split,
    validate_dataset,
)

__all__ = [
    "DATASETS",
    "EMBEDDED_DATASETS",
    "GROUPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "VTAB_DATASETS",
    "ArrayDataset",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "ListDataset",
    "ListFile",
    "Sample",
    "VTABDataset",
    "canonical_dataset_name",
    "dataset_dir",
    "dataset_info",
    "load_split_arrays",
    "parse_list_file",
    "preprocess_image",
    "read_split",
    "validate_dataset",
    "write_digits_dataset",
]


def __getattr__(name: str):
    # Imported lazily so that ``python -m glora_ray.data.digits`` does not find the module
    # already imported by its package (runpy warns about that).
    if name == "write_digits_dataset":
        from .digits import write_digits_dataset

        return write_digits_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
