"""Resolve a BACKBONE argument (export folder or checkpoint file) and check it against a config's backbone.

The export folder layout is written by ``dap_pretrain.export.export_backbone``::

    DIR/backbone.pth     plain state dict of the timm model, classifier removed
    DIR/model.safetensors  full timm state dict (not used here)
    DIR/meta.json        {"model": "resnet50", "compute_fraction_measured": 0.74, ...}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dap_pretrain.checkpoint import state_dict_mismatch
from dap_pretrain.export import classifier_prefixes
from downstream import TransferInputError

# Keys a classification checkpoint may carry that no detection/pose backbone has.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.")  # only where the timm model is unknown
# Wrappers training scripts put around the state dict (timm saver: 'state_dict', ConvNeXt: 'model').
_STATE_DICT_KEYS = ("state_dict", "model", "module")


@dataclasses.dataclass
class BackboneSpec:
    """What the transfer run needs to know about a backbone.

    Attributes:
        model: timm model name (``meta.json`` ``model``, or ``--model`` for a bare checkpoint).
        checkpoint: the state dict file to initialise from.
        meta: the export's ``meta.json`` (``{}`` for a bare checkpoint), copied into metrics.json.
    """

    model: str
    checkpoint: Path
    meta: dict


def resolve_backbone(*, backbone: str | Path, model: str | None = None) -> BackboneSpec:
    """Reads an export folder's ``meta.json`` or takes a bare checkpoint file.

    Args:
        backbone: export folder (holding ``backbone.pth`` and ``meta.json``) or a ``.pth`` file.
        model: timm model name; required for a bare checkpoint, must agree with ``meta.json`` otherwise.

    Raises:
        TransferInputError: missing files, malformed ``meta.json``, a model name conflict, or a backbone trained
            with ``--model-kwargs`` (the stock mmdet/mmpose configs would build another architecture).
    """
    path = Path(backbone)
    if path.is_dir():
        ckpt, meta_file = path / "backbone.pth", path / "meta.json"
        for f in (ckpt, meta_file):
            if not f.is_file():
                raise TransferInputError(
                    f"export folder {path} has no {f.name}; pass a folder written by "
                    "`python -m dap_pretrain export CKPT --out DIR` or a .pth file with --model"
                )
        try:
            meta = json.loads(meta_file.read_text())
            meta_model = meta["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TransferInputError(
                f"{meta_file} is malformed ({type(e).__name__}: {e}); re-export the backbone"
            ) from None
        if model is not None and model != meta_model:
            raise TransferInputError(
                f"--model {model} contradicts {meta_file} (model={meta_model}); drop --model for an export folder"
            )
        if meta.get("model_kwargs"):  # mmdet/mmpose build the stock architecture, which would not be this one
            raise TransferInputError(
                f"{path} was trained with --model-kwargs {meta['model_kwargs']}, which the COCO configs cannot "
                "build yet; transfer a backbone trained without them"
            )
        return BackboneSpec(model=meta_model, checkpoint=ckpt, meta=meta)
    if path.is_file():
        if model is None:
            raise TransferInputError(f"{path} is a bare checkpoint; pass --model TIMM_NAME (e.g. --model resnet50)")
        return BackboneSpec(model=model, checkpoint=path, meta={"model": model, "checkpoint": str(path)})
    raise TransferInputError(f"backbone {path} does not exist; pass an export folder or a .pth file")


def load_backbone_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads a plain tensor state dict, unwrapping a training checkpoint and a DDP ``module.`` prefix.

    Loads with ``weights_only=True``: a backbone file holds tensors only.

    Raises:
        TransferInputError: the file is not a loadable state dict.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise TransferInputError(f"cannot load {path} as a state dict ({type(e).__name__}); re-export it") from None
    for key in _STATE_DICT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TransferInputError(f"{path} is not a tensor state dict; pass backbone.pth of an export folder")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def compare_state_dicts(
    *, checkpoint: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], model: str | None = None
) -> list[str]:
    """Lists the problems loading ``checkpoint`` into a module whose state dict is ``reference``.

    The project's one fit check (:func:`dap_pretrain.checkpoint.state_dict_mismatch`); the classifier keys of
    timm ``model`` (from its pretrained config; common names when ``model`` is unknown) are ignored.

    Returns:
        Human-readable problems, empty when the checkpoint fits.
    """
    optional = classifier_prefixes(model) if model else _CLASSIFIER_PREFIXES
    bad = state_dict_mismatch(checkpoint, reference, optional=optional)
    return [f"{len(keys)} {what} keys, e.g. {keys[0]}" for what, keys in bad.items() if keys]


def check_backbone(
    *,
    spec: BackboneSpec,
    reference: dict[str, torch.Tensor],
    expected: str,
    overrides: Sequence[str] = (),
    stock_reference: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Raises if ``spec.checkpoint`` does not load into the config's backbone.

    Args:
        spec: the resolved backbone.
        reference: state dict of the backbone the config builds (random init is fine).
        expected: how to name that backbone in the message, e.g. ``'mmdet ResNet-50 (configs/det/...py)'``.
        overrides: the user's ``--cfg-options`` keys that changed that backbone (``model.backbone.depth``).
        stock_reference: builds the state dict of the backbone without ``overrides``; called only on a misfit. If
            the checkpoint fits that one, the misfit is blamed on ``overrides``, else on the checkpoint.

    Raises:
        TransferInputError: names the mismatch and the fix.
    """
    checkpoint = load_backbone_state_dict(spec.checkpoint)
    problems = compare_state_dicts(checkpoint=checkpoint, reference=reference, model=spec.model)
    if not problems:
        return
    if (
        overrides
        and stock_reference is not None
        and not compare_state_dicts(checkpoint=checkpoint, reference=stock_reference(), model=spec.model)
    ):
        raise TransferInputError(
            f"backbone {spec.checkpoint} ({spec.model}) does not fit {expected} as --cfg-options "
            f"{' '.join(overrides)} changes it: {'; '.join(problems)}; drop those options, or pass an export of the "
            "architecture they ask for"
        )
    raise TransferInputError(
        f"backbone {spec.checkpoint} ({spec.model}) does not fit {expected}: {'; '.join(problems)}; "
        "pass an export of the architecture the config expects (or the right --model for a bare .pth)"
    )
