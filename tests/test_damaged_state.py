"""Issue 34: names that stay inside --out, damaged state, a full disk, limits, advice that works.

One finished tiny run (training in the job's process) is copied for each probe, damaged one way,
and run again with the same command: what can be rebuilt is rebuilt (the same results, a
warning), the rest is one ``error:`` line naming the file and what to do, exit 2.
"""
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from glora_ray import storage
from glora_ray.data import DataError, write_digits_dataset
from glora_ray.errors import NoSpaceError
from glora_ray.pipeline import layout
from glora_ray.pipeline.lock import LOCK_FILE
from glora_ray.runtime import RayUnreachableError, check_reachable
from glora_ray.search import read_population
from glora_ray.search.results import read_pareto
from glora_ray.train import train_supernet
from helpers import REPO, injected_faults, load_entry_point, logged, make_spec, quick, tiny_args


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def entry():
    return load_entry_point()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local, entry):
    """A finished tiny run: (data root, output folder)."""
    root = tmp_path_factory.mktemp("damaged")
    out = root / "out"
    assert entry.main(tiny_args(root / "data", out)) == 0
    return root / "data", out


@pytest.fixture
def copy(finished, tmp_path):
    """A copy of the finished run to damage; its argv."""
    data, out = finished
    target = tmp_path / "out"
    shutil.copytree(out, target)
    return target, tiny_args(data, target)


def results(out: Path) -> tuple:
    """What a run's results are: the summary's row and the winner's test record."""
    summary = storage.read_bytes(str(out / layout.SUMMARY_FILE))
    import io

    import pandas as pd

    row = pd.read_parquet(io.BytesIO(summary)).drop(columns="wall_seconds").iloc[0].to_dict()
    return row, json.loads((out / "digits" / "export" / "test.json").read_text())


# -- rebuilt: the same results, one warning ---------------------------------------------------------
@pytest.mark.parametrize("damage", ["supernet adapters", "result.json", "test.json", "wall_time.json"])
def test_damaged_files_that_can_be_rebuilt_are_rebuilt(copy, finished, entry, capsys, damage):
    out, argv = copy
    path = {"supernet adapters": out / "digits" / "train" / "supernet" / "supernet" / "adapters.safetensors",
            "result.json": out / "digits" / "search" / "result.json",
            "test.json": out / "digits" / "export" / "test.json",
            "wall_time.json": out / "digits" / "wall_time.json"}[damage]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert entry.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "damaged" in printed or "cannot be read" in printed, printed  # said, not silent
    assert results(out) == results(finished[1])
    if damage == "result.json":
        assert json.loads(path.read_text()) == json.loads((finished[1] / "digits" / "search" / "result.json").read_text())
    if damage == "wall_time.json":
        assert len(json.loads(path.read_text())["runs"]) == 1  # the record starts again with this run


# -- refused: one line naming the file and what to do ----------------------------------------------
@pytest.mark.parametrize("content, message", [(b'{"config": {', "config.json is damaged (JSONDecodeError"),
                                              (b"[]", "config.json is damaged (a JSON list, not a dict)"),
                                              (b"\xff\xfe garbage", "config.json is damaged (")])
def test_a_damaged_run_record_is_one_line(copy, entry, capsys, content, message):
    out, argv = copy
    (out / "config.json").write_bytes(content)
    assert entry.main(argv) == 2
    line = error_line(capsys)
    assert message in line and "restore the file, or choose another --out" in line, line


def test_an_edited_run_record_is_refused(copy, entry, capsys):
    out, argv = copy
    record = json.loads((out / "config.json").read_text())
    record["identity"]["train"]["epochs"] = 30  # hand-edited: no longer what its settings give
    (out / "config.json").write_text(json.dumps(record))
    assert entry.main(argv) == 2
    assert "config.json was edited: its identity has train.epochs=30, its settings give 3" in error_line(capsys)


def test_a_damaged_generation_file_names_every_file_to_remove_and_that_advice_works(copy, finished, entry, capsys):
    out, argv = copy
    population = out / "digits" / "search" / "population"
    (population / "gen=0000.parquet").write_bytes(b"PAR1 cut")
    assert entry.main(argv) == 2
    line = error_line(capsys)
    assert "remove gen=0000.parquet and every later one (gen=0001.parquet)" in line, line
    for name in ("gen=0000.parquet", "gen=0001.parquet"):
        (population / name).unlink()
    assert entry.main(argv) == 0  # as advised: the search recomputes both, to the same result
    assert results(out)[0] == results(finished[1])[0]


