"""Datasets for the trainer: indices travel in the batch; archives and the embedded default become folders.

* :class:`IndexedDataset` turns ``(img, target)`` items into ``(img, target, index)``, so the loss recorded for a
  sample is tied to it by data, not by hidden "current batch" state.
* :func:`resolve_data_dir` accepts an ImageFolder tree or a ``.tar``/``.tar.gz``/``.tgz`` of one, extracting an
  archive once into a cache folder (never next to the input, which may be read-only).
* :func:`embedded_data_dir` is the trainer's offline default: the CIFAR-10 test split shipped in the package
  (10 classes x 1,000 JPEGs, 3.2 MiB) split deterministically into ``train`` (first 800 per class by file name)
  and ``val`` (last 200).
* :func:`create_dataset` wraps ``timm.data.create_dataset`` and turns bad input into one-line :class:`DataError`.

Everything written to the cache is built in a temporary folder beside its destination and published with
``os.replace``, so a reader never sees a half-built folder and concurrent callers (DDP ranks) can race safely.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import timm.data
import torch.utils.data
from PIL import Image

__all__ = ["DataError", "IndexedDataset", "create_dataset", "embedded_data_dir", "resolve_data_dir"]

_logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
EMBEDDED_ARCHIVE = Path(__file__).resolve().parent / "embedded" / "cifar10_test_jpg.tar.gz"
EMBEDDED_TRAIN_PER_CLASS = 800  # of CIFAR-10's 1,000 test images per class; the other 200 validate
_DATA_DIR_HINT = "pass --data-dir pointing at an ImageFolder tree or a .tar/.tar.gz of one"


class DataError(ValueError):
    """Bad input data. The message is one line naming the problem and the fix; the CLI prints it and exits 2."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset of ``(img, target)`` items and yields ``(img, target, index)``.

    The index travels in the batch through workers, collate and prefetcher, so the trainer attributes each
    per-sample loss to its dataset index without patching torch or timm.

    Args:
        dataset: any map-style dataset whose items are ``(img, target)`` pairs (timm ``ImageDataset``,
            torchvision datasets, ``Subset`` of them).

    Attributes:
        dataset: the wrapped dataset.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        img, target = self.dataset[index]
        return img, target, int(index)

    @property
    def transform(self) -> Any:
        """The wrapped dataset's transform; timm's ``create_loader`` assigns it, so assignment passes through."""
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value

    @property
    def targets(self) -> list[int] | None:
        """Every sample's label in index order, without decoding images; None where that is not cheap."""
        return _targets(self.dataset)


def _targets(dataset: Any) -> list[int] | None:
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _targets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if getattr(dataset, "target_transform", None) is not None:
        return None  # stored labels would not be the ones __getitem__ returns
    targets = getattr(dataset, "targets", None)  # torchvision datasets
    reader = getattr(dataset, "reader", None)  # timm ImageDataset: folder and tar readers
    if targets is None and reader is not None:
        targets = getattr(reader, "targets", None)
        if targets is None and hasattr(reader, "samples"):
            targets = [t for _, t in reader.samples]
    return None if targets is None else [int(t) for t in targets]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dap-pretrain" / "datasets"


def _cache_key(archive: Path) -> str:
    """``<name>-<size>-<mtime>``: a changed archive gets a fresh folder, an unchanged one reuses its own."""
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    st = archive.stat()
    return f"{name}-{st.st_size}-{int(st.st_mtime)}"


def _make_tmp_beside(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise DataError(
            f"cannot write the dataset cache {dest.parent} ({_one_line(e)}); set XDG_CACHE_HOME to a writable folder"
        ) from None


def _publish(tmp: Path, dest: Path) -> None:
    """Moves the finished ``tmp`` to ``dest``; if another process published ``dest`` first, keeps theirs."""
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
        _logger.debug("%s was published by another process first; using it", dest)


def _extract(archive: Path, dest: Path) -> None:
    tmp = _make_tmp_beside(dest)
    _logger.info("extracting %s into %s (once; later runs reuse it)", archive, dest)
    # the 'data' filter refuses absolute paths, links out of the tree and device files (Python >= 3.10.12)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, **safe)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"archive {archive} is corrupt or not a tar file ({_one_line(e)}); re-create it with "
            "`tar -czf NAME.tar.gz FOLDER` or pass --data-dir the extracted folder"
        ) from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot extract {archive} into {dest.parent} ({_one_line(e)}); free disk space or set "
            "XDG_CACHE_HOME to a writable folder with room"
        ) from None
    _publish(tmp, dest)


def _single_top_folder(root: Path) -> Path:
    """An archive of ``name/`` holding ``<class>/`` or split folders is read from ``name/``."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and any(p.is_dir() for p in entries[0].iterdir()):
        return entries[0]
    return root


def resolve_data_dir(data_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns a folder to read a dataset from, extracting an archive once if given one.

    Called by :func:`create_dataset` (every rank, every run). Nothing is ever written next to ``data_dir``.

    Args:
        data_dir: an existing folder (returned as is) or a ``.tar``, ``.tar.gz`` or ``.tgz`` file of one.
        cache_dir: where archives are extracted, each into ``<name>-<size>-<mtime>/`` below it; defaults to
            ``$XDG_CACHE_HOME/dap-pretrain/datasets`` (``~/.cache/...``). An existing extraction is reused.

    Returns:
        The folder, or the extracted tree; if that holds a single top-level folder, that folder.

    Raises:
        DataError: ``data_dir`` is missing or is some other file, the archive is corrupt, or the cache is not
            writable.
    """
    path = Path(data_dir).expanduser()
    if path.is_dir():
        return path
    if not path.exists():
        raise DataError(f"data folder {path} does not exist; {_DATA_DIR_HINT}")
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{path} is a file but not a .tar/.tar.gz/.tgz archive; {_DATA_DIR_HINT}")
    dest = _cache_root(cache_dir) / _cache_key(path)
    if not dest.is_dir():  # published atomically: if it exists, it is complete
        _extract(path, dest)
    return _single_top_folder(dest)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def _build_split(source: Path, out: Path) -> None:
    for class_dir in sorted((p for p in source.iterdir() if p.is_dir()), key=lambda p: p.name):
        files = sorted((p for p in class_dir.iterdir() if p.is_file()), key=lambda p: p.name)
        for split, chunk in (("train", files[:EMBEDDED_TRAIN_PER_CLASS]), ("val", files[EMBEDDED_TRAIN_PER_CLASS:])):
            dst_dir = out / split / class_dir.name
            dst_dir.mkdir(parents=True)
            for f in chunk:
                _link_or_copy(f, dst_dir / f.name)


