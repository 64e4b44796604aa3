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
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dap_pretrain.errors import DapError, brief

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


def checkpoint_in_folder(folder: Path) -> Path | None:
    """The checkpoint a folder given in place of a checkpoint file most likely means: its run's ``last.pth.tar``,
    or the file an mmengine work dir's ``last_checkpoint`` names; ``None`` if it holds neither."""
    if (folder / LAST_CHECKPOINT).is_file():
        return folder / LAST_CHECKPOINT
    try:
        named = Path((folder / "last_checkpoint").read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    named = named if named.is_absolute() else folder / named.name
    return named if named.is_file() else None


def not_a_checkpoint_file(path: Path, *, fix: str) -> CheckpointError:
    """The one-line error for a checkpoint path that is no file: a folder names the checkpoint inside it (see
    :func:`checkpoint_in_folder`), a missing file says so; ``fix`` is the advice when there is nothing to name."""
    if path.is_dir():
        inside = checkpoint_in_folder(path)
        return CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file; pass {inside or fix}")
    return CheckpointError(f"checkpoint {path} does not exist; {fix}")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100 * 2**20


def _is_mmengine(path: Path) -> bool:
    """An mmengine (``tools/pretrain_mm.sh``) checkpoint, told from its pickle's text without unpickling it: the
    message hub pickles ``mmengine`` classes beside the ``meta`` and ``message_hub`` keys."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return False
    return b"mmengine" in data or (b"message_hub" in data and b"meta" in data)


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a trainer checkpoint for ``--resume`` safely (``weights_only=True``) or raise :class:`CheckpointError`.

    Each refusal is one line naming the fix for the file given: a missing file (or a run folder whose run saved
    none), a folder (its ``last.pth.tar`` named), weights without training state (an export's ``model.safetensors``
    or ``backbone.pth``: ``--initial-checkpoint``), an mmengine checkpoint (``tools/pretrain_mm.sh --resume``), or
    a file a safe load refuses. torch's own text is cut to its first line, escape codes removed.
    """
    path = Path(path)
    fix = f"pass a run's OUTPUT/{LAST_CHECKPOINT} written by dap-train"
    if not path.is_file():
        if not path.exists() and path.name == LAST_CHECKPOINT and (path.parent / "args.yaml").is_file():
            fix = (
                f"the run in {path.parent} saved none (it failed or was stopped before its first checkpoint); start "
                f"it again with --output {path.parent} --overwrite"
            )
        raise not_a_checkpoint_file(path, fix=fix)
    weights_only = (
        f"to continue a run pass its OUTPUT/{LAST_CHECKPOINT} to --resume, or start a new run from these weights "
        f"with --initial-checkpoint {path}"
    )
    if _is_safetensors(path):
        raise CheckpointError(
            f"{path} holds weights only (an export or a release), not a training state; {weights_only}"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # pickles objects: torch's text here advises unsafe loading; not repeated
        if _is_mmengine(path):  # only here: a dap-train checkpoint whose paths say "mmengine" loads safely
            raise CheckpointError(
                f"checkpoint {path} is an mmengine checkpoint (tools/pretrain_mm.sh), not dap-train's; resume it "
                f"with tools/pretrain_mm.sh CONFIG --resume {path}, or export it with "
                f"`python -m dap_pretrain export {path} --out DIR`"
            ) from None
        refused = "Weights only load failed" in str(e)
        why = "it pickles Python objects that a safe load refuses" if refused else brief(e)
        raise CheckpointError(f"checkpoint {path} is unreadable ({why}); {fix}") from None
    except Exception as e:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({brief(e)}); {fix}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} was not written by dap-train (no 'arch'/'state_dict'; weights only, such as an "
            f"export's backbone.pth?); {weights_only}"
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
