"""One training run, wired from resolved arguments: what ``dap-train`` does after parsing.

Each ``_build_*`` helper makes one component; :func:`run` owns the epoch loop, the compute
accounting and the checkpoints. Epoch numbers in logs, ``summary.csv`` and ``run.json`` are
1-based (the paper's); ``set_epoch`` and the LR progress use 0-based epochs (torch's).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dap_pretrain.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    checkpoint_in_folder,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)
from dap_pretrain.config import (
    AUGMENT_FLAGS,
    DERIVED_SETTINGS,
    EVAL_FLAGS,
    MODEL_FLAGS,
    RunConfig,
    args_yaml,
    cli_flags,
    dap_config_from_args,
    default_reuse,
    given_kwargs,
    merged_kwargs,
    mixing,
    optimizer_kwargs,
    scaled_lr,
)
from dap_pretrain.cuda_graph import GraphedSGDStep, check_graphable
from dap_pretrain.data.dataset import (
    IndexedDataset,
    check_batch_size,
    create_dataset,
    dataset_classes,
    dataset_prefix,
    embedded_data_dir,
    split_folder,
)
from dap_pretrain.data.gpu_decode import GpuDecodeLoader, dataset_samples
from dap_pretrain.data.infobatch import InfoBatchSampler
from dap_pretrain.data.loader import create_loader, trainer_transform, uses_cifar_aug
from dap_pretrain.data.memory import decoded_bytes, in_memory_loaders
from dap_pretrain.data.sampler import DaPSampler
from dap_pretrain.distributed import barrier, cuda_speed_flags, init_distributed, pick_threads, rank0_outcome
from dap_pretrain.engine import evaluate, train_one_epoch
from dap_pretrain.errors import UsageError, brief, cause, on_every_rank, one_line, stopped, user_input
from dap_pretrain.logs import HeldLogs, main_process_logging
from dap_pretrain.lr import EpochProgressLR
from dap_pretrain.mixing import Mixer
from dap_pretrain.reporting import Accounting, log_epoch, subset_digest, write_summary_csv
from dap_pretrain.run_folder import (
    REPLACED,
    claim_output,
    drop_replaced,
    git_commit,
    inside_class_folders,
    release_unused,
    restore_replaced,
    take_over,
)
from dap_pretrain.schedule import plan

_logger = logging.getLogger("dap_pretrain.train")
_INIT_LOCK = threading.Lock()  # global-RNG seeding + model init (dap_pretrain.multirun runs share a process)
RESUME_KEYS = ("epoch", "optimizer", "lr_scheduler", "sampler", "accounting", "history")


@dataclass
class Data:
    train: IndexedDataset
    val: IndexedDataset | None
    num_classes: int
    mean: tuple
    std: tuple
    img_size: int = 224
    cifar_aug: bool = False


def _build_model(cfg, num_classes: int, device: torch.device):
    import timm

    import dap_pretrain.models  # noqa: F401  (registers cifar_* with timm)

    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:5]
        raise UsageError(f"unknown model '{cfg.model}'; pass a timm model name (e.g. {', '.join(close) or 'resnet50'})")
    own = sorted({"num_classes", "pretrained"} & set(cfg.model_kwargs))
    if own:
        fix = "; drop it" + (" and pass --num-classes" if "num_classes" in own else "")
        raise UsageError(f"--model-kwargs sets {', '.join(own)}, which the trainer sets itself{fix}")
    kwargs = merged_kwargs(given_kwargs(cfg, MODEL_FLAGS), cfg.model_kwargs, flag="--model-kwargs")
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e) or not kwargs:
            raise
        named = [cli_flags([f]) for f, kw in MODEL_FLAGS.items() if kw in kwargs and f"'{kw}'" in str(e)]
        named += [f"--model-kwargs {kw}" for kw in cfg.model_kwargs if f"'{kw}'" in str(e)]
        named = named or [cli_flags([f]) for f, kw in MODEL_FLAGS.items() if kw in kwargs]
        flags = ", ".join(named or ["--model-kwargs"])
        raise UsageError(f"model {cfg.model} does not take {flags} ({e}); drop the flag for this model") from None
    if cfg.initial_checkpoint:
        _load_initial(model, cfg.initial_checkpoint, model_name=cfg.model)
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise UsageError(
                f"model {cfg.model} has no gradient checkpointing ({one_line(e) or type(e).__name__}); drop "
                "--grad-checkpointing"
            ) from None
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _load_initial(model, path: str, *, model_name: str) -> None:
    """timm's ``--initial-checkpoint``: ``path``'s weights into ``model`` (timm's ``load_state_dict``: a state dict,
    ``.safetensors``, or a checkpoint whose ``state_dict_ema``/``state_dict`` it picks).

    Every key must fit, as timm's ``load_checkpoint`` demands, except the classifier's: a file without one (an
    export's ``backbone.pth``) or with another class count (``model.safetensors`` of a 1000-class run, for a
    10-class one) leaves this run's classifier as initialised, and the log says so. A missing file, a folder, or
    weights of another model are one line.
    """
    from timm.models import load_state_dict

    from dap_pretrain.export import classifier_prefixes

    if Path(path).is_dir():  # a run folder: its last checkpoint; else an export's or release's weights file
        example = checkpoint_in_folder(Path(path)) or Path(path) / "model.safetensors"
        raise UsageError(f"--initial-checkpoint {path} is a folder; pass a weights file, e.g. {example}")
    if not Path(path).is_file():
        raise UsageError(f"--initial-checkpoint {path} does not exist; pass a weights file")
    own = model.state_dict()
    try:
        state = load_state_dict(path)
    except Exception as e:  # truncated, a Git LFS pointer, an HTML page, unreadable: not the model's fault
        why = brief(e)
        if "weights_only" in str(e):  # torch's text here advises unsafe loading; not repeated
            why = "a safe load refuses it: it pickles Python objects, or is no torch file (e.g. a saved web page)"
        raise UsageError(
            f"--initial-checkpoint {path} is not a readable weights file ({why}); download it again (a Git LFS "
            "pointer or a web page is not weights), or save the weights alone: torch.save(state_dict) or .safetensors"
        ) from None
    try:
        head = classifier_prefixes(model_name)
        fresh = sorted(k for k in own if k.startswith(head) and (k not in state or state[k].shape != own[k].shape))
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
        missing = sorted(set(missing) - set(fresh))
        unexpected = [k for k in unexpected if not k.startswith(head)]
        if missing or unexpected:
            shown = ", ".join((missing + unexpected)[:4]) + (" ..." if len(missing) + len(unexpected) > 4 else "")
            raise RuntimeError(f"missing {len(missing)} and unexpected {len(unexpected)} keys: {shown}")
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(
            f"--initial-checkpoint {path} does not fit model {model_name} ({one_line(e)[:300]}); pass weights of "
            f"a {model_name}"
        ) from None
    kept = ""
    if fresh:
        other = "another" if any(k in state for k in fresh) else "no"
        kept = f"; classifier ({', '.join(fresh)}) as initialised: the file has {other} classifier for it"
    _logger.info("initial weights from %s (--initial-checkpoint)%s", path, kept)


def _planned_text(cfg, fraction: float, *, lead: str = "planned ") -> str:
    """The planned compute for the log: InfoBatch's depends on the losses, so without a target it is a bound."""
    if cfg.dap_select == "infobatch" and cfg.infobatch_target_compute is None:
        return f"{lead}at most {fraction:.2%} (InfoBatch prunes by the losses as it goes)"
    return f"{lead}{fraction:.2%}"