def embedded_data_dir(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the root of the trainer's embedded default dataset, building it on first use.

    The shipped CIFAR-10 test split (``dap_pretrain/data/embedded/cifar10_test_jpg.tar.gz``) is extracted via
    :func:`resolve_data_dir` and split per class by sorted file name: the first 800 images into
    ``train/<class>/``, the last 200 into ``val/<class>/`` (8,000 / 2,000 images, 10 classes), as hard links
    (copies where links fail). Idempotent; safe when several processes (DDP ranks) call it at once.

    Args:
        cache_dir: as for :func:`resolve_data_dir`; the split lives beside the extraction.

    Returns:
        A folder holding ``train`` and ``val`` ImageFolder trees.
    """
    source = resolve_data_dir(EMBEDDED_ARCHIVE, cache_dir=cache_dir)
    dest = _cache_root(cache_dir) / f"{_cache_key(EMBEDDED_ARCHIVE)}-split{EMBEDDED_TRAIN_PER_CLASS}"
    if not dest.is_dir():
        tmp = _make_tmp_beside(dest)
        _logger.info("splitting the embedded CIFAR-10 sample into %s", dest)
        try:
            _build_split(source, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, dest)
    return dest


def _split_folder(root: Path, split: str) -> Path:
    """The folder timm's ImageFolder search reads for ``split`` (``root`` itself when there is no split folder)."""
    name = split.split("[")[0]
    synonyms = (("train", "training"), ("val", "valid", "validation", "eval", "evaluation"))
    for candidate in (name, *next((s for s in synonyms if name in s), ())):
        if candidate and (root / candidate).exists():
            return root / candidate
    return root


def _check_first_image(dataset: Any, folder: Path) -> None:
    """Decodes sample 0 directly: timm's ImageDataset would skip an unreadable file with only a warning."""
    reader = getattr(dataset, "reader", None)
    if reader is None or len(dataset) == 0:
        return
    try:
        handle = reader[0][0]
        with handle, Image.open(handle) as img:
            img.convert(getattr(dataset, "input_img_mode", None) or "RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"cannot decode {dataset.filename(0, absolute=True)} ({_one_line(e)}); the images under "
            f"{folder} are unreadable: remove or re-encode the broken files"
        ) from None


def create_dataset(
    *,
    name: str,
    root: str | os.PathLike,
    split: str,
    is_training: bool,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> torch.utils.data.Dataset:
    """Builds a dataset with ``timm.data.create_dataset``, first resolving archives, and checks it is usable.

    Called by the trainer once per split before wrapping the result in :class:`IndexedDataset`.

    Args:
        name: '' or 'imagefolder' for an ImageFolder tree (or an archive of one); timm names such as
            'torch/cifar10' pass through unchanged.
        root: the dataset folder or archive (for 'torch/...' names, torchvision's download folder).
        split: split folder to read below ``root`` ('train', 'val', ...); as in timm, ``root`` itself is read
            when there is no such folder.
        is_training: passed to timm (shuffling for iterable datasets).
        cache_dir: extraction cache, see :func:`resolve_data_dir`.
        **kwargs: passed to ``timm.data.create_dataset`` (``class_map``, ``download``, ...).

    Returns:
        The timm / torchvision dataset, yielding ``(img, target)``.

    Raises:
        DataError: missing folder, corrupt archive, no images, or an undecodable first image.
    """
    if name.lower() in ("", "imagefolder"):
        root = resolve_data_dir(root, cache_dir=cache_dir)
        folder = _split_folder(root, split)
        where = str(folder) if folder != root else f"{root} (it has no {split}/ folder)"
        try:
            dataset = timm.data.create_dataset("", root=str(root), split=split, is_training=is_training, **kwargs)
        except RuntimeError:  # timm's folder reader: "Found 0 images in subfolders of ..."
            raise DataError(f"no images found under {where}; expected <class>/<image> folders there") from None
        _check_first_image(dataset, folder)
    elif name.lower().startswith("torch/"):
        try:
            dataset = timm.data.create_dataset(
                name, root=str(Path(root).expanduser()), split=split, is_training=is_training, **kwargs
            )
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DataError(
                f"cannot load {name} from {root} ({_one_line(e)}); pass --dataset-download to fetch "
                "it there, or point --data-dir at the folder that holds it"
            ) from None
    else:
        dataset = timm.data.create_dataset(name, root=root, split=split, is_training=is_training, **kwargs)
    if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) == 0:
        raise DataError(
            f"dataset {name or 'imagefolder'} at {root} split {split} is empty; "
            "point --data-dir at a folder with images"
        )
    return dataset
