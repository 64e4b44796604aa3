"""The run's picture: subset size and cumulative compute per epoch (the paper's Figure 1 as data),
and the per-sample loss distribution DaP ranked at each drop."""

from __future__ import annotations

from pathlib import Path

from dap_pretrain.checkpoint import write_atomic


def plot_run(history: list[dict], drops: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Write a PNG from the trainer's per-epoch rows and drop histograms; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.step(epochs, [r["subset_size"] for r in history], where="mid", color="tab:blue", label="subset size")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("samples trained in epoch", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [100 * r["cum_compute"] for r in history], color="tab:red", label="cumulative compute")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("cumulative compute (% of full-data run)", color="tab:red")
    ax1.set_title(f"{title}: subset and compute per epoch".strip(": "))
    cmap = plt.get_cmap("viridis")
    for i, d in enumerate(drops):
        edges, counts = d["edges"], d["counts"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax3.plot(
            centers,
            counts,
            color=cmap(i / max(1, len(drops) - 1)),
            label=f"epoch {d['epoch']}: kept {d['kept']}/{d['of']}",
        )
    ax3.set_xlabel("per-sample training loss (with augmentation)")
    ax3.set_ylabel("samples")
    ax3.set_title("loss distribution ranked at each drop")
    if drops:
        ax3.legend(fontsize=7, ncol=2)
    else:
        ax3.text(0.5, 0.5, "no drops in this run", ha="center", transform=ax3.transAxes)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # disk full: one line, no half file
    finally:
        plt.close(fig)
    return Path(path)
