"""Command-line plumbing shared by ``python -m dap_pretrain`` and the trainer.

Only entry points import this module; library code takes keyword arguments (STYLE rule 6).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time

from dap_pretrain.config import PAPER_SETTINGS, dap_config_from_args, default_reuse, paper_setting
from dap_pretrain.errors import TORCHRUN_ENV, UsageError, entry_point, print_error, user_input
from dap_pretrain.schedule import IMAGENET_NUM_SAMPLES, plan


def add_dap_arguments(parser: argparse.ArgumentParser, *, with_epochs: bool = True) -> None:
    """The DaP flags, identical for ``plan`` and the trainer."""
    g = parser.add_argument_group("Drop-and-Pick")
    if with_epochs:
        g.add_argument("--epochs", type=int, default=120, help="total epochs E")
    g.add_argument("--dap-warmup", type=int, default=10, metavar="W", help="warm-up epochs on all data")
    g.add_argument("--dap-interval", type=int, default=2, metavar="I", help="drop every I epochs")
    g.add_argument("--dap-keep", type=float, default=0.9, metavar="P", help="fraction of the current subset kept")
    g.add_argument(
        "--dap-active",
        type=int,
        default=None,
        metavar="A",
        help="drop only during the first A epochs of a cycle (default: unlimited)",
    )
    g.add_argument(
        "--dap-reuse",
        type=int,
        nargs="*",
        default=None,
        metavar="R",
        help="epochs at whose end all data is picked up again (trainer default: the LR decay milestones)",
    )
    g.add_argument(
        "--dap-target-compute",
        type=float,
        default=None,
        metavar="F",
        help="solve --dap-keep so the plan spends compute fraction F",
    )


# Flags that set the same thing two ways: both on one command line is a one-line refusal (a config file's value
# is overridden by either without notice, as the command line overrides a config).
EXCLUSIVE_FLAGS = (
    ("--lr", "--lr-base", "--lr sets the LR and --lr-base sets it from the global batch size"),
    ("--dap-keep", "--dap-target-compute", "--dap-target-compute solves --dap-keep"),
    ("--decay-milestones", "--decay-epochs", "--decay-epochs N sets the milestones N, 2N, ... (--sched step)"),
)


def given_flags(argv: list[str] | None) -> set[str]:
    """The long flags written on the command line ``argv`` (default ``sys.argv[1:]``), values and ``=VALUE`` left
    out: what was given, as opposed to a default or a config file's value."""
    return {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}


def refuse_exclusive_flags(argv: list[str] | None, args: argparse.Namespace | None = None) -> None:
    """A :class:`UsageError` when ``argv`` (default ``sys.argv[1:]``) gives both flags of a pair in
    :data:`EXCLUSIVE_FLAGS`. With ``args`` (parsed with a config's values as defaults), the first flag of a pair
    given alone clears the second if a config set it, so the command line wins either way (the second, given alone,
    already replaces the first: ``run_config`` sets the LR from ``--lr-base``, the planner solves p)."""
    given = given_flags(argv)
    for a, b, why in EXCLUSIVE_FLAGS:
        if a in given and b in given:
            raise UsageError(f"{why}; give one of {a} and {b}")
        if args is not None and a in given:
            setattr(args, b.lstrip("-").replace("-", "_"), None)


