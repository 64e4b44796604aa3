"""Checkpoints as plain dicts, written atomically; resume that restores every stateful piece.

A checkpoint (``OUTPUT/last.pth.tar``, ``OUTPUT/model_best.pth.tar``) holds only tensors, numbers,
strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it (no pickled argparse
Namespace, unlike timm's). Keys: ``version``, ``arch``, ``num_classes``, ``epoch`` (epochs
completed), ``state_dict``, ``state_dict_ema``, ``optimizer``, ``lr_scheduler``, ``scaler``,
``sampler``, ``rng``, ``args`` (resolved config), ``history`` (per-epoch rows), ``best``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dap_pretrain.errors import DapError

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


LAST_CHECKPOINT = "last.pth.tar"  # a run folder's latest checkpoint (runner writes it, --resume reads it)


class StorageError(DapError):
    """A file of a run could not be written (disk full, read-only or vanished folder); one line, exit 2."""


class CheckpointError(DapError, ValueError):
    """A checkpoint that cannot be used; the message is one line naming the fix."""


def rng_state() -> dict:
    """Every RNG a training step may draw from, as plain tensors and lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# How torch.save's C++ zip writer reports a short write (a full disk): a RuntimeError, not an OSError.
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _write_failure(e: BaseException, folder: Path) -> str | None:
    """Why a write into ``folder`` failed, in a few words, if ``e`` is a storage failure; else ``None``."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_SHORT_WRITE):
        try:
            st = os.statvfs(folder)
            left = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB left on its device"
        except OSError:
            left = "the device may be full"
        return f"torch.save could not write it all, {left}"
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` then ``os.replace(tmp, path)``; on any failure (disk full, a kill signal) remove the tmp.

    A storage failure (an ``OSError``: disk full, folder removed or made read-only mid-run; or torch.save's
    ``RuntimeError`` for a short write, which is how a full disk reaches it) raises :class:`StorageError`: one line
    naming ``path`` and the fix, with the previous file at ``path`` intact. Anything else is re-raised as it is.
    A kill -9 mid-write can still leave ``.NAME.tmpPID``; :func:`remove_stale_tmp` clears those at the next start.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = _write_failure(e, path.parent)  # measured before the tmp is removed: what the write left free
        tmp.unlink(missing_ok=True)
        if reason is None:
            raise
        last = path.parent / LAST_CHECKPOINT
        then = (
            f"then continue from {last} (--resume), which is intact"
            if last.is_file()
            else "then start the run again with --overwrite (it wrote no checkpoint yet)"
        )
        raise StorageError(f"cannot write {path} ({reason}); free space or fix the folder, {then}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_tmp(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files of killed writes (``.NAME.tmp*``) in ``folder``; call only while owning it."""
    stale = sorted(p for p in Path(folder).glob(".*.tmp*") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` via a temp file and ``os.replace``: a kill never leaves half a file."""
    return write_atomic(path, lambda tmp: torch.save({"version": CHECKPOINT_VERSION, **state}, tmp))


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a trainer checkpoint safely (``weights_only=True``) or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a last.pth.tar written by dap-train")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickles foreign objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({first[:120]}); pass a last.pth.tar written by dap-train"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} was not written by dap-train (no 'arch'/'state_dict'); "
            "use `python -m dap_pretrain export` only on dap-train checkpoints"
        )
    return ckpt


def state_dict_mismatch(weights: dict, reference: dict, *, optional: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """How ``weights`` fails to load into a module whose state dict is ``reference``: the one fit check of the
    project (export, ``load_backbone``, the mm backbones).

    Keys starting with an ``optional`` prefix (a classifier) may be absent from either side. Returns the
    ``missing``, ``unexpected`` and ``mis-shaped`` keys; all empty when ``weights`` fits.
    """
    return {
        "missing": [k for k in reference if k not in weights and not k.startswith(optional)],
        "unexpected": [k for k in weights if k not in reference and not k.startswith(optional)],
        "mis-shaped": [k for k in reference if k in weights and weights[k].shape != reference[k].shape],
    }
