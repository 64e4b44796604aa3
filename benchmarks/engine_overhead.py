"""Time DaP's bookkeeping at ImageNet scale (N = 1,281,167), on whatever CPU runs it.

Measures, each as the median of --repeats runs: recording one epoch of per-sample losses in
batches of 256, selecting the next subset (hard, p=0.9 of all N), and one sampler pass
(set_epoch + iterate one rank's shard). Compares the sum with one ImageNet epoch of ResNet-50 on
one GPU, taken as 300 s (about 4,300 img/s, a typical A100/H100 AMP figure) unless --epoch-seconds.

    .venv/bin/python benchmarks/engine_overhead.py
"""

import argparse
import platform
import statistics
import time

import torch

from dap_pretrain.data.sampler import DaPSampler, select_subset
from dap_pretrain.schedule import IMAGENET_NUM_SAMPLES, DaPConfig


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    return f"{names[0]} x{len(names)}" if names else platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=IMAGENET_NUM_SAMPLES)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=300.0, help="one ResNet-50 ImageNet epoch on one GPU")
    args = parser.parse_args()
    n = args.num_samples
    sampler = DaPSampler(
        n, config=DaPConfig(epochs=120, warmup=10, interval=2, keep=0.9, active=10, reuse=(30, 60, 90)), seed=0
    )
    order = torch.randperm(n)
    batches = list(order.split(args.batch_size))
    losses = [torch.rand(b.numel()) for b in batches]

    def record():
        sampler.recorder.reset()
        for idx, loss in zip(batches, losses, strict=True):
            sampler.record(idx, loss)

    record()
    mean = sampler.recorder.mean_losses()
    full = torch.arange(n)

    def select():
        select_subset(full, mean, keep=0.9, strategy="hard")

    def sampler_pass():
        sampler.set_epoch(1)
        for _ in sampler:
            pass

    rows = [
        (f"record one epoch (batches of {args.batch_size})", _median_seconds(record, args.repeats)),
        ("select next subset (hard, p=0.9)", _median_seconds(select, args.repeats)),
        ("one sampler pass (shuffle + iterate)", _median_seconds(sampler_pass, args.repeats)),
    ]
    total = sum(t for _, t in rows)
    print(
        f"machine: {_cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; N = {n:,}; median of {args.repeats}"
    )
    print(f"| {'step':<40} | {'seconds':>8} | {'% of a ' + str(int(args.epoch_seconds)) + ' s epoch':>16} |")
    print(f"|{'-' * 42}|{'-' * 10}:|{'-' * 18}:|")
    for name, t in rows + [("all bookkeeping", total)]:
        print(f"| {name:<40} | {t:>8.3f} | {100 * t / args.epoch_seconds:>15.3f}% |")


if __name__ == "__main__":
    main()
