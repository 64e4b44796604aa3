"""One training epoch and one evaluation pass (ConvNeXt/DeiT ``engine.py`` shape).

The training step computes the unreduced loss once, records it per sample for DaP, and
back-propagates its mean: the losses DaP ranks by come from the training forward pass itself,
with augmentation, as in the paper (Section 4.1). No second forward pass.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad

from dap_pretrain.distributed import all_reduce_sum
from dap_pretrain.mixing import mixed_losses

_logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    loss: float  # the mean training loss of the epoch's samples over every rank (as timm logs it, reduced)
    samples: int  # samples this rank passed through the model (DDP padding included)
    steps: int
    seconds: float
    lr: float  # at the start of the epoch (progress == epoch): comparable across runs of any subset size
    first_batch_s: float = 0.0  # of ``seconds``, the wait for the loader's first batch (the epoch's fixed start)
    updates: int = 0  # optimizer updates of the run so far, this epoch's included (the EMA's step count)
    samples_all: int = 0  # samples every rank passed through the model: the job's throughput is this / seconds


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal, the plain iterable otherwise (logs carry the per-epoch line)."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return iterable


class _Updater:
    """Backward and optimizer update of the eager path, every ``accum`` micro-batches (timm's
    ``--grad-accum-steps``): each micro-batch's mean loss is divided by the size of its group, so a group's
    gradient is the mean over its samples when its micro-batches are of one size; DDP all-reduces only at
    the update (the other micro-batches run forward and backward inside ``no_sync``, see :meth:`step_context`);
    the epoch's last group may be shorter and still updates."""

    def __init__(
        self, model, optimizer, *, steps: int, accum: int, scaler, clip_grad, model_ema, clip_mode="norm", updates=0
    ):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.clip_grad, self.clip_mode, self.model_ema = clip_grad, clip_mode, model_ema
        self.steps, self.accum = steps, max(1, accum)
        self.updates = updates  # optimizer updates of the run so far: the EMA's step, as timm's num_updates
        self.last_group = steps - (steps % self.accum or self.accum)  # first step of the last group
        self.pending = False  # gradients accumulated and not yet applied

    def _updates_at(self, step: int) -> bool:
        return (step + 1) % self.accum == 0 or step == self.steps - 1

    def step_context(self, step: int):
        """Wrap ``step``'s forward *and* backward: DDP decides at the forward whether the backward all-reduces, so
        a ``no_sync`` around the backward alone would all-reduce every micro-batch."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None and not self._updates_at(step) else nullcontext()

    def backward(self, loss: torch.Tensor, step: int) -> None:
        """Accumulate ``loss``'s gradient (inside :meth:`step_context`); update when ``step`` ends its group."""
        if not self.pending:
            self.optimizer.zero_grad(set_to_none=True)
        group = self.accum if step < self.last_group else self.steps - self.last_group
        loss = loss / group if group > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.pending = True
        if self._updates_at(step):
            self.update()

    def cut_short(self) -> None:
        """Apply a group whose last batch was skipped: its micro-batches ran under ``no_sync``, so
        under DDP their gradients are first averaged over the ranks here, as DDP's own all-reduce would have."""
        if hasattr(self.model, "no_sync") and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        self.update()

    def update(self) -> None:
        """Apply the accumulated gradients (clipped, if asked), count the update and step the EMA by the count."""
        if self.clip_grad and self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:  # timm's dispatch; AGC leaves the classifier out, as timm's train.py does
            params = model_parameters(self.model, exclude_head=self.clip_mode == "agc")
            dispatch_clip_grad(params, self.clip_grad, mode=self.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.pending = False
        self.updates += 1
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.updates)


