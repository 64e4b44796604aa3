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

A control, because each sample is mixed once per epoch and both rankings carry that draw's noise: before each drop
the script passes the subset twice more through a copy of the model (train mode, no gradient, the epoch's own
batches and augmentation) with two other mixing draws, B and C, and compares at equal weights and draws:
own(B) against image(B) (the choice of attribution), own(B) against own(C) and image(B) against image(C) (what
another draw alone changes). The choice matters beyond the noise only where the first overlap is clearly below
the other two. ``--no-control`` skips these passes.

The only instrumentation: ``dap_pretrain.engine.mixed_losses`` is wrapped to keep each batch's per-image losses,
and ``DaPSampler.record`` / ``end_epoch`` to sum them per sample and compare at each drop. The training itself is
the trainer's, unchanged (its top-1 and compute are printed at the end).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dap_pretrain import engine, runner  # noqa: E402
from dap_pretrain.data.sampler import DaPSampler, select_subset  # noqa: E402
from dap_pretrain.mixing import Mixer  # noqa: E402
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


def dropped_share(subset: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: float) -> float:
    """Of the samples ranking ``a`` drops from ``subset``, the share ranking ``b`` drops too (per-sample losses)."""
    drop_a = subset[~torch.isin(subset, select_subset(subset, a, keep=keep, strategy="hard"))]
    drop_b = subset[~torch.isin(subset, select_subset(subset, b, keep=keep, strategy="hard"))]
    return float(torch.isin(drop_a, drop_b).sum()) / max(1, drop_a.numel())


def drops_after_this_epoch(sampler) -> bool:
    """Whether the sampler's ``end_epoch`` about to run drops (its schedule stepped on a copy)."""
    schedule = sampler.schedule
    return schedule is not None and copy.deepcopy(schedule).step(sampler.epoch + 1) == DROP


def train_embedded(output: str, flags: list[str], name: str, rows: list[dict]) -> tuple[dict, dict]:
    """Train the embedded default (``configs/pretrain/embedded_cifar10.yaml``) with ``flags`` into ``output`` through
    the trainer, with whatever the caller's probe has wrapped; write ``OUTPUT/NAME.json`` (flags, the probe's
    ``rows`` per drop, top-1, compute, seconds). Returns the run summary and that JSON's content."""
    from dap_pretrain.train import main as train_main

    config = REPO / "configs/pretrain/embedded_cifar10.yaml"
    t0 = time.perf_counter()
    summary = train_main(["--config", str(config), "--no-plot", "--output", output, *flags])
    result = {
        "flags": flags,
        "drops": rows,
        "top1": summary["top1"],
        "compute_fraction_measured": summary["compute_fraction_measured"],
        "seconds": time.perf_counter() - t0,
    }
    (Path(output) / f"{name}.json").write_text(json.dumps(result, indent=1))
    return summary, result


def share_ranges(rows: list[dict], keys) -> str:
    """``key min-max (median m)`` of each share over the drops, ``; ``-joined."""
    shares = {k: [r[k] for r in rows] for k in keys}
    return "; ".join(f"{k} {min(v):.1%}-{max(v):.1%} (median {statistics.median(v):.1%})" for k, v in shares.items())


def redraw(mixer: Mixer, offset: int) -> Mixer:
    """The same mixing with another seed: other draws from the same distributions."""
    return Mixer(mixup_alpha=mixer.mixup_alpha, cutmix_alpha=mixer.cutmix_alpha, cutmix_minmax=mixer.cutmix_minmax,
                 prob=mixer.prob, switch_prob=mixer.switch_prob, mode=mixer.mode, seed=mixer.seed + 7919 * offset,
                 rank=mixer.rank)  # fmt: skip