def _check_sync_bn(cfg, *, device: torch.device, world: int) -> None:
    """Refuse ``--sync-bn`` where torch cannot run it (several CPU processes), before any data is read."""
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError(
            f"--sync-bn needs GPUs: torch's SyncBatchNorm does not run on {device.type} processes; drop it "
            "(--dist-bn still gives every process the same BatchNorm statistics after each epoch)"
        )


def _batchnorm_across_processes(model, cfg, *, world: int):
    """timm's ``--sync-bn`` under DDP: the model with its BatchNorm layers (timm's ``BatchNormAct2d`` included) as
    ``SyncBatchNorm``, the same parameters and state-dict keys, so checkpoints and exports do not change.
    Returns the model to train and one line for the log ("" for a model without BatchNorm)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, ""
    if world == 1:
        return model, "--sync-bn: one process, nothing to synchronise; BatchNorm left as it is" if cfg.sync_bn else ""
    if cfg.sync_bn:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model), f"BatchNorm: statistics of the global batch over {world} processes"
    if cfg.dist_bn:
        how = "averaged over" if cfg.dist_bn == "reduce" else "copied from rank 0 to"
        return model, f"BatchNorm: running statistics {how} all {world} processes after each epoch (--dist-bn)"
    return model, "BatchNorm: each process keeps its own running statistics (--dist-bn ''); rank 0's are saved"


def _equal_batchnorm(models, cfg, *, world: int) -> None:
    """timm's ``--dist-bn`` after an epoch: every process's BatchNorm running statistics made the same, so each
    rank evaluates its shard with the model that rank 0 saves, and a resumed run continues from what every rank
    held. ``models``: the model and its EMA (or ``None``)."""
    if world == 1 or not cfg.dist_bn:
        return
    from timm.utils import distribute_bn

    for m in models:
        if m is not None:
            distribute_bn(m, world, reduce=cfg.dist_bn == "reduce")


def _build_optimizer(cfg, model):
    """timm's ``create_optimizer_v2`` with :func:`optimizer_kwargs`; an option the optimizer lacks is one line."""
    import difflib

    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.opt_betas is not None and len(cfg.opt_betas) not in (2, 3):
        raise UsageError(
            f"--opt-betas takes 2 values (3 for adan), not {len(cfg.opt_betas)}: e.g. --opt-betas 0.9 0.999"
        )
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg))
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UsageError(f"--opt {cfg.opt} does not take one of the options given ({e}); drop it") from None
    except (ValueError, AssertionError, ImportError, IndexError) as e:  # timm's registry, a CUDA-only or bnb one
        if "not found in registry" in str(e):
            close = difflib.get_close_matches(cfg.opt.lower(), list_optimizers(), n=3) or ["sgd", "adamw"]
            raise UsageError(f"--opt {cfg.opt} is not a timm optimizer; e.g. --opt {', '.join(close)}") from None
        raise UsageError(
            f"--opt {cfg.opt} refused this run's settings ({cause(e)}); check --opt-eps/--opt-betas/--opt-kwargs, "
            "or choose another --opt (timm's fused/apex ones need CUDA, bnb ones bitsandbytes)"
        ) from None


