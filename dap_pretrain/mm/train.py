"""``python -m dap_pretrain.mm.train CONFIG``: DaP pretraining with mmengine/mmpretrain (``tools/pretrain_mm.sh``).

    python -m dap_pretrain.mm.train CONFIG [--data-root DIR] [--work-dir DIR] [--resume [CKPT]] [--overwrite]
        [--launcher none|pytorch] [--cfg-options key=value ...]

Writes mmengine's work dir (``epoch_N.pth`` with ``checkpoint['dap']``, logs) plus ``run.json`` and
``summary.csv`` in the timm trainer's format. Bad input: one line on stderr, exit code 2, and the work dir left as
it was (see :mod:`dap_pretrain.mm.work_dir`).
"""

from __future__ import annotations

import argparse
import sys

from dap_pretrain.cli import add_cfg_options, make_parser
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
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none", help="pytorch under torchrun")
    add_cfg_options(p)
    return p.parse_args(argv)


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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
