"""Report bookkeeping on hand-made metrics.json files (the end-to-end table is in test_transfer.py)."""

from __future__ import annotations

import json

import pytest

from downstream.report import TABLE_COLUMNS, main, make_tables


def _run(tmp_path, name, *, method, table, model, compute, values, note=None):
    """A metrics.json whose every column of ``table`` has ``values[i]`` (a fraction)."""
    metrics = {key: v for (_, _, key), v in zip(TABLE_COLUMNS[table], values, strict=True) if v is not None}
    run = {"task": "x", "method": method, "table": table, **metrics, "backbone": {"model": model}}
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
    assert header.endswith(",best,note")
    assert first.split(",")[3:6] == ["100%", "60.0", ""] and first.endswith(
        ",AP_kp;AP50_kp;AP75_kp;APM_kp;APL_kp;AR_kp;AR50_kp;AR75_kp;ARM_kp;ARL_kp,"
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
    assert rows[0].endswith(",AP_bb;AP50_bb;AP75_bb;APS_bb;APM_bb;APL_bb,")
    assert rows[1].startswith("8,FPN,ResNet-50,75%,0.0,-10.0,") and rows[1].endswith(f",,{note}")


@pytest.mark.parametrize("content", [None, "{broken", json.dumps({"coco/AP": 0.1})])
def test_bad_work_dir_is_one_line_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("report: error:") and str(tmp_path) in err
