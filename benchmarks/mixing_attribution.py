"""Does it matter whom a mixed image's loss is charged to? DaP's own-label split against per-image losses.

    python benchmarks/mixing_attribution.py [--output DIR] [trainer flags ...]

Trains the embedded default (``tools/pretrain.sh``'s config: CIFAR ResNet-20, 8,000 images, 20 epochs, DaP with
p=0.9 every epoch after a warm-up of 3) with Mixup 0.8 / CutMix 1.0 / smoothing 0.1 unless other flags are given,
through the trainer itself. DaP ranks by each sample's own label's share of the mixed losses
(``dap_pretrain.mixing``). Beside it, this script keeps what timm-style code would rank by: each *image*'s loss,
charged to the sample whose index the image carries. At every drop it prints, over the current subset:

- Spearman's rho between the two per-sample means;
- the share of the samples DaP dropped that ranking by image loss would also have dropped (same p, same subset;
  chance, for two unrelated rankings, is 1 - p).

The only instrumentation: ``dap_pretrain.engine.mixed_losses`` is wrapped to keep each batch's per-image losses,
and ``DaPSampler.record`` / ``end_epoch`` to sum them per sample and compare at each drop. The training itself is
the trainer's, unchanged (its top-1 and compute are printed at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dap_pretrain import engine  # noqa: E402
from dap_pretrain.data.sampler import DaPSampler, select_subset  # noqa: E402
from dap_pretrain.schedule import DROP  # noqa: E402

DEFAULT_FLAGS = ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho (ties broken by order: the losses are continuous)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class Probe:
    """Sums each sample's per-image loss beside the recorder's own-label sums; compares the two at each drop."""

    def __init__(self):
        self.last_images: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.rows: list[dict] = []

    def install(self) -> None:
        probe, losses, record, end_epoch = self, engine.mixed_losses, DaPSampler.record, DaPSampler.end_epoch

        def mixed_losses(*args, **kwargs):
            out = losses(*args, **kwargs)
            probe.last_images = out.images.detach()
            return out

        def record_both(sampler, indices, owned):
            record(sampler, indices, owned)
            if probe.sums is None:
                probe.sums = torch.zeros(sampler.num_samples, dtype=torch.float64)
                probe.counts = torch.zeros(sampler.num_samples, dtype=torch.float64)
            images = probe.last_images if probe.last_images is not None else owned.detach()  # unmixed epochs
            probe.sums.index_add_(0, indices.cpu(), images.cpu().double())
            probe.counts.index_add_(0, indices.cpu(), torch.ones(indices.numel(), dtype=torch.float64))
            probe.last_images = None

        def end_epoch_and_compare(sampler):
            subset = sampler.subset.clone()
            own_mean = sampler.recorder.mean_losses().clone()
            report = end_epoch(sampler)
            if report.event == DROP and probe.sums is not None:
                image_mean = probe.sums / probe.counts.clamp(min=1)
                kept_by_image = select_subset(subset, image_mean, keep=sampler.config.keep, strategy="hard")
                dropped = subset[~torch.isin(subset, sampler.subset)]
                dropped_by_image = subset[~torch.isin(subset, kept_by_image)]
                probe.rows.append(
                    {
                        "epoch": report.epoch,
                        "subset": subset.numel(),
                        "dropped": dropped.numel(),
                        "spearman": spearman(own_mean[subset], image_mean[subset]),
                        "dropped_by_both": float(torch.isin(dropped, dropped_by_image).sum()) / max(1, dropped.numel()),
                        "chance": dropped.numel() / max(1, subset.numel()),
                    }
                )
                row = probe.rows[-1]
                print(
                    f"[mixing_attribution] epoch {row['epoch']}: subset {row['subset']}, dropped {row['dropped']}; "
                    f"Spearman rho {row['spearman']:.3f}; ranking by image loss drops {row['dropped_by_both']:.1%} "
                    f"of the same samples (chance: {row['chance']:.1%})",
                    flush=True,
                )
            if probe.sums is not None:
                probe.sums.zero_()
                probe.counts.zero_()
            return report

        engine.mixed_losses = mixed_losses
        DaPSampler.record = record_both
        DaPSampler.end_epoch = end_epoch_and_compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/mixing_attribution", help="the run folder (refused if it holds a run)")
    args, trainer_flags = p.parse_known_args(argv)
    flags = trainer_flags or DEFAULT_FLAGS
    probe = Probe()
    probe.install()
    from dap_pretrain.train import main as train_main

    config = REPO / "configs/pretrain/embedded_cifar10.yaml"
    t0 = time.perf_counter()
    summary = train_main(["--config", str(config), "--no-plot", "--output", args.output, *flags])
    seconds = time.perf_counter() - t0
    rhos = [r["spearman"] for r in probe.rows]
    both = [r["dropped_by_both"] for r in probe.rows]
    result = {
        "flags": flags,
        "drops": probe.rows,
        "top1": summary["top1"],
        "compute_fraction_measured": summary["compute_fraction_measured"],
        "seconds": seconds,
    }
    (Path(args.output) / "mixing_attribution.json").write_text(json.dumps(result, indent=1))
    print(
        f"[mixing_attribution] {len(rhos)} drops: Spearman rho {min(rhos):.3f}-{max(rhos):.3f}; ranking by image loss "
        f"would have dropped {min(both):.1%}-{max(both):.1%} of the samples DaP dropped; top-1 {summary['top1']:.2f}"
        f" at compute {summary['compute_fraction_measured']:.1%}; {seconds:.0f} s (flags: {' '.join(flags)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