def _compiled(module, *, backend: str, mode: str | None):
    """``torch.compile(module)`` (timm's ``--torchcompile``); an unknown backend or mode is a UsageError."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        names = ", ".join(torch._dynamo.list_backends())
        raise UsageError(f"--torchcompile {backend} is not a torch.compile backend; choose one of {names}")
    try:
        return torch.compile(module, backend=backend, mode=mode)
    except RuntimeError as e:
        raise UsageError(f"--torchcompile-mode {mode}: {e}; drop it or pass a valid mode") from None


def _build_data(cfg, model_cfg: dict) -> Data:
    if cfg.data_dir == "embedded" and dataset_prefix(cfg.dataset) in ("torch", "hfds"):
        raise UsageError(  # else torchvision or Hugging Face would download into the embedded sample's extraction
            f"--dataset {cfg.dataset} reads --data-dir as its download or cache folder, and this run's is the "
            "embedded sample; pass --data-dir DIR"
        )
    root = str(embedded_data_dir()) if cfg.data_dir == "embedded" else cfg.data_dir
    if not dataset_prefix(cfg.dataset) and os.path.isdir(root):  # an ImageFolder tree: class folders per split
        splits = [s for s in (cfg.train_split, cfg.val_split) if s]
        inside = inside_class_folders(cfg.output, [split_folder(Path(root), s) for s in splits])
        if inside is not None:
            raise UsageError(
                f"--output {cfg.output} is inside {inside}, whose folders the trainer reads as classes: the run's "
                f"folder would be read as one; pass an --output outside {root}"
            )
    extra = {"download": True} if cfg.dataset_download else {}
    train = create_dataset(name=cfg.dataset, root=root, split=cfg.train_split, is_training=True, **extra)
    val = (
        create_dataset(
            name=cfg.dataset,
            root=root,
            split=cfg.val_split,
            is_training=False,
            class_to_idx=dataset_classes(train),  # the train split's labels, so an empty val class cannot shift them
            **extra,
        )
        if cfg.val_split
        else None
    )
    if cfg.val_split and cfg.val_split == cfg.train_split:
        _logger.warning(
            "--val-split %s is the training split: top-1 then measures the images it trains on, not held-out ones; "
            "pass another split, or --val-split '' to skip evaluation",
            cfg.val_split,
        )
    img_size = cfg.img_size or model_cfg.get("input_size", (3, 224, 224))[-1]
    cifar = uses_cifar_aug(img_size=img_size, aug=cfg.aug)
    aug, evaluation = given_kwargs(cfg, AUGMENT_FLAGS), given_kwargs(cfg, EVAL_FLAGS)
    if cifar and (aug or evaluation):
        flags = [f for f in (*AUGMENT_FLAGS, *EVAL_FLAGS) if getattr(cfg, f) is not None]
        raise UsageError(
            f"{cli_flags(flags)} set timm's ImageNet transforms, but this run uses the CIFAR one (pad-4 crop + flip; "
            f"--aug {cfg.aug} at {img_size} px); pass --aug imagenet or drop them"
        )
    mean = tuple(cfg.mean or model_cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(cfg.std or model_cfg.get("std", IMAGENET_DEFAULT_STD))
    try:
        kwargs = dict(img_size=img_size, aug=cfg.aug, mean=mean, std=std)
        train.transform = trainer_transform(is_training=True, **kwargs, **aug)
        if val is not None:
            val.transform = trainer_transform(img_size=img_size, aug=cfg.aug, is_training=False, **evaluation)
    except (AssertionError, KeyError, ValueError) as e:  # timm asserts on an unknown policy, a KeyError on a mode
        given = [f for f in (*AUGMENT_FLAGS, *EVAL_FLAGS) if getattr(cfg, f) is not None]
        values = {f: getattr(cfg, f) for f in given}
        shown = " ".join(f"{cli_flags([f])} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                         for f, v in values.items())  # fmt: skip
        raise UsageError(
            f"timm's transform cannot take {shown} ({cause(e)}); e.g. --aa rand-m9-mstd0.5-inc1 (or augmix-m5-w3, "
            "v0), an interpolation bilinear or bicubic (random: --train-interpolation only)"
        ) from None
    classes = getattr(getattr(train, "reader", None), "class_to_idx", None) or getattr(train, "class_to_idx", None)
    num_classes = cfg.num_classes or (len(classes) if classes else 1000)
    if classes and num_classes < len(classes):  # else the loss fails at the first step on a label past the head
        raise UsageError(
            f"--num-classes {num_classes} is fewer than the {len(classes)} classes of {cfg.data_dir}; pass "
            f"--num-classes {len(classes)} or more, or leave it out to take the data's"
        )
    return Data(
        IndexedDataset(train), IndexedDataset(val) if val is not None else None, num_classes, mean, std, img_size, cifar
    )


def _build_sampler(cfg, num_samples: int, world: int, rank: int) -> tuple[DaPSampler, Accounting, dict, str | None]:
    dap_cfg, note = dap_config_from_args(cfg, num_samples=num_samples, default_reuse=default_reuse(cfg))
    initial = None
    if cfg.fixed_subset is not None:
        g = torch.Generator().manual_seed(cfg.seed)
        k = max(1, round(cfg.fixed_subset * num_samples))
        initial = torch.randperm(num_samples, generator=g)[:k]
    common = dict(num_replicas=world, rank=rank, seed=cfg.seed, drop_last=cfg.drop_last)
    if cfg.dap_select == "infobatch":
        sampler = InfoBatchSampler(
            num_samples,
            epochs=cfg.epochs,
            ratio=cfg.infobatch_ratio,
            delta=cfg.infobatch_delta,
            target_compute=cfg.infobatch_target_compute,
            **common,
        )
    else:
        sampler = DaPSampler(num_samples, config=dap_cfg, select=cfg.dap_select, initial_subset=initial, **common)
    if cfg.dap_select == "infobatch":  # data-dependent: the target if one is set, else an upper bound
        planned = round((cfg.infobatch_target_compute or 1.0) * cfg.epochs * num_samples)
    elif cfg.dap_select == "none":
        planned = cfg.epochs * sampler.subset.numel()
    else:
        planned = plan(dap_cfg, num_samples).samples_trained
    acct = Accounting(num_samples=num_samples, baseline_epochs=cfg.baseline_epochs, planned=planned)
    dap = {
        **dap_cfg.to_dict(),
        "select": cfg.dap_select,
        "epochs_scale": cfg.epochs_scale,
        "fixed_subset": cfg.fixed_subset,
        "seed": cfg.seed,  # the sampler's: its order, subsets and random choices
    }
    if cfg.dap_select == "infobatch":
        dap["infobatch"] = {
            "ratio": cfg.infobatch_ratio,
            "delta": cfg.infobatch_delta,
            "target_compute": cfg.infobatch_target_compute,
        }
    return sampler, acct, dap, note


def use_in_memory(cfg, data: Data) -> bool:
    """Whether the in-memory path applies: ``--in-memory on``, or ``auto`` with the CIFAR augmentation and room."""
    if cfg.in_memory == "off":
        return False
    n = len(data.train) + (len(data.val) if data.val is not None else 0)
    size_mb = decoded_bytes(n, data.img_size) / 2**20
    if cfg.in_memory == "on":
        if not data.cifar_aug:
            raise UsageError(
                "--in-memory on applies the CIFAR augmentation (pad-4 crop + flip); pass --aug cifar, or "
                "--in-memory off for timm's ImageNet augmentation"
            )
        if size_mb > cfg.in_memory_max_mb:
            raise UsageError(
                f"the decoded data needs {size_mb:.0f} MiB, over --in-memory-max-mb {cfg.in_memory_max_mb:.0f}; "
                "raise it or pass --in-memory off"
            )
        return True
    return data.cifar_aug and size_mb <= cfg.in_memory_max_mb


def _build_loaders(cfg, data: Data, sampler, *, device, rank: int, world: int):
    """Train and val loaders: the in-memory path (see :func:`use_in_memory`), the GPU JPEG pipeline for the train
    split (``--gpu-decode``), or JPEG decoding in workers."""
    val_batch = cfg.validation_batch_size or cfg.batch_size
    val_indices = range(rank, len(data.val), world) if data.val is not None else None
    if not cfg.gpu_decode and use_in_memory(cfg, data):
        return in_memory_loaders(
            data.train,
            data.val,
            img_size=data.img_size,
            sampler=sampler,
            val_indices=val_indices,
            batch_size=cfg.batch_size,
            val_batch_size=val_batch,
            mean=data.mean,
            std=data.std,
            device=device,
            seed=cfg.seed,
            rank=rank,
            workers=cfg.workers,
            drop_last=cfg.drop_last,
            channels_last=cfg.channels_last,
        )
    if cfg.gpu_decode:
        train_loader = _gpu_decode_loader(cfg, data, sampler, device=device)
    else:
        train_loader = create_loader(
            data.train,
            batch_size=cfg.batch_size,
            sampler=sampler,
            mean=data.mean,
            std=data.std,
            device=device,
            num_workers=cfg.workers,
            drop_last=cfg.drop_last,
            channels_last=cfg.channels_last,
            seed=cfg.seed,  # per-sample augmentation seeds: the same on every rank and worker count
        )
    val_loader = None
    if data.val is not None:
        val_loader = create_loader(
            data.val,
            batch_size=val_batch,
            sampler=val_indices,
            mean=data.mean,
            std=data.std,
            device=device,
            num_workers=cfg.workers,
            channels_last=cfg.channels_last,
        )
    return train_loader, val_loader


_GPU_AUGMENT = ("scale", "ratio", "hflip", "color_jitter")  # the augmentation keywords GpuDecodeLoader takes


def _gpu_decode_augment(cfg) -> dict:
    """The augmentation flags given, as :class:`GpuDecodeLoader` keywords; one it cannot apply is a UsageError."""
    aug = given_kwargs(cfg, AUGMENT_FLAGS)
    if aug.get("interpolation") == "bilinear":  # what the GPU crop computes anyway
        del aug["interpolation"]
    unsupported = set(aug) - set(_GPU_AUGMENT)
    if unsupported:
        flags = cli_flags(f for f, kw in AUGMENT_FLAGS.items() if kw in unsupported)
        raise UsageError(
            f"--gpu-decode applies RandomResizedCrop (bilinear), flip and colour jitter only, not {flags}; drop "
            "them or drop --gpu-decode (the loader workers then apply timm's whole transform)"
        )
    return aug


def _gpu_decode_device(device: torch.device) -> None:
    """Refuse ``--gpu-decode`` off CUDA (the pipeline's own code runs on CPU tensors too, which tests use)."""
    if device.type != "cuda":
        raise UsageError(
            f"--gpu-decode decodes JPEGs with nvjpeg on a CUDA GPU, and this run's device is {device}; "
            "drop --gpu-decode (the loader workers then decode with PIL)"
        )


def _gpu_decode_loader(cfg, data: Data, sampler, *, device) -> GpuDecodeLoader:
    """``--gpu-decode``: the train split decoded and augmented on the GPU; refused off CUDA or with CIFAR's aug."""
    aug = _gpu_decode_augment(cfg)
    _gpu_decode_device(device)
    if data.cifar_aug:
        raise UsageError(
            "--gpu-decode applies timm's ImageNet augmentation (RandomResizedCrop); pass --aug imagenet, or drop "
            "--gpu-decode for the CIFAR augmentation"
        )
    return GpuDecodeLoader(
        dataset_samples(data.train),
        **aug,
        sampler=sampler,
        batch_size=cfg.batch_size,
        img_size=data.img_size,
        mean=data.mean,
        std=data.std,
        device=device,
        num_workers=cfg.workers,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        channels_last=cfg.channels_last,
        # batches in the AMP dtype, which the first layer casts to anyway: the model fed by the pipeline ran 5%
        # faster on an H100 (RESULTS section 9, run 6); pinned bytes and nested padding did not help the trainer
        dtype=_amp_dtype(cfg, device) or torch.float32,
    )


def _subset_fix(cfg) -> str:
    """What to change when the smallest subset is below a ``--drop-last`` batch (:func:`check_batch_size`)."""
    if cfg.dap_select != "infobatch":
        return "raise --dap-keep"
    if cfg.infobatch_target_compute is not None:
        return "drop --infobatch-target-compute (its calibrated ratio may reach 0.95)"
    return "lower --infobatch-ratio"


def _smallest_subset(cfg, sampler) -> int | None:
    """The fewest samples any epoch will train (InfoBatch's: the fewest it can keep, whatever the losses)."""
    if cfg.dap_select == "infobatch":
        return sampler.fewest_samples()
    if cfg.dap_select == "none" or sampler.config is None:
        return sampler.subset.numel()
    return min(plan(sampler.config, sampler.num_samples).subset_sizes)


def _amp_dtype(cfg, device) -> torch.dtype | None:
    """The autocast dtype: ``None`` without ``--amp``, bfloat16 on the CPU, else ``--amp-dtype``."""
    if not cfg.amp:
        return None
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16


def _amp(cfg, device):
    """``(autocast dtype or None, GradScaler or None)``: a scaler for float16 only."""
    dtype = _amp_dtype(cfg, device)
    return dtype, (torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)


def _gather_rng(world: int, digest: str) -> list:
    """Every rank's RNG state (for the checkpoint), checking on the way that all ranks hold the same subset."""
    state = rng_state()
    if world == 1:
        return [state]
    out = [None] * world
    dist.all_gather_object(out, (state, digest))
    digests = {d for _, d in out}
    if len(digests) > 1:
        raise RuntimeError(f"DDP ranks disagree on the DaP subset ({sorted(digests)}); this is a bug, please report it")
    return [s for s, _ in out]


def _mixer(cfg, *, rank: int) -> Mixer | None:
    """timm's Mixup/CutMix from the trainer's flags (None when neither is on)."""
    if not mixing(cfg):
        return None
    return Mixer(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        cutmix_minmax=tuple(cfg.cutmix_minmax) if cfg.cutmix_minmax is not None else None,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        seed=cfg.seed,
        rank=rank,
        off_epoch=cfg.mixup_off_epoch,
    )


def _check_input_size(model, cfg, *, img_size: int, device: torch.device) -> None:
    """One forward of a zero image at the run's input size, in eval mode (no statistics, no random draws), so a
    model that cannot take it is one line before anything is written: timm's ViTs are built for their pretrained
    size unless given ``img_size``, and deep networks fail on inputs smaller than their total stride. timm's
    train.py meets both at the first training step, with a traceback."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except (RuntimeError, AssertionError, ValueError) as e:
        given = cfg.model_kwargs.get("img_size")
        sized = "channels" not in str(e) and any(w in str(e) for w in ("size", "Input height", "Input width"))
        if given is not None and given != img_size:
            fix = f"pass --img-size {given} to match --model-kwargs img_size={given}"
        elif sized and "img_size" in inspect.signature(type(model).__init__).parameters:
            fix = f"pass --model-kwargs img_size={img_size} (the model's own input size is fixed when built)"
        elif sized:
            fix = "pass a larger --img-size"
        else:
            fix = "check --model-kwargs (3-channel images are fed) and --img-size"
        raise UsageError(f"model {cfg.model} fails on one {img_size} px RGB image ({brief(e, 200)}); {fix}") from None
    finally:
        model.train(was_training)


def _seeded_model(cfg, num_classes: int, device: torch.device, rank: int):
    """Seed the global RNGs and build the model under one lock, so runs sharing a process init reproducibly."""
    with _INIT_LOCK:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)
        return _build_model(cfg, num_classes, device)


# What a resumed run must keep: the sampler's state, schedule and accounting were made with these. Each resolved
# sampler setting (see :func:`_sampler_settings`) -> the flags that set it, as setting names of the config.
_SAMPLER_FLAGS = {
    "epochs": ("epochs", "epochs_scale"),
    "warmup": ("dap_warmup",),
    "interval": ("dap_interval",),
    "keep": ("dap_keep", "dap_target_compute"),
    "active": ("dap_active",),
    "reuse": ("dap_reuse", "decay_milestones", "decay_epochs", "sched"),
    "select": ("dap_select", "fixed_subset", "epochs_scale"),
    "ratio": ("infobatch_ratio",),
    "delta": ("infobatch_delta",),
    "target_compute": ("infobatch_target_compute",),
    "seed": ("seed",),
}
# The optimizer's state is only valid for the optimizer and parameter groups that made it.
_OPTIMIZER_FLAGS = ("opt", "weight_decay", "layer_decay", "opt_kwargs", "opt_betas", "opt_eps", "momentum")
# where and how a run starts, not what it is
_NOT_COMPARED = ("resume", "output", "overwrite", *DERIVED_SETTINGS)


def _plain(value):
    """``value`` with tuples as lists (a checkpoint's args hold lists), for comparing settings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value) -> str:
    """A setting's value as typed on the command line: lists space-separated, ``none`` for unset."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(_shown, value)) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def _differing_flags(had: dict, cfg, names) -> list[str]:
    """The settings among ``names`` whose value in this run differs from the checkpoint's args ``had`` (settings
    the checkpoint did not record are skipped)."""
    now = cfg.to_dict()
    return [n for n in names if n in had and n in now and _plain(now[n]) != _plain(had[n])]


def _sampler_settings(state: dict) -> dict:
    """What a sampler state was made with: the DaP config, the policy, InfoBatch's parameters and the seed (one flat
    dict)."""
    settings = dict(state.get("config") or {})
    settings["select"] = state.get("select")
    if "seed" in state:  # the sampler's order and subsets; the loaders seed each sample's augmentation with it too
        settings["seed"] = state["seed"]
    if state.get("infobatch") is not None:
        settings["select"] = "infobatch"
        settings.update({k: state["infobatch"].get(k) for k in ("epochs", "ratio", "delta", "target_compute")})
    return settings


def _check_same_data(ckpt: dict, ckpt_path, *, cfg, sampler, files: str | None) -> None:
    """Refuse a checkpoint made on a dataset of another size, or on other files (``files``: this run's
    :meth:`~dap_pretrain.data.dataset.IndexedDataset.file_digest`; checkpoints without one are checked by size
    only): its sampler state indexes that dataset, so its kept subset would name other images."""
    had = ckpt.get("args") or {}
    saved = int(ckpt["sampler"]["num_samples"])
    where = f"--data-dir {had['data_dir']}" if had.get("data_dir") else "its data"
    split = f" --train-split {had['train_split']}" if had.get("train_split") not in (None, cfg.train_split) else ""
    if saved == sampler.num_samples:
        if ckpt.get("files_digest") and files and ckpt["files_digest"] != files:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was trained on other files than this run's --data-dir {cfg.data_dir} "
                f"(both {saved} samples, but other file names or labels); resume with {where}{split}, or start a new "
                f"run from its weights with --initial-checkpoint {ckpt_path}"
            )
        return
    raise CheckpointError(
        f"checkpoint {ckpt_path} was trained on {saved} samples ({where}), this run's --data-dir {cfg.data_dir} has "
        f"{sampler.num_samples}; resume with {where}{split}, or start a new run from its weights with "
        f"--initial-checkpoint {ckpt_path}"
    )


def _check_same_sampler(ckpt: dict, ckpt_path, *, cfg, sampler) -> None:
    """Refuse to continue a checkpoint with other DaP / InfoBatch settings, naming the flags that differ."""
    had = ckpt.get("args") or {}
    saved, now = _sampler_settings(ckpt["sampler"]), _sampler_settings(sampler.state_dict())
    changed = [k for k in sorted(set(saved) | set(now)) if _plain(saved.get(k)) != _plain(now.get(k))]
    if not changed:
        return
    flags: list[str] = []
    for key in changed:
        named = [f for f in _differing_flags(had, cfg, _SAMPLER_FLAGS.get(key, ())) if f not in flags]
        flags += named
        if not named and not any(f in flags for f in _SAMPLER_FLAGS.get(key, ())):  # an older checkpoint: no args
            flags.append(key)
    now_cfg = cfg.to_dict()
    parts = [
        f"{cli_flags([f])} {_shown(now_cfg[f])}, the checkpoint's {_shown(had[f])}"
        if f in had and f in now_cfg
        else f"DaP {f} {_shown(now.get(f))}, the checkpoint's {_shown(saved.get(f))}"
        for f in flags
    ]
    config = ""
    if had.get("config") and had.get("config") != getattr(cfg, "config", None):
        config = f" (it was started with --config {had['config']}, e.g. by tools/pretrain.sh: pass that too)"
    longer = "epochs" in changed and "epochs" in now and "epochs" in saved and now["epochs"] > saved["epochs"]
    fix = (
        "; a run cannot be extended with more epochs: to train on, start a new run with "
        if longer
        else ", or start a new run from its weights with "
    )
    raise CheckpointError(
        f"checkpoint {ckpt_path} was trained with other data-selection settings: {'; '.join(parts)}; resume with the "
        f"checkpoint's flags{config}{fix}--initial-checkpoint {ckpt_path}"
    )


def _check_same_optimizer(ckpt: dict, ckpt_path, *, cfg, optimizer) -> None:
    """Refuse an optimizer state this run's optimizer cannot continue: another ``--opt`` (its momentum buffers or
    Adam moments are that optimizer's), or other parameter groups (``--weight-decay 0``, ``--layer-decay``)."""
    had = ckpt.get("args") or {}
    if had.get("opt") is not None and str(had["opt"]).lower() != str(cfg.opt).lower():
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained with --opt {had['opt']}, this run has --opt {cfg.opt}; resume with "
            f"--opt {had['opt']} (the checkpoint holds {had['opt']}'s state), or start a new run from its weights "
            f"with --initial-checkpoint {ckpt_path}"
        )
    saved = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if saved == now:
        return
    now_cfg = cfg.to_dict()
    differing = _differing_flags(had, cfg, _OPTIMIZER_FLAGS)
    named = [f"{cli_flags([f])} {_shown(now_cfg[f])}, the checkpoint's {_shown(had[f])}" for f in differing]
    what = "; ".join(named) or f"parameter groups of sizes {_shown(now)}, the checkpoint's {_shown(saved)}"
    raise CheckpointError(
        f"checkpoint {ckpt_path}'s optimizer state does not fit this run's optimizer ({what}); resume with the "
        f"checkpoint's optimizer flags, or start a new run from its weights with --initial-checkpoint {ckpt_path}"
    )


