"""How much of DaP's ranking is the sample, and how much the draw? DaP's drops against fixed-model re-rankings.

    python benchmarks/ranking_noise.py [--output DIR] [trainer flags ...]

Trains the embedded default (``tools/pretrain.sh``'s config: CIFAR ResNet-20, 8,000 images, 20 epochs, DaP with
p=0.9 every epoch after a warm-up of 3; crop and flip from the in-memory loader), through the trainer itself,
unchanged. DaP ranks the current subset by each sample's mean training loss over the epoch before a drop, recorded
on the fly: the loss under that epoch's augmentation, from the model as it was when the sample's batch came (the
paper, section 3). Before each drop this script passes the epoch's subset three more times through a copy of the
end-of-epoch model (train mode, as in training; no gradient; the run's model is left untouched), and ranks the
subset by each pass's losses:

- ``B``, ``C``: the epoch's order under two other augmentation draws (the loader's seed offset);
- ``clean``: the same order with no augmentation (each image's centre, unflipped).

For pairs of rankings it reports the share of the first ranking's drops that the second drops too (two unrelated
rankings: ``1 - p``, 10% here), and Spearman's rho over the subset:

- ``training`` vs ``B``: what DaP used against a fixed model under another draw (the model's drift through the
  epoch and the draw together);
- ``B`` vs ``C``: the draw alone, at a fixed model;
- ``B`` vs ``clean`` and ``training`` vs ``clean``: augmented against plain images.

The only instrumentation: ``runner.train_one_epoch`` is wrapped to keep the model and loader, and
``DaPSampler.end_epoch`` to compare before each drop. Needs the in-memory loader (``--in-memory``, the config's
default), whose augmentation is one seeded generator per epoch. Mixing flags are refused: for mixed batches see
``benchmarks/mixing_attribution.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mixing_attribution import (  # noqa: E402
    dropped_share,
    drops_after_this_epoch,
    share_ranges,
    spearman,
    train_embedded,
)

from dap_pretrain import runner  # noqa: E402
from dap_pretrain.data.memory import PAD, InMemoryLoader, gather_crop_flip  # noqa: E402
from dap_pretrain.data.sampler import DaPSampler, select_subset  # noqa: E402

PAIRS = (
    ("training", "b"),
    ("b", "c"),
    ("b", "clean"),
    ("training", "clean"),
    ("relative", "b"),
    ("training", "relative"),
)
MIXING_FLAGS = ("--mixup", "--cutmix")


@torch.no_grad()
def fixed_model_pass(context: dict, num_samples: int, *, draw: int | None) -> torch.Tensor:
    """Per-sample mean loss of one pass over the epoch's order through a copy of the model (train mode).

    ``draw``: the augmentation seed's offset (another draw of the same crop and flip distribution); ``None``: each
    image's centre crop, unflipped.
    """
    loader: InMemoryLoader = context["loader"]
    model = copy.deepcopy(context["model"]).train()
    sums = torch.zeros(num_samples, dtype=torch.float64)
    counts = torch.zeros(num_samples, dtype=torch.float64)
    seed = loader.seed
    try:
        if draw is not None:
            loader.seed = seed + 7919 * draw
            batches = iter(loader)
        else:
            order = loader._order().to(loader.device)
            batches = (
                (
                    loader.normalize(
                        gather_crop_flip(
                            loader.store, index, torch.full_like(index, PAD), torch.full_like(index, PAD),
                            torch.zeros_like(index, dtype=torch.bool), loader.size,
                        ),
                        channels_last=loader.channels_last,
                    ),
                    loader.targets[index],
                    index,
                )
                for index in order.split(loader.batch_size)
            )  # fmt: skip
        for images, targets, indices in batches:
            if images.shape[0] < 2:  # BatchNorm in train mode needs two (the trainer skips such a batch too)
                continue
            output = model(images).float()
            losses = F.cross_entropy(output, targets, reduction="none", label_smoothing=context["smoothing"])
            idx = indices.cpu()
            sums.index_add_(0, idx, losses.cpu().double())
            counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    finally:
        loader.seed = seed
    return sums / counts.clamp(min=1)


class Probe:
    """Before each drop, ranks the subset three more ways and compares them with DaP's own ranking."""

    def __init__(self):
        self.rows: list[dict] = []
        self.context: dict = {}
        self.step = 0  # batches recorded this epoch
        self.position: torch.Tensor | None = None  # each sample's batch number in the epoch
        self.relative: torch.Tensor | None = None  # each sample's loss over its batch's mean, summed

    def install(self) -> None:
        probe, train_one_epoch = self, runner.train_one_epoch
        end_epoch, record = DaPSampler.end_epoch, DaPSampler.record

        def record_position(sampler, indices, losses):  # on the losses' device: no sync per batch
            record(sampler, indices, losses)
            if probe.position is None:
                probe.position = torch.zeros(sampler.num_samples, dtype=torch.float64, device=losses.device)
                probe.relative = torch.zeros_like(probe.position)
            batch = losses.detach().double()
            probe.position[indices] = float(probe.step)
            probe.relative.index_add_(0, indices, batch / batch.mean())
            probe.step += 1

        def train_and_remember(model, loader, *args, **kwargs):
            if not isinstance(loader, InMemoryLoader):
                raise SystemExit("ranking_noise: needs the in-memory loader; drop --in-memory off / --gpu-decode")
            probe.context = dict(model=model, loader=loader, smoothing=kwargs["smoothing"])
            return train_one_epoch(model, loader, *args, **kwargs)

        def end_epoch_and_compare(sampler):
            steps, position, relative = probe.step, probe.position, probe.relative
            probe.step, probe.position, probe.relative = 0, None, None
            if not drops_after_this_epoch(sampler):
                return end_epoch(sampler)
            position, relative = position.cpu(), relative.cpu()
            seen = sampler.recorder.seen().double().clamp(min=1)
            subset, keep, n = sampler.subset.clone(), sampler.config.keep, sampler.num_samples
            losses = {
                "training": sampler.recorder.mean_losses().clone().double(),
                "b": fixed_model_pass(probe.context, n, draw=1),
                "c": fixed_model_pass(probe.context, n, draw=2),
                "clean": fixed_model_pass(probe.context, n, draw=None),
                "relative": relative / seen,  # one loss per sample and epoch here: the recorder's count
            }
            report = end_epoch(sampler)
            dropped = subset[~torch.isin(subset, sampler.subset)]
            b_dropped = subset[~torch.isin(subset, select_subset(subset, losses["b"], keep=keep, strategy="hard"))]
            # the ranking read here must be the one DaP dropped by, or every comparison below is off
            kept = select_subset(subset, losses["training"], keep=keep, strategy="hard")
            same = torch.equal(dropped.sort().values, subset[~torch.isin(subset, kept)].sort().values)
            row = {
                "epoch": report.epoch,
                "subset": subset.numel(),
                "dropped": dropped.numel(),
                "chance": dropped.numel() / max(1, subset.numel()),
                "training_is_daps_ranking": same,
                "mean_loss": {k: float(v[subset].mean()) for k, v in losses.items()},
                # the epoch's order is random, so half of any unbiased ranking's drops were seen in its first half
                "dropped_in_first_half": float((position[dropped] < steps / 2).double().mean()),
                "first_half_of_subset": float((position[subset] < steps / 2).double().mean()),
                "b_dropped_in_first_half": float((position[b_dropped] < steps / 2).double().mean()),
            }
            for a, b in PAIRS:
                row[f"{a}_vs_{b}"] = dropped_share(subset, losses[a], losses[b], keep)
                row[f"rho_{a}_{b}"] = spearman(losses[a][subset], losses[b][subset])
            probe.rows.append(row)
            print(
                f"[ranking_noise] epoch {row['epoch']}: subset {row['subset']}, dropped {row['dropped']} (chance "
                f"{row['chance']:.1%}); seen in the epoch's first half: {row['first_half_of_subset']:.1%} of the "
                f"subset, {row['dropped_in_first_half']:.1%} of DaP's drops, {row['b_dropped_in_first_half']:.1%} of "
                "B's; of the first ranking's drops the second drops too: "
                + ", ".join(f"{a} vs {b} {row[f'{a}_vs_{b}']:.1%} (rho {row[f'rho_{a}_{b}']:.3f})" for a, b in PAIRS),
                flush=True,
            )
            return report

        runner.train_one_epoch = train_and_remember
        DaPSampler.end_epoch = end_epoch_and_compare
        DaPSampler.record = record_position


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/ranking_noise", help="the run folder (refused if it holds a run)")
    args, trainer_flags = p.parse_known_args(argv)
    if any(f.split("=")[0] in MIXING_FLAGS for f in trainer_flags):
        p.error("mixing flags: this measures augmentation alone; use benchmarks/mixing_attribution.py for mixing")
    probe = Probe()
    probe.install()
    summary, result = train_embedded(args.output, trainer_flags, "ranking_noise", probe.rows)
    seconds = result["seconds"]
    if probe.rows:
        print(
            f"[ranking_noise] {len(probe.rows)} drops; of the first ranking's drops the share the second drops too: "
            + share_ranges(probe.rows, [f"{a}_vs_{b}" for a, b in PAIRS]).replace("_vs_", " vs ")
        )
    print(
        f"[ranking_noise] top-1 {summary['top1']:.2f} at compute {summary['compute_fraction_measured']:.1%}; "
        f"{seconds:.0f} s (flags: {' '.join(trainer_flags) or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
