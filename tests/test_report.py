"""The paper's tables and figures from finished runs, and the exports other tools load (issue 35).

Two tiny VTAB-1k runs at two budgets (ranks 4 2 restricted to LoRA forms, with a PEFT export;
ranks 2, the full space) over two VTAB-named datasets: Table 1 and Figures 3 and 4 from both,
the PEFT adapter loaded by PEFT itself, the inference record of each winner.
"""
import json
import shutil

import pandas as pd
import pytest
import torch

from glora_ray.backbone import create_backbone
from glora_ray.data import write_digits_dataset
from glora_ray.pipeline.inference import describe as describe_inference
from glora_ray.pipeline.winner_loader import load_winner
from glora_ray.pipeline.report import FIGURE3_FILE, FIGURE4_FILE, TABLE1_FILE, TABLE1_MARKDOWN, ReportError, write_report
from helpers import load_entry_point, tiny_args

DATASETS = ("svhn", "eurosat")  # natural and specialized: two VTAB groups
LORA_ONLY = ("--forms-A", "none", "--forms-B", "lora", "none", "--forms-C", "none", "--forms-D", "none",
             "--forms-E", "none")


@pytest.fixture(scope="module")
def budgets(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("report")
    staging = write_digits_dataset(root / "staging")
    for name in DATASETS:
        shutil.copytree(staging, root / "data" / name)
    entry = load_entry_point()
    runs = {"r42": (*LORA_ONLY, "--ranks", "4", "2"), "r2": ("--ranks", "2")}
    outputs = {}
    for name, options in runs.items():
        out = root / name
        assert entry.main(tiny_args(root / "data", out, "--datasets", *DATASETS, "--export", "peft", *options)) == 0
        outputs[name] = out
    return root, outputs


def test_table1_and_the_figures_from_two_budgets(budgets, tmp_path):
    _, outputs = budgets
    written = write_report([str(outputs["r42"]), str(outputs["r2"])], str(tmp_path / "report"))
    assert written == [TABLE1_FILE, TABLE1_MARKDOWN, FIGURE3_FILE, FIGURE4_FILE]
    table = pd.read_parquet(tmp_path / "report" / TABLE1_FILE)
    assert list(zip(table["ranks"], table["dataset"])) == [("4 2", "svhn"), ("4 2", "eurosat"), ("2", "svhn"),
                                                          ("2", "eurosat")]
    assert list(table["paper_test_acc"]) == pytest.approx([0.912, 0.967, 0.905, 0.967])  # the paper's Table 1
    for name, out in outputs.items():
        summary = pd.read_parquet(out / "summary.parquet")
        mine = table[table["run"] == str(out)]
        assert list(mine["test_acc"]) == list(summary["test_acc"]) and list(mine["params"]) == list(summary["params"])
    text = (tmp_path / "report" / TABLE1_MARKDOWN).read_text()
    assert "| mean natural |" in text and "| mean specialized |" in text and "mean average" not in text
    for figure in (FIGURE3_FILE, FIGURE4_FILE):
        data = (tmp_path / "report" / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000
    # The same run twice would be two columns of one label: refused before anything is written.
    with pytest.raises(ReportError, match=r"more than one VTAB-1k run of this budget and rank set \(GLoRA "):
        write_report([str(outputs["r2"]), str(outputs["r2"])], str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_a_lora_winner_exports_to_peft_and_peft_loads_it_as_the_merged_model(budgets):
    from peft import PeftModel

    _, outputs = budgets
    export = outputs["r42"] / "svhn" / "export"
    record = json.loads((export / "subnet.json").read_text())
    config = json.loads((export / "peft" / "adapter_config.json").read_text())
    ranks = {name: int(choice["B"][len("lora"):]) for name, choice in record["layers"].items() if choice["B"] != "none"}
    assert {key.replace("\\", ""): r for key, r in config["rank_pattern"].items()} == ranks and ranks
    merged, transform = load_winner(export)
    from glora_ray.checkpoint import read_spec

    spec = read_spec(outputs["r42"] / "svhn" / "train" / "supernet" / "supernet")
    base = create_backbone(spec.backbone, spec.num_classes)  # the frozen backbone a PEFT user starts from
    peft_model = PeftModel.from_pretrained(base, str(export / "peft")).eval()
    x = torch.randn(3, 3, spec.backbone.img_size, spec.backbone.img_size)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), merged(x), rtol=1e-4, atol=1e-5)
    # The full space's winner is no LoRA: no PEFT export, the merged one stands.
    assert not (outputs["r2"] / "svhn" / "export" / "peft").exists()


def test_each_winner_costs_what_its_backbone_costs(budgets):
    _, outputs = budgets
    for dataset in DATASETS:
        record = json.loads((outputs["r2"] / dataset / "export" / "inference.json").read_text())
        assert record["flops_equal"] and record["flops_per_image"]["merged"] > 0
        assert set(record["batches"]) == {"1", "4", "16"}
        assert all(v["merged_images_per_s"] > 0 and v["backbone_images_per_s"] > 0 for v in record["batches"].values())
        # The line the pipeline prints from the record read back names the batches in order.
        assert describe_inference(record).startswith("merged winner / plain backbone, images/s by batch 1: ")
        assert describe_inference(record).index(" 4: ") < describe_inference(record).index(" 16: ")


def test_swin_builds_with_every_linear_layer_adapted():
    from glora_ray import SearchSpace, Supernet
    from glora_ray.backbone import BackboneConfig, empty_backbone

    # The paper's Table 5 backbone: every nn.Linear but the head, the patch-merging reductions included.
    model = empty_backbone(BackboneConfig("swin_base_patch4_window7_224", pretrained=False, img_size=224), 100)
    net = Supernet(model, SearchSpace((8, 4)))
    assert net.num_layers == 99 and sum(".downsample.reduction" in n for n in net.layer_names) == 3
    assert net.head_name == "head.fc" and net.counter.max_params > 0
