"""Bad input refused before compute: one line, exit 2, nothing written; preflight never trains."""
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glora_ray.data import DataError
from glora_ray.data.digits import write_digits_dataset
from glora_ray.data.verify import ImageRef, check_images, split_images, verify_images
from glora_ray.pipeline import layout, preflight as preflight_module, run as run_module
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.config import PipelineConfigError
from glora_ray.pipeline.preflight import budget_warning, check_cluster, preflight, resource_shortfalls
from helpers import logged
from helpers import TINY_MODEL, load_entry_point, tiny_args


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight-data")
    write_digits_dataset(root)
    return root


@pytest.fixture(scope="module")
def entry():
    return load_entry_point()


def refuses(entry, argv, capsys, *fragments):
    """main() exits 2 with a one-line message holding every fragment, and leaves no config.json."""
    assert entry.main(argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("error: "):].rstrip("\n")  # log lines (progress, warnings) come before it
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    out = Path(argv[argv.index("--out") + 1])
    assert not (out / layout.CONFIG_FILE).exists()
    return message


# -- 1. every image opened ----------------------------------------------------------------------
def _images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    pixels = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    paths = {name: folder / name for name in ("ok.png", "ok.jpg", "cut.png", "cut.jpg", "text.png")}
    Image.fromarray(pixels).save(paths["ok.png"])
    Image.fromarray(pixels).save(paths["ok.jpg"], quality=90)
    for name in ("png", "jpg"):
        whole = paths[f"ok.{name}"].read_bytes()
        paths[f"cut.{name}"].write_bytes(whole[: len(whole) * 3 // 4])
    paths["text.png"].write_text("not an image")
    return paths


def test_verify_finds_undecodable_and_truncated_images_with_list_and_line(tmp_path):
    paths = _images(tmp_path)
    listing = tmp_path / "train800.txt"
    refs = [(paths[n], listing, i) for i, n in enumerate(["ok.png", "ok.jpg", "cut.png", "cut.jpg", "text.png"], 1)]
    refs.append((paths["cut.png"], tmp_path / "test.txt", 9))  # named twice: checked once, first naming kept
    calls = []
    problems = verify_images(refs, threads=3, progress=lambda done, total: calls.append((done, total)))
    assert [(p.ref.path.name, p.ref.line) for p in problems] == [("cut.png", 3), ("cut.jpg", 4), ("text.png", 5)]
    assert "truncated" in problems[1].problem.lower() and "UnidentifiedImageError" in problems[2].problem
    assert calls[-1] == (5, 5)
    with pytest.raises(DataError, match=r"3 image\(s\) cannot be read: .*train800.txt:3: .*cut.png") as err:
        check_images(refs)
    assert "\n" not in str(err.value)
    assert check_images([ImageRef(paths["ok.png"], listing, 1)]) == 1


def test_a_bad_test_image_is_refused_before_ray_naming_list_and_line(digits_root, tmp_path, entry, capsys,
                                                                     monkeypatch):
    def no_ray():
        raise AssertionError("Ray started before the images were checked")

    monkeypatch.setattr(run_module, "init_ray", no_ray)
    refs = split_images(digits_root, "digits", ("test",))
    victim = refs[-1].path
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a truncated PNG, found only by its CRCs
    try:
        refuses(entry, tiny_args(digits_root, tmp_path / "out"), capsys,
                f"test.txt:{refs[-1].line}", victim.name, "cannot be read")
    finally:
        victim.write_bytes(original)
    assert not (tmp_path / "out").exists()


# -- 2. --out -----------------------------------------------------------------------------------
def test_out_that_cannot_hold_a_run_is_refused(digits_root, tmp_path, entry, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    refuses(entry, tiny_args(digits_root, a_file), capsys, "is a file")
    assert a_file.read_text() == "x"

    def refused(out, message):
        with pytest.raises(PipelineConfigError, match=message):
            preflight(parse_config(tiny_args(digits_root, out)))

    refused(a_file / "run", "is a file, so no folder")
    refused("nosuch-scheme://bucket/run", "filesystem is not available")
    if Path("/proc/self").is_dir():  # a place where nothing can be created, even by root
        refused("/proc/glora-ray-run", "cannot create anything in /proc")


# -- 3. --model-kwargs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragments", [
    ({"depth": "two"}, ["does not build", "TypeError"]),
    ({"no_such_kwarg": 1}, ["does not build", "no_such_kwarg"]),
    ({"img_size": 64}, ["img_size=64", "--img-size", "(here 16)"]),
    ({"num_classes": 3}, ["num_classes=3"]),
])
def test_model_kwargs_the_model_rejects_are_refused(kwargs, fragments, digits_root, tmp_path, entry, capsys):
    argv = tiny_args(digits_root, tmp_path / "out")
    argv[argv.index("--model-kwargs") + 1] = json.dumps({**json.loads(TINY_MODEL), **kwargs})
    refuses(entry, argv, capsys, "--model-kwargs", *fragments)


def test_an_image_size_given_twice_alike_is_accepted(digits_root, tmp_path):
    cfg = parse_config(tiny_args(digits_root, tmp_path / "out"))
    same = replace(cfg, backbone=replace(cfg.backbone, model_kwargs={**cfg.backbone.model_kwargs, "img_size": 16}))
    assert preflight(same)["digits"][1] == 6000


# -- 4. resources and batch size ---------------------------------------------------------------------
def test_batch_larger_than_the_training_split_is_refused(digits_root, tmp_path):
    with pytest.raises(PipelineConfigError, match="--batch-size 1000 .* train800 .*800 images.* at most 800"):
        preflight(parse_config(tiny_args(digits_root, tmp_path / "out", "--batch-size", "1000")))
    with pytest.raises(PipelineConfigError, match="at most 800"):  # 2 workers: 400 images each
        preflight(parse_config(tiny_args(digits_root, tmp_path / "out", "--batch-size", "802", "--train-workers", "2")))


def test_resource_shortfalls_name_what_was_asked_and_what_the_cluster_has(tmp_path):
    def short(*extra, cluster=None):
        cfg = parse_config(tiny_args(tmp_path, tmp_path / "out", *extra))
        return "; ".join(resource_shortfalls(cfg, cluster or {"CPU": 2.0}))

    assert short() == ""
    assert "stage 1 asks 4 worker(s) x 1 CPU = 4 CPU" in short("--train-workers", "4")
    assert "stage 1 asks 1 worker(s) x 1 GPU" in short("--train-workers", "1", "--train-gpus", "1")
    message = short("--actor-cpus", "100", "--actor-gpus", "0.5")
    assert "each evaluator actor asks 100 CPU" in message and "0.5 GPU" in message
    assert message.endswith("the Ray cluster has 2 CPU and 0 GPU in total")
    assert short("--train-workers", "1", "--train-gpus", "1", "--actor-gpus", "0.5", cluster={"CPU": 4.0, "GPU": 1.0}) == ""


def test_check_cluster_refuses_or_waits_for_an_autoscaling_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module, "_WAIT_POLL_S", 0.01)
    cfg = parse_config(tiny_args(tmp_path, tmp_path / "out", "--train-workers", "2", "--train-cpus", "2"))
    requests = []
    with pytest.raises(PipelineConfigError, match="4 CPU .* has 2 CPU .*--wait-for-resources SECONDS"):
        check_cluster(cfg, lambda: {"CPU": 2.0}, request=requests.append)
    assert requests == []  # no waiting asked for: no demand sent

    sizes = iter([2.0, 2.0, 8.0])  # the autoscaler adds a node on the third look
    check_cluster(cfg, lambda: {"CPU": next(sizes)}, wait_s=60, request=requests.append)
    assert requests == [[{"CPU": 2}, {"CPU": 2}, {"CPU": 1.0}], []]  # demand sent, then withdrawn

    with pytest.raises(PipelineConfigError, match="after waiting 0.05 s"):
        check_cluster(cfg, lambda: {"CPU": 2.0}, wait_s=0.05, request=requests.append)
    assert parse_config(["--wait-for-resources", "30"]).wait_for_resources_s == 30


