"""Parquet results: fixed schema round trip, atomic writes, URIs, readers."""
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glora_ray import TENSORS, ParamCounter, SearchSpace
from glora_ray.search import (EvalResult, EvolutionPlanner, Fitness, ResultStore, SearchConfig, population_schema,
                              read_population)
from glora_ray.search.results import (
    PARETO_FILE, POPULATION_DIR, front_table, generation_table, read_pareto, stored_scores,
)
from glora_ray.search.pareto import pareto_front

SPACE = SearchSpace((4, 2))
LAYERS = ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1")
COUNTER = ParamCounter(SPACE, [(16, 48), (16, 16), (16, 64)])


def two_generations():
    """Two evaluated generations of a small search, with made-up timings."""
    planner = EvolutionPlanner(SearchConfig(population=6, parents=2, mutants=2, crossovers=2), SPACE, COUNTER,
                               COUNTER.min_params, COUNTER.max_params)
    tables = []
    for g in range(2):
        asked = planner.ask()
        accs = {c.key: round(0.1 + 0.8 * (i / len(asked)), 3) for i, c in enumerate(asked)}
        losses = {c.key: 2.0 - accs[c.key] for c in asked}
        scored = planner.tell(accs, losses)
        timings = {c.key: EvalResult(c.key, accs[c.key], 0.01 * i, f"actor-{i % 2}", 0, 0, losses[c.key])
                   for i, c in enumerate(asked)}
        tables.append(generation_table(scored, timings, run_id="r1", dataset="dtd", seed=0, space=SPACE,
                                       layer_names=LAYERS, commit={"generation": g, "rng_state": planner.rng_state()}))
    return planner, tables


def test_schema_columns_in_the_documented_order():
    schema = population_schema(LAYERS)
    genes = [f"{layer}/{t}" for layer in LAYERS for t in TENSORS]
    assert schema.names == ["run_id", "dataset", "generation", "candidate_id", "parent_ids", "origin", "key",
                            *genes, "params", "val_acc", "val_loss", "eval_seconds", "actor", "seed"]
    assert schema.field("parent_ids").type == pa.list_(pa.string())
    assert schema.field("generation").type == pa.int32() and schema.field("params").type == pa.int64()
    assert schema.field("val_loss").type == pa.float64()


def test_round_trip_through_pandas_read_parquet(tmp_path):
    planner, tables = two_generations()
    store = ResultStore(tmp_path / "out")
    for g, table in enumerate(tables):
        store.write_generation(g, table)
    frame = pd.read_parquet(tmp_path / "out" / POPULATION_DIR)  # the notebook's one-liner
    assert len(frame) == 12 and sorted(frame["generation"].unique()) == [0, 1]
    assert str(frame["generation"].dtype) == "int32"
    ours = read_population(tmp_path / "out")
    assert list(ours.columns) == population_schema(LAYERS).names
    for _, row in ours.iterrows():
        scored = planner.evaluated[row["key"]]
        assert row["params"] == scored.candidate.params and row["val_acc"] == scored.val_acc
        assert row["val_loss"] == scored.val_loss == 2.0 - scored.val_acc
        assert list(row["parent_ids"]) == list(scored.candidate.parent_ids)
        assert row["origin"] == scored.candidate.origin.value
        # The per-gene columns decode to the same subnet as the canonical key.
        choices = {layer: {t: row[f"{layer}/{t}"] for t in TENSORS} for layer in LAYERS}
        assert SPACE.genes_to_string(SPACE.encode(choices, LAYERS)) == row["key"]
    assert ours["key"].is_unique  # one row per evaluation
    back = store.read_generation(1, population_schema(LAYERS))
    assert back.commit["generation"] == 1
    assert stored_scores([back.table])[0] == [(s.candidate.candidate_id, s.candidate.key, s.val_acc, s.val_loss)
                                              for s in planner.history[1]]


def test_uris_and_relative_paths_reach_the_same_files(tmp_path, monkeypatch):
    _, tables = two_generations()
    ResultStore(f"file://{tmp_path}/out").write_generation(0, tables[0])
    monkeypatch.chdir(tmp_path)
    relative = ResultStore("out")
    assert relative.generation_numbers() == [0]
    assert relative.population_uri == f"{tmp_path}/out/{POPULATION_DIR}"
    assert len(read_population("out")) == 6


