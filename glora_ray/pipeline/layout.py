"""Where a pipeline run keeps what, under its output path or URI."""
from __future__ import annotations

from .. import storage

CONFIG_FILE = "config.json"  # the resolved configuration of the whole run
SUMMARY_FILE = "summary.parquet"
# The protocol jobs' results at the top of their --out (written there, read by pipelines/report.py).
FEWSHOT_RESULTS_FILE, FEWSHOT_FIGURE_FILE = "fewshot.parquet", "figure2.png"
DOMAIN_TABLE_FILE = "table2.parquet"


def dataset_uri(out: str, dataset: str) -> str:
    return storage.join(out, dataset)


def train_uri(out: str, dataset: str) -> str:
    """Ray Train storage_path: checkpoints of every run (and lr trial) of this dataset."""
    return storage.join(out, dataset, "train")


def search_uri(out: str, dataset: str) -> str:
    """Stage 2: population/gen=*.parquet, pareto.parquet, result.json."""
    return storage.join(out, dataset, "search")


def export_uri(out: str, dataset: str) -> str:
    """Stage 3: merged.safetensors, subnet.json, adapters.safetensors, test.json."""
    return storage.join(out, dataset, "export")
