"""The trainer with :class:`GpuDecodeLoader`'s experiments switched on, for ``gpu_decode.py``'s A/B (benchmarks only).

    python benchmarks/trainer_gpu_variant.py '{"pin_memory": true, "dtype": "float16"}' TRAINER FLAGS...

The JSON's keys are :class:`GpuDecodeLoader` keywords (``dtype`` by name); every ``--gpu-decode`` loader the trainer
builds gets them. Everything else is ``python -m dap_pretrain.train FLAGS``: the same code path, so a variant that
wins here becomes the trainer's default with the figure it measured.
"""

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as ``python -m`` from its root has it

from dap_pretrain import runner  # noqa: E402
from dap_pretrain.train import cli  # noqa: E402

if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    runner.GpuDecodeLoader = functools.partial(runner.GpuDecodeLoader, **kwargs)
    sys.exit(cli(sys.argv[2:]))
