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


# What mmpretrain's multimodal models (BLIP's language model) import from transformers, in mmpretrain 1.2.0.
_MULTIMODAL_NEEDS = ("PreTrainedModel", "apply_chunking_to_forward", "find_pruneable_heads_and_indices",
                     "prune_linear_layer")  # fmt: skip


def without_broken_multimodal() -> str | None:
    """Switches off mmpretrain's multimodal models where the installed transformers cannot serve them.

    mmpretrain 1.2.0 imports its multimodal models (BLIP, CLIP, ...) whenever ``transformers>=4.28`` is installed,
    and BLIP needs ``transformers.modeling_utils`` names that newer transformers no longer has. Its import then
    fails with "NoneType takes no arguments", and so does every mmdet model build, because mmdet imports
    mmpretrain. The detection and pose transfers use none of those models, so when the names are missing,
    mmpretrain is told what it does without transformers: register placeholders instead.

    Call before anything imports ``mmpretrain.models``. Returns a one-line notice when it switched them off, else
    ``None`` (mmpretrain absent, transformers absent or compatible, or the models already imported).
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("mmpretrain") is None or "mmpretrain.models" in sys.modules:
        return None
    from mmpretrain.utils import dependency

    if not dependency.WITH_MULTIMODAL:
        return None
    try:
        import transformers.modeling_utils as hf

        missing = [name for name in _MULTIMODAL_NEEDS if not hasattr(hf, name)]
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
    except Exception as e:  # noqa: BLE001  (a transformers that fails to import at all breaks mmpretrain the same way)
        missing, version = [f"import failed: {type(e).__name__}: {e}"], "?"
    if not missing:
        return None
    dependency.WITH_MULTIMODAL = False
    return (f"mmpretrain's multimodal models switched off: transformers {version} lacks what they import "
            f"({', '.join(missing)}); the transfers do not use them")
