"""One mmengine DaP pretraining run from a config file: what ``python -m dap_pretrain.mm.train`` calls.

:func:`prepare_config` resolves the config (``--cfg-options``, ``--data-root``, work dir, resume, launcher) and
:func:`check_config` refuses what cannot work before anything is built; :func:`pretrain_mm` then owns the work dir
and runs mmengine's ``Runner``, whose :class:`~dap_pretrain.mm.hook.DaPHook` does the DaP part.
"""

from __future__ import annotations

import os
from pathlib import Path

from dap_pretrain.errors import brief, cause, print_error, refused_on_every_rank
from dap_pretrain.mm.buildable import build_refusal, merge_options
from dap_pretrain.mm.head import head_refusal
from dap_pretrain.mm.loaders import dataloader_refusal
from dap_pretrain.mm.settings import DaPMMError, DaPSettings, resolve_dap, resume_mismatch
from dap_pretrain.mm.work_dir import (
    REPLACED,
    RUN_MARKERS,
    ClearPreviousRun,
    FirstIteration,
    WorkDirSnapshot,
    check_work_dir,
    last_checkpoint_in,
    work_dir_lock,
)
from dap_pretrain.run_folder import inside_class_folders

# dataset keys that name where the data is; --data-root replaces them and keeps the rest (pipeline, indices, ...)
_WHERE_KEYS = ("type", "data_root", "data_prefix", "split", "ann_file", "metainfo", "with_label")


def load_config(config: str | os.PathLike):
    """``Config.fromfile``, with a missing file one line (``--cfg-options`` are merged by :func:`prepare_config`)."""
    from mmengine.config import Config

    if not Path(config).is_file():
        raise DaPMMError(f"config file {config} does not exist; pass one such as configs/mmpretrain/*.py")
    try:
        return Config.fromfile(str(config))
    except SyntaxError as e:  # mmengine parses a .py config with ast before it runs it
        raise DaPMMError(f"config file {config} is not valid Python (line {e.lineno}: {e.msg}); fix it") from None
    except (ValueError, TypeError, OSError) as e:  # a .json/.yaml config mmengine cannot read, a bad _base_
        raise DaPMMError(
            f"config file {config} cannot be read ({cause(e, 200)}); pass an mmengine .py config"
        ) from None


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
    if not isinstance(cfg.get("model"), dict) or not isinstance(cfg.model.get("head"), dict):
        raise DaPMMError(
            "the config has no model.head (a classifier's); start from one of configs/mmpretrain/*.py, e.g. "
            "_base_ = ['resnet18_dap75_in1k.py']"
        )
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
    amp: bool = False,
    validate: bool = True,
    auto_scale_lr: bool = False,
    pin_memory: bool = True,
    persistent_workers: bool = True,
):
    """The run's resolved config; writes nothing.

    Args:
        config: an mm config with a ``dap`` block, e.g. ``configs/mmpretrain/resnet50_dap75_in1k.py``.
        data_root: an ImageFolder tree with ``train/`` and ``val/`` (see :func:`set_data_root`); ``None`` keeps the
            config's datasets.
        work_dir: default: the config's ``work_dir``, else ``work_dirs/<config name>``.
        resume: ``None`` (new run), ``'auto'`` (the work dir's latest checkpoint) or a checkpoint path.
        cfg_options: ``--cfg-options`` overrides, merged after ``data_root`` and ``work_dir`` (so ``work_dir=...``
            beats ``--work-dir``, as in mmpretrain's ``tools/train.py``); the flags below then apply to the merged
            config (mmpretrain applies them before the options: the same result unless an option and a flag set one
            key, where here the flag wins, and ``--no-validate`` beside a ``val_dataloader.*`` option is no
            traceback).
        launcher: ``'none'`` or ``'pytorch'`` (under torchrun).
        amp, validate, auto_scale_lr, pin_memory, persistent_workers: what mmpretrain's ``tools/train.py`` does with
            ``--amp``, ``--no-validate``, ``--auto-scale-lr``, ``--no-pin-memory``, ``--no-persistent-workers``
            (:func:`mmpretrain_defaults`).
    """
    cfg = load_config(config)
    if data_root is not None:
        set_data_root(cfg, data_root)
    cfg.work_dir = str(work_dir or cfg.get("work_dir") or Path("work_dirs") / Path(config).stem)
    cfg.launcher = launcher
    if cfg_options:
        before = cfg.work_dir
        refusal = merge_options(cfg, cfg_options)
        if refusal:
            raise DaPMMError(refusal)
        given = cfg.get("work_dir")  # an empty or None value keeps the folder above, as before the merge
        cfg.work_dir = before if given in (None, "", "None") else str(given)
    mmpretrain_defaults(  # after the options: the flags and loader defaults see the loaders as they will run
        cfg,
        amp=amp,
        validate=validate,
        auto_scale_lr=auto_scale_lr,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
    )
    refusal = dataloader_refusal(cfg)
    if refusal:
        raise DaPMMError(refusal)
    if resume is not None:
        if resume != "auto" and not Path(resume).is_file():
            raise DaPMMError(f"--resume {resume} does not exist; pass a checkpoint file or --resume alone")
    if resume == "auto" and not (Path(cfg.work_dir) / "last_checkpoint").is_file():
        held = [m for m in (*RUN_MARKERS, REPLACED) if (Path(cfg.work_dir) / m).exists()]
        if held:
            raise DaPMMError(
                f"--resume: {cfg.work_dir} holds a run ({', '.join(held)}) but no last_checkpoint; pass --resume CKPT, "
                "or --overwrite without --resume"
            )
        # nothing to resume yet (a requeued job's first start): a new run, as mmpretrain's --resume does
        if _rank0():
            print_error(f"pretrain_mm: --resume: {cfg.work_dir} has no checkpoint yet; starting a new run there")
        resume = None
    if resume is not None:
        cfg.resume, cfg.load_from = True, (None if resume == "auto" else str(resume))
        if resume == "auto":  # a moved or copied work dir resumes from its own copy of the checkpoint
            cfg.load_from = str(last_checkpoint_in(Path(cfg.work_dir), fix="pass --resume CKPT"))
    if launcher == "pytorch" and not _cuda():
        # CPU processes: mmengine's default wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules
        if cfg.get("model_wrapper_cfg") is None:  # broadcast_buffers=False: mmengine's default wrapper setting
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    return cfg


