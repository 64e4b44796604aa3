"""``dap-train`` / ``python -m dap_pretrain.train``: timm's train.py flags plus Drop-and-Pick.

``main()`` only wires components: args -> data -> model -> optimizer/LR -> sampler -> epochs.
Config precedence, as in timm: ``--config file.yaml`` sets argparse defaults, the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from timm.utils import ParseKwargs

from dap_pretrain.checkpoint import LAST_CHECKPOINT
from dap_pretrain.cli import add_dap_arguments, given_flags, make_parser, not_key_value, refuse_exclusive_flags
from dap_pretrain.config import load_config, run_config
from dap_pretrain.errors import UsageError, entry_point, stopped
from dap_pretrain.mixing import MODES as MIX_MODES
from dap_pretrain.run_folder import RUN_MARKERS

_logger = logging.getLogger("dap_pretrain.train")


class _Kwargs(ParseKwargs):
    """timm's ``ParseKwargs``, where an item without ``=`` is ``parser.error``'s one line (timm's raises)."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = not_key_value(values)
        if bad:
            parser.error(f"{option_string} takes KEY=VALUE items, not {' '.join(bad)}")
        super().__call__(parser, namespace, values, option_string)


def _add_kwargs_flag(group, flag: str, target: str, example: str) -> None:
    """timm's ``--model-kwargs``-style flag: ``KEY=VALUE`` pairs (values read as Python) into a dict for ``target``."""
    group.add_argument(
        flag,
        nargs="*",
        default={},
        action=_Kwargs,
        metavar="KEY=VALUE",
        help=f"more {target} keywords, e.g. {flag} {example} (values read as Python)",
    )


HELP = """Train a timm model with Drop-and-Pick: timm's train.py flags plus --dap-*.

The defaults are the paper's ImageNet recipe (SGD at LR 0.1, step decay at 30/60/90 of 120 epochs, DaP's
warm-up 10, interval 2, keep 0.9), not timm's; without --data-dir the run trains on the embedded CIFAR-10 sample.
--config FILE.yaml sets the defaults (a run's args.yaml repeats it); the command line wins."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help (timm writes most into its help), where
    there is one to show: not for a switch, an unset (None or '') value, or a help that already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == "" or default is argparse.SUPPRESS  # 0 is shown
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(prog="dap-train", description=HELP, formatter_class=_HelpFormatter, timm_hints=True)
    p.add_argument("-c", "--config", default="", help="YAML file of argparse defaults (command line overrides)")
    d = p.add_argument_group("Data")
    d.add_argument(
        "--data-dir",
        default="embedded",
        help="ImageFolder tree (with split subfolders), a .tar/.tar.gz of one, or 'embedded'",
    )
    d.add_argument(
        "--dataset",
        default="",
        help="timm dataset name: '' (or a name without a prefix) = ImageFolder, 'torch/cifar10', 'hfds/NAME' "
        "(needs the datasets package); streaming ones (wds/, tfds/, hfids/) are refused",
    )
    d.add_argument("--dataset-download", action="store_true", help="let torchvision download a torch/* dataset")
    d.add_argument("--train-split", default="train", help="the training split's folder under --data-dir")
    d.add_argument("--val-split", default="val", help="'' skips evaluation")
    d.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    d.add_argument(
        "--aug",
        choices=("auto", "cifar", "imagenet"),
        default="auto",
        help="cifar: pad-4 crop + flip; imagenet: timm RandomResizedCrop; auto: by image size",
    )
    d.add_argument(
        "--in-memory",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode the data once into a uint8 tensor on the device and augment there (CIFAR augmentation); "
        "auto: on when the CIFAR augmentation applies and the decoded data fits --in-memory-max-mb",
    )
    d.add_argument("--in-memory-max-mb", type=float, default=4096, help="largest decoded dataset kept in memory")
    d.add_argument(
        "--gpu-decode",
        action="store_true",
        help="train split: workers read file bytes, the GPU decodes them in batches (nvjpeg) and applies timm's "
        "RandomResizedCrop + flip + colour jitter there (CUDA only; files nvjpeg refuses go through PIL)",
    )
    d.add_argument("-j", "--workers", type=int, default=2, help="loader processes per training process")
    d.add_argument("--drop-last", action="store_true", help="drop each epoch's last partial batch")
    m = p.add_argument_group("Model")
    m.add_argument("--model", default="cifar_resnet20", help="any timm model name")
    m.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    m.add_argument("--channels-last", action="store_true", help="channels-last memory layout (timm's)")
    m.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (exported if present)")
    m.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA weights' decay per update")
    m.add_argument(
        "--model-ema-warmup", action="store_true", help="timm's EMA warmup: the decay rises with the update count"
    )
    m.add_argument("--drop", type=float, default=None, metavar="PCT", help="dropout rate (timm's drop_rate)")
    m.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="stochastic depth (drop_path_rate)")
    _add_kwargs_flag(m, "--model-kwargs", "timm.create_model", "drop_block_rate=0.1")
    m.add_argument(
        "--initial-checkpoint",
        default="",
        metavar="PATH",
        help="start from these weights (a timm/torch state dict, .safetensors, or a dap-train checkpoint: its EMA "
        "weights if it has them); unlike --resume, the run starts at epoch 0",
    )
    m.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass through the model's blocks (less memory, more compute)",
    )
    b = p.add_argument_group("BatchNorm across processes (DDP; timm's flags)")
    b.add_argument(
        "--sync-bn",
        action="store_true",
        help="BatchNorm statistics over the global batch in every step (torch's SyncBatchNorm: GPUs only)",
    )
    b.add_argument(
        "--dist-bn",
        choices=("reduce", "broadcast", ""),
        default="reduce",
        help="after each epoch, give every process the same BatchNorm running statistics before evaluating and "
        "saving: reduce averages them, broadcast copies rank 0's, '' leaves each its own (default: reduce)",
    )
    a = p.add_argument_group("Augmentation (timm's; the ImageNet augmentation only, default: timm's)")
    a.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="RandomResizedCrop area")
    a.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="its aspect ratio")
    a.add_argument("--hflip", type=float, default=None, metavar="P", help="horizontal flip probability (0.5)")
    a.add_argument("--vflip", type=float, default=None, metavar="P", help="vertical flip probability (0)")
    a.add_argument("--color-jitter", type=float, default=None, metavar="F", help="colour jitter strength (0.4)")
    a.add_argument("--aa", default=None, metavar="NAME", help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    a.add_argument(
        "--train-interpolation", default=None, help="resize interpolation: bilinear (default here), bicubic, random"
    )
    a.add_argument("--mean", type=float, nargs=3, default=None, metavar="M", help="pixel mean (default: the model's)")
    a.add_argument("--std", type=float, nargs=3, default=None, metavar="S", help="pixel std (default: the model's)")
    a.add_argument("--crop-pct", type=float, default=None, help="evaluation: centre crop of the resized image (0.875)")
    a.add_argument("--interpolation", default=None, help="evaluation resize interpolation (bilinear)")
    a.add_argument("--reprob", type=float, default=None, metavar="P", help="random erasing probability (0)")
    a.add_argument("--remode", choices=("const", "rand", "pixel"), default=None, help="random erasing fill (pixel)")
    a.add_argument("--recount", type=int, default=None, help="random erasing regions per image (1)")
    o = p.add_argument_group("Optimizer and schedule")
    o.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    o.add_argument("--opt", default="sgd", help="timm optimizer name")
    o.add_argument("--lr", type=float, default=0.1, help="learning rate, as given (see --lr-base-size)")
    o.add_argument("--lr-base", type=float, default=None, help="sets --lr for a global batch of --lr-base-size (256)")
    o.add_argument(
        "--lr-base-size",
        type=int,
        default=None,
        metavar="N",
        help="--lr is for a global batch of N: scale it to -b x processes x --grad-accum-steps",
    )
    o.add_argument(
        "--lr-base-scale", choices=("linear", "sqrt"), default=None, help="default: sqrt for Adam/LAMB-like, linear"
    )
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (timm's: 2e-5)")
    o.add_argument("--opt-eps", type=float, default=None, metavar="EPS", help="optimizer epsilon (Adam-like)")
    o.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="BETA", help="optimizer betas")
    o.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay (timm's param groups)")
    o.add_argument("--clip-grad", type=float, default=None, metavar="V", help="clip gradients at V (--clip-mode)")
    o.add_argument(
        "--clip-mode",
        choices=("norm", "value", "agc"),
        default="norm",
        help="--clip-grad as the global gradient norm, per value, or adaptive (AGC, head excluded; timm's)",
    )
    _add_kwargs_flag(o, "--opt-kwargs", "timm create_optimizer_v2", "nesterov=False")
    o.add_argument(
        "--grad-accum-steps", type=int, default=1, metavar="N", help="one optimizer update per N batches (-b each)"
    )
    o.add_argument(
        "--sched", choices=("step", "multistep", "cosine"), default="step", help="step = multistep: at the milestones"
    )
    o.add_argument("--decay-milestones", type=int, nargs="*", default=[30, 60, 90], help="epochs where LR *= rate")
    o.add_argument(
        "--decay-epochs",
        type=int,
        default=None,
        metavar="N",
        help="LR *= rate every N epochs (replaces the milestones)",
    )
    o.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="LR factor at each decay (timm's --dr too)")
    o.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warm-up (not DaP's --dap-warmup)")
    o.add_argument("--warmup-lr", type=float, default=1e-5, help="LR at the start of --warmup-epochs")
    o.add_argument("--min-lr", type=float, default=0.0, help="cosine schedule's floor")
    o.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    x = p.add_argument_group(
        "Mixup/CutMix (timm's flags; with DaP each sample is ranked by its own label's share of the mixed losses)"
    )
    x.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="Mixup alpha; on if > 0 (0)")
    x.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="CutMix alpha; on if > 0 (0)")
    x.add_argument(
        "--cutmix-minmax",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="CutMix box sides as fractions of the image, instead of alpha (turns CutMix on)",
    )
    x.add_argument("--mixup-prob", type=float, default=1.0, metavar="P", help="probability of mixing a batch (1.0)")
    x.add_argument(
        "--mixup-switch-prob", type=float, default=0.5, metavar="P", help="with both on: CutMix instead (0.5)"
    )
    x.add_argument("--mixup-mode", choices=MIX_MODES, default="batch", help="one draw per batch, pair or elem")
    x.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N", help="mix the first N epochs only (0: all)")
    add_dap_arguments(p)
    g = p.add_argument_group("DaP selection and Table 2(f) baselines")
    g.add_argument(
        "--dap-select",
        choices=("hard", "random", "none", "infobatch"),
        default="hard",
        help="hard: DaP; random: DaP's sizes, uniform choice; none: all data; infobatch: InfoBatch's policy instead",
    )
    g.add_argument("--infobatch-ratio", type=float, default=0.5, metavar="R", help="InfoBatch: pruned share r")
    g.add_argument(
        "--infobatch-delta", type=float, default=0.875, metavar="D", help="InfoBatch: prune in the first D of epochs"
    )
    g.add_argument(
        "--infobatch-target-compute",
        type=float,
        default=None,
        metavar="F",
        help="InfoBatch: set r each epoch so the run spends compute fraction F (equal-compute comparisons)",
    )
    g.add_argument(
        "--epochs-scale",
        type=float,
        default=None,
        metavar="F",
        help="baseline: all data for round(F x epochs) epochs, LR milestones scaled by F; DaP off",
    )
    g.add_argument(
        "--fixed-subset",
        type=float,
        default=None,
        metavar="F",
        help="baseline: one fixed random fraction F of the data for all epochs; DaP off",
    )
    r = p.add_argument_group("Run")
    r.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, --amp-dtype on GPU")
    r.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16", help="with --amp")
    r.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each full training step as a CUDA graph (SGD, one GPU; for launch-bound small networks)",
    )
    r.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model for training (backend: inductor unless named)",
    )
    r.add_argument("--torchcompile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    r.add_argument(
        "--val-interval",
        "--eval-interval",
        dest="eval_interval",
        type=int,
        default=1,
        metavar="N",
        help="evaluate every N epochs and at the last",
    )
    r.add_argument("-vb", "--validation-batch-size", type=int, default=None, help="default: --batch-size")
    r.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:N, ...")
    r.add_argument("--seed", type=int, default=42, help="run seed: initial weights, data order, augmentation")
    r.add_argument(
        "--output",
        default="runs/default",
        help="the run folder itself (timm's --output is a parent of experiment folders); refused if it holds "
        "another run; default: runs/default, or with --resume the checkpoint's folder",
    )
    r.add_argument("--resume", default="", help="checkpoint to continue from (e.g. OUTPUT/last.pth.tar)")
    r.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    r.add_argument("--log-interval", type=int, default=50, help="steps between log lines")
    r.add_argument("--no-plot", action="store_true", help="skip dap_schedule.png")
    r.add_argument("--compare", action="store_true", help="also train a full-data baseline into OUTPUT/full_data")
    r.add_argument("--export", action="store_true", help="export OUTPUT/export (timm/mmdet/mmpose) at the end")
    r.add_argument(
        "--check",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="PROCESSES",
        help="check every input (flags, data, model, output folder, --resume) for a run of PROCESSES processes "
        "(default 1) and exit: trains and writes nothing (tools/pretrain.sh runs it once before torchrun starts its "
        "processes, so bad input is one line, not one per process)",
    )
    return p


def _config_key_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> its parser action: each flag's ``dest`` and each of its long names with ``_`` (``val_interval``
    and ``eval_interval`` both name ``--val-interval``, as timm's ``args.yaml`` spells it)."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        keys.setdefault(action.dest, action)
        for option in action.option_strings:
            if option.startswith("--"):
                keys.setdefault(option[2:].replace("-", "_"), action)
    return keys


def _config_value(action: argparse.Action, key: str, value, path: Path):
    """A config value checked and converted as the command line's would be, or a :class:`UsageError` naming it.

    argparse checks neither ``choices`` nor ``type`` of a default, which is what a config value becomes, so a typo
    would be silently taken for the default behaviour. YAML reads ``on``/``off`` as booleans: for a flag whose
    choices are ``on``/``off`` they are mapped back."""
    bad = f"config {path}: {key}: {value!r} is invalid"
    if isinstance(action, _Kwargs):  # a mapping; also null (none), or the command line's KEY=VALUE items
        if value is None or isinstance(value, dict):
            return value or {}
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items) or not_key_value(items):
            raise UsageError(f"{bad}: write a mapping (e.g. `{key}: {{name: value}}`) or KEY=VALUE items")
        parsed = argparse.Namespace()
        action(None, parsed, items)
        return getattr(parsed, action.dest)
    if type(action) not in (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction):
        return value
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise UsageError(f"{bad}: write true or false")
        return value
    if value is None or (value == "" and action.default is None):  # timm writes '' for "unset" (lr_base_scale)
        # null where the flag has a value is refused, but timm's `lr: null` (no --lr typed) means "from lr_base"
        if action.default is not None and action.dest != "lr":
            raise UsageError(f"{bad}: give a value (null leaves nothing to use; the default is {action.default!r})")
        return None
    if isinstance(value, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
        value = "on" if value else "off"
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if many and isinstance(value, list) else [value]
    if many and not isinstance(value, list):
        raise UsageError(f"{bad}: write a list, e.g. [{value!r}]")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f"{bad}: write a list of {action.nargs}")
    if action.type in (int, float):
        items = [_number(item, action.type, bad) for item in items]
    elif action.type in (None, str):  # YAML reads `val_split: 2017` as a number; the flag takes text
        items = [str(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else item for item in items]
    if action.choices is not None:
        wrong = [item for item in items if item not in action.choices]
        if wrong:
            raise UsageError(f"{bad}: choose from {', '.join(map(str, action.choices))}")
    return items if many else items[0]


def _number(item, kind: type, bad: str):
    """``item`` as ``kind`` (int or float), as argparse converts the command line's text; YAML 1.1 reads ``5e-4`` as
    text, which is a number here too. Booleans and fractional integers are refused (:class:`UsageError`)."""
    if isinstance(item, str):
        try:
            item = kind(item)
        except ValueError:
            pass
    if not isinstance(item, (bool, str)) and isinstance(item, (int, float)) and math.isfinite(item):
        if kind is float or item == int(item):
            return kind(item)
    raise UsageError(f"{bad}: write {'an integer' if kind is int else 'a number'}")


def _config_defaults(parser: argparse.ArgumentParser, cfg: dict, path: Path) -> tuple[dict, list[str]]:
    """A config's values as ``{dest: value}``, each checked (:func:`_config_value`), and its notes for the run log.

    Keys the trainer lacks are refused in one line, except timm's own settings at timm's defaults
    (:data:`~dap_pretrain.timm_keys.TIMM_ONLY_DEFAULTS`), which change nothing here: a timm ``args.yaml`` holds all
    of them. Those are listed in one note."""
    from dap_pretrain.timm_keys import TIMM_ONLY_DEFAULTS

    actions = _config_key_actions(parser)
    values, at_default, unknown = {}, [], []
    for key, value in cfg.items():
        action = actions.get(key)
        if action is not None:
            values[action.dest] = _config_value(action, key, value, path)
        elif key in TIMM_ONLY_DEFAULTS and value == TIMM_ONLY_DEFAULTS[key]:
            at_default.append(key)
        else:
            unknown.append(key)
    if unknown:
        timm = sorted(k for k in unknown if k in TIMM_ONLY_DEFAULTS)
        why = (
            f" ({', '.join(timm)}: timm settings this trainer lacks, accepted only at timm's defaults)" if timm else ""
        )
        raise UsageError(
            f"config {path} has unknown keys {sorted(unknown)}{why}; use the trainer's flag names with '_'"
        )
    notes = [f"config {path.name}: timm settings at timm's defaults, not used here: {', '.join(at_default)}"]
    return values, notes if at_default else []


def parse_args(argv=None) -> argparse.Namespace:
    """YAML config -> argparse defaults -> command line (timm's two-pass parse).

    The result also holds ``config_notes``: lines the run logs about how the config was read (keys left unused as
    timm's own train.py leaves them)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    cfg, notes, defaults, origin = {}, [], {}, {}
    if pre.config:
        path = Path(pre.config)
        raw = load_config(path, origin=origin)
        if "baseline_epochs" in raw:  # a run's args.yaml written before 2026-11-27
            if raw.get("epochs_scale") is not None and raw["baseline_epochs"] != raw.get("epochs"):
                raise UsageError(
                    f"config {path} is an --epochs-scale run's args.yaml from before 2026-11-27, which holds the "
                    f"scaled epochs and milestones; set epochs: {raw['baseline_epochs']} and the unscaled "
                    "decay_milestones and warmup_epochs, and remove baseline_epochs"
                )
            for key in ("baseline_epochs", "resume", "overwrite"):  # derived, or how that run was started
                raw.pop(key, None)
        cfg, more = _config_defaults(parser, raw, path)
        notes += more
        defaults = {dest: parser.get_default(dest) for dest in cfg}
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    refuse_exclusive_flags(argv, args)
    given = given_flags(argv)
    if not str(args.output).strip():
        raise UsageError("--output is empty: pass the run folder, e.g. --output runs/my_run")
    if args.lr is None and args.lr_base is None:  # a config's lr: null (timm's args.yaml) without an lr_base
        raise UsageError("the config sets lr: null and no lr_base; set lr, or lr_base (the LR of a batch of 256)")
    if "--lr" in given and cfg.get("lr_base") is not None and "--lr-base-size" not in given:
        args.lr_base_size = None  # the config's lr_base_size was lr_base's batch, which --lr replaces (as in timm)
    typed = {"--lr", "--lr-base"} & given
    if cfg.get("lr") is not None and cfg.get("lr_base") is not None and not typed:
        (lr_at, lr_file), (base_at, base_file) = origin["lr"], origin["lr_base"]
        if lr_file == base_file or lr_at > base_at:  # one file holds both (a timm args.yaml), or lr is the later
            notes.append(f"config sets lr and lr_base: lr {args.lr} wins, as in timm (lr_base only without lr)")
            args.lr_base = None
            if "--lr-base-size" not in given:
                args.lr_base_size = None
    if args.decay_epochs is not None and args.sched != "step":  # timm: every N epochs under --sched step only
        if "--decay-epochs" in given:
            raise UsageError(
                f"--decay-epochs sets --sched step's interval, but --sched is {args.sched}; drop it, or pass "
                "--sched step (--sched multistep decays at --decay-milestones)"
            )
        notes.append(f"config's decay_epochs {args.decay_epochs} is not used under sched {args.sched}, as in timm")
        args.decay_epochs = None
    if "--decay-milestones" in given and args.decay_milestones and args.sched == "cosine":  # ignored, reuse too
        raise UsageError(
            "--decay-milestones sets --sched step's decays, but --sched is cosine; drop it, or pass --sched step "
            "(DaP's reuse epochs under cosine: --dap-reuse)"
        )
    # what the command line or the config sets (a config value at the flag's default sets nothing): a setting
    # either holds must not be silently ignored
    set_by_config = {"--" + dest.replace("_", "-") for dest, v in cfg.items() if v != defaults[dest]}
    settings = given | set_by_config
    unused = sorted(f for f in settings if f.startswith("--infobatch-"))
    if unused and args.dap_select != "infobatch":
        raise UsageError(f"{' '.join(unused)} set InfoBatch's policy; add --dap-select infobatch or drop them")
    unused = sorted(f for f in settings if f.startswith("--mixup-") or f == "--cutmix-minmax")
    if unused and not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        raise UsageError(f"{' '.join(unused)} set how batches are mixed; add --mixup or --cutmix, or drop them")
    if args.resume and "--output" not in given:  # continue the run where it is, not in the default folder
        args.output = str(Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent)
    args.config_notes = notes
    return args


def main(argv=None) -> dict:
    """Train one run and, with ``--compare``, its full-data baseline. Returns the run summary."""
    args = parse_args(argv)
    check = vars(args).pop("check", None)  # how this command runs, not a setting of the run
    if check is not None and check < 1:
        raise UsageError(f"--check {check} is invalid: pass the number of processes the run will have (1 or more)")
    cfg = run_config(args)  # resolved once, read-only from here on
    from dap_pretrain.runner import run

    if check is not None:
        run(cfg, check_processes=check)
        if args.compare:  # its baseline's folder and settings too, which the real run reaches only after the first
            run(run_config(_baseline_args(args)), check_processes=check)
        print(f"dap-train: inputs ok for {check} process{'es' if check > 1 else ''} -> {cfg.output}")
        return {}
    summary = run(cfg)  # None on every rank but 0 under torchrun, which trains the baseline all the same
    if args.compare:
        try:
            base = run(run_config(_baseline_args(args)))
        except KeyboardInterrupt as e:  # its own --resume line would be refused: the pair continues through the DaP run
            last = Path(args.output) / LAST_CHECKPOINT
            raise stopped(e, f"continue both runs with --compare --resume {last}") from None
        if summary is not None and base is not None:
            print(compare_table(summary, base))
    return summary


def _baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--compare``'s full-data run, in ``OUTPUT/full_data``: the same flags with ``--dap-select none``. With
    ``--resume`` it continues the baseline from its own last checkpoint where one was saved (in ``OUTPUT/full_data``,
    else beside the resumed run, when that run continues in another folder); a baseline stopped before its first
    checkpoint is started again (``--overwrite``, which keeps its files until the new first checkpoint)."""
    full = argparse.Namespace(**{**vars(args), "compare": False, "dap_select": "none", "resume": ""})
    full.output = str(Path(args.output) / "full_data")
    if args.resume:
        here = Path(full.output) / LAST_CHECKPOINT  # the resumed run's folder, or the one it continues in
        there = Path(args.resume).parent / "full_data" / LAST_CHECKPOINT  # the baseline beside the resumed run
        if here.is_file() or there.is_file():
            full.resume = str(here if here.is_file() else there)
        elif any((Path(full.output) / m).exists() for m in RUN_MARKERS):
            full.overwrite = True
    return full


def compare_table(dap: dict, full: dict) -> str:
    """``--compare``'s lines: compute, top-1 and wall time of both runs, then the difference (top-1 ``n/a``
    where a run was not evaluated, ``--val-split ''``)."""

    def top1(s: dict) -> str:
        return "n/a" if s["top1"] is None else f"{s['top1']:.2f}"

    lines = [f"\n{'run':<10} {'compute':>8} {'top-1':>7} {'wall s':>8}"]
    for name, s in (("DaP", dap), ("full data", full)):
        lines.append(f"{name:<10} {s['compute_fraction_measured']:>8.1%} {top1(s):>7} {s['wall_time_s']:>8.1f}")
    delta = "n/a" if None in (dap["top1"], full["top1"]) else f"{dap['top1'] - full['top1']:+.2f} points"
    lines.append(
        f"DaP top-1 {delta} at {dap['compute_fraction_measured']:.1%} compute, "
        f"{dap['wall_time_s'] / max(full['wall_time_s'], 1e-9):.1%} wall-clock"
    )
    return "\n".join(lines)


cli = entry_point(lambda argv=None: (main(argv), 0)[1])

if __name__ == "__main__":
    sys.exit(cli())