def _log_changed_flags(ckpt: dict, cfg) -> list[str]:
    """Log, in one line, each flag this resumed run sets differently from the checkpoint's args (allowed, as timm
    allows them: ``--lr``, ``--workers``, ...); returns the setting names."""
    had = ckpt.get("args") or {}
    names = [n for n in _differing_flags(had, cfg, cfg.to_dict()) if n not in _NOT_COMPARED]
    if names:
        now = cfg.to_dict()
        _logger.info(
            "resumed with flags that differ from the checkpoint's: %s",
            ", ".join(f"{cli_flags([n])} {_shown(now[n])} (was {_shown(had[n])})" for n in names),
        )
    return names


def _check_resumable(
    ckpt: dict, ckpt_path, *, cfg, num_classes: int, sampler, optimizer, files: str | None = None
) -> None:
    """Refuse a checkpoint this run cannot continue, in one line naming what differs and the fix; log the other
    flags that differ. Called before the run folder is changed.

    Refused: another model or ``--model-kwargs`` (they can change what a layer computes without changing a weight's
    shape, and export builds the model from the checkpoint's), missing training state, another number of classes or
    of samples, other training files (``files``: see :func:`_check_same_data`), other sampler settings (DaP's,
    ``--dap-select``, InfoBatch's, ``--seed``: the sampler state,
    schedule and accounting were made with them, and a resumed sampler keeps its seed while the loaders would take
    the new one), another ``--opt`` or other optimizer parameter groups. Anything else
    (``--lr``, ...) is allowed, as timm allows it, and logged as ``resumed with flags that differ from the
    checkpoint's: --lr 0.5 (was 0.1)``.
    """
    model, model_kwargs = cfg.model, cfg.model_kwargs
    if ckpt["arch"] != model:
        raise CheckpointError(
            f"checkpoint {ckpt_path} is a {ckpt['arch']}, this run is a {model}; "
            f"pass --model {ckpt['arch']} or another --resume"
        )
    had = (ckpt.get("args") or {}).get("model_kwargs") or {}
    if dict(had) != dict(model_kwargs):
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained with --model-kwargs {_shown(dict(had))}, this run has "
            f"{_shown(dict(model_kwargs))}; "
            f"resume with the checkpoint's --model-kwargs (they define the model), or start a new run"
        )
    missing = [k for k in RESUME_KEYS if ckpt.get(k) is None]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_path} has no {', '.join(missing)} state, so training cannot continue from it; "
            "pass a last.pth.tar written by dap-train (to start from its weights, export it instead)"
        )
    _check_same_data(ckpt, ckpt_path, cfg=cfg, sampler=sampler, files=files)
    if ckpt.get("num_classes") is not None and ckpt["num_classes"] != num_classes:
        raise CheckpointError(
            f"checkpoint {ckpt_path} has {ckpt['num_classes']} classes, this run has {num_classes}; resume on the "
            f"data it was trained on (or pass --num-classes {ckpt['num_classes']}), or start a new run"
        )
    _check_same_sampler(ckpt, ckpt_path, cfg=cfg, sampler=sampler)
    _check_same_optimizer(ckpt, ckpt_path, cfg=cfg, optimizer=optimizer)
    _log_changed_flags(ckpt, cfg)