def mmpretrain_defaults(
    cfg, *, amp: bool, validate: bool, auto_scale_lr: bool, pin_memory: bool, persistent_workers: bool
) -> None:
    """What mmpretrain's ``tools/train.py`` adds to every config (its ``merge_args``), so a config trains here as it
    does there: each dataloader gets ``pin_memory=True``, ``persistent_workers=True`` (only where it has workers:
    torch refuses it without) and ``collate_fn=default_collate`` unless the config sets them; ``pin_memory`` /
    ``persistent_workers`` False turn those off, as ``--no-pin-memory`` / ``--no-persistent-workers`` do. ``amp``:
    ``AmpOptimWrapper`` with dynamic loss scaling; ``validate`` False: no validation; ``auto_scale_lr``:
    ``auto_scale_lr.enable=True``. Modifies ``cfg`` in place."""
    if not validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if amp:
        if not _cuda():
            raise DaPMMError("--amp: mmengine's AmpOptimWrapper needs a CUDA GPU, and torch sees none; drop --amp")
        wrapper = cfg.get("optim_wrapper") or {}
        if wrapper.get("type", "OptimWrapper") not in ("OptimWrapper", "AmpOptimWrapper"):
            raise DaPMMError(
                f"--amp replaces optim_wrapper.type, but the config has {wrapper.get('type')!r}; drop --amp or use "
                "OptimWrapper"
            )
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if auto_scale_lr:
        if not cfg.get("auto_scale_lr"):
            raise DaPMMError("--auto-scale-lr: the config has no auto_scale_lr=dict(base_batch_size=N); add it")
        cfg.auto_scale_lr.enable = True
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if not loader:
            continue
        merged = dict(pin_memory=True, persistent_workers=bool(loader.get("num_workers", 0)))
        merged["collate_fn"] = dict(type="default_collate")
        merged.update(loader)
        if not pin_memory:
            merged["pin_memory"] = False
        if not persistent_workers:
            merged["persistent_workers"] = False
        cfg[key] = merged


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _schedulers(cfg) -> list:
    """The config's ``param_scheduler`` entries as a list (one dict, a list, or none)."""
    items = cfg.get("param_scheduler") or []
    return [s for s in (items if isinstance(items, (list, tuple)) else [items]) if isinstance(s, dict)]


