"""The whole job: options, bad input before compute, an end-to-end run, resume, export, notebook."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from ray.exceptions import RayTaskError

from glora_ray import TENSORS, storage
from glora_ray.identity import IDENTITY, identity_changes
from glora_ray.search import Fitness
from glora_ray.checkpoint import read_spec
from glora_ray.data import VTAB_DATASETS, write_digits_dataset
from glora_ray.pipeline import layout
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.config import PipelineConfigError
from glora_ray.pipeline.lr_sweep import run_name_for
from glora_ray.pipeline.baselines import baseline, run_name as baseline_run_name
from glora_ray.pipeline.comparison import format_comparison
from glora_ray.pipeline.run import _outcome, comparison_table, preflight, run_pipeline
from glora_ray.pipeline.unit import spec_for
from glora_ray.pipeline.summary import format_summary, group_means
from glora_ray.search import read_population, without_timing
from helpers import REPO, load_entry_point, tiny_args



def test_options_override_the_preset():
    default = parse_config([])
    assert default.datasets == ("digits",) and default.backbone.name == "tf_efficientnet_lite0"
    assert default.backbone.weights == "efficientnet-lite0-package" and default.layer_types == ("conv2d",)
    assert default.preprocessing_values() == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    # The levers measured to beat a fixed LoRA of the same size (bench/README.md, "Issue 19").
    assert default.search.fitness is Fitness.LOSS and default.retrain_epochs == 20
    assert default.seed_population == ("lora", "ssf", "bitfit")
    tiny = parse_config(["--preset", "tiny"])
    assert tiny.backbone.name == "vit_tiny_patch16_224" and not tiny.backbone.loads_weights
    assert tiny.search.fitness is Fitness.ACCURACY and tiny.retrain_epochs == 0 and tiny.seed_population == ()
    assert tiny.layer_types == ("linear",) and tiny.preprocessing == "vtab"
    both = parse_config(["--preset", "tiny", "--layer-types", "linear", "conv2d", "--preprocessing", "backbone"])
    assert both.layer_types == ("linear", "conv2d") and both.preprocessing == "backbone"
    packaged = parse_config(["--preset", "tiny", "--weights", "efficientnet-lite0-package"])
    assert packaged.backbone.name == "tf_efficientnet_lite0" and packaged.backbone.model_kwargs == {}
    local = parse_config(["--checkpoint", "weights.pth"])
    assert local.backbone.checkpoint_path == "weights.pth" and local.backbone.weights is None
    paper = parse_config(["--preset", "paper", "--datasets", "cifar100", "oxford_pet", "dtd",
                          "--max-params", "0.29M", "--ranks", "8", "4", "--seed", "3"])
    assert paper.datasets == ("cifar", "oxford_iiit_pet", "dtd")
    assert paper.search.max_params == 290_000 and paper.ranks == (8, 4)
    assert paper.backbone.name == "vit_base_patch16_224.orig_in21k" and paper.backbone.pretrained
    assert paper.lr is None and paper.lr_for("cifar") == 5e-4 and paper.lr_for("clevr_count") == 1e-4
    assert paper.train.epochs == 500 and paper.search.population == 50 and paper.search.generations == 20
    assert paper.train.seed == paper.search.seed == paper.backbone.init_seed == 3
    # docs/method.md §4: the paper's preprocessing, not timm's 0.5 / 0.5 of these weights.
    assert paper.preprocessing_values() == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                            "interpolation": "bicubic"}
    assert parse_config(["--datasets", "all"]).datasets == tuple(VTAB_DATASETS)
    # The default trains in the job's process; what only a worker has (a Tune trial, a GPU) starts one.
    assert default.train.num_workers == 0 and parse_config(["--train-workers", "2"]).train.num_workers == 2
    sweep = parse_config(["--lr-sweep", "1e-4", "5e-4"])
    assert sweep.lr is None and sweep.lr_sweep == (1e-4, 5e-4) and sweep.train.num_workers == 1
    gpu = parse_config(["--train-gpus", "1", "--actor-gpus", "0.25", "--actors", "4"])
    assert gpu.train.use_gpu and gpu.search.gpus_per_actor == 0.25 and gpu.search.num_actors == 4
    assert gpu.train.num_workers == 1 and parse_config(["--train-gpus", "0"]).train.num_workers == 0


def test_the_default_budget_is_its_fixed_lora_s_size():
    from glora_ray.pipeline.baselines import baseline
    from glora_ray.pipeline.config import DEFAULT_LORA_PARAMS

    default = parse_config([])
    structure = spec_for(default, default.datasets[0]).build_empty()
    lora = structure.counter.count(baseline("lora").genes(structure))
    assert default.search.max_params == DEFAULT_LORA_PARAMS == lora  # searched never larger than the LoRA


def test_options_are_generated_from_the_fields_they_set():
    from dataclasses import dataclass, field, replace

    from glora_ray.checkpoint import SupernetSpec

    from glora_ray.options import JOB, option
    from glora_ray.pipeline.cli import build_parser, config_from_args
    from glora_ray.pipeline.config import PipelineConfig

    parser = build_parser()
    default = parse_config([])
    dests = {a.dest for a in parser._actions} - {"help", "preset"}
    assert len(dests) > 40
    for dest in dests:  # each option's destination is the path of a field that exists
        section, _, name = dest.rpartition(".")
        owner = getattr(default, section) if section else default
        assert name in TENSORS if section == "forms" else hasattr(owner, name), dest
    # Each given option changes exactly its field (values unlike the preset's), --seed every seed.
    cfg = parse_config(["--actors", "3", "--train-workers", "4", "--seed", "7", "--wait-for-resources", "9",
                        "--forms-A", "vector", "none", "--no-distill", "--train-gpus", "0.5"])
    assert (cfg.search.num_actors, cfg.train.num_workers, cfg.wait_for_resources_s) == (3, 4, 9.0)
    assert cfg.train.seed == cfg.backbone.init_seed == cfg.search.seed == 7
    assert cfg.forms == {**default.forms, "A": ("vector", "none")}
    assert (cfg.train.use_gpu, cfg.train.gpus_per_worker) == (True, 0.5)
    changed = {k for k, v in cfg.to_dict()["search"].items() if v != default.to_dict()["search"][k]}
    assert changed == {"num_actors", "seed"}
    reseeded = replace(cfg, search=replace(cfg.search, seed=9))  # --seed was applied once: a section's own stands
    assert (reseeded.search.seed, reseeded.train.seed) == (9, 7)
    # List options reach their fields as the configuration keeps them (a spec read back matches).
    targeted = parse_config(["--preset", "tiny", "--targets", "qkv", "fc1"])
    spec = spec_for(targeted, targeted.datasets[0])
    SupernetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).check_matches(spec, "a stored spec")
    with pytest.raises(SystemExit):  # an option and its negation exclude each other
        parser.parse_args(["--distill", "--no-distill"])

    # A field declared as an option on a config class is an option: no table to extend.
    @dataclass
    class WithLevel(PipelineConfig):
        level: int = field(default=1, metadata=option(JOB, "a new setting", argparse={"type": int}))

    extended = build_parser(WithLevel)
    assert "--level" in extended.format_help() and "(preset: 1)" in extended.format_help()
    assert config_from_args(extended.parse_args(["--level", "5"]), WithLevel).level == 5
    with pytest.raises(PipelineConfigError, match="--seed and --seeds exclude each other"):
        config_from_args(parser.parse_args(["--seed", "1", "--seeds", "2", "3"]))


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "imagenet"], "unknown dataset 'imagenet'"),
    (["--max-params", "lots"], "0.29M"),
    (["--ranks", "4", "4"], "distinct"),
    (["--layer-types", "lstm"], "'lstm' is not adaptable"),
    (["--train-workers", "0", "--lr-sweep", "1e-3", "2e-3"], "--train-workers 1 or more"),
])
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_entry_point().main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_fails_before_compute(tmp_path, capsys):
    entry = load_entry_point()
    data = tmp_path / "data"

    def fails(argv, message):
        assert entry.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert err.startswith("error: ") and "Traceback" not in err, err  # the message alone
        return err

    fails(tiny_args(tmp_path / "nowhere", tmp_path / "o1", "--datasets", "cifar"), "does not exist")
    (data / "dtd").mkdir(parents=True)
    fails(tiny_args(data, tmp_path / "o2", "--datasets", "dtd"), "train800.txt")
    err = fails(tiny_args(data, tmp_path / "o3", "--min-params", "100M", "--max-params", "200M"), "reaches")
    assert "100,000,000" in err
    fails(tiny_args(data, tmp_path / "o4", "--model", "no_such_net_v9"), "unknown timm model")
    broken = tmp_path / "weights.pth"
    broken.write_bytes(b"not a checkpoint")
    fails(tiny_args(data, tmp_path / "o5", "--checkpoint", str(broken)), "cannot read checkpoint")
    fails(tiny_args(data, tmp_path / "o6", "--checkpoint", str(tmp_path / "missing.pth")), "does not exist")
    other = tmp_path / "o7"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's")
    fails(tiny_args(data, other), "holds no glora-ray run")
    for name in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not (tmp_path / name / "digits").exists(), "nothing may start before the checks pass"


# Two VTAB-named datasets (one natural, one specialized) holding the bundled digits, so one run
# covers two datasets at once, the VTAB group means and, on a rerun, --test-pareto; the lr sweep
# runs on the first alone.
DATASETS = ("svhn", "eurosat")
GROUPS = {"svhn": "natural", "eurosat": "specialized"}
CHANCE = 0.1  # ten classes


def write_vtab_named_digits(root: Path) -> None:
    staging = write_digits_dataset(root / "staging")
    for name in DATASETS:
        shutil.copytree(staging, root / name)


def run_args(cfg, *extra):
    return tiny_args(cfg.data_root, cfg.out, "--datasets", *DATASETS, *extra)


@pytest.fixture(scope="module")
def vtab_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab_data")
    write_vtab_named_digits(root)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, vtab_data, ray_local):
    # Both datasets at once, each a Ray task training in its own process; one fixed-adapter
    # baseline (LoRA) trained like the supernet and tested once beside the search.  --out as a
    # file:// URI: every file goes through the storage layer, as to s3:// (test_cluster).
    out = (tmp_path_factory.mktemp("pipeline") / "out").as_uri()
    cfg = parse_config(tiny_args(vtab_data, out, "--datasets", *DATASETS, "--baselines", "lora"))
    frame = run_pipeline(cfg)
    return cfg, frame


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory, vtab_data, ray_local):
    # The paper's lr search: two Tune trials, each a Ray Train run with a worker group (no local
    # mode inside a trial), on the 2-CPU test cluster (the trial drivers reserve no CPU, or the
    # second trial's worker could never start).
    out = tmp_path_factory.mktemp("swept") / "out"
    cfg = parse_config(tiny_args(vtab_data, out, "--datasets", DATASETS[0], "--lr-sweep", "1e-5", "3e-3",
                                 "--train-workers", "1"))
    frame = run_pipeline(cfg)
    return cfg, frame


def test_end_to_end_outputs(finished_run):
    cfg, frame = finished_run
    assert list(frame["dataset"]) == list(DATASETS) and list(frame["group"]) == [GROUPS[d] for d in DATASETS]
    for _, row in frame.iterrows():
        assert 0 < row["params"] <= 6_000
        assert row["test_acc"] > 2 * CHANCE and row["val_acc"] > 2 * CHANCE  # learnt, not guessed
        subnet = storage.read_json(storage.join(layout.export_uri(cfg.out, row["dataset"]), "subnet.json"))
        assert subnet["key"] == row["key"] and subnet["params"] == row["params"]
        assert sum(subnet["layer_params"].values()) == subnet["params"]
        assert subnet["test_acc"] == row["test_acc"] and subnet["dataset"] == row["dataset"]
        population = pd.read_parquet(storage.join(layout.search_uri(cfg.out, row["dataset"]), "population"))
        assert set(population["generation"]) == {0, 1} and (population["params"] <= 6_000).all()
    summary = pd.read_parquet(storage.join(cfg.out, layout.SUMMARY_FILE))
    pd.testing.assert_frame_equal(summary, frame)
    stored = storage.read_json(storage.join(cfg.out, layout.CONFIG_FILE))
    assert stored["config"]["search"]["max_params"] == 6_000
    # Every stage's record keeps the inputs that decided it, the one thing a rerun compares.
    assert not identity_changes(stored, cfg.identity())
    for row in frame.itertuples():
        export = layout.export_uri(cfg.out, row.dataset)
        winner = {"key": row.key, "retrain_epochs": cfg.retrain_epochs}
        for name in ("test.json", "inference.json"):
            assert not identity_changes(storage.read_json(storage.join(export, name)), winner), name
        lora = storage.read_json(storage.join(layout.dataset_uri(cfg.out, row.dataset), "baselines", "lora.json"))
        assert lora[IDENTITY] == {"key": lora["key"], "lr": row.lr, "epochs": cfg.train.epochs, "seed": 0}
        trained = storage.read_json(storage.join(layout.train_uri(cfg.out, row.dataset), "supernet", "supernet",
                                                 "train_config.json"))
        assert (trained[IDENTITY]["epochs"], trained[IDENTITY]["lr"]) == (cfg.train.epochs, row.lr)
        run = storage.read_json(storage.join(layout.search_uri(cfg.out, row.dataset), "run.json"))
        assert run[IDENTITY]["config"] == cfg.search.result_identity() and run[IDENTITY]["dataset"] == row.dataset


def test_vtab_group_means(finished_run):
    _, frame = finished_run
    acc = dict(zip(frame["dataset"], frame["test_acc"]))
    assert group_means(frame) == {"natural": acc["svhn"], "specialized": acc["eurosat"]}  # no "average": 2 of 3
    means = {line.split()[1]: float(line.split()[-1]) for line in format_summary(frame).splitlines()
             if line.startswith("mean ")}
    assert means == {"natural": round(acc["svhn"] * 100, 2), "specialized": round(acc["eurosat"] * 100, 2)}


def test_baselines_are_trained_counted_and_compared(finished_run):
    cfg, frame = finished_run
    assert (frame["seed"] == 0).all()
    table = comparison_table(cfg)
    assert list(zip(table["dataset"], table["name"])) == [(d, n) for d in DATASETS for n in ("glora", "lora")]
    assert (table["seed"] == 0).all() and table["test_acc"].between(0, 1).all() and table["val_acc"].between(0, 1).all()
    winners = table[table["name"] == "glora"]
    assert list(winners["key"]) == list(frame["key"]) and list(winners["test_acc"]) == list(frame["test_acc"])
    supernet = spec_for(cfg, DATASETS[0]).build_empty()
    genes = baseline("lora").genes(supernet)
    for dataset, lr in zip(frame["dataset"], frame["lr"]):
        dataset_uri = layout.dataset_uri(cfg.out, dataset)
        record = storage.read_json(storage.join(dataset_uri, "baselines", "lora.json"))
        assert record["key"] == supernet.subnet_key(genes) and record["params"] == supernet.num_params(genes) > 0
        assert record["lr"] == lr and record["epochs"] == cfg.train.epochs and record["seed"] == 0
        history = storage.read_json(storage.join(record["checkpoint_dir"], "history.json"))
        assert len(history) == cfg.train.epochs
        row = table[(table["dataset"] == dataset) & (table["name"] == "lora")].iloc[0]
        assert (row["params"], row["test_acc"]) == (record["params"], record["test_acc"])
        plot = storage.read_bytes(storage.join(dataset_uri, "comparison.png"))
        assert plot.startswith(b"\x89PNG") and len(plot) > 5_000
    assert "lora" in format_comparison(table)


def test_lr_sweep_trains_one_run_per_lr_and_keeps_the_best(swept_run):
    cfg, frame = swept_run
    for dataset, chosen in zip(frame["dataset"], frame["lr"]):
        sweep = storage.read_json(storage.join(layout.export_uri(cfg.out, dataset), "lr_sweep.json"))
        assert [t["lr"] for t in sweep["trials"]] == [1e-5, 3e-3]
        scores = {t["lr"]: t["val_acc"] for t in sweep["trials"]}
        assert sweep["lr"] == max(scores, key=lambda lr: (scores[lr], -lr)) == chosen
        assert sweep["checkpoint_dir"] == next(t["checkpoint_dir"] for t in sweep["trials"] if t["lr"] == sweep["lr"])
        for lr in cfg.lr_sweep:
            history = json.loads((Path(cfg.out) / dataset / "train" / run_name_for(lr) / "supernet" / "history.json").read_text())
            assert len(history) == cfg.train.epochs and history[0]["lr"] <= lr
        assert storage.exists(storage.join(layout.train_uri(cfg.out, dataset), "lr_sweep"))  # Tune's own record


def test_merged_export_loads_in_plain_timm(swept_run):
    cfg, frame = swept_run
    dataset = DATASETS[0]
    export = layout.export_uri(cfg.out, dataset)
    script = f"""
