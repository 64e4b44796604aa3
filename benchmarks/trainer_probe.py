"""The trainer with a benchmark's probes, for ``gpu_decode.py`` (benchmarks only).

    python benchmarks/trainer_probe.py '{"loader": {"dtype": "float16"}, "profile": {...}}' TRAINER FLAGS...

* ``loader``: :class:`GpuDecodeLoader` keywords (``dtype`` by name) for every ``--gpu-decode`` loader the trainer
  builds: its experiments, A/B against the default.
* ``profile``: ``{"out": PATH, "epoch": E, "warm": W, "steps": S}``: ``torch.profiler`` (device activity only)
  over ``S`` training steps of epoch ``E`` (0-based), after its first ``W`` batches; ``gpu_decode.timeline``'s
  per-step figures (wall, SMs busy and idle, kernel time per stream) are written to ``PATH`` as JSON, so the
  trainer's steps can be set beside the model-only and fed loops' (``profile_model_gpu_loader``).

Everything else is ``python -m dap_pretrain.train FLAGS``: the same code path, so a loader variant that wins here
becomes the trainer's default with the figure it measured.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as ``python -m`` from its root has it

from dap_pretrain import runner  # noqa: E402
from dap_pretrain.train import cli  # noqa: E402


class ProfiledLoader:
    """``inner``, with its ``epoch``-th pass profiled from batch ``warm`` for ``steps`` batches (see the module)."""

    def __init__(self, inner, *, out: str, epoch: int, warm: int, steps: int):
        self.inner, self.out, self.epoch, self.warm, self.steps = inner, Path(out), epoch, warm, steps
        self.passes = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):  # the runner asks the train loader for describe(), store, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __iter__(self):
        from gpu_decode import profiled_timeline
        from torch.profiler import ProfilerActivity, profile

        epoch, self.passes = self.passes, self.passes + 1
        if epoch != self.epoch:
            yield from self.inner
            return
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        prof, t0 = None, 0
        for k, batch in enumerate(self.inner):
            if k == self.warm:
                sync()
                prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
                prof.start()
                t0 = time.perf_counter_ns()
            elif k == self.warm + self.steps:
                sync()
                wall = time.perf_counter_ns() - t0
                prof.stop()
                res = {**profiled_timeline(prof, steps=self.steps, wall_ns=wall), "steps": self.steps, "epoch": epoch}
                self.out.write_text(json.dumps(res, indent=2))
                prof = None
            yield batch
        if prof is not None:  # the epoch ended inside the window
            prof.stop()
            self.out.write_text(json.dumps({"error": f"epoch {epoch} has {k + 1} batches, fewer than "
                                            f"{self.warm + self.steps + 1} to profile"}))  # fmt: skip


def main(argv: list[str]) -> int:
    probe = json.loads(argv[0])
    loader = dict(probe.get("loader", {}))
    if "dtype" in loader:
        loader["dtype"] = getattr(torch, loader["dtype"])
    if loader:
        runner.GpuDecodeLoader = functools.partial(runner.GpuDecodeLoader, **loader)
    if "profile" in probe:
        build = runner._build_loaders

        def profiled(*args, **kwargs):
            train, val = build(*args, **kwargs)
            return ProfiledLoader(train, **probe["profile"]), val

        runner._build_loaders = profiled
    return cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