def _cfg_milestones(cfg) -> tuple[int, ...]:
    """The epochs where an epoch-based ``MultiStepLR`` of the config decays the LR (DaP's default R)."""
    out = set()
    for s in _schedulers(cfg):
        if s.get("type") == "MultiStepLR" and s.get("by_epoch", True):
            out.update(s.get("begin", 0) + int(m) for m in s.get("milestones", ()))
    return tuple(sorted(out))


def _check_step_lr(cfg, max_epochs: int) -> None:
    """A ``StepLR`` decays every ``step_size`` epochs; DaP's default R (pick all data back up at each LR decay) is
    meant for a few decays, and mmpretrain's own StepLR schedules step every epoch or two, which would leave nothing
    dropped. So with ``dap.reuse`` unset such a schedule is one line asking for R (before, it got none, silently)."""
    if (cfg.get("dap") or {}).get("reuse") is not None:
        return
    for s in _schedulers(cfg):
        if s.get("type") == "StepLR" and s.get("by_epoch", True):
            step, begin = int(s.get("step_size", 0)), int(s.get("begin", 0))
            decays = list(range(begin + step, min(int(s.get("end", max_epochs)), max_epochs), step)) if step > 0 else []
            shown = f"{decays[:4]}{' ...' if len(decays) > 4 else ''}"
            raise DaPMMError(
                f"param_scheduler StepLR decays every {step} epochs ({shown}) and dap.reuse is unset: set the epochs "
                f"where DaP picks all data back up, e.g. dap.reuse={decays[:3]}, or dap.reuse=[] for none"
            )


def _check_schedulers(cfg, *, warmup: int, max_epochs: int) -> None:
    """:func:`~dap_pretrain.mm.hook.check_schedulers` on the config, where the epoch length is not needed: an
    iteration-counting scheduler whose end (default: the run's end) lies past the DaP warm-up."""
    for s in _schedulers(cfg):
        if s.get("convert_to_iter_based") and s.get("end", max_epochs) > warmup:
            end = f"ends at epoch {s.get('end', max_epochs)}"
        elif not s.get("by_epoch", True) and "end" not in s and max_epochs > warmup:
            end = "ends with the run"
        else:  # by_epoch=False with an end in iterations: the hook checks it against the built loader
            continue
        raise DaPMMError(
            f"param_scheduler {s.get('type')} counts iterations (by_epoch=False or convert_to_iter_based=True; {end}) "
            f"but DaP shortens epochs after its warm-up (dap.warmup={warmup} epochs), so its LR would drift from the "
            "full-data run's; use by_epoch=True without convert_to_iter_based"
        )


_SAMPLER_KEYS = ("type", "_scope_", "shuffle", "seed", "drop_last", "round_up")