@dataclass
class TrainState:
    """What a checkpoint holds of a run, and what ``--resume`` restores: one place for both directions.

    The checkpoint keys (``state_dict``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``state_dict_ema``,
    ``sampler``, ``accounting``, ``history``, ``rng``, ...) are the trainer's file format: runs written by earlier
    versions resume unchanged.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_sched: EpochProgressLR
    sampler: object
    acct: Accounting
    scaler: object = None
    ema: object = None
    best: float = -1.0
    updates: int = 0  # optimizer updates so far: the EMA's step count (timm's num_updates)

    def state_dict(self, *, cfg, epoch: int, rngs: list, num_classes: int, dap: dict, files: str | None = None) -> dict:
        """The checkpoint after ``epoch`` epochs (``rngs``: every rank's RNG states, see :func:`_gather_rng`;
        ``files``: the training set's file digest, which ``--resume`` compares)."""
        acct = self.acct
        return {
            "arch": cfg.model,
            "num_classes": num_classes,
            "files_digest": files,
            "epoch": epoch,
            "state_dict": self.model.state_dict(),
            "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "updates": self.updates,
            "accounting": {"measured": acct.measured, "lost": acct.lost, "drops": acct.drops},
            "history": acct.history,
            "args": {  # model_kwargs among them: export builds the model with them
                k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))
            },
            "run": {
                "epochs": cfg.epochs,
                "dap": dap,
                "dataset": cfg.data_dir,
                "compute_fraction_planned": acct.planned / acct.baseline,
                "compute_fraction_measured": acct.measured / acct.baseline,
                "top1": acct.history[-1]["eval_top1"],
                "top5": acct.history[-1]["eval_top5"],
                "ema_top1": acct.history[-1].get("ema_top1"),
                "ema_top5": acct.history[-1].get("ema_top5"),
                "git_commit": git_commit(),
            },
        }

    def load_state_dict(self, ckpt: dict, *, source, model_name: str, rank: int, world: int, epochs: int) -> int:
        """Restore from a checkpoint already checked by :func:`_check_resumable`; returns the epochs it had done.
        ``epochs``: the run's; a finished run (nothing left to train) is not warned that its augmentation changes.

        A sampler state that does not fit, should one pass :func:`_check_resumable`, raises
        :class:`CheckpointError`.
        """
        try:
            self.model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:  # a head or layer of another shape than the checkpoint's num_classes says
            first = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"checkpoint {source} does not fit this {model_name} ({first[:160]}); resume with the data and "
                "--num-classes it was trained with"
            ) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("state_dict_ema"):
            self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        try:
            self.sampler.load_state_dict(ckpt["sampler"])
        except ValueError as e:  # the sampler's own check of its state, should one pass _check_resumable
            raise CheckpointError(
                f"checkpoint {source} does not fit this run's sampler ({one_line(e)}); resume with the checkpoint's "
                f"flags, or start a new run from its weights with --initial-checkpoint {source}"
            ) from None
        self.updates = int(ckpt["updates"]) if "updates" in ckpt else _updates_implied(ckpt, world=world)
        self.acct.measured, self.acct.lost = ckpt["accounting"]["measured"], ckpt["accounting"]["lost"]
        self.acct.history, self.acct.drops = list(ckpt["history"]), list(ckpt["accounting"]["drops"])
        rngs = ckpt.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        elif int(ckpt["epoch"]) < epochs:  # a finished run only writes its results again: nothing is drawn
            _logger.warning(
                "checkpoint was written by %d processes, this run has %d: the global batch changes with them "
                "(-b is per process; --lr-base rescales the LR) and augmentation will differ",
                len(rngs),
                world,
            )
        return int(ckpt["epoch"])


