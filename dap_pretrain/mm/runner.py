"""One mmengine DaP pretraining run from a config file: what ``python -m dap_pretrain.mm.train`` calls.

:func:`prepare_config` resolves the config (``--cfg-options``, ``--data-root``, work dir, resume, launcher) and
:func:`check_config` refuses what cannot work before anything is built; :func:`pretrain_mm` then owns the work dir
and runs mmengine's ``Runner``, whose :class:`~dap_pretrain.mm.hook.DaPHook` does the DaP part.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from dap_pretrain.mm.settings import DaPMMError, resolve_dap

RUN_MARKERS = ("run.json", "summary.csv", "last_checkpoint")
_WIRING = (  # (config path, type the DaP config needs there)
    ("train_dataloader.sampler", "DaPMMSampler"),
    ("model.head", "DaPClsHead"),
)
# dataset keys that name where the data is; --data-root replaces them and keeps the rest (pipeline, indices, ...)
_WHERE_KEYS = ("type", "data_root", "data_prefix", "split", "ann_file", "metainfo", "with_label")


def load_config(config: str | os.PathLike, cfg_options: dict | None = None):
    """``Config.fromfile`` + ``--cfg-options`` (dotted keys, list indices such as ``pipeline.1.scale``)."""
    from mmengine.config import Config

    if not Path(config).is_file():
        raise DaPMMError(f"config file {config} does not exist; pass one such as configs/mmpretrain/*.py")
    cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _class_folders(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise DaPMMError(
            f"--data-root {root} has no {split}/ folder; expected an ImageFolder tree DIR/{split}/CLASS/IMG"
        )
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not any(f.is_file() for c in classes for f in (folder / c).iterdir()):
        raise DaPMMError(f"no images under {folder}/CLASS/; expected an ImageFolder tree DIR/{split}/CLASS/IMG")
    return classes


def set_data_root(cfg, data_root: str | os.PathLike) -> None:
    """Point the train (``train/``) and val/test (``val/``) loaders at an ImageFolder tree; set the class count.

    mmpretrain's ``CustomDataset`` numbers classes by sorted folder name in each split separately, so ``val/`` must
    have exactly ``train/``'s class folders. Top-k accuracies above the class count are dropped.
    """
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise DaPMMError(f"--data-root {data_root} is not a folder; pass an ImageFolder tree with train/ and val/")
    classes = _class_folders(root, "train")
    val_classes = _class_folders(root, "val")
    if val_classes != classes:
        odd = sorted(set(val_classes) ^ set(classes))[:3]
        raise DaPMMError(
            f"{root}/val/ and {root}/train/ have different class folders (e.g. {odd}); give both the same classes"
        )
    for key, split in (("train_dataloader", "train"), ("val_dataloader", "val"), ("test_dataloader", "val")):
        if cfg.get(key):
            dataset = {k: v for k, v in cfg[key]["dataset"].items() if k not in _WHERE_KEYS}
            cfg[key]["dataset"] = dict(type="CustomDataset", data_root=str(root), data_prefix=split, **dataset)
    cfg.model.head.num_classes = len(classes)
    for preprocessor in (cfg.get("data_preprocessor"), cfg.model.get("data_preprocessor")):
        if preprocessor and "num_classes" in preprocessor:
            preprocessor["num_classes"] = len(classes)
    for key in ("val_evaluator", "test_evaluator"):
        evaluator = cfg.get(key)
        if isinstance(evaluator, dict) and "topk" in evaluator:
            evaluator["topk"] = tuple(k for k in evaluator["topk"] if k <= len(classes)) or (1,)


def prepare_config(
    *,
    config: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    cfg_options: dict | None = None,
    launcher: str = "none",
):
    """The run's resolved config; writes nothing.

    Args:
        config: an mm config with a ``dap`` block, e.g. ``configs/mmpretrain/resnet50_dap75_in1k.py``.
        data_root: an ImageFolder tree with ``train/`` and ``val/`` (see :func:`set_data_root`); ``None`` keeps the
            config's datasets.
        work_dir: default: the config's ``work_dir``, else ``work_dirs/<config name>``.
        resume: ``None`` (new run), ``'auto'`` (the work dir's latest checkpoint) or a checkpoint path.
        cfg_options: ``--cfg-options`` overrides, applied before ``data_root``.
        launcher: ``'none'`` or ``'pytorch'`` (under torchrun).
    """
    cfg = load_config(config, cfg_options)
    if data_root is not None:
        set_data_root(cfg, data_root)
    cfg.work_dir = str(work_dir or cfg.get("work_dir") or Path("work_dirs") / Path(config).stem)
    cfg.launcher = launcher
    if resume is not None:
        if resume != "auto" and not Path(resume).is_file():
            raise DaPMMError(f"--resume {resume} does not exist; pass a checkpoint file or --resume alone")
        if resume == "auto" and not (Path(cfg.work_dir) / "last_checkpoint").is_file():
            raise DaPMMError(f"--resume: {cfg.work_dir} has no last_checkpoint; pass the run's --work-dir")
        cfg.resume, cfg.load_from = True, (None if resume == "auto" else str(resume))
    if launcher == "pytorch" and not _cuda():
        # CPU processes: mmengine's default wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules
        if cfg.get("model_wrapper_cfg") is None:  # broadcast_buffers=False: mmengine's default wrapper setting
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cfg_milestones(param_scheduler) -> tuple[int, ...]:
    items = param_scheduler if isinstance(param_scheduler, (list, tuple)) else [param_scheduler]
    out = set()
    for s in items:
        if isinstance(s, dict) and s.get("type") == "MultiStepLR" and s.get("by_epoch", True):
            out.update(s.get("begin", 0) + int(m) for m in s.get("milestones", ()))
    return tuple(sorted(out))


def check_config(cfg) -> None:
    """Refuse, before anything is built, a config that cannot run DaP (the hook re-checks the built objects)."""
    train_cfg = cfg.get("train_cfg") or {}
    if train_cfg.get("type", "EpochBasedTrainLoop") != "EpochBasedTrainLoop" or not train_cfg.get("by_epoch", True):
        raise DaPMMError(
            f"DaP needs an epoch-based train loop, the config has train_cfg={dict(train_cfg)}; set "
            "train_cfg=dict(by_epoch=True, max_epochs=N)"
        )
    if not isinstance(train_cfg.get("max_epochs"), int):
        raise DaPMMError("train_cfg.max_epochs must be an integer (DaP's schedule counts epochs)")
    resolve_dap(cfg.get("dap"), epochs=train_cfg["max_epochs"], milestones=_cfg_milestones(cfg.get("param_scheduler")))
    hooks = [h.get("type") for h in cfg.get("custom_hooks") or []]
    if not any(getattr(t, "__name__", t) == "DaPHook" for t in hooks):
        raise DaPMMError("custom_hooks has no DaPHook; add dict(type='DaPHook') (configs/mmpretrain/_base_ does)")
    for path, wanted in _WIRING:
        node = cfg
        for key in path.split("."):
            node = (node or {}).get(key)
        got = (node or {}).get("type")
        if getattr(got, "__name__", got) != wanted:
            raise DaPMMError(f"{path}.type is {got!r}; set it to '{wanted}' for DaP")


def check_work_dir(work_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a work dir that holds another DaP run, unless resuming it or told to overwrite it."""
    held = [m for m in RUN_MARKERS if (work_dir / m).exists()]
    if held and not resume and not overwrite:
        raise DaPMMError(
            f"work dir {work_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or another --work-dir"
        )


@contextlib.contextmanager
def _work_dir_lock(work_dir: Path, *, enabled: bool):
    """An advisory lock on WORK_DIR/.dap.lock (rank 0); the OS drops it when the process dies."""
    if not enabled:
        yield
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".dap.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaPMMError(
                f"work dir {work_dir} is in use by another run; wait for it or pass another --work-dir"
            ) from None
        yield