def test_cluster_too_small_exits_2_before_config_json(digits_root, tmp_path, entry, capsys, ray_local):
    refuses(entry, tiny_args(digits_root, tmp_path / "out", "--train-workers", "1", "--train-cpus", "100"), capsys,
            "stage 1 asks 1 worker(s) x 100 CPU", "the Ray cluster has 2 CPU")
    refuses(entry, tiny_args(digits_root, tmp_path / "out", "--actor-cpus", "100"), capsys,
            "each evaluator actor asks 100 CPU")


# -- 5. budgets and checkpoints -----------------------------------------------------------------------
def test_a_budget_below_every_real_choice_is_warned_about(digits_root, tmp_path):
    cfg = parse_config(tiny_args(digits_root, tmp_path / "out", "--max-params", "5"))
    with logged("glora_ray") as records:
        assert preflight(cfg)["digits"] == (0, 5)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warned == ["digits: max_params=5 is below the smallest non-empty vector or LoRA choice of any layer "
                      "(vector on C of blocks.0.attn.qkv, 32 parameters): the search can only combine scalars"]

    from glora_ray.pipeline.unit import spec_for

    supernet = spec_for(cfg, "digits").build_empty()
    assert "holds no non-empty choice in any layer (the smallest, scalar on A of blocks.0.attn.qkv, costs 1)" in \
        budget_warning(supernet.counter, supernet.layer_names, 0)
    assert budget_warning(supernet.counter, supernet.layer_names, 6000) is None


