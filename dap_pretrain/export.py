"""Release a trained backbone for timm, mmdet and mmpose, and load it back.

``export_backbone(ckpt, out)`` writes:

- ``out/model.safetensors``: the timm state dict (EMA weights when the run kept an EMA);
- ``out/backbone.pth``: the same without the classifier, a plain state dict that mmdet/mmpose
  load with ``init_cfg=dict(type='Pretrained', checkpoint='out/backbone.pth')`` (timm's ResNet key
  names are torchvision's, which is what mmdet's and mmpose's ResNet expect);
- ``out/meta.json``: model, compute fractions, top-1/5, DaP parameters, dataset, epochs, git commit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dap_pretrain.checkpoint import CheckpointError, load_checkpoint


def _classifier_prefixes(arch: str) -> tuple[str, ...]:
    """Key prefixes of ``arch``'s classifier, from timm's pretrained cfg (no model is built)."""
    from timm.models import get_pretrained_cfg_value

    import dap_pretrain.models  # noqa: F401  (the cifar_* cfgs)

    names = get_pretrained_cfg_value(arch, "classifier") or "fc"
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def export_backbone(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True, overwrite: bool = False
) -> Path:
    """Write model.safetensors, backbone.pth and meta.json for a dap-train checkpoint; returns ``out_dir``.

    Refuses a non-empty ``out_dir`` unless ``overwrite``; files appear together (written to a temp
    folder first), so a failed export leaves nothing half-written.
    """
    from safetensors.torch import save_file

    ckpt = load_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"export folder {out} is not empty; choose another --out or pass --overwrite")
    ema = ckpt.get("state_dict_ema")
    used_ema = bool(use_ema and ema)
    weights = ema if used_ema else ckpt["state_dict"]
    weights = {k.removeprefix("module."): v.contiguous() for k, v in weights.items()}
    prefixes = _classifier_prefixes(ckpt["arch"])
    backbone = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    run = ckpt.get("run", {})
    meta = {
        "model": ckpt["arch"],
        "num_classes": ckpt.get("num_classes"),
        "weights": "ema" if used_ema else "raw",
        "epochs": run.get("epochs"),
        "epochs_completed": ckpt.get("epoch"),
        "compute_fraction_planned": run.get("compute_fraction_planned"),
        "compute_fraction_measured": run.get("compute_fraction_measured"),
        "top1": run.get("ema_top1" if used_ema else "top1"),
        "top5": run.get("ema_top5" if used_ema else "top5"),
        "dap": run.get("dap"),
        "dataset": run.get("dataset"),
        "git_commit": run.get("git_commit"),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "classifier_keys_removed": sorted(set(weights) - set(backbone)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"arch": ckpt["arch"]})
        torch.save(backbone, tmp / "backbone.pth")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        for name in ("model.safetensors", "backbone.pth", "meta.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_backbone(path: str | os.PathLike, *, model: str | None = None, **create_kwargs) -> torch.nn.Module:
    """Build the timm model an export (folder or ``model.safetensors``/``backbone.pth``) holds.

    ``model`` defaults to ``meta.json``'s; pass it for a bare weights file. Extra keyword arguments
    go to ``timm.create_model`` (e.g. ``features_only=True``, ``num_classes=0``). A file made for
    another architecture raises :class:`CheckpointError` naming both.
    """
    import timm

    import dap_pretrain.models  # noqa: F401  (registers the CIFAR networks)

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_file = folder / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    arch = model or meta.get("model")
    if arch is None:
        raise CheckpointError(f"{path} has no meta.json naming the model; pass model='resnet50' (the timm name)")
    if model and meta.get("model") and model != meta["model"]:
        raise CheckpointError(f"{path} holds a {meta['model']} backbone, not {model}; load it as {meta['model']}")
    weights_file = path / "model.safetensors" if path.is_dir() else path
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
    else:
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    num_classes = meta.get("num_classes") or 1000
    _check_fits(weights, arch=arch, num_classes=num_classes, source=weights_file, holds=meta.get("model"))
    if weights_file.name == "backbone.pth" or not any(k.startswith(_classifier_prefixes(arch)) for k in weights):
        create_kwargs.setdefault("num_classes", 0)  # no classifier in the file: build without one
    # timm's own loader adapts the weights to num_classes / features_only
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights_file), num_classes=num_classes),
        **{"num_classes": num_classes, **create_kwargs},
    )


def _check_fits(weights: dict, *, arch: str, num_classes: int, source, holds: str | None) -> None:
    """Raise one line naming both architectures unless ``weights`` is ``arch``'s state dict (classifier optional)."""
    import timm

    expected = timm.create_model(arch, pretrained=False, num_classes=num_classes).state_dict()
    head = _classifier_prefixes(arch)
    missing = [k for k in expected if k not in weights and not k.startswith(head)]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{source} holds {holds or 'another architecture'}'s weights, not timm '{arch}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys); "
            f"load it as {holds or 'the model it was trained as'}"
        )
