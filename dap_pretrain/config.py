"""Turns trainer/planner arguments into DaP configuration, once, for every front end.

The library never imports the command line (``cli.py``, ``train.py``); they import this module.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    if isinstance(args.dap_warmup, int) and isinstance(args.epochs, int) and 1 <= args.epochs <= args.dap_warmup:
        raise UsageError(
            f"--dap-warmup {args.dap_warmup} is not below --epochs {args.epochs}: DaP warms up on all data for "
            f"W epochs before it drops any (default 10); pass --dap-warmup {max(0, args.epochs // 4)} or another "
            f"W below {args.epochs}"
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


class RunConfig:
    """The trainer's settings, resolved once and read-only: what :func:`dap_pretrain.runner.run` takes.

    Attribute names are the trainer's flag names (``cfg.batch_size`` for ``-b``), plus ``baseline_epochs`` (the
    epochs of the full-data run that compute fractions are measured against). Built by :func:`run_config` from the
    parsed command line; :meth:`replace` gives a changed copy (``--compare`` builds its baseline run that way). An
    unknown name raises ``AttributeError``, and assignment raises ``dataclasses.FrozenInstanceError``.
    """

    __slots__ = ("_values",)

    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"RunConfig has no setting {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        raise dataclasses.FrozenInstanceError(f"RunConfig is read-only; use .replace({name}=...)")

    def __repr__(self) -> str:
        return f"RunConfig({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def replace(self, **changes) -> RunConfig:
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise AttributeError(f"RunConfig has no settings {unknown}")
        return RunConfig(**{**self._values, **changes})

    def to_dict(self) -> dict:
        return dict(self._values)


def mixing(v) -> bool:
    """Whether the settings (a RunConfig or its dict) mix batches (Mixup or CutMix)."""
    get = v.get if isinstance(v, dict) else lambda k: getattr(v, k)
    return get("mixup") > 0 or get("cutmix") > 0 or get("cutmix_minmax") is not None


def _check_mixing(v: dict) -> None:
    for flag in ("mixup", "cutmix"):
        if v[flag] < 0:
            raise UsageError(f"{cli_flags([flag])}={v[flag]} is invalid: an alpha must be >= 0 (0: off)")
    if not mixing(v):
        return
    for flag in ("mixup_prob", "mixup_switch_prob"):
        if not 0 <= v[flag] <= 1:
            raise UsageError(f"{cli_flags([flag])}={v[flag]} is invalid: a probability must be in [0, 1]")
    if v["mixup_off_epoch"] < 0:
        raise UsageError(f"--mixup-off-epoch={v['mixup_off_epoch']} is invalid: an epoch >= 1 (0: mix every epoch)")
    minmax = v["cutmix_minmax"]
    if minmax is not None and (len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1):
        raise UsageError(f"--cutmix-minmax {' '.join(map(str, minmax))} is invalid: two fractions 0 <= MIN < MAX <= 1")
    if v["cuda_graph"]:
        raise UsageError("--cuda-graph replays an unmixed step; drop it or drop --mixup/--cutmix")


# settings whose range the run would otherwise find out at its first step (a traceback) or never (silently wrong):
# (name, lowest, highest, highest included); None: unbounded
_RANGES = (
    ("smoothing", 0.0, 1.0, False),
    ("drop", 0.0, 1.0, False),
    ("drop_path", 0.0, 1.0, False),
    ("reprob", 0.0, 1.0, True),
    ("hflip", 0.0, 1.0, True),
    ("vflip", 0.0, 1.0, True),
    ("model_ema_decay", 0.0, 1.0, True),
    ("color_jitter", 0.0, None, False),
    ("warmup_epochs", 0.0, None, False),
    ("warmup_lr", 0.0, None, False),
    ("min_lr", 0.0, None, False),
    ("lr", 0.0, None, False),
    ("weight_decay", 0.0, None, False),
    ("momentum", 0.0, 1.0, False),
    ("decay_rate", 0.0, None, False),  # below 0 the LR turns negative at the first decay: training climbs
    ("clip_grad", 0.0, None, False),  # below 0 every clipped gradient points the other way
    ("recount", 0.0, None, False),
)
_POSITIVE = ("crop_pct", "img_size", "std")  # 0 fails in torchvision's resize or divides by 0; None is the model's
SEED_LIMIT = 2**62  # the loaders add epoch and rank offsets to the seed; numpy and torch take 64-bit seeds


def _check_ranges(v: dict) -> None:
    """One line for a setting out of its range (:data:`_RANGES`), and for a crop scale that is not
    ``0 <= MIN <= MAX`` or a ratio that is not ``0 < MIN <= MAX``. Only what would fail or be silently wrong:
    what timm's train.py takes and uses (``--min-lr`` above ``--lr``, a scale above 1) is left to the user."""
    for name, low, high, closed in _RANGES:
        value = v.get(name)
        if value is None or (low <= value and (high is None or value < high or (closed and value == high))):
            continue
        span = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}{']' if closed else ')'}"
        raise UsageError(f"{cli_flags([name])}={value} is invalid: must be {span}")
    for name in _POSITIVE:
        value = v.get(name)
        if value is not None and min(value if isinstance(value, (list, tuple)) else [value]) <= 0:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise UsageError(f"{cli_flags([name])} {shown} is invalid: must be > 0 (or left out for the model's)")
    if v.get("seed") is not None and not -SEED_LIMIT < v["seed"] < SEED_LIMIT:
        raise UsageError(f"--seed {v['seed']} is invalid: must be between -2**62 and 2**62")
    for name, strict in (("scale", False), ("ratio", True)):  # timm takes a scale of 0, or above 1 (centre crops)
        pair = v.get(name)
        if pair is None:
            continue
        if not (len(pair) == 2 and (pair[0] > 0 if strict else pair[0] >= 0) and pair[0] <= pair[1]):
            least = "0 < MIN" if strict else "0 <= MIN"
            raise UsageError(f"{cli_flags([name])} {' '.join(map(str, pair))} is invalid: two values {least} <= MAX")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The trainer's parsed flags, resolved into a :class:`RunConfig` (``args`` is not changed).

    Applies ``--epochs-scale`` / ``--fixed-subset`` (Table 2(f)'s baselines) and refuses the options DaP cannot
    honour, in one line each (:class:`UsageError`), before any data is read.
    """
    v = dict(vars(args))
    v["baseline_epochs"] = v["epochs"]
    if v["sched"] == "multistep":  # timm's name for decays at --decay-milestones, which this trainer calls step
        v["sched"] = "step"
    if v["decay_epochs"] is not None:  # timm's step schedule: every N epochs
        if v["decay_epochs"] < 1:
            raise UsageError(f"--decay-epochs={v['decay_epochs']} is invalid: must be an integer >= 1")
        v["decay_milestones"] = list(range(v["decay_epochs"], v["epochs"], v["decay_epochs"]))
    milestones = list(v["decay_milestones"] or [])
    if milestones != sorted(set(milestones)):  # else blamed on --dap-reuse, which defaults to them
        raise UsageError(
            f"--decay-milestones {' '.join(map(str, milestones))} is invalid: epochs in ascending order without "
            f"repeats, e.g. {' '.join(map(str, sorted(set(milestones))))}"
        )
    if v["dap_select"] == "infobatch" and (v["epochs_scale"] is not None or v["fixed_subset"] is not None):
        raise UsageError("--dap-select infobatch cannot be combined with --epochs-scale/--fixed-subset; drop one")
    v["unscaled"] = None
    if v["epochs_scale"] is not None:
        scale = v["epochs_scale"]
        if not 0 < scale <= 1:
            raise UsageError(f"--epochs-scale={scale} is invalid: must be in (0, 1]")
        v["unscaled"] = {k: v[k] for k in ("epochs", "decay_milestones", "warmup_epochs")}  # for args.yaml
        v["epochs"] = max(1, round(v["epochs"] * scale))
        v["decay_milestones"] = [round(m * scale) for m in v["decay_milestones"]]
        v["warmup_epochs"] = v["warmup_epochs"] * scale
        v["dap_select"] = "none"
    if v["fixed_subset"] is not None:
        if not 0 < v["fixed_subset"] <= 1:
            raise UsageError(f"--fixed-subset={v['fixed_subset']} is invalid: must be in (0, 1]")
        v["dap_select"] = "none"
    _check_mixing(v)
    if v["lr_base"] is not None:  # timm's --lr-base: the LR of a global batch of --lr-base-size (default 256)
        v["lr"], v["lr_base_size"] = v["lr_base"], v["lr_base_size"] or 256
    _check_ranges(v)
    if v["lr_base_size"] is not None and v["lr_base_size"] < 1:
        raise UsageError(f"--lr-base-size={v['lr_base_size']} is invalid: must be a batch size >= 1")
    if v["sync_bn"]:  # statistics are already the global batch's in every step (timm clears --dist-bn too)
        v["dist_bn"] = ""
    if v["grad_checkpointing"] and v["cuda_graph"]:
        raise UsageError(
            "--cuda-graph is for small launch-bound networks, --grad-checkpointing for large memory-bound ones; "
            "choose one"
        )
    if v["torchcompile"] and v["cuda_graph"]:
        raise UsageError("--torchcompile and --cuda-graph both replace the eager step; choose one")
    for flag, least in (("batch_size", 1), ("validation_batch_size", 1), ("workers", 0), ("log_interval", 1)):
        if v[flag] is not None and v[flag] < least:
            raise UsageError(f"{cli_flags([flag])}={v[flag]} is invalid: must be an integer >= {least}")
    if v["grad_accum_steps"] < 1:
        raise UsageError(f"--grad-accum-steps={v['grad_accum_steps']} is invalid: must be an integer >= 1")
    if v["eval_interval"] < 1:
        raise UsageError(f"--eval-interval={v['eval_interval']} is invalid: must be an integer >= 1")
    if v["dap_select"] in ("none", "infobatch"):  # DaP's parameters unused (InfoBatch prunes from epoch 1): valid
        v["dap_warmup"] = min(v["dap_warmup"], v["epochs"] - 1)
    cfg = RunConfig(**v)
    dap_config_from_args(cfg, num_samples=1, default_reuse=default_reuse(cfg))  # bad DaP flags fail before data
    return cfg


# RunConfig settings that are not flags: what run_config derives, and the notes parse_args adds
DERIVED_SETTINGS = ("baseline_epochs", "unscaled", "config_notes")
# flags args.yaml leaves out: how a run was started, which reading the file back must not repeat
START_FLAGS = ("resume", "overwrite")


def args_yaml(cfg: RunConfig) -> dict:
    """What OUTPUT/args.yaml holds: the run's resolved flags, so that ``--config OUTPUT/args.yaml`` trains the same run
    (as timm's args.yaml does). Derived settings are left out, and a run of ``--epochs-scale`` keeps its unscaled
    epochs, milestones and warm-up, which the flag scales again when the file is read; ``--resume`` and
    ``--overwrite`` are left out (reading the file back starts a new run)."""
    settings = cfg.to_dict()
    values = {k: v for k, v in settings.items() if k not in DERIVED_SETTINGS + START_FLAGS}
    values.update(settings.get("unscaled") or {})
    return values


# The trainer's timm augmentation flags -> timm ``create_transform`` keywords. A flag left at None keeps timm's
# default, except the interpolation, which defaults to bilinear here (what --gpu-decode's crop computes).
AUGMENT_FLAGS = {
    "scale": "scale",
    "ratio": "ratio",
    "hflip": "hflip",
    "vflip": "vflip",
    "color_jitter": "color_jitter",
    "aa": "auto_augment",
    "train_interpolation": "interpolation",
    "reprob": "re_prob",
    "remode": "re_mode",
    "recount": "re_count",
}


MODEL_FLAGS = {"drop": "drop_rate", "drop_path": "drop_path_rate"}  # -> timm.create_model keywords
EVAL_FLAGS = {"crop_pct": "crop_pct", "interpolation": "interpolation"}  # -> create_transform(is_training=False)


def cli_flags(flags, *, sep: str = " ") -> str:
    """The command-line spelling of setting names: ``["drop_path", "aa"]`` -> ``"--drop-path --aa"``."""
    return sep.join("--" + f.replace("_", "-") for f in flags)


def given_kwargs(cfg, flags: dict) -> dict:
    """The settings of ``flags`` (setting name -> keyword) that were given (not None), as keywords; lists become
    tuples."""
    given = {kw: getattr(cfg, flag) for flag, kw in flags.items() if getattr(cfg, flag) is not None}
    return {kw: tuple(v) if isinstance(v, list) else v for kw, v in given.items()}


def merged_kwargs(given: dict, extra: dict, *, flag: str) -> dict:
    """``given`` (keywords the trainer's own flags set) plus ``extra`` (those of ``flag``, e.g. ``--model-kwargs``);
    a keyword in both is a :class:`UsageError`."""
    both = sorted(set(given) & set(extra))
    if both:
        raise UsageError(f"{flag} sets {', '.join(both)}, which a flag sets too; give each keyword once")
    return {**given, **extra}


def optimizer_kwargs(cfg) -> dict:
    """``timm.optim.create_optimizer_v2`` keywords (timm's bridge of the same name, for this trainer's flags)."""
    kwargs = dict(opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    extra = {"eps": cfg.opt_eps, "betas": tuple(cfg.opt_betas or ()) or None, "layer_decay": cfg.layer_decay}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return merged_kwargs(kwargs, cfg.opt_kwargs, flag="--opt-kwargs")


def scaled_lr(cfg, *, world: int) -> tuple[RunConfig, str | None]:
    """``cfg`` with ``--lr`` scaled from a global batch of ``--lr-base-size`` to the run's (timm's rule: linear, or
    square root for Adam/LAMB-like optimizers, unless ``--lr-base-scale``), and a line saying so; unchanged without
    ``--lr-base-size``. The scaled config holds the LR it trains with and no base, so its ``args.yaml`` reproduces
    that LR whatever the process count of a later run."""
    if cfg.lr_base_size is None:
        return cfg, None
    global_batch = cfg.batch_size * world * cfg.grad_accum_steps
    rule = cfg.lr_base_scale or ("sqrt" if any(k in cfg.opt.lower() for k in ("ada", "lamb")) else "linear")
    ratio = global_batch / cfg.lr_base_size
    lr = cfg.lr * (ratio**0.5 if rule == "sqrt" else ratio)
    note = (
        f"lr {lr:.6g}: {cfg.lr:g} for a global batch of {cfg.lr_base_size}, scaled ({rule}) to this run's "
        f"{global_batch} (-b {cfg.batch_size} x {world} processes x {cfg.grad_accum_steps} accumulated)"
    )
    return cfg.replace(lr=lr, lr_base=None, lr_base_size=None, lr_base_scale=None), note


def load_config(path: Path, _seen: tuple = (), origin: dict | None = None) -> dict:
    """Read a YAML config; ``_base_: file`` (or a list) is read first and overridden (mmengine-style).

    ``origin``, if given, receives for each key ``(order, file)``: the position in merge order of the file that set
    it last (later files override earlier ones) and that file's path, so a caller can tell which of two keys was
    set later, or whether one file set both."""
    path = Path(path).resolve()
    if path in _seen:
        raise UsageError(f"config {path} includes itself through _base_; remove the cycle")
    if not path.is_file():
        if _seen:  # named by a _base_ line
            raise UsageError(f"config {_seen[-1]} has _base_: {path.name}, but {path} does not exist; fix that line")
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"config file {path} {what}; pass a YAML file such as configs/pretrain/*.yaml")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UsageError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read config {path} ({e.strerror}); check its permissions") from None
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
        merged.update(load_config(path.parent / base, (*_seen, path), origin))
    merged.update(cfg)
    if origin is not None:
        order = 1 + max((o for o, _ in origin.values()), default=-1)
        origin.update(dict.fromkeys(cfg, (order, path)))
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
