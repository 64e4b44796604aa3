"""Print the paper's Table 8 (detection/segmentation) and Table 9 (keypoints) from transfer work dirs.

    python -m downstream.report WORK_DIR [WORK_DIR ...] [--format md|csv|both]

Each WORK_DIR holds the ``metrics.json`` of one ``tools/transfer_coco.sh`` run. Rows are grouped by
(method, backbone); within a group the 100% pre-train-compute row is the baseline every other row's
delta is taken against, and the best value of each column is marked (Markdown bold, CSV ``best``
column). Values are percent (the evaluator's fractions x 100); ``-`` where a run has no such metric
or COCO had no instance of that size. A run whose ``metrics.json`` carries a ``note`` (an evaluation
that scored nothing, recorded as 0.0) shows it in a last ``Note`` column (Markdown, only in tables
that have one) and in the CSV's ``note`` column.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

from dap_pretrain.errors import entry_point
from downstream import TransferInputError

# (CSV label, Markdown header, metrics.json key) in the paper's column order.
TABLE_COLUMNS = {
    8: [
        ("AP_bb", "AP^bb", "coco/bbox_mAP"),
        ("AP50_bb", "AP^bb_50", "coco/bbox_mAP_50"),
        ("AP75_bb", "AP^bb_75", "coco/bbox_mAP_75"),
        ("APS_bb", "AP^bb_S", "coco/bbox_mAP_s"),
        ("APM_bb", "AP^bb_M", "coco/bbox_mAP_m"),
        ("APL_bb", "AP^bb_L", "coco/bbox_mAP_l"),
        ("AP_m", "AP^m", "coco/segm_mAP"),
        ("AP50_m", "AP^m_50", "coco/segm_mAP_50"),
        ("AP75_m", "AP^m_75", "coco/segm_mAP_75"),
        ("APS_m", "AP^m_S", "coco/segm_mAP_s"),
        ("APM_m", "AP^m_M", "coco/segm_mAP_m"),
        ("APL_m", "AP^m_L", "coco/segm_mAP_l"),
    ],
    9: [
        ("AP_kp", "AP^kp", "coco/AP"),
        ("AP50_kp", "AP^kp_50", "coco/AP .5"),
        ("AP75_kp", "AP^kp_75", "coco/AP .75"),
        ("APM_kp", "AP^kp_M", "coco/AP (M)"),
        ("APL_kp", "AP^kp_L", "coco/AP (L)"),
        ("AR_kp", "AR^kp", "coco/AR"),
        ("AR50_kp", "AR^kp_50", "coco/AR .5"),
        ("AR75_kp", "AR^kp_75", "coco/AR .75"),
        ("ARM_kp", "AR^kp_M", "coco/AR (M)"),
        ("ARL_kp", "AR^kp_L", "coco/AR (L)"),
    ],
}
TABLE_TITLES = {
    8: "Table 8: COCO val detection and segmentation (AP^bb box AP, AP^m mask AP, percent)",
    9: "Table 9: COCO val keypoints (AP^kp / AR^kp, percent)",
}
_BACKBONE_NAMES = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
    "densenet121": "DenseNet-121",
    "densenet169": "DenseNet-169",
    "mobilenetv1_100": "MobileNet-V1-1.0",
}
_FULL_COMPUTE = 0.995  # compute fractions at or above this count as the 100% baseline


@dataclasses.dataclass
class Row:
    """One run: identification, values in percent (``None`` = absent), deltas vs its group's baseline."""

    method: str
    backbone: str
    compute: float | None
    work_dir: str
    values: list[float | None]
    note: str = ""
    deltas: list[float | None] = dataclasses.field(default_factory=list)
    best: list[bool] = dataclasses.field(default_factory=list)

    @property
    def compute_str(self) -> str:
        return "?" if self.compute is None else f"{round(100 * self.compute)}%"


def load_run(work_dir: str | Path) -> dict:
    """Reads ``WORK_DIR/metrics.json``; raises ``TransferInputError`` if absent or not a transfer result."""
    path = Path(work_dir) / "metrics.json"
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise TransferInputError(f"{path} not found; pass work dirs of finished tools/transfer_coco.sh runs") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TransferInputError(f"{path} is not valid JSON ({e}); rerun the transfer with --overwrite") from None
    if not isinstance(run, dict) or run.get("table") not in TABLE_COLUMNS or "method" not in run:
        raise TransferInputError(f"{path} is not a transfer result (no method/table); rerun tools/transfer_coco.sh")
    return run


def _compute_fraction(meta: dict) -> float | None:
    for key in ("compute_fraction_measured", "compute_fraction_planned"):
        if isinstance(meta.get(key), (int, float)):
            return float(meta[key])
    return None


