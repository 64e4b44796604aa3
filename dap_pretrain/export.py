"""Release a trained backbone for timm, mmdet and mmpose, and load it back.

``export_backbone(ckpt, out)`` takes a dap-train checkpoint (``OUTPUT/last.pth.tar``) or an mmengine one
written by the mmpretrain front end (``WORK_DIR/epoch_N.pth``) and writes:

- ``out/model.safetensors``: the timm state dict (EMA weights when the run kept an EMA);
- ``out/config.json``: timm's hub config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``), written by timm's own ``save_for_hf`` writer, so plain timm loads the folder
  without this package: ``timm.create_model('local-dir:out', pretrained=True)``, and, once the folder
  is uploaded, ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` (see docs/MODEL_ZOO.md);
  the project's own ``cifar_*`` architectures need ``import dap_pretrain`` first (noted in the file);
- ``out/backbone.pth``: the same without the classifier, a plain state dict that mmdet/mmpose
  load with ``init_cfg=dict(type='Pretrained', checkpoint='out/backbone.pth')`` (timm's ResNet key
  names are torchvision's, which is what mmdet's and mmpose's ResNet expect);
- ``out/meta.json``: model, compute fractions, top-1/5, DaP parameters, dataset, epochs, git commit.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from dap_pretrain.checkpoint import CheckpointError, not_a_checkpoint_file, state_dict_mismatch

RELEASE_FILES = ("model.safetensors", "config.json", "backbone.pth", "meta.json")
# pretrained_cfg fields that describe timm's own weights for an architecture (their tag, paper, licence,
# labels); a DaP release copying them would misattribute itself.
_FOREIGN_CFG_FIELDS = tuple(
    "tag license description origin_url paper_name paper_ids notes label_names label_descriptions "
    "hf_hub_id hf_hub_filename url".split()
)
_REFETCH = "re-download the release or re-export it with `python -m dap_pretrain export CKPT --out DIR`"


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What a training checkpoint releases, whichever front end wrote it."""

    arch: str
    num_classes: int
    weights: dict[str, torch.Tensor]
    weights_kind: str  # 'ema' or 'raw'
    epochs_completed: int | None
    run: dict
    trainer: str  # 'dap-train' or 'mmengine'
    data_config: dict  # the eval preprocessing, for config.json's pretrained_cfg
    model_args: dict = dataclasses.field(default_factory=dict)  # --model-kwargs: timm.create_model keywords


def classifier_prefixes(arch: str) -> tuple[str, ...]:
    """Key prefixes of ``arch``'s classifier, from timm's pretrained cfg (no model is built)."""
    from timm.models import get_pretrained_cfg_value

    import dap_pretrain.models  # noqa: F401  (the cifar_* cfgs)

    names = get_pretrained_cfg_value(arch, "classifier") or "fc"
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _num_classes_in(weights: dict, arch: str) -> int:
    """Rows of the classifier weight in ``weights``; 0 when the file holds no classifier."""
    w = weights.get(f"{classifier_prefixes(arch)[0]}weight")
    return int(w.shape[0]) if w is not None else 0


def _read_checkpoint(path: Path) -> dict:
    """Load a training checkpoint the caller named, trusting it with ``weights_only=False`` only if it needs that.

    dap-train checkpoints hold plain data and load with ``weights_only=True``. mmengine's cannot: its
    message hub pickles ``HistoryBuffer`` methods through ``builtins.getattr``, which torch refuses. Such a
    file is the caller's own training output named explicitly to ``export``, so it is loaded with
    ``weights_only=False`` (the trusted-path rule of ``downstream/compat.py``). Files ``load_backbone``
    reads (releases, possibly downloaded) never get this.
    """
    if not path.is_file():
        raise not_a_checkpoint_file(path, fix="pass OUTPUT/last.pth.tar (dap-train) or WORK_DIR/epoch_N.pth (mmengine)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # a readable file that pickles objects: mmengine's message hub
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt, truncated, or not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not zipfile.is_zipfile(path):  # a CSV, a log: the unpickler's words ("pop from empty list") say nothing
            first = "not a torch checkpoint: torch.save writes a zip archive"
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({first[:120]}); pass a checkpoint written by dap-train or mmengine"
        ) from None


