"""Report bookkeeping on hand-made metrics.json files (the end-to-end table is in test_transfer.py)."""

from __future__ import annotations

import json

import pytest

from downstream.report import TABLE_COLUMNS, main, make_tables


def _run(tmp_path, name, *, method, table, model, compute, values, note=None, **protocol):
    """A metrics.json whose every column of ``table`` has ``values[i]`` (a fraction); ``protocol``: its "run" keys
    (data_root, train_iters, person_boxes), the same for every run unless given."""
    metrics = {key: v for (_, _, key), v in zip(TABLE_COLUMNS[table], values, strict=True) if v is not None}
    run = {"task": "x", "method": method, "table": table, **metrics, "backbone": {"model": model}}
    run["run"] = {"data_root": "/data/coco", "train_iters": 100, "person_boxes": "gt" if table == 9 else None}
    run["run"].update(protocol)
    if note is not None:
        run["note"] = note
    if compute is not None:
        run["backbone"]["compute_fraction_measured"] = compute
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(run))
    return d


def test_deltas_against_full_compute_row_and_best_marked(tmp_path, capsys):
    n = len(TABLE_COLUMNS[9])
    dap = _run(tmp_path, "dap", method="SimpleBaseline", table=9, model="resnet50", compute=0.74, values=[0.5] * n)
    full = _run(tmp_path, "full", method="SimpleBaseline", table=9, model="resnet50", compute=1.0, values=[0.4] * n)
    assert main([str(dap), str(full), "--format", "md"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| SimpleBaseline")]
    assert lines[0].startswith("| SimpleBaseline | ResNet-50 | 100% | 40.0 |")  # the baseline comes first
    assert lines[1].startswith("| SimpleBaseline | ResNet-50 | 74% | **50.0** (+10.0) |")
    assert "AP^kp_M" in out and "AR^kp_L" in out
    assert "Note" not in out  # the column appears only in a table with a noted run


def test_groups_by_method_and_backbone_and_skips_absent_metrics(tmp_path):
    n = len(TABLE_COLUMNS[8])
    box_only = [0.3] * 6 + [None] * 6  # Faster R-CNN has no mask AP
    runs = [
        _run(tmp_path, "a", method="FPN", table=8, model="resnet50", compute=1.0, values=box_only),
        _run(tmp_path, "b", method="Mask R-CNN", table=8, model="resnet50", compute=0.86, values=[0.2] * n),
        _run(
            tmp_path, "c", method="Mask R-CNN", table=8, model="resnet50", compute=1.0, values=[0.25] * (n - 1) + [-1]
        ),
    ]
    rows = make_tables([(str(d), json.loads((d / "metrics.json").read_text())) for d in runs])[8]
    assert [(r.method, r.compute_str) for r in rows] == [("FPN", "100%"), ("Mask R-CNN", "100%"), ("Mask R-CNN", "86%")]
    assert rows[0].values[6:] == [None] * 6 and not any(rows[0].best)  # alone in its group: nothing to mark
    assert rows[2].deltas[0] == pytest.approx(-5.0) and rows[2].deltas[-1] is None  # -1 = no such objects
    assert rows[1].best[:-1] == [True] * (n - 1) and rows[2].best[-1]


def test_csv_has_value_delta_and_best_columns(tmp_path, capsys):
    n = len(TABLE_COLUMNS[9])
    full = _run(tmp_path, "f", method="SimpleBaseline", table=9, model="resnet101", compute=1.0, values=[0.6] * n)
    dap = _run(tmp_path, "d", method="SimpleBaseline", table=9, model="resnet101", compute=0.75, values=[0.55] * n)
    assert main([str(full), str(dap), "--format", "csv"]) == 0
    header, first, second = capsys.readouterr().out.strip().splitlines()
    assert header.split(",")[:6] == ["table", "method", "backbone", "compute", "AP_kp", "AP_kp_delta"]
    assert header.endswith(",best,note,data_root,train_iters,person_boxes,test_options")
    assert first.split(",")[3:6] == ["100%", "60.0", ""] and first.endswith(
        ",AP_kp;AP50_kp;AP75_kp;APM_kp;APL_kp;AR_kp;AR50_kp;AR75_kp;ARM_kp;ARL_kp,,/data/coco,100,gt,stock"
    )
    assert second.split(",")[2:6] == ["ResNet-101", "75%", "55.0", "-5.0"]


def test_an_empty_evaluation_shows_its_zeros_and_note(tmp_path, capsys):
    note = "no detection above the score threshold (model.test_cfg.rcnn.score_thr=0.05) on the 79 test images"
    box = [0.0] * 6 + [None] * 6
    empty = _run(tmp_path, "e", method="FPN", table=8, model="resnet50", compute=0.75, values=box, note=note)
    full = _run(tmp_path, "f", method="FPN", table=8, model="resnet50", compute=1.0, values=[0.1] * 6 + [None] * 6)
    assert main([str(full), str(empty)]) == 0
    out = capsys.readouterr().out
    md = [line for line in out.splitlines() if line.startswith("|")]
    assert md[0].endswith("| AP^m_L | Note |")
    assert md[2] == "| FPN | ResNet-50 | 100% | " + " | ".join(["**10.0**"] * 6 + ["-"] * 6) + " |  |"
    assert md[3] == "| FPN | ResNet-50 | 75% | " + " | ".join(["0.0 (-10.0)"] * 6 + ["-"] * 6) + f" | {note} |"
    rows = [line for line in out.splitlines() if line.startswith("8,FPN")]
    assert rows[0].endswith(",AP_bb;AP50_bb;AP75_bb;APS_bb;APM_bb;APL_bb,,/data/coco,100,,stock")
    assert rows[1].startswith("8,FPN,ResNet-50,75%,0.0,-10.0,") and rows[1].endswith(f",,{note},/data/coco,100,,stock")


def test_runs_evaluated_differently_are_never_compared(tmp_path, capsys):
    """A 74% run evaluated on detected person boxes is not set against a 100% run on ground-truth boxes, nor a run
    fine-tuned for fewer iterations: each is its own group, an Evaluation column names what differs, and a group
    without a 100% run says why it has no deltas."""
    n = len(TABLE_COLUMNS[9])
    pose = dict(method="SimpleBaseline", table=9, model="resnet50")
    full = _run(tmp_path, "full", **pose, compute=1.0, values=[0.722] * n)
    det = _run(tmp_path, "det", **pose, compute=0.74, values=[0.704] * n, person_boxes="/data/coco/dets.json")
    short = _run(tmp_path, "short", **pose, compute=0.86, values=[0.01] * n, train_iters=2)
    dap = _run(tmp_path, "dap", **pose, compute=0.74, values=[0.72] * n)
    assert main([str(full), str(det), str(short), str(dap), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "ground-truth person boxes" not in out  # the boxes differ between rows: the title names none
    md = [line for line in out.splitlines() if line.startswith("| SimpleBaseline")]
    no_delta = "no deltas: no 100% run of this method, backbone and evaluation was given"
    assert md[0].startswith("| SimpleBaseline | ResNet-50 | 100% | iters 100, person boxes gt | **72.2** |")
    assert md[1].startswith("| SimpleBaseline | ResNet-50 | 74% | iters 100, person boxes gt | 72.0 (-0.2) |")
    assert md[2].startswith("| SimpleBaseline | ResNet-50 | 74% | iters 100, person boxes dets.json | 70.4 |")
    assert md[3].startswith("| SimpleBaseline | ResNet-50 | 86% | iters 2, person boxes gt | 1.0 |")
    assert md[2].endswith(f"| {no_delta} |") and md[3].endswith(f"| {no_delta} |") and "(" not in md[2]


def test_first_100_percent_run_given_is_the_baseline_and_repeats_are_one_row(tmp_path, capsys):
    n = len(TABLE_COLUMNS[9])
    pose = dict(method="SimpleBaseline", table=9, model="resnet50")
    first = _run(tmp_path, "first", **pose, compute=1.0, values=[0.722] * n)
    second = _run(tmp_path, "second", **pose, compute=0.9999, values=[0.73] * n)
    dap = _run(tmp_path, "dap", **pose, compute=0.74, values=[0.72] * n)
    args = [str(first), str(second), str(dap), str(dap), str(dap / "metrics.json"), "--format", "md"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "**Table 9: COCO val keypoints (AP^kp / AR^kp, percent), ground-truth person boxes**" in out
    md = [line for line in out.splitlines() if line.startswith("| SimpleBaseline")]
    assert len(md) == 3 and md[0].startswith("| SimpleBaseline | ResNet-50 | 100% | 72.2 |")
    assert md[1].startswith("| SimpleBaseline | ResNet-50 | 100% | **73.0** (+0.8) |")
    assert md[1].endswith(f"| a second 100% run; deltas are against the first given, {first} |")
    assert md[2].startswith("| SimpleBaseline | ResNet-50 | 74% | 72.0 (-0.2) |")


@pytest.mark.parametrize(
    "content",
    [
        None,
        "{broken",
        json.dumps({"coco/AP": 0.1}),
        json.dumps({"method": "SimpleBaseline", "table": 9, "coco/AP": 0.7, "backbone": "resnet50"}),
        json.dumps({"method": "SimpleBaseline", "table": 9, "coco/AP": "0.7", "backbone": {}}),
        "a folder",
        # edited by hand: shown as 5730.0, nan, or '-' beside the other columns (was no error)
        json.dumps({"method": "SimpleBaseline", "table": 9, "coco/AP": 57.3, "backbone": {}}),
        '{"method": "SimpleBaseline", "table": 9, "coco/AP": NaN, "backbone": {}}',
        json.dumps({"method": "SimpleBaseline", "table": 9, "coco/AP": 0.7, "coco/AR": "0.8", "backbone": {}}),
        json.dumps({"method": "SimpleBaseline", "table": 9, "coco/AP": -0.5, "backbone": {}}),
    ],
    ids="missing not-json no-method backbone-not-object no-number a-folder percent nan string-beside-numbers "
    "negative".split(),
)
def test_bad_work_dir_is_one_line_exit_2(tmp_path, capsys, content):
    if content == "a folder":  # was an IsADirectoryError traceback
        (tmp_path / "metrics.json").mkdir()
    elif content is not None:
        (tmp_path / "metrics.json").write_text(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("report: error:") and str(tmp_path) in err


def test_a_backbone_pre_trained_on_other_data_is_noted_beside_its_deltas(tmp_path, capsys):
    """Only the fine-tuning protocol grouped runs: a DaP backbone from a 3-class CIFAR subset got a delta against a
    100% backbone from 1,000 ImageNet classes with no word. The deltas stay (the data may be the same under another
    path), with a note naming both; backbones that agree, or whose meta.json does not say, get none."""
    n = len(TABLE_COLUMNS[9])
    kw = {"method": "SimpleBaseline", "table": 9, "model": "resnet18", "values": [0.4] * n}
    dirs = [_run(tmp_path, "full", compute=1.0, **kw), _run(tmp_path, "dap", compute=0.74, **kw),
            _run(tmp_path, "same", compute=0.8, **kw), _run(tmp_path, "unknown", compute=0.9, **kw)]  # fmt: skip
    pretrain = {"full": ("/data/imagenet", 1000), "dap": ("/tmp/c3", 3), "same": ("/data/imagenet", 1000)}
    for d in dirs:
        run = json.loads((d / "metrics.json").read_text())
        if d.name in pretrain:
            run["backbone"]["dataset"], run["backbone"]["num_classes"] = pretrain[d.name]
        (d / "metrics.json").write_text(json.dumps(run))
    rows = make_tables([(str(d), json.loads((d / "metrics.json").read_text())) for d in dirs])[9]
    notes = {r.work_dir.rsplit("/", 1)[-1]: r.note for r in rows}
    assert notes["dap"] == ("pre-trained on /tmp/c3 (3 classes), the 100% run on /data/imagenet (1000 classes): "
                            "the deltas mix pre-training data with compute")  # fmt: skip
    assert notes["full"] == notes["same"] == notes["unknown"] == ""
    assert all(r.deltas[0] == pytest.approx(0.0) for r in rows[1:])  # the deltas are still given


def test_runs_tested_with_other_options_are_never_compared(tmp_path, capsys):
    """Two runs tested on other subsets and score thresholds (their --cfg-options) shared a group and got +0.0
    deltas; such runs are now their own groups, and the Evaluation column names their test options. Options that
    change only training, or none, keep runs together."""
    n = len(TABLE_COLUMNS[8])
    det = dict(method="FPN", table=8, model="resnet18")
    fast = {"test_dataloader.dataset.indices": "10", "model.test_cfg.rcnn.score_thr": "0.0"}
    full = _run(tmp_path, "full", **det, compute=1.0, values=[0.3] * n, cfg_options=fast)
    other = _run(tmp_path, "other", **det, compute=0.83, values=[0.3] * n,
                 cfg_options={**fast, "test_dataloader.dataset.indices": "2"})  # fmt: skip
    same = _run(tmp_path, "same", **det, compute=0.74, values=[0.2] * n,
                cfg_options={**fast, "train_cfg.max_iters": "100"})  # fmt: skip
    rows = make_tables([(str(d), json.loads((d / "metrics.json").read_text())) for d in (full, other, same)])[8]
    by = {r.work_dir.rsplit("/", 1)[-1]: r for r in rows}
    assert by["same"].deltas[0] == pytest.approx(-10.0) and by["other"].deltas[0] is None
    assert "test model.test_cfg.rcnn.score_thr=0.0; test_dataloader.dataset.indices=2" in by["other"].evaluation
    assert "no deltas" in by["other"].note