def test_a_lock_file_of_garbage_is_stale_and_a_folder_in_its_place_is_named(copy, entry, capsys):
    out, argv = copy
    lock = out / LOCK_FILE
    lock.write_bytes(b"\xff\x00\xfe garbage")
    os.utime(lock, (1, 1))  # old: its driver is long gone
    assert entry.main(argv) == 0
    lock.mkdir()
    assert entry.main(argv) == 2
    assert f"{lock} is a folder where the lock file of --out must be; remove it" in error_line(capsys)


# -- readers take the writer's files only; a search stopped midway is readable ---------------------
def test_readers_count_only_the_generation_files_and_read_a_search_without_its_front(copy):
    out, _ = copy
    search = out / "digits" / "search"
    before = read_population(search)
    shutil.copy(search / "population" / "gen=0001.parquet", search / "population" / "gen=0001 (copy).parquet")
    (search / "pareto.parquet").unlink()  # stopped before the front was written
    after = read_population(search)
    assert len(after) == len(before) == 16
    front = read_pareto(search)
    assert len(front) >= 1 and front["params"].is_monotonic_increasing and set(front["key"]) <= set(after["key"])
    # An older store (format 4 kept the settings at the top of run.json) reads the same front.
    manifest = json.loads((search / "run.json").read_text())
    (search / "run.json").write_text(json.dumps({**manifest.pop("identity"), **manifest}))
    pd.testing.assert_frame_equal(read_pareto(search), front)


# -- a full disk: one line, nothing half-written, the same command resumes -------------------------
def test_a_full_disk_is_one_line_counts_the_failed_time_and_the_rerun_resumes(finished, tmp_path, entry, capsys):
    data, reference = finished
    out = tmp_path / "out"
    argv = tiny_args(data, out)
    with injected_faults(write={"match": "population/gen=0001"}):
        assert entry.main(argv) == 2
    line = error_line(capsys)
    assert "no space left on the device writing" in line and "gen=0001.parquet" in line and "resumes" in line, line
    assert not list((out / "digits" / "search" / "population").glob(".*tmp*"))  # no half-written file
    failed = json.loads((out / "digits" / "wall_time.json").read_text())["runs"]
    assert len(failed) == 1 and failed[0] > 0  # the failed invocation's time is counted
    assert entry.main(argv) == 0
    assert "resuming: 1 complete generations" in capsys.readouterr().out
    assert results(out) == results(reference)
    assert len(json.loads((out / "digits" / "wall_time.json").read_text())["runs"]) == 2


def test_a_full_disk_while_training_checkpoints_is_one_line_and_leaves_no_partial_checkpoint(data, tmp_path):
    runs = str(tmp_path / "runs")
    with injected_faults(write={"match": "checkpoint_epoch_000002/state.pt"}):
        with pytest.raises(NoSpaceError, match="no space left on the device writing .*checkpoint_epoch_000002"):
            train_supernet(make_spec(), data, quick(epochs=3), runs, "full")
    kept = sorted(p.name for p in (tmp_path / "runs" / "full" / "local_checkpoints").iterdir())
    assert kept == ["checkpoint_epoch_000001"]  # the one being written is gone, the earlier one whole
    resumed = train_supernet(make_spec(), data, quick(epochs=3), runs, "full")
    assert resumed.resumed_from_step == 12 and [h["epoch"] for h in resumed.history] == [0, 1, 2]


# -- a damaged newest checkpoint: the newest intact one is resumed ----------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from glora_ray.data import DataConfig

    root = tmp_path_factory.mktemp("ckpt-data")
    write_digits_dataset(root)
    return DataConfig(str(root), "digits", 16)


def test_a_damaged_newest_local_checkpoint_falls_back_to_the_intact_one(data, tmp_path):
    runs = str(tmp_path / "runs")
    reference = train_supernet(make_spec(), data, quick(epochs=3), str(tmp_path / "reference"), "r")
    train_supernet(make_spec(), data, quick(epochs=2), runs, "d")
    newest = tmp_path / "runs" / "d" / "local_checkpoints" / "checkpoint_epoch_000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a kill mid-write
    with logged() as records:
        resumed = train_supernet(make_spec(), data, quick(epochs=3), runs, "d")
    assert any("checkpoint_epoch_000002 cannot be resumed from" in r.getMessage() for r in records)
    assert resumed.resumed_from_step == 12  # from epoch 1's checkpoint: epochs 2 and 3 trained again
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]


