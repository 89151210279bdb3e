"""Search results as Parquet, through pyarrow filesystems (a local path, file://, s3://, gs://, ...).

Layout under the output URI::

    run.json                      the run's identity (settings, model, data fingerprints)
    population/gen=0000.parquet   one file per complete generation, fixed schema
    population/gen=0001.parquet   ...
    pareto.parquet                the front of (the search's fitness, params down) over all evaluations
    result.json                   the best subnet under the budget, counts, settings

Every file is written under a hidden temporary name in its final directory and then moved into
place, so a reader (or a resume) never sees a half-written file; Parquet readers skip names
that start with ".".  ``pandas.read_parquet(<out>/population)`` reads all generations as one
table.

Population rows: one row per evaluation.  A generation's file holds exactly the candidates
evaluated in that generation; a parent surviving into later generations is not repeated
(its children name it in ``parent_ids``), so ``len(table)`` is the number of evaluations and
``key`` is unique across the table.  The elite at generation g is the top ``parents`` rows
of generations < g in the ranking of ``SearchConfig.fitness`` (docs/method.md §3): by
(val_acc desc, params asc, key asc), or for ``loss`` by (val_loss asc, val_acc desc, params asc,
key asc).

Columns, in order: run_id, dataset, generation (int32), candidate_id, parent_ids (list<string>),
origin ("seeded" | "random" | "mutation" | "crossover"), key (the canonical subnet key: the space's
prefix, then one character per gene), then one string column per adapted layer and tensor named "<layer name>/<tensor>"
(e.g. "blocks.0.attn.qkv/A") holding the choice name ("lora8", "vector", "scalar", "none"),
in gene order, then params (int64), val_acc (float64), val_loss (float64, the mean validation
cross-entropy), eval_seconds (float64), actor, seed (int64).

Each generation file's metadata (key ``glora_ray``) is its commit record: the run's fingerprint,
the generator state after the generation, where its candidates came from ("origins": count
per origin; "wanted": the mutants and crossovers asked for; "repaired": offspring moved into the
budget) and where they were evaluated ("nodes": actor name -> Ray node id).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..errors import GLoRARayError, one_line
from ..identity import IDENTITY
from ..space import TENSORS, SearchSpace
from .evaluator import EvalResult
from .evolution import Scored, StoredScore
from .pareto import FRONT_COLUMNS

# 2: keys carry their space ("r8r4:..."), population column "key"; 3: population column "val_loss",
# run.json records the initial subnets and the fitness; 4: no inert forms, one front by the fitness
# with val_loss, streams tagged by purpose; 5: below
FORMAT_VERSION = 5
FORMAT_CHANGES = ("no inert forms in the space (D on a layer without a bias), one front by the search's fitness "
                  "with val_loss, streams tagged by purpose; run.json keeps the run's inputs under 'identity'")
MANIFEST_FILE = "run.json"
POPULATION_DIR = "population"
PARETO_FILE = "pareto.parquet"
RESULT_FILE = "result.json"
METADATA_KEY = b"glora_ray"
_GENERATION_FILE = re.compile(r"gen=(\d{4,})\.parquet")
_TEMPORARY_FILE = re.compile(r"\..+\.tmp-[0-9a-f]{32}")
TIMING_COLUMNS = ("eval_seconds", "actor")  # the columns that differ between equal runs


class ResultFileError(GLoRARayError):
    """A stored results file that is unreadable or was not written by this run's format."""


class MissingResultsError(GLoRARayError, FileNotFoundError):
    """No results where a reader was pointed."""


def gene_column(layer: str, tensor: str) -> str:
    return f"{layer}/{tensor}"


def gene_columns(layer_names: Sequence[str]) -> list[str]:
    """One column per layer and tensor, in gene order (layer-major)."""
    return [gene_column(layer, t) for layer in layer_names for t in TENSORS]