def _from_dap_train(ckpt: dict, *, use_ema: bool) -> _Trained:
    ema = ckpt.get("state_dict_ema")
    used_ema = bool(use_ema and ema)
    weights = {k.removeprefix("module."): v for k, v in (ema if used_ema else ckpt["state_dict"]).items()}
    run = dict(ckpt.get("run") or {})
    run["top1"], run["top5"] = (
        (run.get("ema_top1"), run.get("ema_top5")) if used_ema else (run.get("top1"), run.get("top5"))
    )
    args = ckpt.get("args") or {}
    return _Trained(
        arch=ckpt["arch"],
        num_classes=ckpt.get("num_classes") or _num_classes_in(weights, ckpt["arch"]),
        weights=weights,
        weights_kind="ema" if used_ema else "raw",
        epochs_completed=ckpt.get("epoch"),
        run=run,
        trainer="dap-train",
        data_config=_dap_train_data_config(ckpt["arch"], args),
        model_args=dict(args.get("model_kwargs") or {}),
    )


def _dap_train_data_config(arch: str, args: dict) -> dict:
    """The trainer's eval preprocessing (runner._build_data): CIFAR resize+crop at <= 64 px, else timm's at 87.5%."""
    from timm.models import get_pretrained_cfg_value

    from dap_pretrain.data.loader import uses_cifar_aug

    img = args.get("img_size") or (get_pretrained_cfg_value(arch, "input_size") or (3, 224, 224))[-1]
    cifar = uses_cifar_aug(img_size=img, aug=args.get("aug") or "auto")
    return {"input_size": (3, img, img), "crop_pct": 1.0 if cifar else 0.875, "interpolation": "bilinear"}


def _from_mmengine(ckpt: dict, *, use_ema: bool, path: Path) -> _Trained:
    """mmpretrain ``ImageClassifier`` keys -> timm: ``backbone.X`` -> ``X``, ``head.fc.X`` -> timm's classifier."""
    run = dict((ckpt.get("dap") or {}).get("run") or {})
    arch = run.get("timm_model")
    if not arch and str(run.get("model", "")).startswith("mmpretrain:"):  # the hook found no timm equivalent
        raise CheckpointError(
            f"{path} holds a {run['model'].removeprefix('mmpretrain:')} backbone, which has no timm equivalent; export "
            "takes mmpretrain's pytorch-style ResNet with GlobalAveragePooling and a linear head (timm's resnet*)"
        )
    if not arch:
        raise CheckpointError(
            f"{path} is an mmengine checkpoint without checkpoint['dap']['run']['timm_model']; "
            "export checkpoints written by tools/pretrain_mm.sh (its DaP hook records the timm name)"
        )
    ema = ckpt.get("ema_state_dict")
    # mmengine's EMAHook swaps on save: 'state_dict' holds the EMA weights, 'ema_state_dict' the raw ones
    if ema and not use_ema:
        source = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    else:
        source = ckpt["state_dict"]
    if ema and (ckpt["dap"].get("version") or 1) >= 2:  # top1 the raw weights', ema_top1 the EMA's; None: unmeasured
        raw, averaged = (run.get("top1"), run.get("top5")), (run.get("ema_top1"), run.get("ema_top5"))
        run["top1"], run["top5"] = averaged if use_ema else raw
    elif ema:  # written before the hook's state version 2: the validated top-1 is ema_top1 (before session 15 the hook
        # wrote it as top1, with ema_top1 empty); the raw weights' was never measured
        old = run.get("ema_top1") is None
        shown = (run.get("top1"), run.get("top5")) if old else (run.get("ema_top1"), run.get("ema_top5"))
        run["top1"], run["top5"] = shown if use_ema else (None, None)
    head = classifier_prefixes(arch)[0]
    weights = {}
    for key, value in source.items():
        if key.startswith("backbone."):
            key = key.removeprefix("backbone.")
        elif key.startswith("head.fc."):
            key = head + key.removeprefix("head.fc.")
        weights[key] = value  # anything else stays as it is, and _check_fits names it
    return _Trained(
        arch=arch,
        num_classes=run.get("num_classes") or _num_classes_in(weights, arch),
        weights=weights,
        weights_kind="ema" if ema and use_ema else "raw",
        epochs_completed=(ckpt.get("meta") or {}).get("epoch"),
        run=run,
        trainer="mmengine",
        data_config=_mmpretrain_data_config(run),
    )