def _check_sampler_keys(sampler_cfg) -> None:
    """``DaPMMSampler`` takes ``DefaultSampler``'s keys: ``round_up=True`` (pad each epoch to a multiple of the world
    size) is what it does anyway and is dropped; ``round_up=False`` (uneven shards) and any other key are one line
    (the sampler's constructor would raise a ``TypeError`` deep inside the runner)."""
    unknown = sorted(set(sampler_cfg) - set(_SAMPLER_KEYS))
    if unknown:
        raise DaPMMError(
            f"train_dataloader.sampler has {unknown}, which DaPMMSampler does not take; it takes "
            f"{', '.join(_SAMPLER_KEYS[2:])}"
        )
    if "round_up" in sampler_cfg:
        if not sampler_cfg["round_up"]:
            raise DaPMMError(
                "train_dataloader.sampler.round_up=False (uneven shards): DaPMMSampler gives every rank the same "
                "count, padding as round_up=True does, or trimming with drop_last=True; remove round_up=False"
            )
        sampler_cfg.pop("round_up")  # True: what DaPMMSampler does without drop_last


def _check_data_paths(cfg) -> None:
    """The train/val datasets' local folders exist (mmengine would fail with a traceback after building the run)."""
    for key in ("train_dataloader", "val_dataloader"):
        dataset = (cfg.get(key) or {}).get("dataset") or {}
        root = dataset.get("data_root") or ""
        prefix = dataset.get("data_prefix")
        prefix = prefix.get("img_path", "") if isinstance(prefix, dict) else (prefix or dataset.get("split") or "")
        folder = os.path.join(root, prefix) if prefix else root
        for path in dict.fromkeys(p for p in (root, folder) if p):
            if "://" not in path and not Path(path).is_dir():
                raise DaPMMError(
                    f"{key}.dataset: {path} does not exist (relative to {Path.cwd()}); pass --data-root DIR, an "
                    "ImageFolder tree with train/ and val/, or set the dataset's data_root"
                )
        if not dataset.get("ann_file") and "://" not in folder and inside_class_folders(cfg.work_dir, [folder]):
            raise DaPMMError(  # without ann_file, mmpretrain's dataset names a class after each folder there
                f"--work-dir {cfg.work_dir} is inside {folder}, whose folders {key}.dataset reads as classes: the "
                f"work dir would be read as one; pass a --work-dir outside {root}"
            )


def check_config(cfg) -> DaPSettings:
    """Refuse, before anything is built or written, a config that cannot run DaP; returns the resolved dap block.

    The hook re-checks the built objects (the dataset size on resume, an iteration-counting scheduler with an
    explicit end in iterations); :func:`pretrain_mm` then undoes what the runner wrote.
    """
    train_cfg = cfg.get("train_cfg") or {}
    if train_cfg.get("type", "EpochBasedTrainLoop") != "EpochBasedTrainLoop" or not train_cfg.get("by_epoch", True):
        raise DaPMMError(
            f"DaP needs an epoch-based train loop, the config has train_cfg={dict(train_cfg)}; set "
            "train_cfg=dict(by_epoch=True, max_epochs=N)"
        )
    if not isinstance(train_cfg.get("max_epochs"), int):
        raise DaPMMError("train_cfg.max_epochs must be an integer (DaP's schedule counts epochs)")
    settings = resolve_dap(
        cfg.get("dap"),
        epochs=train_cfg["max_epochs"],
        milestones=_cfg_milestones(cfg),
    )
    _check_step_lr(cfg, train_cfg["max_epochs"])
    hooks = [h.get("type") for h in cfg.get("custom_hooks") or []]
    if not any(getattr(t, "__name__", t) == "DaPHook" for t in hooks):
        raise DaPMMError("custom_hooks has no DaPHook; add dict(type='DaPHook') (configs/mmpretrain/_base_ does)")
    sampler_cfg = (cfg.get("train_dataloader") or {}).get("sampler") or {}
    sampler = sampler_cfg.get("type")
    if str(getattr(sampler, "__name__", sampler)).rpartition(".")[2] != "DaPMMSampler":  # also mmpretrain.DaPMMSampler
        raise DaPMMError(f"train_dataloader.sampler.type is {sampler!r}; set it to 'DaPMMSampler' for DaP")
    _check_sampler_keys(sampler_cfg)
    if cfg.get("runner_type", "Runner") not in ("Runner", None):
        raise DaPMMError(
            f"runner_type={cfg.runner_type!r}: DaPHook drives mmengine's Runner, the only runner this front end "
            "builds; remove runner_type"
        )
    checkpoint = (cfg.get("default_hooks") or {}).get("checkpoint") or {}
    if checkpoint and not checkpoint.get("by_epoch", True):
        raise DaPMMError(
            "default_hooks.checkpoint.by_epoch=False: DaP shortens epochs, so mmengine's iteration count never reaches "
            "its planned end and the last checkpoint would not be saved; use by_epoch=True (interval in epochs)"
        )
    refusal = head_refusal(((cfg.get("model") or {}).get("head") or {}).get("type"))
    if refusal:
        raise DaPMMError(refusal)
    if settings.select != "none":
        _check_schedulers(cfg, warmup=settings.config.warmup, max_epochs=settings.config.epochs)
    _check_data_paths(cfg)
    return settings