def _row(run: dict, work_dir: str) -> Row:
    meta = run.get("backbone") or {}
    values = []
    for _, _, key in TABLE_COLUMNS[run["table"]]:
        v = run.get(key)
        values.append(
            100 * v if isinstance(v, (int, float)) and v >= 0 else None
        )  # COCO writes -1 for "no such instances"
    model = meta.get("model", "?")
    note = str(run.get("note") or "")
    return Row(run["method"], _BACKBONE_NAMES.get(model, model), _compute_fraction(meta), work_dir, values, note)


def _fill_group(rows: list[Row]) -> None:
    """Sets deltas against the group's first 100% row and marks each column's best (only if >1 row)."""
    base = next((r for r in rows if r.compute is not None and r.compute >= _FULL_COMPUTE), None)
    n = len(rows[0].values)
    for r in rows:
        r.deltas = [
            None if base is None or r is base or v is None or base.values[i] is None else v - base.values[i]
            for i, v in enumerate(r.values)
        ]
        r.best = [False] * n
    if len(rows) < 2:
        return
    for i in range(n):
        present = [round(r.values[i], 1) for r in rows if r.values[i] is not None]
        for r in rows:
            r.best[i] = bool(present) and r.values[i] is not None and round(r.values[i], 1) == max(present)


def make_tables(runs: list[tuple[str, dict]]) -> dict[int, list[Row]]:
    """Groups runs into the paper's tables.

    Args:
        runs: ``(work_dir, metrics.json dict)`` pairs, in the order given on the command line.

    Returns:
        table number -> rows, grouped by (method, backbone) in first-seen order, the 100% row first
        in each group, then by compute fraction.
    """
    tables: dict[int, dict[tuple[str, str], list[Row]]] = {}
    for work_dir, run in runs:
        row = _row(run, work_dir)
        tables.setdefault(run["table"], {}).setdefault((row.method, row.backbone), []).append(row)
    out = {}
    for table, groups in sorted(tables.items()):
        out[table] = []
        for rows in groups.values():
            rows.sort(key=lambda r: (r.compute is None or r.compute < _FULL_COMPUTE, r.compute or 0.0))
            _fill_group(rows)
            out[table].extend(rows)
    return out


def _cell(row: Row, i: int) -> str:
    v = row.values[i]
    if v is None:
        return "-"
    text = f"**{v:.1f}**" if row.best[i] else f"{v:.1f}"
    return text if row.deltas[i] is None else f"{text} ({row.deltas[i]:+.1f})"


def format_markdown(table: int, rows: list[Row]) -> str:
    """The table as Markdown: ``value (delta)``, best of each column in bold; a ``Note`` column if a run has one."""
    notes = any(r.note for r in rows)
    headers = ["Method", "Backbone", "Pre-train Computation"] + [h for _, h, _ in TABLE_COLUMNS[table]]
    headers += ["Note"] if notes else []
    lines = [f"**{TABLE_TITLES[table]}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r.method, r.backbone, r.compute_str] + [_cell(r, i) for i in range(len(r.values))]
        cells += [r.note.replace("|", "/")] if notes else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: int, rows: list[Row]) -> str:
    """The table as CSV: a value and a delta column per metric, a ``best`` column naming the metrics won, ``note``."""
    labels = [lab for lab, _, _ in TABLE_COLUMNS[table]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metric_cells = [c for lab in labels for c in (lab, f"{lab}_delta")]
    w.writerow(["table", "method", "backbone", "compute", *metric_cells, "best", "note"])
    for r in rows:
        cells = []
        for v, d in zip(r.values, r.deltas, strict=True):
            cells += ["" if v is None else f"{v:.1f}", "" if d is None else f"{d:+.1f}"]
        best = ";".join(lab for lab, b in zip(labels, r.best, strict=True) if b)
        w.writerow([table, r.method, r.backbone, r.compute_str, *cells, best, r.note])
    return buf.getvalue().rstrip("\n")


@entry_point(prog="report", exit=False)
def main(argv: list[str] | None = None) -> int:
    """CLI: print Markdown and/or CSV for every table the work dirs fill; bad input -> one line, exit 2."""
    p = argparse.ArgumentParser(prog="python -m downstream.report", description=__doc__.splitlines()[0])
    p.add_argument("work_dirs", nargs="+", help="work dirs of tools/transfer_coco.sh runs")
    p.add_argument("--format", choices=["md", "csv", "both"], default="both")
    args = p.parse_args(argv)
    tables = make_tables([(d, load_run(d)) for d in args.work_dirs])
    parts = []
    if args.format in ("md", "both"):
        parts += [format_markdown(t, rows) for t, rows in tables.items()]
    if args.format in ("csv", "both"):
        parts += [format_csv(t, rows) for t, rows in tables.items()]
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