def _mmpretrain_data_config(run: dict) -> dict:
    """The eval preprocessing the run recorded, else that of mmpretrain's ImageNet configs.

    mmpretrain's ``_base_/datasets/imagenet_bs32.py`` evaluates at ResizeEdge 256 (short side), CenterCrop 224,
    bilinear; the DaP hook may record ``img_size``, ``crop_pct`` and ``interpolation`` in ``dap.run`` instead.
    """
    img = run.get("img_size") or 224
    return {
        "input_size": (3, img, img),
        "crop_pct": run.get("crop_pct") or 224 / 256,
        "interpolation": run.get("interpolation") or "bilinear",
    }


def _trained(path: Path, *, use_ema: bool) -> _Trained:
    ckpt = _read_checkpoint(path)
    if isinstance(ckpt, dict) and "arch" in ckpt and isinstance(ckpt.get("state_dict"), dict):
        return _from_dap_train(ckpt, use_ema=use_ema)
    if isinstance(ckpt, dict) and "meta" in ckpt and isinstance(ckpt.get("state_dict"), dict):
        return _from_mmengine(ckpt, use_ema=use_ema, path=path)
    raise CheckpointError(
        f"checkpoint {path} was written by neither dap-train (no 'arch'/'state_dict') nor mmengine (no 'meta'); "
        "export OUTPUT/last.pth.tar of dap-train or WORK_DIR/epoch_N.pth of tools/pretrain_mm.sh"
    )


