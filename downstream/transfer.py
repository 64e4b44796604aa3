"""Fine-tune and evaluate one backbone on one COCO task; the entry point ``tools/transfer_coco.sh`` calls.

    python -m downstream.transfer TASK BACKBONE [--data-root DIR] [--work-dir DIR] [--cfg-options k=v ...]

Writes ``WORK_DIR/metrics.json``: the COCO evaluator's keys (``coco/bbox_mAP``, ..., ``coco/AP (M)``)
at the top level as floats in [0, 1] (-1 where COCO has no instance of that size), the export's
``meta.json`` under ``backbone``, and how the run was made under ``run`` (device, seconds per iteration, ...).
An evaluation that scores nothing (no detection above the score threshold: mmdet logs "The testing results
of the whole dataset is empty" and returns no metric) is a result too: every column the evaluator would
have written is recorded as 0.0 and ``note`` says why, in one line that is also printed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from dap_pretrain.cli import add_cfg_options, check_launcher, make_parser
from dap_pretrain.compat import quiet_mm_imports
from dap_pretrain.errors import cause, entry_point, refused_on_every_rank
from downstream import TransferInputError
from downstream.backbone import BackboneSpec, check_backbone, resolve_backbone
from downstream.checks import check_coco_inputs, check_person_dets
from downstream.config import TASKS, build_transfer_config, config_path, get_task
from downstream.report import TABLE_COLUMNS

METRICS_FILE = "metrics.json"
_ZEROS = "every COCO column recorded as 0.0"
# mmengine keys that hold the backbone's weights: set from BACKBONE, whose meta.json labels the run's row
_BACKBONE_KEYS = ("model.backbone.init_cfg.checkpoint", "model.backbone.checkpoint", "load_from")
_GENERIC_FILE_NAMES = {"backbone", "model", "pytorch_model", "checkpoint", "last", "model_best"}


def _reference_state_dict(cfg, spec: BackboneSpec) -> dict:
    """State dict of the backbone the config builds, randomly initialised, for the key check."""
    if cfg.model.backbone.type == "DaPTimmBackbone":
        import timm  # the wrapper loads the full timm model's state dict before feature wrapping

        return timm.create_model(spec.model, num_classes=0, pretrained=False).state_dict()
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(cfg.get("default_scope"))
    backbone = copy.deepcopy(cfg.model.backbone)
    backbone.pop("init_cfg", None)
    return MODELS.build(backbone).state_dict()


def _train_sec_per_iter(runner, key: str = "train/time") -> float:
    """Mean seconds per training iteration (IterTimerHook), leaving out the first (warm-up) one.

    ``key``: ``train/time`` (the whole iteration) or ``train/data_time`` (waiting for the loader).
    """
    times = runner.message_hub.get_scalar(key).data[0]
    return float(np.mean(times[1:] if len(times) > 1 else times))


def _device_name(model) -> str:
    """Where the model trained: the CUDA device's name (``NVIDIA H100 80GB HBM3``) or ``cpu``."""
    import torch

    device = next(model.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def evaluator_columns(cfg, table: int) -> list[str]:
    """The ``metrics.json`` keys the config's COCO test evaluator writes for a run of paper ``table``.

    Detection: the box columns, plus the mask columns when the evaluator's ``metric`` includes ``segm``
    (Mask R-CNN); keypoints: all AP/AR columns.
    """
    keys = [key for _, _, key in TABLE_COLUMNS[table]]
    evaluator = cfg.get("test_evaluator")
    if table == 9 or not isinstance(evaluator, dict):
        return keys
    metric = evaluator.get("metric", "bbox")
    kinds = {metric} if isinstance(metric, str) else set(metric)
    return [key for key in keys if key.split("/")[-1].split("_")[0] in kinds]


def empty_evaluation_note(cfg, *, is_pose: bool, n_test: int) -> str:
    """The one line that says why an evaluation scored nothing."""
    if is_pose:
        return f"no keypoint prediction on the {n_test} test person boxes: {_ZEROS}"
    thr = (cfg.model.get("test_cfg") or {}).get("rcnn", {}).get("score_thr")
    where = f" (model.test_cfg.rcnn.score_thr={thr})" if thr is not None else ""
    return f"no detection above the score threshold{where} on the {n_test} test images: {_ZEROS}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm", "mmengine", "mmcv", "mmdet", "mmpose"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _finite_metrics(metrics: dict) -> dict[str, float]:
    """The evaluator's numeric results as plain floats (mmdet also logs strings, which are dropped)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"evaluator returned non-finite {bad}")
    return out


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _resume_in_moved_work_dir(cfg) -> None:
    """``resume=True`` reads ``WORK_DIR/last_checkpoint``, which in a work dir moved or copied since names the old
    place: resume then from the work dir's own file of that name (``load_from``, in place); refuse in one line if
    it lacks it (:func:`dap_pretrain.mm.work_dir.last_checkpoint_in`)."""
    if cfg.get("resume") is not True or cfg.get("load_from"):
        return
    from dap_pretrain.mm.work_dir import last_checkpoint_in

    marker = Path(cfg.work_dir) / "last_checkpoint"
    own = last_checkpoint_in(Path(cfg.work_dir), fix="pass --cfg-options resume=True load_from=CHECKPOINT")
    if own is not None and os.fspath(own) != marker.read_text().strip():  # not the file it names: the copy's own
        print(f"transfer_coco: resuming from {own} ({marker} names another place, outside this work dir)", flush=True)
        cfg.load_from = os.fspath(own)


def _check_work_dir(work_dir: Path, *, cfg_options: dict, overwrite: bool) -> None:
    """Refuses, before anything is written, a work dir this run could not use or would overwrite unasked: an empty
    name, a file or a path through one, an ``--overwrite`` killed before its first checkpoint (``.replaced/``), a
    pre-training run's folder (``run.json``: ``dap_pretrain.train`` or ``tools/pretrain_mm.sh``, whose checkpoints
    a transfer would replace), a finished transfer without ``--overwrite``, an unfinished one (a
    ``last_checkpoint``) without ``resume=True`` or ``--overwrite``, and a ``work_dir`` or a missing ``load_from``
    among ``--cfg-options``."""
    if "work_dir" in cfg_options:
        raise TransferInputError(
            f"--cfg-options work_dir={cfg_options['work_dir']} bypasses --work-dir (its lock and its --overwrite "
            "check); pass --work-dir instead"
        )
    if not str(work_dir) or str(work_dir) == ".":
        raise TransferInputError("--work-dir is empty; pass a folder for the run's checkpoints and metrics.json")
    from dap_pretrain.mm.work_dir import REPLACED, killed_overwrite, not_a_folder

    refusal = not_a_folder(work_dir)
    if refusal:
        raise TransferInputError(refusal)
    resume = cfg_options.get("resume") is True
    if (work_dir / REPLACED).is_dir() and not (resume or overwrite):  # as tools/pretrain_mm.sh's check_work_dir
        raise TransferInputError(killed_overwrite(work_dir, "work dir"))
    if (work_dir / "run.json").is_file():
        raise TransferInputError(
            f"--work-dir {work_dir} holds a pre-training run (run.json), whose checkpoints a transfer would replace; "
            "pass another --work-dir"
        )
    metrics_file = work_dir / METRICS_FILE
    if metrics_file.exists() and not overwrite:
        raise TransferInputError(f"{metrics_file} exists; pass another --work-dir or --overwrite to replace it")
    if (work_dir / "last_checkpoint").is_file() and not (resume or overwrite):
        raise TransferInputError(
            f"--work-dir {work_dir} holds an unfinished run (last_checkpoint); pass --cfg-options resume=True to "
            "continue it, or --overwrite to start again"
        )
    load_from = cfg_options.get("load_from")  # without resume=True: the backbone check below refuses it
    if resume and isinstance(load_from, str) and load_from and not Path(load_from).is_file():
        raise TransferInputError(
            f"--cfg-options load_from={load_from} is not a file; pass a checkpoint of this run (WORK_DIR/epoch_N.pth)"
        )


def _check_test_evaluator(cfg) -> None:
    """Builds the config's test evaluator now, as ``runner.test()`` would after training: a setting it refuses
    (``test_evaluator.metric=...``) is one line before the run, not a traceback after it (and, with
    ``--overwrite``, after the previous run's files were replaced)."""
    from mmengine.evaluator import Evaluator
    from mmengine.registry import EVALUATOR, init_default_scope

    init_default_scope(cfg.get("default_scope", "mmdet"))
    spec = copy.deepcopy(cfg.get("test_evaluator"))
    try:  # mmengine's Runner.build_evaluator: a dict with metrics= is an Evaluator's config, else the metrics'
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations into memory..."
            if isinstance(spec, dict) and "metrics" in spec:
                EVALUATOR.build({"type": "Evaluator", **spec})
            elif spec is not None:
                Evaluator(spec)
    except Exception as e:  # noqa: BLE001  (mmdet/mmpose raise KeyError, TypeError, ValueError, AssertionError)
        raise TransferInputError(
            f"the config's test_evaluator cannot be built ({cause(e, 200)}); check --cfg-options test_evaluator.*"
        ) from None


def prepare_transfer(
    *,
    task: str,
    backbone: str | Path,
    data_root: str | Path,
    work_dir: str | Path,
    model: str | None = None,
    person_dets: str | Path | None = None,
    cfg_options: dict | None = None,
    launcher: str = "none",
    overwrite: bool = False,
):
    """Resolves and checks every input and returns ``(cfg, spec)``; writes nothing.

    Raises:
        TransferInputError: unknown task, bad backbone, bad annotations/images/detections, or a work
            dir that already holds ``metrics.json`` while ``overwrite`` is false.
    """
    from dap_pretrain.compat import without_broken_multimodal

    notice = without_broken_multimodal()  # before any config or model imports mmdet, which imports mmpretrain
    if notice:
        print(notice, flush=True)
    t = get_task(task)
    _check_work_dir(Path(work_dir), cfg_options=cfg_options or {}, overwrite=overwrite)
    overridden = [k for k in _BACKBONE_KEYS if k in (cfg_options or {})]
    if overridden == ["load_from"] and (cfg_options or {}).get("resume") is True:
        overridden = []  # mmengine's resume=True load_from=CKPT: continue this fine-tuning from one of its checkpoints
    if overridden:
        raise TransferInputError(
            f"--cfg-options {overridden[0]} would train other weights than BACKBONE {backbone}, whose meta.json "
            "labels the run in metrics.json and the report; pass those weights as BACKBONE instead"
        )
    spec = resolve_backbone(backbone=backbone, model=model)
    if person_dets is not None:
        check_person_dets(person_dets)
    cfg = build_transfer_config(
        task=task,
        spec=spec,
        data_root=data_root,
        work_dir=work_dir,
        cfg_options=cfg_options,
        person_dets=person_dets,
        launcher=launcher,
    )
    _resume_in_moved_work_dir(cfg)
    from dap_pretrain.mm.loaders import dataloader_refusal  # after without_broken_multimodal (dap_pretrain.mm)

    refusal = dataloader_refusal(cfg)
    if refusal:
        raise TransferInputError(refusal)
    check_coco_inputs(cfg, keypoints=t.is_pose)
    _check_test_evaluator(cfg)
    path = config_path(task=task, model=spec.model)
    changed = [k for k in (cfg_options or {}) if k.startswith("model.backbone.")]
    unchanged = {k: v for k, v in (cfg_options or {}).items() if k not in changed}
    from dap_pretrain.mm.buildable import build_refusal

    try:
        reference = _reference_state_dict(cfg, spec)
    except Exception:  # the backbone's constructor refused an option (model.backbone.depthh=50): name it
        refusal = build_refusal(cfg, cfg_options)
        if refusal:
            raise TransferInputError(refusal) from None
        raise
    check_backbone(
        spec=spec,
        reference=reference,
        expected=f"the backbone of {path.name}",
        overrides=changed,
        stock_reference=lambda: _reference_state_dict(
            build_transfer_config(
                task=task, spec=spec, data_root=data_root, work_dir=work_dir, cfg_options=unchanged,
                person_dets=person_dets, launcher=launcher,
            ),
            spec,
        ),
    )  # fmt: skip
    refusal = build_refusal(cfg, cfg_options)  # what the run builds before its first step: model, pipelines, ...
    if refusal:
        raise TransferInputError(refusal)
    return cfg, spec


def run_transfer(*, task: str, person_dets: str | Path | None = None, **kwargs) -> dict:
    """Fine-tunes, evaluates with the config's test evaluator and writes ``WORK_DIR/metrics.json``.

    Keyword args are those of :func:`prepare_transfer`. Training runs under
    :func:`downstream.compat.trusted_checkpoints` for the work dir and ``load_from``/``resume`` (torch>=2.6).

    Returns:
        The dict written to ``metrics.json`` (on every rank; rank 0 writes it).
    """
    with refused_on_every_rank():  # inputs every process reads alike: under torchrun, said once per node
        cfg, spec = prepare_transfer(task=task, person_dets=person_dets, **kwargs)
    from mmengine.dist import get_world_size, is_main_process
    from mmengine.runner import Runner

    from dap_pretrain.mm.work_dir import ClearPreviousRun, FirstIteration, WorkDirSnapshot, work_dir_lock
    from downstream.compat import trusted_checkpoints

    trusted = [cfg.work_dir] + [p for p in (cfg.get("load_from"), cfg.get("resume")) if isinstance(p, str)]
    # one run per work dir: a second (another GPU's job with the same --work-dir) is one line, before it writes
    rank0 = os.environ.get("RANK", "0") == "0"
    before = WorkDirSnapshot.take(Path(cfg.work_dir)) if rank0 else None
    with work_dir_lock(Path(cfg.work_dir), enabled=rank0), trusted_checkpoints(trusted):
        clear, first = None, FirstIteration()
        try:
            runner = Runner.from_cfg(cfg)
            runner.register_hook(first)
            if kwargs.get("overwrite") and rank0 and cfg.get("resume") is not True:
                # the previous run's checkpoints and metrics.json wait in .replaced/ until this run's first checkpoint
                clear = ClearPreviousRun(work_dir=Path(cfg.work_dir), keep=(runner.timestamp,), also=(METRICS_FILE,))
                runner.register_hook(clear, priority="LOWEST")
            runner.train()
        except BaseException:
            if clear is not None:
                clear.undo()  # stopped before its first checkpoint: the previous run comes back
            if before is not None and not first.reached:  # a config key mmdet refuses, with its traceback
                before.restore()  # wrote only a config dump and a log folder: the work dir as it was
            raise
        sec_per_iter = _train_sec_per_iter(runner)
        data_sec_per_iter = _train_sec_per_iter(runner, "train/data_time")
        metrics = _finite_metrics(runner.test())  # the config's test evaluator on the final weights
    t = get_task(task)
    note = None
    columns = evaluator_columns(cfg, t.table)
    if not any(key in metrics for key in columns):  # mmdet: "The testing results of the whole dataset is empty"
        note = empty_evaluation_note(cfg, is_pose=t.is_pose, n_test=len(runner.test_dataloader.dataset))
        metrics.update(dict.fromkeys(columns, 0.0))
    result = {
        "task": task,
        "method": t.method,
        "table": t.table,
        **metrics,
        **({"note": note} if note else {}),
        "backbone": spec.meta,
        "run": {
            "config": str(config_path(task=task, model=spec.model)),
            "backbone_checkpoint": str(spec.checkpoint),
            "data_root": str(Path(kwargs["data_root"]).resolve()),
            "person_boxes": str(Path(person_dets).resolve()) if person_dets else ("gt" if t.is_pose else None),
            "train_iters": runner.iter,
            "train_sec_per_iter": sec_per_iter,
            "train_data_sec_per_iter": data_sec_per_iter,
            "train_batch_size_per_gpu": cfg.train_dataloader.batch_size,
            "device": _device_name(runner.model),
            "launcher": cfg.launcher,
            "world_size": get_world_size(),
            "cfg_options": {k: repr(v) for k, v in (kwargs.get("cfg_options") or {}).items()},
            "versions": _versions(),
        },
    }
    if is_main_process():
        _write_json_atomic(Path(cfg.work_dir) / METRICS_FILE, result)
    return result


def default_work_dir(task: str, backbone: str | Path) -> str:
    """``work_dirs/TASK/NAME``: an export folder's name whole (``resnet50.dap75_in1k``), a file's name less its
    extension, or, for a file named like every export's (``backbone.pth``), its folder's name."""
    path = Path(backbone).resolve()
    name = path.name
    if path.is_file():
        name = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
        name = path.parent.name if name in _GENERIC_FILE_NAMES else name
    return os.path.join("work_dirs", task, name)


def parse_args(argv: list[str] | None = None):
    p = make_parser(
        prog="transfer_coco",
        description=__doc__.splitlines()[0],
        error_prefix="transfer_coco: ",
        epilog="tools/transfer_coco.sh also takes --gpus N: N processes through torchrun, one per GPU (N >= 1).",
    )
    p.add_argument("task", help=f"one of {', '.join(TASKS)}")
    p.add_argument("backbone", help="export folder (backbone.pth + meta.json) or a .pth state dict with --model")
    p.add_argument("--data-root", default="data/coco", help="COCO folder with annotations/, train2017/, val2017/")
    p.add_argument("--work-dir", default=None, help="default: work_dirs/TASK/<export folder name, or .pth file name>")
    p.add_argument("--model", default=None, help="timm model name of a bare .pth backbone")
    p.add_argument("--person-dets", default=None, help="person detection JSON for pose eval (default: GT boxes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing WORK_DIR/metrics.json")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none", help="pytorch under torchrun")
    add_cfg_options(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="check every input (backbone, COCO files, person boxes, work dir) and exit: trains and writes nothing "
        "(tools/transfer_coco.sh --gpus N runs it once before starting N processes)",
    )
    args = p.parse_args(argv)
    if not args.check:  # the check runs as one plain process, whatever launcher the run will have
        check_launcher(p, args.launcher, fix="start it with tools/transfer_coco.sh --gpus N, or drop --launcher")
    return args


@entry_point(prog="transfer_coco", exit=False)
def main(argv: list[str] | None = None) -> int:
    """CLI: parse and run; a :class:`~downstream.TransferInputError` is one stderr line, exit code 2."""
    quiet_mm_imports()
    args = parse_args(argv)
    work_dir = default_work_dir(args.task, args.backbone) if args.work_dir is None else args.work_dir
    inputs = dict(
        task=args.task,
        backbone=args.backbone,
        data_root=args.data_root,
        work_dir=work_dir,
        model=args.model,
        person_dets=args.person_dets,
        cfg_options=args.cfg_options,
        launcher=args.launcher,
        overwrite=args.overwrite,
    )
    if args.check:
        prepare_transfer(**inputs)
        print(f"transfer_coco: inputs ok for {args.task} ({args.backbone}, {args.data_root}, work dir {work_dir})")
        return 0
    result = run_transfer(**inputs)
    from mmengine.dist import is_main_process

    if not is_main_process():
        return 0
    run = result["run"]
    print(
        f"transfer_coco: {args.task} on {run['device']} x{run['world_size']}: {run['train_iters']} iterations, "
        f"{run['train_sec_per_iter']:.3f} s/iter ({run['train_data_sec_per_iter']:.3f} s waiting for data)"
    )
    if "note" in result:
        print(f"transfer_coco: note: {result['note']}")
    print(f"wrote {os.path.join(work_dir, METRICS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