def test_a_killed_write_leaves_nothing_unreadable(tmp_path):
    _, tables = two_generations()
    store = ResultStore(tmp_path)
    store.write_generation(0, tables[0])
    # A writer killed mid-file leaves only its hidden temporary name behind ...
    leftover = tmp_path / POPULATION_DIR / f".{store.generation_file(1)}.tmp-{'0' * 32}"
    leftover.write_bytes(b"PAR1 half a file")
    assert len(pd.read_parquet(tmp_path / POPULATION_DIR)) == 6  # readers skip hidden names
    assert store.generation_numbers() == [0]
    assert store.remove_temporaries() == 1 and not leftover.exists()

    # ... and an error during a write removes the temporary and keeps the old file.
    class Boom(Exception):
        pass

    def failing(stream):
        stream.write(b"PAR1")
        raise Boom

    with pytest.raises(Boom):
        store._atomic((POPULATION_DIR, store.generation_file(0)), failing)
    assert sorted(p.name for p in (tmp_path / POPULATION_DIR).iterdir()) == [store.generation_file(0)]
    assert len(read_population(tmp_path)) == 6


def test_unreadable_or_foreign_files_are_named(tmp_path):
    _, tables = two_generations()
    store = ResultStore(tmp_path)
    (tmp_path / POPULATION_DIR).mkdir()
    (tmp_path / POPULATION_DIR / store.generation_file(0)).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="gen=0000.parquet: not a readable Parquet file"):
        store.read_generation(0)
    store.write_generation(0, tables[0])
    with pytest.raises(ValueError, match="columns differ"):
        store.read_generation(0, population_schema(LAYERS[:2]))
    pq.write_table(tables[0].replace_schema_metadata(None), tmp_path / POPULATION_DIR / store.generation_file(1))
    with pytest.raises(ValueError, match="no commit record"):
        store.read_generation(1)
    with pytest.raises(FileNotFoundError, match="no generation files"):
        read_population(tmp_path / "elsewhere")


def test_pareto_and_json_round_trip(tmp_path):
    planner, _ = two_generations()
    frame = pd.DataFrame({
        "key": [s.candidate.key for s in planner.evaluated.values()],
        "params": [s.candidate.params for s in planner.evaluated.values()],
        "val_acc": [s.val_acc for s in planner.evaluated.values()],
        "val_loss": [s.val_loss for s in planner.evaluated.values()],
        "candidate_id": [s.candidate.candidate_id for s in planner.evaluated.values()],
        "generation": [s.candidate.generation for s in planner.evaluated.values()],
        "origin": [s.candidate.origin.value for s in planner.evaluated.values()],
    })
    front = pareto_front(frame, Fitness.ACCURACY)
    store = ResultStore(tmp_path)
    store.write_table(front_table(front), PARETO_FILE)
    back = read_pareto(tmp_path)
    assert list(back["key"]) == list(front["key"]) and back["params"].is_monotonic_increasing
    store.write_json({"best": {"val_acc": 0.5}}, "result.json")
    assert json.loads((tmp_path / "result.json").read_text()) == {"best": {"val_acc": 0.5}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_results_and_checkpoints_on_a_non_local_filesystem():
    """fsspec's in-memory filesystem, wrapped by pyarrow: the code path of s3:// or gs://
    (no local paths, no os.rename) run for real, without a cloud."""
    import uuid

    import pyarrow.fs as pafs
    import torch

    from glora_ray.backbone import BackboneConfig
    from glora_ray.checkpoint import SupernetSpec, load_supernet, save_supernet
    from helpers import randomize_adapters

    root = f"memory://glora-test-{uuid.uuid4().hex}"
    planner, tables = two_generations()
    store = ResultStore(f"{root}/search")
    assert not isinstance(store.fs, pafs.LocalFileSystem)
    for g, table in enumerate(tables):
        store.write_generation(g, table)
    store.write_json({"best": {"val_acc": 0.5}}, "result.json")
    assert store.generation_numbers() == [0, 1] and store.read_json("result.json") == {"best": {"val_acc": 0.5}}
    assert store.read_generation(1).commit["generation"] == 1
    frame = read_population(f"{root}/search")
    assert len(frame) == 12 and set(frame["key"]) == set(planner.evaluated)
    assert not [i for i in store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
                if i.base_name.startswith(".")]  # every move completed
    # A supernet checkpoint written to and read back from the same kind of URI.
    spec = SupernetSpec(BackboneConfig("vit_tiny_patch16_224", img_size=16, model_kwargs=dict(
        patch_size=8, depth=1, embed_dim=32, num_heads=2)), num_classes=3, ranks=(2,))
    trained = spec.build()
    randomize_adapters(trained, seed=2)
    save_supernet(f"{root}/supernet", trained, spec)
    loaded, loaded_spec = load_supernet(f"{root}/supernet", expected=spec)
    assert loaded_spec == spec
    for key, value in trained.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
