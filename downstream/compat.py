"""torch>=2.6 ``weights_only`` default vs mmengine 0.10.7 checkpoints.

torch 2.6 made ``torch.load`` default to ``weights_only=True``. mmengine 0.10.7 loads every
checkpoint (``resume``, ``load_from``, ``init_cfg=Pretrained``) through
``CheckpointLoader`` -> ``torch.load(filename, map_location=...)``, and its own training checkpoints
cannot pass that check: the message hub's ``HistoryBuffer`` pickles its statistics methods as
``getattr(HistoryBuffer, 'min')``. Allow-listing ``builtins.getattr`` would reopen arbitrary code
execution for every file, and turning the check off process-wide (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)
does the same silently. So :func:`trusted_checkpoints` instead trusts *paths*: inside it, files
under the given folders (the run's own work dir, a ``load_from`` the user named) load with
``weights_only=False``; every other file (a downloaded or exported backbone) keeps torch's check.
It swaps mmengine's loader for local paths through mmengine's public
``CheckpointLoader.register_scheme`` and restores ``load_from_local`` on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch


def _is_under(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


@contextlib.contextmanager
def trusted_checkpoints(trusted: Iterable[str | os.PathLike]):
    """Loads mmengine checkpoints under ``trusted`` paths with ``weights_only=False`` while active.

    Args:
        trusted: folders or files whose checkpoints this run wrote or the user named explicitly
            (``work_dir``, ``load_from``). Everything else loads with ``weights_only=True``.

    Wrap the runner calls that load checkpoints (``runner.train()`` resumes or applies ``load_from``).
    """
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local

    folders = [Path(p).expanduser().resolve() for p in trusted]

    def load(filename: str, map_location=None):
        path = Path(filename).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{filename} can not be found.")
        return torch.load(path, map_location=map_location, weights_only=not _is_under(path, folders))

    CheckpointLoader.register_scheme(prefixes="", loader=load, force=True)
    try:
        yield
    finally:
        CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