def checkpoint_to_resume(cfg) -> str | None:
    """The checkpoint ``cfg`` resumes (``load_from``, else the one the work dir's ``last_checkpoint`` names, in a
    moved work dir its own copy: :func:`~dap_pretrain.mm.work_dir.last_checkpoint_in`), else ``None``."""
    if not cfg.get("resume"):
        return None
    if cfg.get("load_from"):
        return str(cfg.load_from)
    own = last_checkpoint_in(Path(cfg.work_dir), fix="pass --resume CKPT")
    return str(own) if own is not None else None


def check_resume(cfg, settings: DaPSettings) -> None:
    """Refuse a ``--resume`` whose checkpoint's DaP run differs from this config's (before anything is built)."""
    path = checkpoint_to_resume(cfg)
    if path is None:
        return
    if not Path(path).is_file():
        raise DaPMMError(f"--resume: {path} (in {cfg.work_dir}/last_checkpoint) does not exist; pass --resume CKPT")
    import torch

    # the file the user resumes, loaded as mmengine's resume will load it (weights_only=False: trusted_checkpoints)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # corrupt, truncated, not a torch file: one line, not torch's traceback
        raise DaPMMError(
            f"--resume: {path} is not a readable checkpoint ({brief(e)}); pass a run's epoch_N.pth"
        ) from None
    if isinstance(ckpt, dict) and "arch" in ckpt and "sampler" in ckpt and "meta" not in ckpt:
        raise DaPMMError(
            f"--resume: {path} is a dap-train checkpoint (tools/pretrain.sh), not an mmengine one; resume it with "
            f"tools/pretrain.sh --resume {path}, or pass a run's epoch_N.pth"
        )
    state = ckpt.get("dap") if isinstance(ckpt, dict) else None
    mismatch = resume_mismatch(state["sampler"], settings) if isinstance(state, dict) else None
    if mismatch:
        raise DaPMMError(mismatch)


