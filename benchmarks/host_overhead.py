"""What the trainer adds per step on the host: ``train_one_epoch`` against the benchmarks' bare ``sgd_step``.

    python benchmarks/host_overhead.py [--steps 400] [--repeats 5]

Both train the same one-layer model on one fixed batch of 256 on the CPU with one thread, so a step is mostly Python
and operator dispatch; the trainer's step also sets the LR (``EpochProgressLR``, cosine), records each sample's loss
(DaP's ``LossRecorder``), sums the loss and applies weight decay. Prints the median microseconds per step of each
over ``--repeats`` epochs of ``--steps`` steps and their difference. RESULTS section 9 sets the difference beside an
H100's ResNet-50 step (about 56 ms), where it bounds what the trainer's own host work can cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import sgd_step  # noqa: E402

from dap_pretrain.data.sampler import LossRecorder  # noqa: E402
from dap_pretrain.engine import train_one_epoch  # noqa: E402
from dap_pretrain.lr import EpochProgressLR  # noqa: E402


def per_step_us(*, steps: int, repeats: int, batch: int = 256) -> dict[str, float]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    batches = [(x, y, torch.arange(k * batch, (k + 1) * batch)) for k in range(steps)]
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    for _ in range(repeats):
        net = torch.nn.Linear(8, 10)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = EpochProgressLR(opt, base_lr=0.1, sched="cosine", epochs=1)
        t0 = time.perf_counter()
        train_one_epoch(net, batches, opt, epoch=0, sampler=LossRecorder(steps * batch), lr_scheduler=sched,
                        device=cpu, show_progress=False)  # fmt: skip
        times["trainer"].append((time.perf_counter() - t0) / steps * 1e6)
        net = torch.nn.Linear(8, 10)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        t0 = time.perf_counter()
        for xb, yb, _ in batches:
            sgd_step(net, opt, None, xb, yb, dev=cpu, dtype=None)
        times["bare"].append((time.perf_counter() - t0) / steps * 1e6)
    res = {k: statistics.median(v) for k, v in times.items()}
    return {**res, "difference": res["trainer"] - res["bare"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    res = per_step_us(steps=args.steps, repeats=args.repeats)
    print(f"host time per step, median of {args.repeats} epochs of {args.steps} steps (one thread, one-layer model): "
          f"trainer {res['trainer']:.1f} us, bare sgd_step {res['bare']:.1f} us, difference "
          f"{res['difference']:.1f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