def train_one_epoch(
    model,
    loader,
    optimizer,
    *,
    epoch: int,
    sampler,
    lr_scheduler,
    device: torch.device,
    smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler=None,
    model_ema=None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    grad_accum_steps: int = 1,
    log_interval: int = 50,
    show_progress: bool = True,
    graph_step=None,
    updates: int = 0,
    mixer=None,
) -> EpochStats:
    """Train ``model`` for one epoch of ``loader`` (batches ``(input, target, index)``).

    Called once per epoch after ``sampler.set_epoch(epoch)``; the caller calls
    ``sampler.end_epoch()`` afterwards. LR is set before each step from epoch progress
    ``epoch + step / steps_in_this_epoch`` so a DaP epoch with fewer steps follows the same curve.

    A sampler with ``loss_weights(indices)`` (InfoBatch) scales each sample's loss in the backward
    pass; the recorded losses stay unscaled. ``clip_grad``/``clip_mode``: timm's gradient clipping before each
    update (``norm``, ``value`` or ``agc``). ``grad_accum_steps``: one optimizer update per that many
    batches (see :class:`_Updater`); every batch's losses are recorded. ``graph_step`` (a
    :class:`~dap_pretrain.cuda_graph.GraphedSGDStep`) trains the batches it accepts as a CUDA graph;
    the others take the eager path below. ``updates``: the run's optimizer updates before this epoch; the EMA
    decays by the run's update count (timm's ``num_updates``), which DaP's shorter epochs and
    ``grad_accum_steps`` make differ from ``epoch * steps``. The returned stats carry the count after the epoch.
    ``mixer`` (a :class:`~dap_pretrain.mixing.Mixer`, or None), where active for ``epoch``, mixes each batch with its
    reverse (Mixup/CutMix); the model trains on each mixed image's soft-target loss and the sampler records each
    sample's own label's loss (:func:`~dap_pretrain.mixing.mixed_losses`); loss weights then scale each label's
    terms by its own sample's weight.
    """
    model.train()
    steps = len(loader)
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no per-step sync
    seen, start = 0, time.perf_counter()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    lr = lr_start = lr_scheduler.step(float(epoch))
    loss_weights = getattr(sampler, "loss_weights", None)
    updater = _Updater(
        model,
        optimizer,
        updates=updates,
        steps=steps,
        accum=grad_accum_steps,
        scaler=scaler,
        clip_grad=clip_grad,
        clip_mode=clip_mode,
        model_ema=model_ema,
    )
    first_batch_s = 0.0
    batches = _progress(loader, total=steps, desc=f"epoch {epoch + 1}", enabled=show_progress)
    # every --log-interval steps a line, as timm's; at DEBUG under a progress bar, which shows the same
    step_level = logging.DEBUG if batches is not loader else logging.INFO
    for step, (images, targets, indices) in enumerate(batches):
        if step == 0:
            first_batch_s = time.perf_counter() - start
        lr = lr_scheduler.step(epoch + step / steps)
        if images.shape[0] == 1 and has_batchnorm:
            # BatchNorm cannot train on one sample; a DaP subset can leave exactly one in the last batch.
            # The sample gets no loss this epoch, so the accounting reports it as not trained.
            _logger.info("epoch %d: skipped a final batch of 1 sample (BatchNorm needs 2)", epoch + 1)
            if updater.pending:  # the group's earlier batches still update
                updater.cut_short()
            continue
        weights = loss_weights(indices) if loss_weights is not None else None
        lam = None
        if mixer is not None and mixer.active(epoch):
            images, lam = mixer(images, epoch=epoch, step=step)
        owned = None  # each sample's own loss, where it differs from its image's (a mixed batch)
        if graph_step is not None and lam is None and graph_step.accepts(images):  # the graph's loss is unmixed
            losses = graph_step(images, targets, weights)
            updater.updates += 1
            loss = None  # the graph's step loss is not kept: the log takes the batch's mean loss
        else:
            with updater.step_context(step):
                with autocast:
                    output = model(images)
                    if lam is None:
                        losses = F.cross_entropy(output.float(), targets, reduction="none", label_smoothing=smoothing)
                        trained = losses * weights if weights is not None else losses
                    else:
                        losses, owned, trained = mixed_losses(
                            output, targets, lam, smoothing=smoothing, weights=weights
                        )
                loss = trained.mean()
                updater.backward(loss, step)
        sampler.record(indices, (losses if owned is None else owned).detach())
        logged = step % log_interval == 0 or step == steps - 1
        batch_loss = float((losses.mean() if loss is None else loss).detach()) if logged else None
        if batch_loss is not None:
            if not math.isfinite(batch_loss):
                raise FloatingPointError(
                    f"training loss became {batch_loss} at epoch {epoch + 1} step {step}; "
                    "lower --lr or enable --clip-grad"
                )
            rate = world * (seen + indices.numel()) / max(time.perf_counter() - start, 1e-9)  # the job's, as timm
            _logger.log(
                step_level, "epoch %d step %d/%d loss %.4f lr %.3g %.0f img/s", epoch + 1, step, steps, batch_loss, lr,
                rate,
            )  # fmt: skip
        loss_sum += losses.detach().sum()
        seen += indices.numel()
    loss_all, seen_all = all_reduce_sum([float(loss_sum), float(seen)], device)  # one sync at the epoch's end
    return EpochStats(
        loss=loss_all / max(1.0, seen_all),
        samples=seen,
        samples_all=int(seen_all),
        steps=steps,
        seconds=time.perf_counter() - start,
        lr=lr_start,
        first_batch_s=first_batch_s,
        updates=updater.updates,
    )


@torch.no_grad()
def evaluate(model, loader, *, device: torch.device, amp_dtype: torch.dtype | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean loss over ``loader``, summed exactly over DDP ranks.

    ``loader`` yields ``(input, target, index)``; under DDP each rank evaluates a disjoint shard
    (no padding), and one all-reduce combines the counts.
    """
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    correct1 = correct5 = loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for images, targets, _ in loader:
        with autocast:
            output = model(images)
        output = output.float()
        loss_sum = loss_sum + F.cross_entropy(output, targets, reduction="sum")
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        hit = top.eq(targets[:, None])
        correct1 = correct1 + hit[:, :1].sum()
        correct5 = correct5 + hit.sum()
        n += targets.numel()
    c1, c5, ls, total = all_reduce_sum([float(correct1), float(correct5), float(loss_sum), float(n)], device)
    total = max(total, 1.0)
    return {"top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total, "loss": ls / total, "samples": int(total)}