def test_a_corrupt_checkpoint_is_refused_in_one_line_without_torch_advice(digits_root, tmp_path, entry, capsys):
    broken = tmp_path / "weights.pth"
    broken.write_bytes(b"not a checkpoint")  # torch: "Weights only load failed ... weights_only=False"
    err = refuses(entry, tiny_args(digits_root, tmp_path / "out", "--checkpoint", str(broken)), capsys,
                  "cannot read checkpoint", str(broken))
    assert "weights_only" not in err


# -- training, search and test lists share no image ---------------------------------------------
def test_lists_that_share_an_image_are_refused_naming_both_lists_and_the_image(tmp_path, entry, capsys):
    import shutil

    root = tmp_path / "data"
    write_digits_dataset(root / "staging")
    folder = root / "overlap"
    shutil.copytree(root / "staging" / "digits", folder)
    shutil.rmtree(root / "staging")
    train, val, test = (folder / f"{name}.txt" for name in ("train800", "val200", "test"))
    clean = {path: path.read_text() for path in (train, val, test)}
    argv = tiny_args(root, tmp_path / "out", "--datasets", "overlap")

    # A training list that contains the search list (train800val200 as the training list, say).
    train.write_text(clean[train] + clean[val])
    first = clean[val].splitlines()[0].rpartition(" ")[0]
    refuses(entry, argv, capsys, f"the training list {train} and the search list {val} share 200 image(s), "
                                 f"first {folder / first} (line 801 of the training list)")
    # A copy of a test image under another name in the search list: the same bytes, which a
    # benchmark may hold itself (dSprites), so a warning naming both files, and the run goes on.
    train.write_text(clean[train])
    lines = clean[val].splitlines()
    image, label = clean[test].splitlines()[5].rsplit(" ", 1)
    shutil.copy(folder / image, folder / "images" / "copy.png")
    lines[3] = f"images/copy.png {label}"
    val.write_text("\n".join(lines) + "\n")
    with logged("glora_ray.data") as records:
        preflight(parse_config(argv))
    messages = [r.getMessage() for r in records]
    assert any(f"the search list {val} and the test list {test} hold 1 image(s)" in m
               and f"first {folder / 'images' / 'copy.png'} (line 4) has the bytes of {folder / image}" in m
               for m in messages), messages
    val.write_text(clean[val])
    with logged("glora_ray.data") as records:
        preflight(parse_config(argv))  # disjoint again: accepted, nothing to warn of
    assert not [r for r in records if "bytes" in r.getMessage()]
