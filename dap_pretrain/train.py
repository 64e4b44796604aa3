"""``dap-train`` / ``python -m dap_pretrain.train``: timm's train.py flags plus Drop-and-Pick.

``main()`` only wires components: args -> data -> model -> optimizer/LR -> sampler -> epochs.
Config precedence, as in timm: ``--config file.yaml`` sets argparse defaults, the command line wins.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from dap_pretrain.cli import UsageError, add_dap_arguments, dap_config_from_args, exits_cleanly, make_parser

_logger = logging.getLogger("dap_pretrain.train")

RUN_MARKERS = ("run.json", "args.yaml", "last.pth.tar", "summary.csv")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(prog="dap-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="", help="YAML file of argparse defaults (command line overrides)")
    d = p.add_argument_group("Data")
    d.add_argument(
        "--data-dir",
        default="embedded",
        help="ImageFolder tree (with split subfolders), a .tar/.tar.gz of one, or 'embedded'",
    )
    d.add_argument("--dataset", default="", help="timm dataset name ('' = ImageFolder, 'torch/cifar10', ...)")
    d.add_argument("--dataset-download", action="store_true", help="let torchvision download a torch/* dataset")
    d.add_argument("--train-split", default="train")
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
    d.add_argument("-j", "--workers", type=int, default=2)
    d.add_argument("--drop-last", action="store_true", help="drop each epoch's last partial batch")
    m = p.add_argument_group("Model")
    m.add_argument("--model", default="cifar_resnet20", help="any timm model name")
    m.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    m.add_argument("--channels-last", action="store_true")
    m.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (exported if present)")
    m.add_argument("--model-ema-decay", type=float, default=0.9998)
    o = p.add_argument_group("Optimizer and schedule")
    o.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    o.add_argument("--opt", default="sgd", help="timm optimizer name")
    o.add_argument("--lr", type=float, default=0.1)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--clip-grad", type=float, default=None)
    o.add_argument("--sched", choices=("step", "cosine"), default="step")
    o.add_argument("--decay-milestones", type=int, nargs="*", default=[30, 60, 90], help="epochs where LR *= rate")
    o.add_argument("--decay-rate", type=float, default=0.1)
    o.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warm-up (not DaP's --dap-warmup)")
    o.add_argument("--warmup-lr", type=float, default=1e-5)
    o.add_argument("--min-lr", type=float, default=0.0)
    o.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    o.add_argument("--mixup", type=float, default=0.0, help="refused with DaP (see docs)")
    o.add_argument("--cutmix", type=float, default=0.0, help="refused with DaP (see docs)")
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
    r.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16")
    r.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each full training step as a CUDA graph (SGD, one GPU; for launch-bound small networks)",
    )
    r.add_argument("--eval-interval", type=int, default=1, metavar="N", help="evaluate every N epochs and at the last")
    r.add_argument("-vb", "--validation-batch-size", type=int, default=None, help="default: --batch-size")
    r.add_argument("--device", default="auto")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--output", default="runs/default", help="run folder (refused if it holds another run)")
    r.add_argument("--resume", default="", help="checkpoint to continue from (e.g. OUTPUT/last.pth.tar)")
    r.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    r.add_argument("--log-interval", type=int, default=50)
    r.add_argument("--no-plot", action="store_true")
    r.add_argument("--compare", action="store_true", help="also train a full-data baseline into OUTPUT/full_data")
    r.add_argument("--export", action="store_true", help="export OUTPUT/export (timm/mmdet/mmpose) at the end")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """YAML config -> argparse defaults -> command line (timm's two-pass parse)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        path = Path(pre.config)
        cfg = load_config(path)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UsageError(f"config {path} has unknown keys {unknown}; use the trainer's flag names with '_'")
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


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


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD of the checkout this package runs from; ``DAP_GIT_COMMIT`` where the copy has no .git (GPU jobs)."""
    if os.environ.get("DAP_GIT_COMMIT"):
        return os.environ["DAP_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_output_dir(output: Path, *, resume: str, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run, unless resuming it or told to overwrite.

    ``--resume A/last.pth.tar`` continues run A: ``--output`` must be A's folder or hold no run (or ``--overwrite``
    replaces the run there); ``--overwrite`` together with resuming the folder's own run is refused, since it would
    delete the run being continued.
    """
    held = [m for m in RUN_MARKERS if (output / m).exists()]
    own = bool(resume) and output.exists() and Path(resume).resolve().parent == output.resolve()
    if own and overwrite:
        raise UsageError(
            f"--overwrite would delete the run in {output} that --resume {resume} continues; drop --overwrite"
        )
    if held and resume and not own and not overwrite:
        raise UsageError(
            f"output folder {output} holds another run ({', '.join(held)}) than --resume {resume}; pass --output "
            f"{Path(resume).parent} to continue that run there, an empty folder, or --overwrite to replace {output}"
        )
    if held and not resume and not overwrite:
        raise UsageError(
            f"output folder {output} already holds a run ({', '.join(held)}); pass --resume "
            f"{output / 'last.pth.tar'} to continue it, --overwrite to replace it, or another --output"
        )


class _ThisThread(logging.Filter):
    """Passes the records of the thread that made it: each run of ``dap_pretrain.multirun`` logs to its own file."""

    def __init__(self):
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


def main_process_logging(rank: int, output: Path) -> None:
    """Log this thread's records to stdout and (rank 0) OUTPUT/log.txt, replacing its earlier run's handlers.

    Handlers are per thread, so runs sharing a process (``dap_pretrain.multirun``) keep separate logs; handlers
    that no run added (e.g. an earlier ``basicConfig``) are replaced too, as ``basicConfig(force=True)`` would.
    """
    root = logging.getLogger()
    ident = threading.get_ident()
    for handler in list(root.handlers):
        if getattr(handler, "dap_thread", None) in (ident, None):
            root.removeHandler(handler)
            handler.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(output / "log.txt"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_ThisThread())
        handler.dap_thread = ident
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


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


def main(argv=None) -> dict:
    """Train one run and, with ``--compare``, its full-data baseline. Returns the run summary."""
    args = parse_args(argv)
    from dap_pretrain.runner import run

    summary = run(args)
    if args.compare and summary is not None:
        base_args = parse_args(argv)
        base_args.compare = False
        base_args.dap_select = "none"
        base_args.output = str(Path(args.output) / "full_data")
        base_args.resume = ""
        base = run(base_args)
        if base is not None:
            print(f"\n{'run':<10} {'compute':>8} {'top-1':>7} {'wall s':>8}")
            for name, s in (("DaP", summary), ("full data", base)):
                print(f"{name:<10} {s['compute_fraction_measured']:>8.1%} {s['top1']:>7.2f} {s['wall_time_s']:>8.1f}")
            print(
                f"DaP top-1 {summary['top1'] - base['top1']:+.2f} points at {summary['compute_fraction_measured']:.1%}"
                f" compute, {summary['wall_time_s'] / max(base['wall_time_s'], 1e-9):.1%} wall-clock"
            )
    return summary


cli = exits_cleanly(lambda argv=None: (main(argv), 0)[1])

if __name__ == "__main__":
    sys.exit(cli())
