"""What a run reports, in one place: the compute accounting, the per-epoch row (summary.csv), its log line, and
the run summary (run.json). Both front ends (the timm trainer and the mmengine hook) use it."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dap_pretrain.checkpoint import write_atomic
from dap_pretrain.run_folder import git_commit

_logger = logging.getLogger("dap_pretrain.train")


@dataclass
class Accounting:
    """Samples trained vs the full-data baseline (``baseline_epochs x N``)."""

    num_samples: int
    baseline_epochs: int
    planned: int
    measured: int = 0
    lost: int = 0
    history: list = field(default_factory=list)
    drops: list = field(default_factory=list)  # loss histograms at each drop, for the plot

    def add_epoch(self, epoch: int, report) -> None:
        """Count an epoch's :class:`~dap_pretrain.data.sampler.EpochReport`: samples trained, samples of the subset
        left untrained, and (at a drop) the loss histogram the plot shows."""
        self.measured += report.seen
        self.lost += report.size_before - report.seen
        if report.losses is None:
            return
        finite = report.losses[torch.isfinite(report.losses)]
        if finite.numel():
            hist = torch.histogram(finite.double(), bins=40)
            self.drops.append(
                {
                    "epoch": epoch,
                    "counts": hist.hist.tolist(),
                    "edges": hist.bin_edges.tolist(),
                    "kept": report.size_after,
                    "of": report.size_before,
                }
            )

    @property
    def baseline(self) -> int:
        return self.baseline_epochs * self.num_samples

    def epoch_row(
        self,
        *,
        epoch: int,
        report,
        train_loss: float,
        ev: dict,
        lr: float,
        seconds: float,
        img_per_s: float,
        digest: str,
        first_batch_s: float | None = None,
    ) -> dict:
        """One ``summary.csv`` row (after this epoch's samples were added to ``measured``); both front ends.

        ``img_per_s`` counts the whole training loop, its wait for the first batch included; ``first_batch_s``
        (the trainer's; the mmengine hook has none) is that wait, the epoch's fixed start.
        """
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "eval_loss": ev.get("loss"),
            "eval_top1": ev.get("top1"),
            "eval_top5": ev.get("top5"),
            "lr": lr,
            "subset_size": report.size_before,
            "samples_trained": report.seen,
            "cum_compute": self.measured / self.baseline,
            "event": report.event,
            "untrained": report.size_before - report.seen,
            "epoch_time_s": round(seconds, 3),
            "img_per_s": round(img_per_s, 2),
            "subset_digest": digest,
        }
        if first_batch_s is not None:
            row["first_batch_s"] = round(first_batch_s, 3)
        return row

    def run_summary(
        self,
        *,
        model: str,
        epochs: int,
        dataset,
        top1,
        top5,
        ema_top1,
        ema_top5,
        wall_s: float,
        dap: dict,
        processes: int = 1,
    ) -> dict:
        """``run.json``: the same keys from both front ends (``dap-train`` and the mmengine ``DaPHook``);
        ``processes``: the run's (last start's) world size, which with the per-process batch sets the global one."""
        return {
            "model": model,
            "epochs": epochs,
            "dataset": dataset,
            "num_samples": self.num_samples,
            "compute_fraction_planned": self.planned / self.baseline,
            "compute_fraction_measured": self.measured / self.baseline,
            "samples_trained": self.measured,
            "samples_planned": self.planned,
            "samples_baseline": self.baseline,
            "samples_untrained": self.lost,
            "top1": top1,
            "top5": top5,
            "ema_top1": ema_top1,
            "ema_top5": ema_top5,
            "wall_time_s": round(wall_s, 2),
            "processes": processes,
            "dap": dap,
            "git_commit": git_commit(),
            "torch": torch.__version__,
        }


def subset_digest(subset: torch.Tensor) -> str:
    """Short fingerprint of a subset, so runs (resumed, DDP, single) can be compared epoch by epoch."""
    return f"{zlib.crc32(subset.numpy().tobytes()):08x}"


def write_summary_csv(output: Path, history: list) -> None:
    import csv

    fields = list(dict.fromkeys(k for row in history for k in row))  # ema_* appear only on evaluated epochs

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(history)

    write_atomic(output / "summary.csv", write)


def log_epoch(row: dict, epochs: int, report) -> None:
    ev = f" top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f}" if row["eval_top1"] is not None else ""
    lost = (
        f" ({row['untrained']} untrained: unreadable, or left out by drop_last or a last batch of 1)"
        if row["untrained"]
        else ""
    )
    event = report.event  # a schedule's drop epoch that kept every sample (--dap-select none) says so
    event += " (none dropped)" if event == "drop" and report.size_after == report.size_before else ""
    _logger.info(
        "epoch %d/%d: subset %d, trained %d%s, %s -> next %d; loss %.4f%s lr %.4g; compute so far %.2f%%; "
        "%.1fs, %.0f img/s%s",
        row["epoch"],
        epochs,
        row["subset_size"],
        row["samples_trained"],
        lost,
        event,
        report.size_after,
        row["train_loss"],
        ev,
        row["lr"],
        100 * row["cum_compute"],
        row["epoch_time_s"],
        row["img_per_s"],
        f" (first batch after {row['first_batch_s']:.2f}s)" if (row.get("first_batch_s") or 0) >= 0.05 else "",
    )