def _updates_implied(ckpt: dict, *, world: int) -> int:
    """The optimizer updates a checkpoint's epochs imply, for checkpoints written before the count was kept (the
    EMA then goes on decaying from about where it was instead of restarting at a copy of the model)."""
    args = ckpt.get("args") or {}
    per_step = max(1, int(args.get("batch_size") or 1)) * world
    accum = max(1, int(args.get("grad_accum_steps") or 1))
    return sum(math.ceil(math.ceil(r["samples_trained"] / per_step) / accum) for r in ckpt.get("history") or [])


def _best_metric(row: dict) -> float | None:
    """What ``model_best.pth.tar`` is chosen by, from an epoch's summary row: the EMA's top-1 where the EMA was
    evaluated (timm's train.py ranks by the EMA's metrics then), else the model's; None where nothing was."""
    ema = row.get("ema_top1")
    return ema if ema is not None else row.get("eval_top1")


def _restore_best(ckpt: dict, output: Path, history: list, *, source: Path | None = None) -> float:
    """The best top-1 so far (:func:`_best_metric`), with OUTPUT/model_best.pth.tar holding its weights where they
    exist. A run continued in another folder takes ``source`` (the resumed checkpoint's folder's
    model_best.pth.tar) if that is the best epoch of this history. A missing one (killed during its first write, or
    a run continued elsewhere) is written from the resumed checkpoint when that is the best epoch (last and best are
    saved from one state); else the next evaluation that beats it writes a new one."""
    evaluated = [r for r in history if _best_metric(r) is not None]
    if not evaluated:
        return -1.0
    top = max(evaluated, key=_best_metric)  # the first epoch reaching it, as the `>` below keeps
    path = output / "model_best.pth.tar"
    if path.is_file():
        return _best_metric(top)
    if source is not None and source.is_file() and _same_run_at(source, ckpt, top["epoch"]):
        write_atomic(path, lambda tmp: shutil.copyfile(source, tmp))
        _logger.info("copied %s (the best epoch, %d) into %s", source, top["epoch"], output)
        return _best_metric(top)
    if top["epoch"] == ckpt["epoch"]:
        save_checkpoint({k: v for k, v in ckpt.items() if k != "version"}, path)
        what = "written" if source is not None else "was missing; rewritten"
        _logger.warning("%s %s from the resumed checkpoint (its best epoch %d)", path, what, top["epoch"])
        return _best_metric(top)
    _logger.warning(
        "%s is missing and the weights of its best epoch %d are gone%s; the next evaluation that beats it writes a "
        "new one",
        path,
        top["epoch"],
        f" (not in {source.parent} either)" if source is not None else "",
    )
    return -1.0


