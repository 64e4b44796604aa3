"""Print the paper's Table 8 (detection/segmentation) and Table 9 (keypoints) from transfer work dirs.

    python -m downstream.report WORK_DIR [WORK_DIR ...] [--format md|csv|both]

Each WORK_DIR holds the ``metrics.json`` of one ``tools/transfer_coco.sh`` run (the file itself may be
given too). Rows are grouped by (method, backbone, evaluation): runs are compared only when they were
fine-tuned and evaluated alike, i.e. the same data root, the same number of iterations and, for pose, the
same person boxes (ground truth or one detection file). Where a table's runs differ in these, an
``Evaluation`` column names what differs. Within a group the first 100% pre-train-compute row given is the
baseline every other row's delta is taken against, and the best value of each column is marked (Markdown
bold, CSV ``best`` column). Values are percent (the evaluator's fractions x 100); ``-`` where a run has no
such metric or COCO had no instance of that size. A run's note (its ``metrics.json`` ``note``, e.g. an
evaluation that scored nothing, recorded as 0.0; or why it has no deltas) shows in a last ``Note`` column
(Markdown, only in tables that have one) and in the CSV's ``note`` column. The same work dir given twice is
one row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

from dap_pretrain.cli import make_parser
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
# metrics.json "run" keys that make two runs' numbers comparable, and how the Evaluation column names them;
# test_options: the --cfg-options that change the evaluation (_TEST_KEYS), from the run's cfg_options
_PROTOCOL = {"data_root": "data", "train_iters": "iters", "person_boxes": "person boxes", "test_options": "test"}
_TEST_KEYS = ("test_dataloader", "test_evaluator", "test_cfg", "model.test_cfg", "tta_model", "tta_pipeline")
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
    protocol: tuple = ()  # the run's values of _PROTOCOL's keys, in that order
    evaluation: str = ""  # what of the protocol differs from other rows of its table (set by make_tables)
    pretrain: tuple = ()  # the backbone's pre-training data and class count (meta.json's dataset, num_classes)
    deltas: list[float | None] = dataclasses.field(default_factory=list)
    best: list[bool] = dataclasses.field(default_factory=list)

    @property
    def compute_str(self) -> str:
        return "?" if self.compute is None else f"{round(100 * self.compute)}%"


def load_run(work_dir: str | Path) -> dict:
    """Reads ``WORK_DIR/metrics.json`` (or ``work_dir`` itself, if it is a file).

    Raises:
        TransferInputError: absent, not JSON, not a transfer result, or holding none of its table's metrics.
    """
    path = Path(work_dir)
    path = path if path.is_file() else path / "metrics.json"
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise TransferInputError(f"{path} not found; pass work dirs of finished tools/transfer_coco.sh runs") from None
    except OSError as e:  # a folder named metrics.json, an unreadable file
        raise TransferInputError(
            f"{path} cannot be read ({e.strerror}); pass the metrics.json of a transfer run"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TransferInputError(f"{path} is not valid JSON ({e}); rerun the transfer with --overwrite") from None
    if not isinstance(run, dict) or run.get("table") not in TABLE_COLUMNS or "method" not in run:
        raise TransferInputError(f"{path} is not a transfer result (no method/table); rerun tools/transfer_coco.sh")
    for key in ("backbone", "run"):
        if not isinstance(run.get(key) or {}, dict):
            raise TransferInputError(f"{path}: '{key}' is not a JSON object; rerun the transfer with --overwrite")
    if not any(_is_number(run.get(key)) for _, _, key in TABLE_COLUMNS[run["table"]]):
        raise TransferInputError(
            f"{path} holds none of Table {run['table']}'s metrics as numbers; rerun the transfer with --overwrite"
        )
    for _, _, key in TABLE_COLUMNS[run["table"]]:
        v = run.get(key)
        if v is None:
            continue
        # COCO's metrics are fractions, -1 where there is no such instance; other values were edited by hand or
        # came from elsewhere, and would show as 5730.0 or nan in the table
        if not _is_number(v) or not (0 <= v <= 1 or v == -1):
            raise TransferInputError(
                f"{path}: {key} is {v!r}, not a COCO metric (a fraction 0-1, or -1 for no such instances); rerun "
                "the transfer with --overwrite"
            )
    return run


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        values.append(100 * v if _is_number(v) and v >= 0 else None)  # COCO writes -1 for "no such instances"
    model = meta.get("model", "?")
    note = str(run.get("note") or "")
    info = dict(run.get("run") or {})
    info["test_options"] = _test_options(info)
    protocol = tuple(info.get(key) for key in _PROTOCOL)
    pretrain = (meta.get("dataset"), meta.get("num_classes"))
    return Row(run["method"], _BACKBONE_NAMES.get(model, model), _compute_fraction(meta), work_dir, values, note,
               protocol, pretrain=pretrain)  # fmt: skip


def _test_options(info: dict) -> str:
    """The run's ``--cfg-options`` that change its evaluation (test subset, scale, score threshold, ...), as one
    string; ``stock`` for none."""
    options = info.get("cfg_options") if isinstance(info.get("cfg_options"), dict) else {}
    return "; ".join(f"{k}={v}" for k, v in sorted(options.items()) if k.startswith(_TEST_KEYS)) or "stock"


def _is_full(row: Row) -> bool:
    return row.compute is not None and row.compute >= _FULL_COMPUTE


def _add_note(row: Row, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _pretrained_apart(row: Row, base: Row) -> bool:
    """Whether meta.json says the two backbones were pre-trained on other data or class counts (unknown: no)."""
    return any(a is not None and b is not None and a != b for a, b in zip(row.pretrain, base.pretrain, strict=True))


def _pretrain_str(row: Row) -> str:
    dataset, classes = row.pretrain
    return f"{dataset or '?'} ({classes if classes is not None else '?'} classes)"


def _fill_group(rows: list[Row]) -> None:
    """Sets deltas against the group's first 100% row and marks each column's best (only if >1 row); notes a row
    that has no deltas because the group has no 100% row, and a second 100% row (the first is the baseline)."""
    base = next((r for r in rows if _is_full(r)), None)
    n = len(rows[0].values)
    for r in rows:
        r.deltas = [
            None if base is None or r is base or v is None or base.values[i] is None else v - base.values[i]
            for i, v in enumerate(r.values)
        ]
        r.best = [False] * n
        if base is None:
            why = " (a bare .pth records no compute)" if r.compute is None else ""
            _add_note(r, f"no deltas: no 100% run of this method, backbone and evaluation was given{why}")
        elif r is not base and _is_full(r):
            _add_note(r, f"a second 100% run; deltas are against the first given, {base.work_dir}")
        if base is not None and r is not base and _pretrained_apart(r, base):
            _add_note(r, f"pre-trained on {_pretrain_str(r)}, the 100% run on {_pretrain_str(base)}: the deltas "
                         "mix pre-training data with compute")  # fmt: skip
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
        table number -> rows, grouped by (method, backbone, evaluation protocol) in first-seen order, the
        100% rows first in each group (in the order given), then by compute fraction. Where a table's rows
        differ in protocol, each row's ``evaluation`` names its values of the keys that differ.
    """
    tables: dict[int, dict[tuple, list[Row]]] = {}
    for work_dir, run in runs:
        row = _row(run, work_dir)
        tables.setdefault(run["table"], {}).setdefault((row.method, row.backbone, row.protocol), []).append(row)
    out = {}
    for table, groups in sorted(tables.items()):
        out[table] = []
        for rows in groups.values():
            rows.sort(key=lambda r: (not _is_full(r), 0.0 if _is_full(r) else r.compute or 0.0))  # stable
            _fill_group(rows)
            out[table].extend(rows)
        differ = [i for i in range(len(_PROTOCOL)) if len({r.protocol[i] for r in out[table]}) > 1]
        for r in out[table]:
            r.evaluation = ", ".join(f"{list(_PROTOCOL.values())[i]} {_shown(r.protocol[i], i)}" for i in differ)
    return out