import json, sys, timm, torch
from safetensors.torch import load_file
record = json.load(open({str(Path(export) / 'subnet.json')!r}))
model = timm.create_model(record["model"], **record["create_model_kwargs"])
model.load_state_dict(load_file({str(Path(export) / 'merged.safetensors')!r}), strict=True)
torch.manual_seed(0)
torch.save(model.eval()(torch.randn(4, 3, 16, 16)).detach(), sys.argv[1])
assert not any(name.startswith("glora_ray") for name in sys.modules)
"""
    plain_out = Path(export) / "plain_logits.pt"
    subprocess.run([sys.executable, "-c", script, str(plain_out)], check=True, timeout=120)
    # The same logits from the supernet with the winning subnet fixed (unmerged).
    from glora_ray.checkpoint import load_supernet

    checkpoint = storage.read_json(storage.join(export, "lr_sweep.json"))["checkpoint_dir"]
    supernet, spec = load_supernet(checkpoint)
    subnet = frame.iloc[0]["key"]
    supernet.set_subnet(subnet)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = supernet.eval()(x)
    torch.testing.assert_close(torch.load(plain_out), want, rtol=1e-4, atol=1e-5)
    assert read_spec(checkpoint).dataset == dataset
    # The exported adapters alone, loaded into a fresh supernet, give the same logits too.
    fresh = spec.build()
    fresh.load_adapters(Path(export) / "adapters.safetensors")
    fresh.set_subnet(subnet)
    untrained = spec.build()
    untrained.set_subnet(subnet)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), want, rtol=0, atol=0)
        assert (untrained.eval()(x) - want).abs().max() > 1e-3  # the adapters are what makes them equal


def test_output_of_another_run_is_refused(finished_run):
    cfg, _ = finished_run
    for option, value, message in [("--seed", "99", "train.seed: stored 0, now 99"),
                                   ("--m-prob", "0.3", "search.m_prob: stored 0.2, now 0.3"),
                                   ("--generations", "1", "search.generations: stored 2, now 1")]:
        with pytest.raises(PipelineConfigError, match=message):
            preflight(parse_config(run_args(cfg, option, value)))


def test_bad_input_found_inside_a_dataset_task_is_raised_as_itself(ray_local):
    # A dataset's stages run in a Ray task: the pipeline re-raises the package's own error (which
    # the entry point reports in one line, exit 2), not Ray's RayTaskError around it.
    @ray_local.remote
    def stage():
        raise PipelineConfigError("--max-params: bad value")

    with pytest.raises(PipelineConfigError) as caught:
        _outcome(stage.remote())
    assert type(caught.value) is PipelineConfigError and str(caught.value) == "--max-params: bad value"

    @ray_local.remote
    def bug():
        raise KeyError("a bug")

    with pytest.raises(RayTaskError):  # anything else keeps Ray's wrapper and its traceback
        _outcome(bug.remote())


def test_population_notebook_runs_headless(finished_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cfg, _ = finished_run
    notebook = nbformat.read(REPO / "notebooks" / "population_analysis.ipynb", as_version=4)
    figures = tmp_path / "figures"
    env = {"GLORA_RUN": cfg.out, "GLORA_DATASET": DATASETS[0], "GLORA_FIGURES": str(figures), "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    for name in ("accuracy_vs_params", "best_per_generation", "choices_per_layer", "params_by_layer_type"):
        image = figures / f"{name}.png"
        assert image.is_file() and image.stat().st_size > 5_000, name


def test_rerun_with_execution_changes_and_more_generations_continues_the_run(finished_run):
    # Last: it changes the run.  Checkpoint frequency, actors, CPUs, concurrency and
    # --test-pareto change how a run executes, not its results; a higher --generations extends the
    # search from where it stopped.  Nothing done before is recomputed, the baseline included.
    cfg, frame = finished_run
    before = {d: read_population(layout.search_uri(cfg.out, d)) for d in DATASETS}
    # The supernets, and the baseline's training and single test (its record).
    out = Path(storage.local_path(cfg.out))
    done_once = [out / d / "train" / "supernet" / "supernet" / "adapters.safetensors" for d in DATASETS]
    done_once += [out / d / "train" / baseline_run_name("lora", cfg.train.epochs) / "supernet" /
                  "adapters.safetensors" for d in DATASETS]
    done_once += [out / d / "baselines" / "lora.json" for d in DATASETS]
    stamps = [path.stat().st_mtime_ns for path in done_once]
    rerun = run_pipeline(parse_config(run_args(
        cfg, "--checkpoint-every", "1", "--actors", "2", "--actor-cpus", "0.5",
        "--max-concurrent-datasets", "1", "--test-pareto", "--generations", "3", "--baselines", "lora")))
    assert [path.stat().st_mtime_ns for path in done_once] == stamps  # neither trained nor tested again
    assert list(rerun["dataset"]) == list(DATASETS) and list(rerun["lr"]) == list(frame["lr"])
    assert (rerun["val_acc"].to_numpy() >= frame["val_acc"].to_numpy()).all()
    for dataset, row in zip(DATASETS, rerun.itertuples()):
        after = read_population(layout.search_uri(cfg.out, dataset))
        assert set(after["generation"]) == {0, 1, 2} and after["key"].is_unique
        first_two = after[after["generation"] < 2].reset_index(drop=True)
        pd.testing.assert_frame_equal(without_timing(first_two), without_timing(before[dataset]))
        # --test-pareto: every front member tested once; the winner's score is the summary's.
        front = storage.read_json(storage.join(layout.search_uri(cfg.out, dataset), "result.json"))["pareto_size"]
        tested = pd.read_parquet(storage.join(layout.export_uri(cfg.out, dataset), "pareto_test.parquet"))
        assert len(tested) == front and tested["key"].is_unique
        assert tested.set_index("key").loc[row.key, "test_acc"] == row.test_acc
    # The comparison now holds the tested front too, between the winner and the baseline.
    table = comparison_table(cfg)
    for dataset in DATASETS:
        names = list(table.loc[table["dataset"] == dataset, "name"])
        assert names[0] == "glora" and names[-1] == "lora" and len(names) == 2 + len(
            pd.read_parquet(storage.join(layout.export_uri(cfg.out, dataset), "pareto_test.parquet")))
    assert storage.read_json(storage.join(cfg.out, layout.CONFIG_FILE))["extent"] == {"search": {"generations": 3}}
    # The output moved elsewhere resumes there: every finished stage is found where it is now (a
    # baseline's record keeps no folder of its own), nothing is recomputed.
    moved = out.parent / f"{out.name}-moved"
    shutil.move(out, moved)
    again = run_pipeline(parse_config(tiny_args(cfg.data_root, moved, "--datasets", *DATASETS, "--generations", "3",
                                                "--baselines", "lora")))
    assert list(again["test_acc"]) == list(rerun["test_acc"])
    placement = storage.read_json(str(moved / DATASETS[0] / "placement.json"))
    assert set(placement["training"]) == {"supernet", "baseline lora"}