def pretrain_mm(
    *,
    config: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    cfg_options: dict | None = None,
    launcher: str = "none",
    overwrite: bool = False,
    check: bool = False,
    **mmpretrain_flags,
) -> dict:
    """Train one DaP run with mmengine's Runner; returns what ``WORK_DIR/run.json`` holds (rank 0 writes it).

    ``check=True``: only the checks made before the runner is built (config, ``dap`` block, data root, ``--resume``
    against the checkpoint, work dir), in this process; returns ``{}`` and writes nothing. ``tools/pretrain_mm.sh``
    runs it before torchrun, so such bad input is one line and exit 2, not one per process and torchrun's report.

    Keyword args are :func:`prepare_config`'s (``mmpretrain_flags``: its ``amp``, ``validate``, ``auto_scale_lr``,
    ``pin_memory``, ``persistent_workers``), plus ``overwrite``: replace a finished run in the work dir; its
    files (:func:`~dap_pretrain.mm.work_dir.previous_run_files`: checkpoints, ``last_checkpoint``, ``run.json``,
    ``summary.csv``, log folders) are set aside once the new run has passed every check and deleted once it has
    saved a checkpoint, as the timm trainer's ``--overwrite`` does; a run that stops before gives them back. A
    refusal leaves the work dir as it was, unless the run had saved a checkpoint.
    Checkpoints under the work dir and the ``--resume`` file load through
    :func:`downstream.compat.trusted_checkpoints` (torch>=2.6 ``weights_only`` vs mmengine's own checkpoints).

    Raises:
        DaPMMError: bad config, data root, work dir or resume; or what the hook refuses once the run is built.
    """
    with refused_on_every_rank():  # from the config, data root, checkpoint and work dir
        cfg = prepare_config(
            config=config,
            data_root=data_root,
            work_dir=work_dir,
            resume=resume,
            cfg_options=cfg_options,
            launcher=launcher,
            **mmpretrain_flags,
        )
        resuming = bool(cfg.get("resume"))  # --resume with nothing to resume yet starts a new run (prepare_config)
        settings = check_config(cfg)
        refusal = build_refusal(cfg, cfg_options)  # an option mmengine would meet only when it builds the run
        if refusal:
            raise DaPMMError(refusal)
        check_resume(cfg, settings)
        work = Path(cfg.work_dir)
        check_work_dir(work, resume=resuming, overwrite=overwrite)
    if check:
        return {}
    train_loader = cfg.get("train_dataloader") or {}
    if (train_loader.get("num_workers") or 0) > 0 and _rank0():
        why = [
            "randomness.seed is None" if (cfg.get("randomness") or {}).get("seed") is None else "",
            "the loader workers persist across epochs" if train_loader.get("persistent_workers") else "",
        ]
        if any(why):  # both as in mmpretrain; the augmentation after a --resume is then drawn afresh
            print_error(
                f"pretrain_mm: {' and '.join(w for w in why if w)}, so a --resume will not repeat the augmentation, "
                "losses and subsets exactly; for that, set randomness.seed and pass --no-persistent-workers"
            )
    if launcher == "pytorch" and not _cuda():
        from dap_pretrain.distributed import init_distributed

        init_distributed("cpu")  # gloo; mmengine then skips its init_dist, which calls torch.cuda.set_device
    from mmengine.runner import Runner

    from dap_pretrain.mm.hook import DaPHook
    from downstream.compat import trusted_checkpoints

    rank0 = _rank0()
    before = WorkDirSnapshot.take(work) if rank0 else None
    with work_dir_lock(work, enabled=rank0):
        check_work_dir(work, resume=resuming, overwrite=overwrite)
        for stale in work.glob("*.dap.tmp") if rank0 else ():  # a checkpoint update killed mid-write (kill -9)
            stale.unlink()
        clear, first = None, FirstIteration()
        try:
            runner = Runner.from_cfg(cfg)
            runner.register_hook(first)
            if overwrite and not resuming and rank0:  # once DaPHook has accepted the built run
                clear = ClearPreviousRun(work_dir=work, keep=(runner.timestamp,))
                runner.register_hook(clear, priority="LOWEST")
            with trusted_checkpoints([work] + ([cfg.load_from] if isinstance(cfg.get("load_from"), str) else [])):
                runner.train()
        except BaseException as e:
            if clear is not None:
                clear.undo()  # stopped before its first checkpoint: the previous run comes back
            if before is not None and (isinstance(e, DaPMMError) or not first.reached):
                before.restore()  # a refusal, or a failure before training, that saved no checkpoint: as it was
            unfit = "size mismatch" in str(e) or "parameter group that doesn't match" in str(e)
            if resuming and not first.reached and not isinstance(e, DaPMMError) and unfit:  # mmengine's resume
                raise DaPMMError(
                    f"--resume: the checkpoint's weights do not fit this config's model ({brief(e)}); resume with the "
                    "config the run was started with"
                ) from None
            raise
    return next(h for h in runner.hooks if isinstance(h, DaPHook)).summary