def _same_run_at(path: Path, ckpt: dict, epoch: int) -> bool:
    """Whether the checkpoint file ``path`` is ``ckpt``'s run after ``epoch`` epochs: the same model, files and
    history up to there (read with mmap, without loading its tensors); False if it cannot be read."""
    try:
        other = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001  (a damaged file is not copied; the caller falls back)
        return False
    return (
        other.get("epoch") == epoch
        and other.get("arch") == ckpt.get("arch")
        and other.get("files_digest") == ckpt.get("files_digest")
        and other.get("history") == list(ckpt.get("history") or [])[:epoch]
    )


def _last_eval(history: list) -> dict:
    """The last evaluated epoch's row (a resumed finished run reports it again); {} if none was evaluated."""
    return next((r for r in reversed(history) if r["eval_top1"] is not None), {})


def run(cfg: RunConfig, *, check_processes: int | None = None) -> dict | None:
    """Train per ``cfg`` (:func:`dap_pretrain.config.run_config`); rank 0 returns the run summary (also written
    to OUTPUT/run.json).

    ``check_processes=N``: only check, in this one process, every input of a run that will have N processes (as
    its rank 0: the output folder, data, model, sampler and batch size for N, ``--resume``); raises the first
    refusal, returns None, and leaves nothing behind (no folder or lock file it made). ``tools/pretrain.sh`` runs
    it before torchrun, so bad input is one line and exit 2 rather than one per process and torchrun's report.
    """
    device, rank, world = init_distributed(cfg.device, single=check_processes is not None)
    if check_processes is not None:
        world = check_processes  # the sampler and batch-size checks for the run's N processes
        if device.type == "cuda" and world > torch.cuda.device_count():
            raise UsageError(
                f"{world} processes, one per GPU, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "start at most that many processes per node"
            )
    cuda_speed_flags(device)
    output = Path(cfg.output)
    held = HeldLogs(rank)
    lock = None
    try:
        refused = None
        if rank == 0:
            try:
                lock = claim_output(output, resume=cfg.resume, overwrite=cfg.overwrite)
            except UsageError as e:
                refused = e
        message = rank0_outcome(str(refused) if refused is not None else None)
        if refused is not None:
            raise refused
        if message is not None:  # the other ranks stop with rank 0's line instead of hanging at a barrier
            raise on_every_rank(UsageError(message))
        result = _train(
            cfg,
            device=device,
            rank=rank,
            world=world,
            output=output,
            held=held,
            lock=lock,
            check=check_processes is not None,
        )
        if check_processes is not None and lock is not None:
            release_unused(lock, output)
        return result
    except BaseException as e:
        saved = lock is not None and getattr(lock, "taken", False) and not getattr(lock, "replaced", False)
        if lock is not None:
            if getattr(lock, "replaced", False):  # --overwrite, stopped before the new run's first checkpoint
                restore_replaced(output)
            release_unused(lock, output)
        last = output / LAST_CHECKPOINT
        if isinstance(e, KeyboardInterrupt) and saved and last.is_file():  # this run's checkpoint, not one put back
            raise stopped(e, f"continue the run: the same command with --resume {last}") from None
        raise
    finally:
        held.close()
        if lock is not None:
            lock.close()


