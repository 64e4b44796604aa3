"""Learning rate as a function of epoch progress (a float), never of the update count.

A DaP epoch runs fewer iterations than a full-data epoch; schedulers keyed on updates (timm's
``step_update(num_updates)``) would then decay DaP's LR later in wall-epochs than the baseline's.
Keying on ``epoch + fraction of the epoch done`` gives both runs the same LR at the same epoch.
"""

from __future__ import annotations

import math

import torch


def lr_at(
    progress: float,
    *,
    base_lr: float,
    sched: str = "step",
    epochs: int,
    milestones: tuple[int, ...] = (),
    decay_rate: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 1e-5,
    min_lr: float = 0.0,
) -> float:
    """LR at ``progress`` epochs into training (0 <= progress <= epochs).

    ``step``: ``base_lr * decay_rate ** (number of milestones <= progress)``; ``cosine``: from
    ``base_lr`` to ``min_lr`` over ``epochs``. A linear warm-up from ``warmup_lr`` over ``warmup_epochs``
    replaces the start of either, as timm's schedulers do by default (timm's ``--warmup-prefix``, which adds the
    warm-up to the epochs instead, is not offered).
    """
    if progress < warmup_epochs:
        return warmup_lr + (base_lr - warmup_lr) * progress / warmup_epochs
    if sched == "step":
        return base_lr * decay_rate ** sum(1 for m in milestones if progress >= m)
    if sched == "cosine":
        t = progress / max(1e-8, epochs)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"sched={sched!r} is invalid: must be 'step' or 'cosine'")


class EpochProgressLR:
    """Sets every param group's LR from epoch progress; call :meth:`step` before each update.

    Args:
        optimizer: the optimizer whose groups get the LR (scaled by a group's ``lr_scale`` if set).
        **schedule: keyword arguments of :func:`lr_at` except ``progress``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, **schedule):
        self.optimizer = optimizer
        self.schedule = schedule
        lr_at(0.0, **schedule)  # validate now, not at the first step
        self.last_progress = 0.0
        self.step(0.0)

    def step(self, progress: float) -> float:
        self.last_progress = float(progress)
        lr = lr_at(self.last_progress, **self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def get_last_lr(self) -> float:
        return lr_at(self.last_progress, **self.schedule)

    def state_dict(self) -> dict:
        return {"last_progress": self.last_progress}

    def load_state_dict(self, state: dict) -> None:
        self.step(float(state["last_progress"]))