def population_schema(layer_names: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [
            ("run_id", pa.string()),
            ("dataset", pa.string()),
            ("generation", pa.int32()),
            ("candidate_id", pa.string()),
            ("parent_ids", pa.list_(pa.string())),
            ("origin", pa.string()),
            ("key", pa.string()),
        ]
        + [(name, pa.string()) for name in gene_columns(layer_names)]
        + [
            ("params", pa.int64()),
            ("val_acc", pa.float64()),
            ("val_loss", pa.float64()),
            ("eval_seconds", pa.float64()),
            ("actor", pa.string()),
            ("seed", pa.int64()),
        ]
    )


PARETO_SCHEMA = pa.schema([
    ("key", pa.string()), ("params", pa.int64()), ("val_acc", pa.float64()), ("val_loss", pa.float64()),
    ("candidate_id", pa.string()), ("generation", pa.int32()), ("origin", pa.string()),
])
assert tuple(PARETO_SCHEMA.names) == FRONT_COLUMNS


def generation_table(
    scored: Sequence[Scored],
    timings: dict[str, EvalResult],
    *,
    run_id: str,
    dataset: str,
    seed: int,
    space: SearchSpace,
    layer_names: Sequence[str],
    commit: dict[str, Any],
) -> pa.Table:
    """One generation's rows under the fixed schema, with its commit record as file metadata."""
    schema = population_schema(layer_names)
    genes = np.stack([s.candidate.genes for s in scored]) if scored else np.zeros((0, len(layer_names) * len(TENSORS)), np.int8)
    names = {t: np.array(space.choices(t), dtype=object) for t in TENSORS}
    columns: dict[str, Any] = {
        "run_id": [run_id] * len(scored),
        "dataset": [dataset] * len(scored),
        "generation": [s.candidate.generation for s in scored],
        "candidate_id": [s.candidate.candidate_id for s in scored],
        "parent_ids": [list(s.candidate.parent_ids) for s in scored],
        "origin": [s.candidate.origin.value for s in scored],
        "key": [s.candidate.key for s in scored],
    }
    for j, column in enumerate(gene_columns(layer_names)):
        columns[column] = names[TENSORS[j % len(TENSORS)]][genes[:, j]].tolist()
    columns.update({
        "params": [s.candidate.params for s in scored],
        "val_acc": [s.val_acc for s in scored],
        "val_loss": [s.val_loss for s in scored],
        "eval_seconds": [timings[s.candidate.key].seconds for s in scored],
        "actor": [timings[s.candidate.key].actor for s in scored],
        "seed": [seed] * len(scored),
    })
    table = pa.table(columns, schema=schema)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(commit, sort_keys=True).encode()})