# -- names, lists and images that would escape or explode --------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/b", ".."])
def test_a_dataset_name_that_is_not_plain_is_refused_before_anything_is_written(tmp_path, entry, capsys, name):
    out = tmp_path / "run" / "out"
    with pytest.raises(SystemExit) as stop:  # refused while the options are read: the usage's exit
        entry.main(tiny_args(tmp_path / "data", out, "--datasets", name))
    assert stop.value.code == 2 and f"--datasets {name!r} is not a plain name" in error_line(capsys)
    assert not any((tmp_path / "run").rglob("*.json")) and not (tmp_path / "evil").exists()


def test_list_lines_leaving_the_dataset_and_oversized_images_are_refused(tmp_path, entry, capsys):
    root = tmp_path / "data"
    write_digits_dataset(root / "staging")
    shutil.copytree(root / "staging" / "digits", root / "mine")
    shutil.rmtree(root / "staging")
    val = root / "mine" / "val200.txt"
    clean = val.read_text()
    argv = tiny_args(root, tmp_path / "out", "--datasets", "mine")
    for bad in ("../digits/images/0/0000.png", "/etc/hostname"):
        val.write_text(f"{bad} 0\n" + clean)
        assert entry.main(argv) == 2
        assert f"val200.txt:1: image path {bad!r} leaves" in capsys.readouterr().err  # the list's bad lines below it
    Image.new("L", (10000, 10000)).save(root / "mine" / "images" / "huge.png")  # about 100 KB on disk
    val.write_text("images/huge.png 0\n" + clean)
    assert entry.main(argv) == 2
    assert "10000x10000 = 100,000,000 pixels, above the budget" in error_line(capsys)


def test_a_one_class_target_set_is_refused(tmp_path):
    from glora_ray.pipeline.domain import domain_units, parse_domain_config

    cfg = parse_domain_config(["--preset", "tiny", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "d")])
    from glora_ray.data.embedded import write_digits_domain

    write_digits_domain(cfg.data_root)
    listing = Path(cfg.data_root) / "domain-generalization" / "imagenet-adversarial" / "annotations" / "val_meta.list"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(line for line in lines if line.endswith(" 1")) + "\n")
    with pytest.raises(DataError, match="imagenet-adversarial.*holds images of class \\[1\\] only"):
        domain_units(cfg)


# -- a cluster that cannot be reached; an address-space limit ----------------------------------------
def test_an_unreachable_ray_address_is_refused_at_once():
    with pytest.raises(RayUnreachableError, match="RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1", timeout_s=5)
    check_reachable("auto")  # no port: Ray's own resolution


@pytest.mark.slow
def test_the_cli_names_an_unreachable_cluster_and_an_address_space_limit(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "GLORA_RAY_HOME": str(tmp_path / "home")}
    argv = [sys.executable, str(REPO / "pipelines" / "vtab.py"), *tiny_args(tmp_path / "data", tmp_path / "out")]
    unreachable = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert unreachable.returncode == 2, unreachable.stderr[-2000:]
    assert "RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers" in unreachable.stderr.splitlines()[-1]
    env.pop("RAY_ADDRESS")
    limit = 1500 * 2**20  # below what torch's libraries map

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    capped = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert capped.returncode == 2
    assert capped.stderr.startswith("error: cannot load torch or Ray") and "ulimit -v) of 1,500 MiB" in capped.stderr


def test_options_the_chosen_mode_would_ignore_are_refused(tmp_path, entry, capsys):
    for option, value, message in (("--train-cpus", "100", "--train-cpus 100: training runs in the job's own process"),
                                   ("--train-gpus", "1", "--train-gpus 1 needs a training worker")):
        with pytest.raises(SystemExit) as stop:
            entry.main(tiny_args(tmp_path / "d", tmp_path / "o", option, value))
        assert stop.value.code == 2 and message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_full_disk_anywhere_is_recognised_through_wrappers():
    cause = OSError(errno.ENOSPC, "No space left on device", "/data/out/config.json")
    try:
        try:
            raise cause
        except OSError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as wrapped:
        found = NoSpaceError.found_in(wrapped)
    assert found is not None and "writing /data/out/config.json" in str(found)
    assert NoSpaceError.found_in(ValueError("not a disk")) is None


def test_torch_is_not_loaded_by_importing_the_package():
    code = "import sys, glora_ray, glora_ray.limits; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