def _hub_config(model: torch.nn.Module, trained: _Trained, *, native: bool, path: Path) -> None:
    """Write timm's ``config.json`` for ``model`` to ``path``, minus the fields that describe timm's own weights."""
    # the writer behind timm's public save_for_hf/push_to_hf_hub; timm.models re-exports only those two
    from timm.models._hub import save_config_for_hf

    if "data_config" in inspect.signature(save_config_for_hf).parameters:  # timm >= 1.0.30
        save_config_for_hf(model, path, data_config=trained.data_config)
        config = json.loads(path.read_text())
    else:  # older timm (1.0.29 on the GPU machines): the same preprocessing fields, set here
        save_config_for_hf(model, path)  # a Path: 1.0.29 calls config_path.open()
        config = json.loads(path.read_text())
        data = {k: v for k, v in (trained.data_config or {}).items() if v is not None}
        config["pretrained_cfg"].update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
        if "input_size" in data:
            config["pretrained_cfg"].pop("test_input_size", None)
    for key in _FOREIGN_CFG_FIELDS:
        config["pretrained_cfg"].pop(key, None)
    if trained.model_args:  # timm's hub loader passes them to create_model
        config["model_args"] = {**config.get("model_args", {}), **trained.model_args}
    config["pretrained_cfg"]["description"] = f"DaP-pretrain release ({trained.trainer}); see meta.json"
    config["dap_pretrain"] = {"meta": "meta.json", "timm_native": native}
    if not native:
        config["dap_pretrain"]["requires"] = f"import dap_pretrain  # registers {trained.arch} with timm"
    path.write_text(json.dumps(config, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_backbone(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True, overwrite: bool = False
) -> Path:
    """Write model.safetensors, config.json, backbone.pth and meta.json for a training checkpoint; returns ``out_dir``.

    Args:
        checkpoint: a dap-train checkpoint, or an mmengine one from the mmpretrain front end (its
            ``checkpoint['dap']['run']`` names ``timm_model``). An mmengine checkpoint pickles objects and is
            loaded with ``weights_only=False``: pass only your own training output.
        out_dir: the release folder; refused when not empty unless ``overwrite``.
        use_ema: release the EMA weights when the run kept an EMA.
        overwrite: replace the release files in a non-empty ``out_dir``.

    Raises:
        CheckpointError: unreadable or foreign checkpoint, NaN/inf weights, or weights that do not fit the
            timm architecture the checkpoint names.

    The files appear together (written to a temp folder first), so a failed export leaves nothing half-written.
    """
    from safetensors.torch import save_file
    from timm.models import model_entrypoint

    out = Path(out_dir)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise CheckpointError(f"export folder {out} cannot be made: {blocked} is a file; pass another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"export folder {out} is not empty; choose another --out or pass --overwrite")
    trained = _trained(Path(checkpoint), use_ema=use_ema)
    weights = {k: v.contiguous() for k, v in trained.weights.items()}
    _check_finite(weights, source=checkpoint, fix="training diverged or the file is damaged; export another checkpoint")
    model = _check_fits(
        weights,
        arch=trained.arch,
        num_classes=trained.num_classes,
        source=checkpoint,
        holds=None,
        fix=f"the checkpoint's weights are not the {trained.arch} it names; export a checkpoint of a timm architecture",
        model_args=trained.model_args,
    )
    native = model_entrypoint(trained.arch).__module__.startswith("timm.")
    backbone = {k: v for k, v in weights.items() if not k.startswith(classifier_prefixes(trained.arch))}
    run = trained.run
    meta = {
        "model": trained.arch,
        "num_classes": trained.num_classes,
        "weights": trained.weights_kind,
        "trainer": trained.trainer,
        "timm_native": native,
        "epochs": run.get("epochs"),
        "epochs_completed": trained.epochs_completed,
        "compute_fraction_planned": run.get("compute_fraction_planned"),
        "compute_fraction_measured": run.get("compute_fraction_measured"),
        "top1": run.get("top1"),
        "top5": run.get("top5"),
        "dap": run.get("dap"),
        "dataset": run.get("dataset"),
        "git_commit": run.get("git_commit"),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "classifier_keys_removed": sorted(set(weights) - set(backbone)),
        "model_kwargs": trained.model_args,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"arch": trained.arch})
        _hub_config(model, trained, native=native, path=tmp / "config.json")
        torch.save(backbone, tmp / "backbone.pth")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        mode = 0o666 & ~_umask()  # as a plain open() would create them (the temp folder's files are private)
        for name in RELEASE_FILES:
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the release into {out} ({e.strerror or e}); free space or pass another --out"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _release_model(folder: Path) -> tuple[str | None, dict]:
    """The timm name in ``folder``'s meta.json and the ``timm.create_model`` keywords it was trained with
    (``model_kwargs``), else timm's config.json ``architecture`` and ``model_args`` (less ``num_classes``, which
    the weights give), else ``(None, {})``."""
    for name, key, args_key in (("meta.json", "model", "model_kwargs"), ("config.json", "architecture", "model_args")):
        file = folder / name
        if file.is_file():
            try:
                info = json.loads(file.read_text())
                args = {k: v for k, v in (info.get(args_key) or {}).items() if k != "num_classes"}
                return info[key], args
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{file} is malformed ({type(e).__name__}: {e}); {_REFETCH}") from None
    return None, {}


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from ``.safetensors`` or (``weights_only=True``) ``.pth``, or a one-line error."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(file))
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or pickles objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is unreadable ({first[:120]}); {_REFETCH}") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{file} is not a tensor state dict; pass model.safetensors or backbone.pth of a release")
    return weights


def load_backbone(path: str | os.PathLike, *, model: str | None = None, **create_kwargs) -> torch.nn.Module:
    """Build the timm model a release holds.

    Args:
        path: a release folder, ``local-dir:DIR``, ``hf-hub:ORG/NAME`` (handed to timm as is), or a weights
            file (``model.safetensors``, ``backbone.pth``). A folder without meta.json uses timm's config.json;
            a bare file without either needs ``model``. The class count comes from the classifier in the file.
        model: timm name; must agree with the release's meta.json/config.json when there is one.
        **create_kwargs: passed to ``timm.create_model`` (e.g. ``features_only=True``, ``num_classes=0``).

    Raises:
        CheckpointError: one line naming the file and the fix: missing or unreadable file, NaN/inf weights
            (a damaged or tampered file), no model name, or weights of another architecture.
    """
    import timm

    import dap_pretrain.models  # noqa: F401  (registers the CIFAR networks)

    name = os.fspath(path)
    if name.startswith("hf-hub:"):
        net = timm.create_model(name, pretrained=True, **create_kwargs)
        arch = net.pretrained_cfg.get("architecture")
        if model and arch and model != arch:
            raise CheckpointError(f"{name} holds a {arch} backbone, not {model}; load it as {arch}")
        _check_finite(net.state_dict(), source=name, fix=f"the upload is damaged; {_REFETCH} and upload it again")
        return net
    path = Path(name.removeprefix("local-dir:"))
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a release folder, local-dir:DIR, hf-hub:ORG/NAME or a weights file"
        )
    holds, model_args = _release_model(path if path.is_dir() else path.parent)
    arch = model or holds
    if arch is None:
        raise CheckpointError(f"{path} has no meta.json or config.json naming the model; pass model='resnet50'")
    if model and holds and model != holds:
        raise CheckpointError(f"{path} holds a {holds} backbone, not {model}; load it as {holds}")
    weights_file = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir() and not weights_file.is_file():
        weights_file = path / "backbone.pth"
    if not weights_file.is_file():
        raise CheckpointError(f"{path} holds neither model.safetensors nor backbone.pth; {_REFETCH}")
    weights = _read_weights(weights_file)
    _check_finite(weights, source=weights_file, fix=f"the file is damaged or tampered; {_REFETCH}")
    file_classes = _num_classes_in(weights, arch)  # 0: no classifier in the file, build without one
    _check_fits(weights, arch=arch, num_classes=file_classes, source=weights_file, holds=holds, model_args=model_args)
    create_kwargs.setdefault("num_classes", file_classes)
    # timm's own loader adapts the (already checked) weights to num_classes / features_only
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=weights, num_classes=file_classes),
        **{**model_args, **create_kwargs},
    )


