"""Class names in what `vimoe eval` and `vimoe analyze routing` report: where the names come from (the data's
manifest, else the run's classes.txt), per-class accuracy and confusions from a confusion matrix derived by hand,
and the classes each expert takes."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from vimoe_dist.analysis.classes import find_class_names, per_class_rows, worst_classes, write_per_class
from vimoe_dist.analysis.report import expert_classes
from vimoe_dist.config import load_config
from vimoe_dist.train.evaluate import evaluate
from vimoe_dist.train.rundir import write_run_classes

NAMES = ["tench", "goldfish", "great white shark"]


def test_names_come_from_the_data_else_from_the_runs_classes_txt(tmp_path):
    from vimoe_dist.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", num_classes=3, num_images=3, size=8, num_val=3, progress=False)
    cfg = load_config("digits", [f"data.train={tmp_path / 'data'}", "model.num_classes=3", "data.val=null"])
    assert find_class_names(cfg) == ["pattern0", "pattern1", "pattern2"]  # the manifest's

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    write_run_classes(run, NAMES)
    assert (run / "classes.txt").read_text() == "tench\ngoldfish\ngreat white shark\n"
    gone = load_config("digits", [f"data.train={tmp_path / 'moved'}", "model.num_classes=3"])
    assert find_class_names(gone, run / "checkpoints" / "step_00000002") == NAMES
    assert find_class_names(gone, run) == NAMES
    wrong_size = load_config("digits", [f"data.train={tmp_path / 'moved'}", "model.num_classes=4"])
    assert find_class_names(wrong_size, run) is None  # a wrong name is worse than a number
    assert write_run_classes(run, []) is None


def test_per_class_accuracy_and_confusions(tmp_path):
    # rows: true class, columns: top-1 prediction
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    rows = per_class_rows(confusion, NAMES)
    assert [(r["class"], r["images"], r["top1"], r["confused_with"], r["confused_images"]) for r in rows] == [
        ("tench", 4, 0.75, "goldfish", 1),
        ("great white shark", 4, 0.5, "tench", 2),  # goldfish had no image: no row
    ]
    assert [w["class"] for w in worst_classes(rows)] == ["great white shark", "tench"]
    assert per_class_rows(torch.eye(2), None)[1] == {
        "index": 1, "class": "1", "images": 1, "top1": 1.0, "confused_with": "", "confused_images": 0
    }  # fmt: skip
    path = write_per_class(tmp_path / "out" / "per_class.csv", rows)
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert read[1]["class"] == "great white shark" and read[1]["top1"] == "0.5000"


def test_evaluate_fills_the_confusion_matrix():
    class Fixed(torch.nn.Module):  # predicts class 1 for every image
        def forward(self, x):
            return torch.tensor([[0.0, 5.0, 1.0]]).expand(x.shape[0], 3)

    batches = [
        {"image": torch.zeros(3, 1), "label": torch.tensor([0, 1, 2])},
        {"image": torch.zeros(2, 1), "label": torch.tensor([1, 0]), "valid": torch.tensor([True, False])},
    ]
    confusion = torch.zeros(3, 3, dtype=torch.float64)
    result = evaluate(Fixed(), batches, torch.device("cpu"), confusion_CC=confusion)
    assert result["images"] == 4 and result["top1"] == 0.5
    assert confusion.tolist() == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]  # the padding sample is not counted


def test_the_classes_each_expert_takes():
    # class x expert image weights: tench all on expert 0, goldfish 3:1 on 0 and 1, the shark all on expert 1
    image = torch.tensor([[4.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    assert expert_classes(image, NAMES, n=2) == {"0": ["tench", "goldfish"], "1": ["great white shark", "goldfish"],
                                                  "2": []}  # fmt: skip
    assert expert_classes(image, None, n=1) == {"0": [0], "1": [2], "2": []}


def test_routing_json_names_the_classes(tmp_path):
    import json

    from vimoe_dist.analysis.accumulate import RoutingAccumulator
    from vimoe_dist.analysis.report import build_report, summary_lines, write_report

    acc = RoutingAccumulator(3, {1: 2})
    layer = acc.layers[1]
    layer.image_weight_CE += torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=layer.image_weight_CE.dtype)
    layer.token_weight_CE += layer.image_weight_CE
    report = build_report(acc, 0.5, 6, 2, class_names=NAMES)
    write_report(tmp_path, report, acc, NAMES)
    saved = json.loads((Path(tmp_path) / "routing.json").read_text())
    assert saved["classes_named"] and saved["expert_classes"]["1"]["0"][0] == "tench"
    assert any("tench" in line and "goldfish" in line for line in summary_lines(report))
