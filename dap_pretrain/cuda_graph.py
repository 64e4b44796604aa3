"""One whole SGD training step replayed as a CUDA graph: the fix for launch-bound small networks.

A CIFAR ResNet-20 step of 128 images spends ~7.7 ms launching ~hundreds of small kernels whose arithmetic takes
well under 1 ms (H100, eager). Capturing forward, per-sample loss, backward and the SGD update once and replaying
the graph removes that host cost. DaP is untouched: the graph writes the per-sample losses into a buffer that
the engine records against the batch's indices, exactly as on the eager path.

Contract (who calls what, when): the engine asks :meth:`GraphedSGDStep.accepts` for each batch; for an accepted
batch it sets the LR as usual (``optimizer.param_groups[i]['lr']``) and calls the step, which trains on the batch
and returns the per-sample losses. The first ``warmup`` accepted batches run eagerly on a side stream (real
training steps: cuDNN picks its algorithms, SGD creates its momentum buffers); the next one is captured and
replayed, and every later one is replayed. A batch of another size (a DaP subset's last, partial batch) goes
through the engine's eager path, which shares the parameters, momentum buffers and BatchNorm statistics.

The captured update is torch.optim.SGD's own rule (weight decay, momentum, dampening, Nesterov) written with
``torch._foreach`` ops whose learning rate is a device tensor, refilled from the param group only when it changes,
so checkpoints keep using the optimizer's ``state_dict`` unchanged.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dap_pretrain.errors import DapError

_CAPTURE_LOCK = threading.Lock()  # one capture at a time per process: concurrent captures fail (cudaErrorIllegalState)


class GraphUnsupportedError(DapError, ValueError):
    """This configuration cannot run as a CUDA graph; the message names the flag to change."""


def check_graphable(
    *, device: torch.device, optimizer, amp_dtype, scaler, model_ema, clip_grad, world: int, grad_accum_steps: int = 1
) -> None:
    """Raise :class:`GraphUnsupportedError` unless a captured step is exact for this configuration."""
    problems = [
        (device.type != "cuda", "needs a CUDA device"),
        (type(optimizer) is not torch.optim.SGD, f"supports --opt sgd/momentum only (got {type(optimizer).__name__})"),
        (scaler is not None or amp_dtype == torch.float16, "needs --amp-dtype bfloat16 (fp16 loss scaling syncs)"),
        (model_ema is not None, "does not support --model-ema"),
        (bool(clip_grad), "does not support --clip-grad"),
        (world > 1, "does not support DDP (one process per GPU) yet"),
        (grad_accum_steps > 1, "updates every batch (it does not support --grad-accum-steps)"),
        (any(g.get("maximize") for g in optimizer.param_groups), "does not support maximize=True"),
    ]
    for bad, why in problems:
        if bad:
            raise GraphUnsupportedError(f"--cuda-graph {why}; drop --cuda-graph or change that option")


class GraphedSGDStep:
    """Forward + per-sample loss + backward + SGD update for batches of exactly ``batch_size``, as a CUDA graph.

    Args:
        model: the module being trained (not DDP-wrapped), on a CUDA device.
        optimizer: its ``torch.optim.SGD``.
        batch_size: the batch size it accepts (the training batch size).
        amp_dtype: autocast dtype (bfloat16) or None.
        smoothing: label smoothing of the cross-entropy.
        warmup: eager steps before capture.
    """

    def __init__(self, model, optimizer, *, batch_size: int, amp_dtype=None, smoothing: float = 0.0, warmup: int = 3):
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.smoothing = smoothing
        self.warmup = warmup
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.device = next(model.parameters()).device
        self._lr = [torch.zeros((), device=self.device) for _ in optimizer.param_groups]
        self._lr_value = [None] * len(optimizer.param_groups)
        self._weighted = True  # static weight buffer state: False once filled with ones

    def accepts(self, images: torch.Tensor) -> bool:
        return images.shape[0] == self.batch_size

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        # cache_enabled=False: autocast's weight-cast cache must not outlive a captured region.
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _forward_backward(self, images, targets, weights) -> torch.Tensor:
        with self._autocast():
            output = self.model(images)
            losses = F.cross_entropy(output.float(), targets, reduction="none", label_smoothing=self.smoothing)
        loss = (losses * weights).mean() if weights is not None else losses.mean()
        loss.backward()
        return losses.detach()

    @torch.no_grad()
    def _sgd_update(self) -> None:
        """torch.optim.SGD's step for params whose momentum buffers exist, with tensor learning rates."""
        for group, lr in zip(self.optimizer.param_groups, self._lr, strict=True):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum:
                bufs = [self.optimizer.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_sub_(params, torch._foreach_mul(grads, lr))

    def _sync_lr(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self._lr_value[i]:
                self._lr[i].fill_(group["lr"])
                self._lr_value[i] = group["lr"]

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Train on one full batch; returns its per-sample losses (a buffer overwritten by the next call)."""
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                losses = self._forward_backward(images, targets, weights)
                self.optimizer.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return losses
        if self.graph is None:
            self._capture(images, targets)
        self.static_x.copy_(images)
        self.static_y.copy_(targets)
        if weights is not None:
            self.static_w.copy_(weights)
            self._weighted = True
        elif self._weighted:
            self.static_w.fill_(1.0)
            self._weighted = False
        self._sync_lr()
        self.graph.replay()
        return self.static_losses

    def _capture(self, images, targets) -> None:
        if any(
            group["momentum"] and "momentum_buffer" not in self.optimizer.state[p]
            for group in self.optimizer.param_groups
            for p in group["params"]
        ):
            raise RuntimeError("SGD momentum buffers missing after warm-up; raise GraphedSGDStep(warmup=...)")
        self.static_x = images.clone()
        self.static_y = targets.clone()
        self.static_w = torch.ones(self.batch_size, device=self.device)
        self._weighted = False
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: runs sharing this process (dap_pretrain.multirun) keep launching work while this captures.
        with _CAPTURE_LOCK, torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_losses = self._forward_backward(self.static_x, self.static_y, self.static_w)
            self._sgd_update()