def _train(
    cfg, *, device, rank: int, world: int, output: Path, held: HeldLogs, lock, check: bool = False
) -> dict | None:
    """:func:`run` once OUTPUT is owned: build, check and resume everything, only then touch the folder; train.
    ``check``: return None once everything is checked (see :func:`run`)."""
    import timm
    from timm.utils import ModelEmaV3

    for note in getattr(cfg, "config_notes", ()):  # how --config was read (dap_pretrain.train.parse_args)
        _logger.info(note)
    cfg, lr_note = scaled_lr(cfg, world=world)
    if lr_note:
        _logger.info(lr_note)
    late = [m for m in cfg.decay_milestones if m >= cfg.epochs] if cfg.sched == "step" else []
    if late:  # e.g. the embedded default's milestone 10 with --epochs 6: silently a constant LR
        below = f"milestones below {cfg.epochs} to decay it, or " if cfg.epochs > 1 else ""
        _logger.warning(
            "--decay-milestones %s: at or after the end of training (%d epoch%s), so the LR never decays there; "
            "pass %s--decay-milestones with no value for a constant LR",
            " ".join(map(str, late)),
            cfg.epochs,
            "s" if cfg.epochs > 1 else "",
            below,
        )
    _check_sync_bn(cfg, device=device, world=world)
    model_cfg = timm.models.get_pretrained_cfg(cfg.model)
    data = _build_data(cfg, model_cfg.to_dict() if model_cfg else {})
    model = _seeded_model(cfg, data.num_classes, device, rank)
    _check_input_size(model, cfg, img_size=data.img_size, device=device)
    model, bn_note = _batchnorm_across_processes(model, cfg, world=world)
    if bn_note:
        _logger.info(bn_note)
    with user_input():  # the flags' values are checked by the components they configure
        sampler, acct, dap, note = _build_sampler(cfg, len(data.train), world, rank)
        check_batch_size(
            num_samples=len(data.train),
            batch_size=cfg.batch_size,
            drop_last=cfg.drop_last,
            num_replicas=world,
            smallest_subset=_smallest_subset(cfg, sampler),
            subset_fix=_subset_fix(cfg),
        )
        if note:
            _logger.info(note)
        optimizer = _build_optimizer(cfg, model)
        lr_sched = EpochProgressLR(
            optimizer,
            base_lr=cfg.lr,
            sched=cfg.sched,
            epochs=cfg.epochs,
            milestones=tuple(cfg.decay_milestones),
            decay_rate=cfg.decay_rate,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
        )
    amp_dtype, scaler = _amp(cfg, device)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    graph_step = None
    if cfg.cuda_graph:
        check_graphable(
            device=device,
            optimizer=optimizer,
            amp_dtype=amp_dtype,
            scaler=scaler,
            model_ema=ema,
            clip_grad=cfg.clip_grad,
            world=world,
            grad_accum_steps=cfg.grad_accum_steps,
        )
        graph_step = GraphedSGDStep(
            model, optimizer, batch_size=cfg.batch_size, amp_dtype=amp_dtype, smoothing=cfg.smoothing
        )
    train_loader, val_loader = _build_loaders(cfg, data, sampler, device=device, rank=rank, world=world)
    mixer = _mixer(cfg, rank=rank)
    decoding_workers = 0 if hasattr(train_loader, "store") else cfg.workers  # in-memory: workers only at start
    threads, threads_note = pick_threads(workers=decoding_workers, device_type=device.type)
    torch.set_num_threads(threads)
    state = TrainState(model, optimizer, lr_sched, sampler, acct, scaler=scaler, ema=ema)
    start_epoch, ckpt = 0, None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        _check_resumable(
            ckpt,
            cfg.resume,
            cfg=cfg,
            num_classes=data.num_classes,
            sampler=sampler,
            optimizer=optimizer,
            files=data.train.file_digest(),
        )
        start_epoch = state.load_state_dict(
            ckpt, source=cfg.resume, model_name=cfg.model, rank=rank, world=world, epochs=cfg.epochs
        )
    if check:  # every input is checked (torch.compile's options by wrapping, which compiles nothing yet)
        if cfg.torchcompile:
            _compiled(model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
        return None
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.torchcompile:  # training only: checkpoints, EMA, evaluation and export keep the plain module
        train_model = _compiled(train_model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
    # Every check has passed: only now is the run folder changed.
    held.close()
    removed = take_over(lock, output, overwrite=cfg.overwrite) if rank == 0 else []
    main_process_logging(rank, output)
    held.replay()
    if removed:
        aside = (
            f" (in {REPLACED}/ until this run's first checkpoint; put back if it stops before)" if cfg.overwrite else ""
        )
        _logger.info("removed from %s before starting: %s%s", output, ", ".join(removed), aside)
    if ckpt is not None:
        done = "; the run is finished: nothing left to train, its results are written again"
        done = done if start_epoch >= cfg.epochs else ""
        _logger.info("resumed %s at epoch %d%s", cfg.resume, ckpt["epoch"], done)
    resolved = args_yaml(cfg)
    if rank == 0:
        write_atomic(output / "args.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))
    _logger.info(threads_note)
    if mixer is not None:
        _logger.info(mixer.describe())
    if hasattr(train_loader, "describe"):
        _logger.info(train_loader.describe())
    where = f"{cfg.dataset} in {cfg.data_dir}" if cfg.dataset else cfg.data_dir
    if cfg.data_dir == "embedded":
        where = "the embedded CIFAR-10 sample (--data-dir embedded)"
    _logger.info(
        "model %s (%.2fM params) on %s x%d; %d train / %s val samples from %s; %s",
        cfg.model,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        world,
        len(data.train),
        len(data.val) if data.val is not None else "no",
        where,
        _planned_text(cfg, acct.planned / acct.baseline, lead="planned compute "),
    )
    run_start = time.perf_counter() - sum(r["epoch_time_s"] for r in acct.history)
    if ckpt is not None and rank == 0:
        elsewhere = Path(cfg.resume).resolve().parent != output.resolve()
        source = Path(cfg.resume).parent / "model_best.pth.tar" if elsewhere else None
        state.best = _restore_best(ckpt, output, acct.history, source=source)
        if elsewhere:  # continued in another folder: it holds its
            write_atomic(output / LAST_CHECKPOINT, lambda tmp: shutil.copyfile(cfg.resume, tmp))  # run, resumable
            write_summary_csv(output, acct.history)  # and comparable, even with no epoch left to train
            if getattr(lock, "replaced", False):  # --overwrite: that copy is this run's first checkpoint
                drop_replaced(output)
                lock.replaced = False
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        digest = subset_digest(sampler.subset)
        stats = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            epoch=epoch,
            sampler=sampler,
            lr_scheduler=lr_sched,
            device=device,
            smoothing=cfg.smoothing,
            amp_dtype=amp_dtype,
            scaler=scaler,
            model_ema=ema,
            clip_grad=cfg.clip_grad,
            clip_mode=cfg.clip_mode,
            grad_accum_steps=cfg.grad_accum_steps,
            log_interval=cfg.log_interval,
            show_progress=rank == 0,
            graph_step=graph_step,
            updates=state.updates,
            mixer=mixer,
        )
        state.updates = stats.updates
        _equal_batchnorm((model, ema.module if ema is not None else None), cfg, world=world)
        report = sampler.end_epoch()
        acct.add_epoch(epoch + 1, report)
        do_eval = val_loader is not None and ((epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs)
        ev = evaluate(model, val_loader, device=device, amp_dtype=amp_dtype) if do_eval else {}
        ema_ev = (
            evaluate(ema.module, val_loader, device=device, amp_dtype=amp_dtype) if ema is not None and do_eval else {}
        )
        row = acct.epoch_row(
            epoch=epoch + 1,
            report=report,
            train_loss=stats.loss,
            ev=ev,
            lr=stats.lr,
            seconds=time.perf_counter() - t0,
            img_per_s=stats.samples_all / max(stats.seconds, 1e-9),  # the job's, every rank's samples
            digest=digest,
            first_batch_s=stats.first_batch_s,
        )
        if ema_ev:
            row["ema_top1"], row["ema_top5"] = ema_ev["top1"], ema_ev["top5"]
        acct.history.append(row)
        rngs = _gather_rng(world, subset_digest(sampler.subset))
        if rank == 0:
            log_epoch(row, cfg.epochs, report)
            write_summary_csv(output, acct.history)
            ckpt_state = state.state_dict(
                cfg=cfg,
                epoch=epoch + 1,
                rngs=rngs,
                num_classes=data.num_classes,
                dap=dap,
                files=data.train.file_digest(),
            )
            save_checkpoint(ckpt_state, output / LAST_CHECKPOINT)
            if getattr(lock, "replaced", False):  # --overwrite: the previous run's files are no longer needed
                drop_replaced(output)
                lock.replaced = False
            best_top1 = _best_metric(row)  # the EMA's top-1 where there is one, as timm's train.py
            if best_top1 is not None and best_top1 > state.best:
                state.best = best_top1
                save_checkpoint(ckpt_state, output / "model_best.pth.tar")
    wall = time.perf_counter() - run_start
    if rank != 0:
        barrier()
        return None
    summary = _finish(cfg, output, acct, wall, dap, world=world)
    barrier()
    return summary


def _finish(cfg, output: Path, acct: Accounting, wall: float, dap: dict, *, world: int = 1) -> dict:
    last = _last_eval(acct.history)
    summary = acct.run_summary(
        model=cfg.model,
        epochs=cfg.epochs,
        dataset=cfg.data_dir,
        top1=last.get("eval_top1"),
        top5=last.get("eval_top5"),
        ema_top1=last.get("ema_top1"),
        ema_top5=last.get("ema_top5"),
        wall_s=wall,
        dap=dap,
        processes=world,
    )
    write_atomic(output / "run.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    if acct.lost:
        _logger.info(
            "%d samples went untrained (unreadable files, warned above, or --drop-last, or a final batch of 1 under "
            "BatchNorm); "
            "measured compute is below planned by that",
            acct.lost,
        )
    if not cfg.no_plot:
        from dap_pretrain.plots import plot_run

        plot_run(acct.history, acct.drops, output / "dap_schedule.png", title=f"{cfg.model} {dap['select']}")
    if cfg.export:
        from dap_pretrain.export import export_backbone

        export_backbone(output / LAST_CHECKPOINT, output / "export", overwrite=True)
    top1 = f"{summary['top1']:.2f}" if summary["top1"] is not None else "n/a (no --val-split)"
    print(
        f"compute spent: {summary['compute_fraction_measured']:.2%} of full-data training "
        f"({acct.measured:,} / {acct.baseline:,} samples; {_planned_text(cfg, summary['compute_fraction_planned'])}); "
        f"top-1 {top1}; wall {wall:.1f}s -> {output}"
    )
    return summary