def pretrain_mm(
    *,
    config: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    cfg_options: dict | None = None,
    launcher: str = "none",
    overwrite: bool = False,
) -> dict:
    """Train one DaP run with mmengine's Runner; returns what ``WORK_DIR/run.json`` holds (rank 0 writes it).

    Keyword args are :func:`prepare_config`'s, plus ``overwrite`` (replace a finished run in the work dir).
    Checkpoints under the work dir and the ``--resume`` file load through
    :func:`downstream.compat.trusted_checkpoints` (torch>=2.6 ``weights_only`` vs mmengine's own checkpoints).

    Raises:
        DaPMMError: bad config, data root, work dir or resume; or what the hook refuses once the run is built.
    """
    cfg = prepare_config(
        config=config, data_root=data_root, work_dir=work_dir, resume=resume, cfg_options=cfg_options, launcher=launcher
    )
    check_config(cfg)
    work = Path(cfg.work_dir)
    if launcher == "pytorch" and not _cuda():
        from dap_pretrain.distributed import init_distributed

        init_distributed("cpu")  # gloo; mmengine then skips its init_dist, which calls torch.cuda.set_device
    from mmengine.runner import Runner

    from dap_pretrain.mm.hook import DaPHook
    from downstream.compat import trusted_checkpoints

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with _work_dir_lock(work, enabled=rank0):
        check_work_dir(work, resume=resume is not None, overwrite=overwrite)
        if overwrite and resume is None and rank0:
            for marker in RUN_MARKERS:
                (work / marker).unlink(missing_ok=True)
        runner = Runner.from_cfg(cfg)
        with trusted_checkpoints([work] + ([cfg.load_from] if isinstance(cfg.get("load_from"), str) else [])):
            runner.train()
    return next(h for h in runner.hooks if isinstance(h, DaPHook)).summary
