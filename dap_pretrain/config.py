"""Turns trainer/planner arguments into DaP configuration, once, for every front end.

The library never imports the command line (``cli.py``, ``train.py``); they import this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from dap_pretrain.errors import UsageError, user_input
from dap_pretrain.schedule import IMAGENET_NUM_SAMPLES, DaPConfig, solve_keep


def dap_config_from_args(
    args: argparse.Namespace, *, num_samples: int, default_reuse: tuple[int, ...] = ()
) -> tuple[DaPConfig, str | None]:
    """Build the :class:`DaPConfig`; with ``--dap-target-compute`` solve p first.

    Returns the config and, when p was solved, a line saying what it achieves.
    """
    reuse = tuple(args.dap_reuse) if args.dap_reuse is not None else tuple(default_reuse)
    kwargs = dict(
        epochs=args.epochs, warmup=args.dap_warmup, interval=args.dap_interval, active=args.dap_active, reuse=reuse
    )
    with user_input():
        DaPConfig(keep=1.0, **kwargs)  # validate everything but p before solving
        note = None
        keep = args.dap_keep
        if args.dap_target_compute is not None:
            keep, achieved = solve_keep(args.dap_target_compute, num_samples=num_samples, **kwargs)
            note = f"solved --dap-keep {keep:.6f}: compute {achieved:.4f} for target {args.dap_target_compute:.4f}"
            if abs(achieved - args.dap_target_compute) > 0.005:
                note += " (closest reachable: warm-up and reuse epochs always train on all data)"
        return DaPConfig(keep=keep, **kwargs), note


def default_reuse(args: argparse.Namespace) -> tuple[int, ...]:
    """The paper's R when --dap-reuse is not given: the step schedule's LR-decay epochs within the run."""
    if args.sched != "step":
        return ()
    return tuple(m for m in args.decay_milestones if 1 <= m <= args.epochs)


def resolve_baselines(args: argparse.Namespace) -> None:
    """Apply --epochs-scale / --fixed-subset (Table 2(f)) and the DaP-incompatible options, in place."""
    if args.dap_select == "infobatch" and (args.epochs_scale is not None or args.fixed_subset is not None):
        raise UsageError("--dap-select infobatch cannot be combined with --epochs-scale/--fixed-subset; drop one")
    if args.epochs_scale is not None:
        if not 0 < args.epochs_scale <= 1:
            raise UsageError(f"--epochs-scale={args.epochs_scale} is invalid: must be in (0, 1]")
        args.baseline_epochs = args.epochs
        args.epochs = max(1, round(args.epochs * args.epochs_scale))
        args.decay_milestones = [round(m * args.epochs_scale) for m in args.decay_milestones]
        args.warmup_epochs = args.warmup_epochs * args.epochs_scale
        args.dap_select = "none"
    if args.fixed_subset is not None:
        if not 0 < args.fixed_subset <= 1:
            raise UsageError(f"--fixed-subset={args.fixed_subset} is invalid: must be in (0, 1]")
        args.dap_select = "none"
    if args.dap_select != "none" and (args.mixup > 0 or args.cutmix > 0):
        # A mixed image's loss belongs to two samples; ranking either by it would be silently wrong.
        raise UsageError(
            "--mixup/--cutmix cannot be combined with DaP (a mixed sample's loss has no single owner); "
            "drop them or pass --dap-select none"
        )
    if args.eval_interval < 1:
        raise UsageError(f"--eval-interval={args.eval_interval} is invalid: must be an integer >= 1")
    if args.dap_select == "none":
        args.dap_warmup = min(args.dap_warmup, args.epochs - 1)  # DaP parameters unused: keep them valid
    dap_config_from_args(args, num_samples=1, default_reuse=default_reuse(args))  # bad DaP flags fail before data loads


def load_config(path: Path, _seen: tuple = ()) -> dict:
    """Read a YAML config; ``_base_: file`` (or a list) is read first and overridden (mmengine-style)."""
    path = Path(path).resolve()
    if path in _seen:
        raise UsageError(f"config {path} includes itself through _base_; remove the cycle")
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; pass a YAML file such as configs/pretrain/*.yaml")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(cfg, dict):
        raise UsageError(
            f"config {path} holds a {type(cfg).__name__} at the top level; expected a mapping of flag names to "
            "values (e.g. `lr: 0.1`)"
        )
    bases = cfg.pop("_base_", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UsageError(f"config {path} has _base_: {bases!r}; expected a file name relative to it, or a list of them")
    merged: dict = {}
    for base in bases:
        merged.update(load_config(path.parent / base, (*_seen, path)))
    merged.update(cfg)
    return merged


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The paper's settings, by the config file that holds them (configs/pretrain is their one home).
PAPER_SETTINGS = {
    "imagenet": ("pretrain/imagenet/resnet50_dap75.yaml", IMAGENET_NUM_SAMPLES),  # Section 4.3.1: 73.9% ("75%")
    "imagenet-86": ("pretrain/imagenet/resnet50_dap86.yaml", IMAGENET_NUM_SAMPLES),  # Section 4.3.2: 86.0%
    "cifar10": ("pretrain/cifar/cifar10_resnet110_dap63.yaml", 50_000),  # Tables 2(f)/5
    "cifar100": ("pretrain/cifar/cifar100_resnet110_dap79.yaml", 50_000),  # Table 6
}
_SETTING_KEYS = ("epochs", "dap_warmup", "dap_interval", "dap_keep", "dap_active", "dap_reuse", "decay_milestones")


def paper_setting(name: str) -> dict:
    """The paper setting ``name`` (a key of :data:`PAPER_SETTINGS`) read from its file under ``configs/``:
    ``epochs``, the ``dap_*`` values, ``decay_milestones`` and ``num_samples`` (the dataset's size)."""
    if name not in PAPER_SETTINGS:
        raise UsageError(f"unknown paper setting {name!r}; choose one of {', '.join(sorted(PAPER_SETTINGS))}")
    rel, num_samples = PAPER_SETTINGS[name]
    path = CONFIGS / rel
    if not path.is_file():
        raise UsageError(f"paper setting {name!r} is read from {path}, which is missing; run from a checkout")
    cfg = load_config(path)
    setting = {k: cfg.get(k) for k in _SETTING_KEYS}
    setting["num_samples"] = num_samples
    return setting