# timm train.py flags the trainer does not have, and what to use instead (the README lists the rest).
TIMM_INSTEAD = {
    "--input-size": "use --img-size N (square, 3 channels)",
    "--in-chans": "not supported: the trainer builds 3-channel models",
    "--no-aug": "not supported; --aug cifar is the lightest augmentation, --in-memory off keeps timm's",
    "--eval-metric": "not supported: model_best.pth.tar is chosen by top-1 (the EMA's with --model-ema, as timm's)",
    "--no-resume-opt": "not supported: --resume restores the optimizer (to start from weights: --initial-checkpoint)",
    "--start-epoch": "not supported: --resume continues from the checkpoint's epoch",
    "--pin-mem": "not needed: batches are pinned when training on CUDA",
    "--class-map": "not supported: classes are the folder names, sorted",
    "--bn-eps": "pass --model-kwargs with the model's norm keyword, if it takes one",
    "--bn-momentum": "pass --model-kwargs with the model's norm keyword, if it takes one",
    "--pretrained": "not supported: DaP pretrains; to start from weights, --initial-checkpoint FILE",
    "--experiment": "use --output DIR, the run folder itself",
    "--log-wandb": "not supported; log.txt, summary.csv and run.json are in the run folder",
    "--cooldown-epochs": "not supported: the LR follows --sched",
    "--sched-on-updates": "not needed: the LR is set before every step from the epoch's progress",
    "--bce-loss": "not supported: DaP ranks samples by cross-entropy",
    "--aug-repeats": "not supported: repeated augmentation would rank each sample several times per epoch",
    "--checkpoint-hist": "not supported: last.pth.tar and model_best.pth.tar are kept",
    "--gp": "pass --model-kwargs global_pool=avg (or the pooling you want)",
    "--drop-block": "pass --model-kwargs drop_block_rate=R, if the model takes it",
    "--drop-connect": "deprecated in timm; use --drop-path",
    "--color-jitter-prob": "not supported: colour jitter is applied to every image (--color-jitter 0 turns it off)",
    "--warmup-prefix": "not supported: the warm-up replaces the start of the schedule, timm's default",
    "--lr-k-decay": "not supported: --sched cosine follows timm's default curve (k = 1)",
    "--local_rank": "launch with torchrun, which sets LOCAL_RANK in the environment",
    "--local-rank": "launch with torchrun, which sets LOCAL_RANK in the environment",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit 2, and a hint for a misspelt flag; ``error_prefix`` goes before
    ``error:`` (``transfer_coco: error: ...``, as the tool's other refusals read); ``timm_hints``: name what to use
    for a timm train.py flag the parser lacks (the trainer's). Abbreviated flags are refused, not expanded: what
    was given on the command line (:func:`given_flags`) must be readable from the words typed."""

    def __init__(self, *args, error_prefix: str = "", timm_hints: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.error_prefix, self.timm_hints = error_prefix, timm_hints

    def error(self, message):  # argparse's default prints usage on several lines
        print_error(f"{self.error_prefix}error: {message}{self._did_you_mean(message)} (see --help)")
        sys.exit(2)

    def _did_you_mean(self, message: str) -> str:
        """``; did you mean --drop-path?`` for an unrecognised flag close to a known one (``--drop_path``), and what
        to use instead for a timm train.py flag this parser lacks (:data:`TIMM_INSTEAD`)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        parsers = [self] + [  # a subcommand's flags too: argparse reports their leftovers from the top parser
            sp for a in self._actions if isinstance(a, argparse._SubParsersAction) for sp in a.choices.values()
        ]
        flags = (o for q in parsers for action in q._actions for o in action.option_strings)
        known = list(dict.fromkeys(o for o in flags if o.startswith("--")))
        hints, instead, previous = [], [], ""
        for token in message.split(":", 1)[1].split():
            flag, after_flag, previous = token.split("=", 1)[0], previous, token
            if flag in TIMM_INSTEAD and self.timm_hints:
                instead.append(f"timm's {flag}: {TIMM_INSTEAD[flag]}")
            elif self.timm_hints and not token.startswith("-") and not _number_like(token):  # not a surplus value
                if not (after_flag.startswith("-") and "=" not in after_flag) and not instead:  # nor a flag's value
                    instead.append(f"timm's positional data folder: pass --data-dir {token}")
            elif flag.startswith("--"):
                longer = [o for o in known if o.startswith(flag)]  # an abbreviation (argparse's are off)
                close = longer if len(longer) == 1 else difflib.get_close_matches(flag.replace("_", "-"), known, 1, 0.8)
                hints += [f"{close[0]} for {flag}"] if close else []
        return (f"; did you mean {', '.join(hints)}?" if hints else "") + "".join(f"; {i}" for i in instead)


def _number_like(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def make_parser(**kwargs) -> argparse.ArgumentParser:
    """An ``argparse.ArgumentParser`` whose errors are one line and exit 2 (see :class:`_Parser`)."""
    return _Parser(**kwargs)


def not_key_value(values: list[str]) -> list[str]:
    """The items of a ``KEY=VALUE ...`` flag that are not: no ``=``, or nothing before it."""
    return [v for v in values if not v.partition("=")[0] or "=" not in v]


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    """mmengine's ``--cfg-options key.path=value ...`` (its ``DictAction``: lists, tuples, ``None``/booleans), where
    an item without ``=``, or a value it cannot parse (``a=[1,2``), is ``parser.error``'s one line instead of
    mmengine's traceback. mmengine is imported only when the flag is given."""

    class CfgOptions(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            from mmengine.config import DictAction

            flag = option_string or "--cfg-options"
            for item in not_key_value(values):
                parser.error(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} train_cfg.max_epochs=4")
            try:
                DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)
            except (ValueError, AssertionError, IndexError) as e:  # DictAction's parsing of a malformed value
                parser.error(f"{flag}: cannot parse {' '.join(values)!r} ({e}); write KEY=VALUE with balanced brackets")

    parser.add_argument(
        "--cfg-options", nargs="+", action=CfgOptions, default=None, metavar="KEY=VALUE", help="mmengine overrides"
    )


def check_launcher(parser: argparse.ArgumentParser, launcher: str, *, fix: str) -> None:
    """``--launcher pytorch`` outside torchrun is ``parser.error``'s one line naming the unset variables and ``fix``
    (mmengine's ``init_dist`` and ``init_process_group`` would fail on a missing ``LOCAL_RANK`` with a traceback)."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if launcher == "pytorch" and missing:
        parser.error(f"--launcher pytorch needs torchrun's environment ({', '.join(missing)} unset); {fix}")


def _plan_main(args: argparse.Namespace) -> int:
    args.sched = "step" if args.sched == "multistep" else args.sched
    with user_input():
        cfg, note = dap_config_from_args(args, num_samples=args.num_samples, default_reuse=default_reuse(args))
        p = plan(cfg, args.num_samples)
    if args.json:
        out = p.to_dict()
        if args.dap_target_compute is not None:
            out["target_compute"] = args.dap_target_compute
        print(json.dumps(out))
        return 0
    print(f"{'epoch':>5}  {'subset':>10}  {'fraction':>8}  event at end")
    for i, (size, event) in enumerate(zip(p.subset_sizes, p.events, strict=True), start=1):
        print(f"{i:>5}  {size:>10}  {size / p.num_samples:>8.4f}  {event}")
    if note:
        print(note)
    print(
        f"compute fraction: {p.compute_fraction:.4f} ({p.compute_fraction:.1%}) = {p.samples_trained} samples "
        f"/ ({cfg.epochs} epochs x {p.num_samples})"
    )
    return 0


def _export_main(args: argparse.Namespace) -> int:
    from dap_pretrain.export import export_backbone

    out = export_backbone(args.checkpoint, args.out, use_ema=not args.no_ema, overwrite=args.overwrite)
    native = json.loads((out / "meta.json").read_text())["timm_native"]
    load = f"timm.create_model('local-dir:{out}', pretrained=True)"
    print(f"exported {args.checkpoint} -> {out}; load: {load}{'' if native else ' after `import dap_pretrain`'}")
    return 0


def _cache_main(args: argparse.Namespace) -> int:
    from dap_pretrain.data import cache

    if not math.isfinite(args.older_than) or args.older_than < 0:
        raise UsageError(f"--older-than {args.older_than:g} is invalid: a number of days >= 0 (0: every unused entry)")
    if args.older_than_given and not args.clean:
        raise UsageError("--older-than says which entries --clean removes; add --clean or drop it")
    root = cache.root(args.cache_dir)
    try:
        if args.cache_dir is not None:
            if not str(args.cache_dir).strip() or not root.is_dir():
                raise UsageError(
                    f"--cache-dir {args.cache_dir!r} is not a folder; pass the folder that holds the extractions"
                )
            if args.clean and not (root / cache.TAG).is_file():
                raise UsageError(
                    f"{root} is not a dap-pretrain dataset cache (no {cache.TAG}); pass the folder that holds the "
                    f"extractions (default {cache.root()}), or, for a cache from before the marker, create "
                    f"{root / cache.TAG}"
                )
        return _cache_report(root, args)
    except OSError as e:
        raise UsageError(
            f"cannot read the dataset cache {root} ({e.strerror or e}); pass a readable --cache-dir"
        ) from None


def _cache_report(root, args: argparse.Namespace) -> int:
    from dap_pretrain.data import cache

    if args.clean:
        try:
            removed, busy = cache.clean(root, older_than_days=args.older_than) if root.is_dir() else ([], [])
        except cache.CleanRefused as e:
            raise UsageError(str(e)) from None
        for e in removed:
            print(f"removed {e.path.name} ({cache.human_bytes(e.bytes)})")
        for e in busy:
            print(f"kept {e.path.name}: in use by another process")
        freed = sum(e.bytes for e in removed)
        print(f"{root}: removed {len(removed)} entries unused for {args.older_than:g} days, {cache.human_bytes(freed)}")
        return 0
    found = cache.entries(root)
    now = time.time()
    for e in found:
        state = "in use" if e.in_use else f"last used {(now - e.last_used) / 86400:.1f} days ago"
        group = cache.group_of(e.path.name)
        if group != e.path.name:  # the embedded split: hard links into its extraction, whose size counts them
            state += f"; its files are hard links into {group}, counted there"
        print(f"{cache.human_bytes(e.bytes):>10}  {e.path.name}  ({state})")
    total = cache.human_bytes(sum(e.bytes for e in found))
    print(
        f"{root}: {len(found)} entries, {total}; `python -m dap_pretrain cache --clean` removes those unused for "
        "30 days"
    )
    return 0


@entry_point
def main(argv=None) -> int:
    parser = make_parser(prog="python -m dap_pretrain", description="Drop-and-Pick planner and backbone export")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="print the per-epoch subset sizes and compute fraction of a DaP schedule")
    add_dap_arguments(p)
    p.add_argument("--num-samples", type=int, default=IMAGENET_NUM_SAMPLES, help="dataset size N (default ImageNet-1k)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sched", choices=("step", "multistep", "cosine"), default="step", help="the trainer's LR schedule")
    p.add_argument(
        "--decay-milestones",
        type=int,
        nargs="*",
        default=[30, 60, 90],
        help="the trainer's LR-decay epochs: R when --dap-reuse is not given (with --sched step), as in the trainer",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PAPER_SETTINGS),
        help="start from a paper setting (read from configs/pretrain); other flags override it",
    )
    e = sub.add_parser("export", help="release a training checkpoint as timm/mmdet/mmpose weights")
    e.add_argument(
        "checkpoint",
        help="OUTPUT/last.pth.tar of dap-train, or WORK_DIR/epoch_N.pth of tools/pretrain_mm.sh "
        "(mmengine's pickles objects: it is unpickled, so pass only your own training output)",
    )
    e.add_argument(
        "--out", required=True, help="folder to write model.safetensors + config.json (timm), backbone.pth, meta.json"
    )
    e.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    c = sub.add_parser("cache", help="list the extracted datasets in the cache; --clean removes the unused ones")
    c.add_argument("--clean", action="store_true", help="remove the entries not used for --older-than days")
    c.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="with --clean: unused this long (default 30)"
    )
    c.add_argument("--cache-dir", default=None, help="default: $XDG_CACHE_HOME/dap-pretrain/datasets")
    args = parser.parse_args(argv)
    if args.command == "cache":
        args.older_than_given = args.older_than is not None
        args.older_than = 30.0 if args.older_than is None else args.older_than
    if args.command == "plan":
        refuse_exclusive_flags(argv)
    if args.command == "plan" and args.preset:
        p.set_defaults(**paper_setting(args.preset))
        args = parser.parse_args(argv)
    return {"plan": _plan_main, "export": _export_main, "cache": _cache_main}[args.command](args)