def _check_finite(weights: dict, *, source, fix: str) -> None:
    """Raise one line naming ``source`` and ``fix`` if any floating-point tensor holds NaN or inf."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} has NaN/inf values in {len(bad)} of its tensors (first: {bad[0]}); {fix}")


def _check_fits(
    weights: dict,
    *,
    arch: str,
    num_classes: int,
    source,
    holds: str | None,
    fix: str | None = None,
    model_args: dict | None = None,
) -> torch.nn.Module:
    """Return a fresh timm ``arch`` (built with ``model_args``) if ``weights`` is its state dict (classifier
    optional), else raise one line.

    The message names both architectures and ``fix`` (default: load it as the architecture it holds).
    """
    import timm

    net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **(model_args or {}))
    bad = state_dict_mismatch(weights, net.state_dict(), optional=classifier_prefixes(arch))
    missing, unexpected, misshaped = bad["missing"], bad["unexpected"], bad["mis-shaped"]
    if missing or unexpected or misshaped:
        example = (missing or unexpected or misshaped)[0]
        fix = fix or f"load it as {holds or 'the model it was trained as'}"
        raise CheckpointError(
            f"{source} holds {holds or 'another architecture'}'s weights, not timm '{arch}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys, "
            f"e.g. {example}); {fix}"
        )
    return net