@torch.no_grad()
def control_pass(context: dict, num_samples: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean own and image losses of one more pass over the epoch's batches with draw ``offset``, through a
    copy of the model in train mode (batch statistics, as in training; the run's model is left untouched)."""
    model = copy.deepcopy(context["model"]).train()
    mixer = redraw(context["mixer"], offset)
    own, image = torch.zeros(num_samples, dtype=torch.float64), torch.zeros(num_samples, dtype=torch.float64)
    count = torch.zeros(num_samples, dtype=torch.float64)
    for step, (images, targets, indices) in enumerate(context["loader"]):
        mixed, lam = mixer(images, epoch=context["epoch"], step=step)
        out = engine.mixed_losses(model(mixed), targets, lam, smoothing=context["smoothing"])
        idx = indices.cpu()
        own.index_add_(0, idx, out.own.cpu().double())
        image.index_add_(0, idx, out.images.cpu().double())
        count.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    return own / count.clamp(min=1), image / count.clamp(min=1)


class Probe:
    """Sums each sample's per-image loss beside the recorder's own-label sums; compares the two at each drop."""

    def __init__(self, *, control: bool = True):
        self.last_images: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.rows: list[dict] = []
        self.control = control
        self.context: dict = {}

    def install(self) -> None:
        probe, losses, record, end_epoch = self, engine.mixed_losses, DaPSampler.record, DaPSampler.end_epoch
        train_one_epoch = runner.train_one_epoch

        def train_and_remember(model, loader, *args, **kwargs):
            probe.context = dict(model=model, loader=loader, epoch=kwargs["epoch"], smoothing=kwargs["smoothing"],
                                 mixer=kwargs["mixer"])  # fmt: skip
            return train_one_epoch(model, loader, *args, **kwargs)

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
            control = None
            if probe.control and drops_after_this_epoch(sampler) and probe.context.get("mixer") is not None:
                keep = sampler.config.keep
                own_b, image_b = control_pass(probe.context, sampler.num_samples, 1)
                own_c, image_c = control_pass(probe.context, sampler.num_samples, 2)
                control = {
                    "own_b_vs_image_b": dropped_share(subset, own_b, image_b, keep),
                    "own_b_vs_own_c": dropped_share(subset, own_b, own_c, keep),
                    "image_b_vs_image_c": dropped_share(subset, image_b, image_c, keep),
                }
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
                        **(control or {}),
                    }
                )
                row = probe.rows[-1]
                line = (
                    f"[mixing_attribution] epoch {row['epoch']}: subset {row['subset']}, dropped {row['dropped']}; "
                    f"Spearman rho {row['spearman']:.3f}; ranking by image loss drops {row['dropped_by_both']:.1%} "
                    f"of the same samples (chance: {row['chance']:.1%})"
                )
                if control:
                    line += (
                        f"; control draws: own(B) vs image(B) {control['own_b_vs_image_b']:.1%}, own(B) vs own(C) "
                        f"{control['own_b_vs_own_c']:.1%}, image(B) vs image(C) {control['image_b_vs_image_c']:.1%}"
                    )
                print(line, flush=True)
            if probe.sums is not None:
                probe.sums.zero_()
                probe.counts.zero_()
            return report

        engine.mixed_losses = mixed_losses
        runner.train_one_epoch = train_and_remember
        DaPSampler.record = record_both
        DaPSampler.end_epoch = end_epoch_and_compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/mixing_attribution", help="the run folder (refused if it holds a run)")
    p.add_argument("--no-control", action="store_true", help="skip the two extra passes per drop (module docstring)")
    args, trainer_flags = p.parse_known_args(argv)
    flags = trainer_flags or DEFAULT_FLAGS
    probe = Probe(control=not args.no_control)
    probe.install()
    summary, result = train_embedded(args.output, flags, "mixing_attribution", probe.rows)
    seconds = result["seconds"]
    rhos = [r["spearman"] for r in probe.rows]
    both = [r["dropped_by_both"] for r in probe.rows]
    if probe.rows and "own_b_vs_image_b" in probe.rows[0]:
        print(
            "[mixing_attribution] control draws, of the samples the first ranking drops the share the second drops "
            "too: " + share_ranges(probe.rows, ("own_b_vs_image_b", "own_b_vs_own_c", "image_b_vs_image_c"))
        )
    print(
        f"[mixing_attribution] {len(rhos)} drops: Spearman rho {min(rhos):.3f}-{max(rhos):.3f}; ranking by image loss "
        f"would have dropped {min(both):.1%}-{max(both):.1%} of the samples DaP dropped; top-1 {summary['top1']:.2f}"
        f" at compute {summary['compute_fraction_measured']:.1%}; {seconds:.0f} s (flags: {' '.join(flags)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