def _shown(value, index: int) -> str:
    """A protocol value for the Evaluation column: a person-box file by its name (metrics.json has its path)."""
    if value is None:
        return "?"
    return Path(value).name if list(_PROTOCOL)[index] == "person_boxes" and value != "gt" else str(value)


def _title(table: int, rows: list[Row]) -> str:
    """The table's title; Table 9 names its person boxes when every row used the same (ground truth by default)."""
    title = TABLE_TITLES[table]
    boxes = {r.protocol[list(_PROTOCOL).index("person_boxes")] for r in rows}
    if table == 9 and len(boxes) == 1 and None not in boxes:
        (source,) = boxes
        title += ", ground-truth person boxes" if source == "gt" else f", person boxes from {source}"
    return title


def _cell(row: Row, i: int) -> str:
    v = row.values[i]
    if v is None:
        return "-"
    text = f"**{v:.1f}**" if row.best[i] else f"{v:.1f}"
    return text if row.deltas[i] is None else f"{text} ({row.deltas[i]:+.1f})"


def format_markdown(table: int, rows: list[Row]) -> str:
    """The table as Markdown: ``value (delta)``, best of each column in bold; an ``Evaluation`` column if the rows
    were evaluated differently, a ``Note`` column if a row has a note."""
    notes, evaluation = any(r.note for r in rows), any(r.evaluation for r in rows)
    headers = ["Method", "Backbone", "Pre-train Computation"] + (["Evaluation"] if evaluation else [])
    headers += [h for _, h, _ in TABLE_COLUMNS[table]] + (["Note"] if notes else [])
    lines = [f"**{_title(table, rows)}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r.method, r.backbone, r.compute_str] + ([r.evaluation.replace("|", "/")] if evaluation else [])
        cells += [_cell(r, i) for i in range(len(r.values))]
        cells += [r.note.replace("|", "/")] if notes else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: int, rows: list[Row]) -> str:
    """The table as CSV: a value and a delta column per metric, a ``best`` column naming the metrics won, ``note``,
    and the evaluation protocol's keys (``data_root``, ``train_iters``, ``person_boxes``, ``test_options``) as the
    last columns."""
    labels = [lab for lab, _, _ in TABLE_COLUMNS[table]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metric_cells = [c for lab in labels for c in (lab, f"{lab}_delta")]
    w.writerow(["table", "method", "backbone", "compute", *metric_cells, "best", "note", *_PROTOCOL])
    for r in rows:
        cells = []
        for v, d in zip(r.values, r.deltas, strict=True):
            cells += ["" if v is None else f"{v:.1f}", "" if d is None else f"{d:+.1f}"]
        best = ";".join(lab for lab, b in zip(labels, r.best, strict=True) if b)
        protocol = ["" if v is None else v for v in r.protocol]
        w.writerow([table, r.method, r.backbone, r.compute_str, *cells, best, r.note, *protocol])
    return buf.getvalue().rstrip("\n")


@entry_point(prog="report", exit=False)
def main(argv: list[str] | None = None) -> int:
    """CLI: print Markdown and/or CSV for every table the work dirs fill; bad input -> one line, exit 2."""
    p = make_parser(prog="python -m downstream.report", description=__doc__.splitlines()[0], error_prefix="report: ")
    p.add_argument("work_dirs", nargs="+", help="work dirs of tools/transfer_coco.sh runs")
    p.add_argument("--format", choices=["md", "csv", "both"], default="both")
    args = p.parse_args(argv)
    seen: set[Path] = set()  # a work dir given twice (overlapping shell globs; the dir and its file) is one row
    runs = []
    for d in args.work_dirs:
        key = Path(d).resolve()
        key = key.parent if key.is_file() else key
        if key not in seen:
            seen.add(key)
            runs.append((d, load_run(d)))
    tables = make_tables(runs)
    parts = []
    if args.format in ("md", "both"):
        parts += [format_markdown(t, rows) for t, rows in tables.items()]
    if args.format in ("csv", "both"):
        parts += [format_csv(t, rows) for t, rows in tables.items()]
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
