"""``python -m dap_pretrain.mm.train CONFIG``: DaP pretraining with mmengine/mmpretrain (``tools/pretrain_mm.sh``).

    python -m dap_pretrain.mm.train CONFIG [--data-root DIR] [--work-dir DIR] [--resume [CKPT]] [--overwrite]
        [--amp] [--no-validate] [--auto-scale-lr] [--no-pin-memory] [--no-persistent-workers]
        [--launcher none|pytorch] [--cfg-options key=value ...]

The flags mmpretrain's ``tools/train.py`` has mean what they mean there, and its dataloader defaults apply
(``pin_memory``, ``persistent_workers``, ``default_collate``).

Writes mmengine's work dir (``epoch_N.pth`` with ``checkpoint['dap']``, logs) plus ``run.json`` and
``summary.csv`` in the timm trainer's format. Bad input: one line on stderr, exit code 2, and the work dir left as
it was (see :mod:`dap_pretrain.mm.work_dir`).
"""

from __future__ import annotations

import argparse
import os
import sys

from dap_pretrain.cli import add_cfg_options, check_launcher, make_parser
from dap_pretrain.compat import quiet_mm_imports
from dap_pretrain.errors import entry_point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(prog="pretrain_mm", description=__doc__.splitlines()[0], error_prefix="pretrain_mm: ")
    p.add_argument("config", help="an mm config with a dap block, e.g. configs/mmpretrain/resnet50_dap75_in1k.py")
    p.add_argument("--data-root", default=None, help="ImageFolder tree with train/ and val/ (default: the config's)")
    p.add_argument("--work-dir", default=None, help="default: work_dirs/<config name>")
    p.add_argument(
        "--resume", nargs="?", const="auto", default=None, help="continue the work dir's latest checkpoint, or CKPT"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in the work dir: its epoch_N.pth, last_checkpoint, run.json, summary.csv and "
        "log folders wait in WORK_DIR/.replaced/ until the new run's first checkpoint, and come back if it stops "
        "before (other files stay)",
    )
    p.add_argument("--amp", action="store_true", help="AmpOptimWrapper, dynamic loss scale (mmpretrain's)")
    p.add_argument("--no-validate", action="store_true", help="no validation during training (mmpretrain's)")
    p.add_argument("--auto-scale-lr", action="store_true", help="auto_scale_lr.enable=True (mmpretrain's)")
    p.add_argument("--no-pin-memory", action="store_true", help="dataloaders without pin_memory (mmpretrain's)")
    p.add_argument(
        "--no-persistent-workers", action="store_true", help="dataloaders without persistent_workers (mmpretrain's)"
    )
    p.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm", "mpi"],
        default="none",
        help="pytorch under torchrun (slurm and mpi: start torchrun from the job, NPROC_PER_NODE/NNODES)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the config, dap block, data root, --resume and work dir, then exit: trains and writes nothing "
        "(tools/pretrain_mm.sh runs it once before torchrun starts its processes)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_cfg_options(p)
    args = p.parse_args(argv)
    if args.launcher in ("slurm", "mpi"):
        p.error(
            f"--launcher {args.launcher}: this front end runs under torchrun; start it from your {args.launcher} job "
            "with NPROC_PER_NODE/NNODES (tools/pretrain_mm.sh) and --launcher pytorch"
        )
    if args.local_rank is not None:  # torch.distributed.launch passes it; mmpretrain sets LOCAL_RANK from it too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not args.check:  # the check runs as one plain process, whatever launcher the run will have
        check_launcher(
            p,
            args.launcher,
            fix="start it with tools/pretrain_mm.sh (NPROC_PER_NODE=N: N processes), or drop --launcher",
        )
    return args


@entry_point(prog="pretrain_mm", exit=False)
def main(argv: list[str] | None = None) -> int:
    """CLI: parse and train; a :class:`~dap_pretrain.mm.settings.DaPMMError` is one stderr line, exit code 2."""
    quiet_mm_imports()
    args = parse_args(argv)
    from dap_pretrain.mm.runner import pretrain_mm

    pretrain_mm(
        config=args.config,
        data_root=args.data_root,
        work_dir=args.work_dir,
        resume=args.resume,
        cfg_options=args.cfg_options,
        launcher=args.launcher,
        overwrite=args.overwrite,
        amp=args.amp,
        validate=not args.no_validate,
        auto_scale_lr=args.auto_scale_lr,
        pin_memory=not args.no_pin_memory,
        persistent_workers=not args.no_persistent_workers,
        check=args.check,
    )
    if args.check:
        print(f"pretrain_mm: inputs ok for {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
