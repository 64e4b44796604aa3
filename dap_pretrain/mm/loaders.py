"""A check of the config's data loader settings before anything is built (``tools/pretrain_mm.sh`` and
``tools/transfer_coco.sh`` share it): mmengine hands every key of ``*_dataloader`` it does not read itself to
``torch.utils.data.DataLoader``, so a misspelled one (``batchsize``) was a ``TypeError`` traceback when the loader
was built, after ``--check`` had said "inputs ok" (and, for the test loader, after training)."""

from __future__ import annotations

import difflib
import inspect

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
# the keys mmengine's Runner.build_dataloader reads itself (0.10.x); the rest go to DataLoader(**rest)
_MMENGINE_KEYS = frozenset(
    {"dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn", "num_batch_per_epoch",
     "disable_subprocess_warning"}
)  # fmt: skip


def dataloader_refusal(cfg) -> str | None:
    """Why one of ``cfg``'s data loaders would fail to build (one line naming the key and the fix), or ``None``:
    a key neither mmengine nor ``DataLoader`` takes (with the closest one that exists), a ``batch_size`` that is no
    positive integer, or a ``num_workers`` that is no integer >= 0."""
    from torch.utils.data import DataLoader

    allowed = _MMENGINE_KEYS | set(inspect.signature(DataLoader).parameters) - {"self"}
    for name in LOADERS:
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        for key in sorted(set(loader) - allowed):
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            return f"{name}.{key} is not a data loader setting{hint}; fix or drop it in --cfg-options"
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            value = loader.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                return f"{name}.{key}={value!r} is not an integer >= {low}; fix it in --cfg-options"
    return None