def front_table(front: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(front[list(FRONT_COLUMNS)], schema=PARETO_SCHEMA, preserve_index=False)


@dataclass(frozen=True)
class StoredGeneration:
    generation: int
    table: pa.Table
    commit: dict[str, Any]


class ResultStore:
    """The output location of one run, on any pyarrow filesystem."""

    def __init__(self, uri: str | os.PathLike):
        uri = os.fspath(uri)
        self.fs, self.root = storage.resolve(uri)
        self.uri = uri if "://" in uri else self.root

    # -- paths --------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def uri_of(self, *parts: str) -> str:
        return "/".join((self.uri.rstrip("/"), *parts))

    @property
    def population_uri(self) -> str:
        return self.uri_of(POPULATION_DIR)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # -- atomic writes ------------------------------------------------------------------
    def _atomic(self, parts: tuple[str, ...], write) -> None:
        storage.atomic_write(self.fs, self.path(*parts), write)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        self._atomic(parts, lambda stream: pq.write_table(table, stream))

    def write_json(self, data: dict[str, Any], *parts: str) -> None:
        text = json.dumps(data, indent=2, sort_keys=True).encode()
        self._atomic(parts, lambda stream: stream.write(text))

    def read_json(self, *parts: str) -> dict[str, Any]:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return json.loads(stream.read().decode())

    def remove_temporaries(self) -> int:
        """Delete leftovers of writes that were killed before their move; returns how many."""
        removed = 0
        for folder in (self.root, self.path(POPULATION_DIR)):
            if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(folder)):
                if info.type == pafs.FileType.File and _TEMPORARY_FILE.fullmatch(info.base_name):
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed

    # -- generations --------------------------------------------------------------------
    def generation_numbers(self) -> list[int]:
        folder = self.path(POPULATION_DIR)
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        numbers = []
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            match = _GENERATION_FILE.fullmatch(info.base_name)
            if match and info.type == pafs.FileType.File:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    @staticmethod
    def generation_file(generation: int) -> str:
        return f"gen={generation:04d}.parquet"

    def write_generation(self, generation: int, table: pa.Table) -> None:
        self.write_table(table, POPULATION_DIR, self.generation_file(generation))

    def read_generation(self, generation: int, schema: pa.Schema | None = None) -> StoredGeneration:
        path = self.path(POPULATION_DIR, self.generation_file(generation))
        try:
            table = pq.read_table(path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise ResultFileError(f"{path}: not a readable Parquet file ({one_line(err)})") from err
        if schema is not None and not table.schema.equals(schema, check_metadata=False):
            raise ResultFileError(f"{path}: its columns differ from this model's population schema "
                             f"(e.g. {sorted(set(table.schema.names) ^ set(schema.names))[:5]})")
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ResultFileError(f"{path}: no commit record (metadata key {METADATA_KEY.decode()!r}); not written by glora_ray")
        return StoredGeneration(generation, table, json.loads(raw))


def read_population(out_uri: str | os.PathLike) -> pd.DataFrame:
    """Every generation of a run as one DataFrame, ordered by generation and candidate: the files
    the search wrote (``gen=NNNN.parquet``) and nothing else in the folder (a stray copy, say)."""
    store = ResultStore(out_uri)
    numbers = store.generation_numbers()
    if not numbers:
        raise MissingResultsError(f"{store.population_uri}: no generation files (gen=NNNN.parquet) here")
    paths = [store.path(POPULATION_DIR, store.generation_file(n)) for n in numbers]
    frame = pq.ParquetDataset(paths, filesystem=store.fs).read().to_pandas()
    return frame.sort_values(["generation", "candidate_id"], kind="stable").reset_index(drop=True)


def read_pareto(out_uri: str | os.PathLike) -> pd.DataFrame:
    """The stored front; for a search stopped before it wrote one, the front of what it evaluated,
    by the fitness its ``run.json`` records."""
    from .config import Fitness
    from .pareto import pareto_front

    store = ResultStore(out_uri)
    if store.exists(PARETO_FILE):
        return pq.read_table(store.path(PARETO_FILE), filesystem=store.fs).to_pandas()
    manifest = store.read_json(MANIFEST_FILE)
    # Format 5 keeps the settings under 'identity', 3-4 at the top; before 3 only accuracy ranked.
    config = manifest.get(IDENTITY, manifest).get("config", {})
    fitness = Fitness(config.get("fitness", Fitness.ACCURACY.value))
    return pareto_front(read_population(out_uri)[list(FRONT_COLUMNS)], fitness)


def read_result(out_uri: str | os.PathLike) -> dict[str, Any]:
    return ResultStore(out_uri).read_json(RESULT_FILE)


def without_timing(frame: pd.DataFrame) -> pd.DataFrame:
    """A population table minus the columns that legitimately differ between equal runs."""
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame.columns])


def stored_scores(tables: Iterable[pa.Table]) -> list[list[StoredScore]]:
    """(candidate_id, key, val_acc, val_loss) per stored generation, in candidate order (for replay)."""
    out = []
    for table in tables:
        columns = table.select(["candidate_id", "key", "val_acc", "val_loss"]).to_pydict()
        out.append([StoredScore(*row) for row in zip(columns["candidate_id"], columns["key"], columns["val_acc"],
                                                      columns["val_loss"])])
    return out
