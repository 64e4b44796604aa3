"""Datasets for the trainer: indices travel in the batch; archives and the embedded default become folders.

* :class:`IndexedDataset` turns ``(img, target)`` items into ``(img, target, index)``, so the loss recorded for a
  sample is tied to it by data, not by hidden "current batch" state.
* :func:`resolve_data_dir` accepts an ImageFolder tree or a ``.tar``/``.tar.gz``/``.tgz`` of one, extracting an
  archive once into a cache folder (never next to the input, which may be read-only).
* :func:`embedded_data_dir` is the trainer's offline default: the CIFAR-10 test split shipped in the package
  (10 classes x 1,000 JPEGs, 3.2 MiB) split deterministically into ``train`` (first 800 per class by file name)
  and ``val`` (last 200).
* :func:`create_dataset` wraps ``timm.data.create_dataset`` and turns bad input into one-line :class:`DataError`;
  the val split is read with the train split's class map (:func:`dataset_classes`) so labels stay aligned.
* :func:`check_batch_size` refuses a ``--batch-size`` that ``--drop-last`` would leave with nothing to train.

Everything written to the cache is built in a temporary folder beside its destination and published with
``os.replace``, so a reader never sees a half-built folder and concurrent callers (DDP ranks) can race safely.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import numbers
import os
import random
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch.utils.data
from PIL import Image

from dap_pretrain.data import cache
from dap_pretrain.errors import DapError

__all__ = [
    "DataError",
    "IndexedDataset",
    "check_batch_size",
    "create_dataset",
    "dataset_classes",
    "dataset_prefix",
    "embedded_data_dir",
    "files_digest",
    "resolve_data_dir",
]

_logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
HASH_WHOLE_BYTES = 256 * 2**20  # archives up to this size are keyed by their content (about 0.1 s per 40 MB)
HASH_ENDS_BYTES = 8 * 2**20  # of a larger archive, this much of each end is hashed, with its mtime
EMBEDDED_ARCHIVE = Path(__file__).resolve().parent / "embedded" / "cifar10_test_jpg.tar.gz"
EMBEDDED_TRAIN_PER_CLASS = 800  # of CIFAR-10's 1,000 test images per class; the other 200 validate
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's 16/32-bit integer modes
_DATA_DIR_HINT = "pass --data-dir pointing at an ImageFolder tree or a .tar/.tar.gz of one"
STREAMING_PREFIXES = ("hfids", "tfds", "wds")  # timm's IterableImageDataset readers: no index per sample
TORCH_DATASETS = (  # the names timm's create_dataset maps to torchvision (after 'torch/')
    "cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "inaturalist", "inat", "places365", "qmnist",
    "imagenet", "image_folder", "folder",
)  # fmt: skip
TORCH_NO_DOWNLOAD = ("imagenet", "image_folder", "folder")  # torchvision cannot fetch these


class DataError(DapError, ValueError):
    """Bad input data. The message is one line naming the problem and the fix; the CLI prints it and exits 2."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _seed_all(seed: int) -> None:
    """Seed the generators a transform may draw from; torch's CPU one only (loader workers have no CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


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
        if hasattr(dataset, "_max_retries"):
            # timm hands back the NEXT file's image for an unreadable one, which would credit its loss to this
            # index; with one try it raises instead, and __getitem__ returns the sample as skipped.
            dataset._max_retries = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, Any, int]:
        """``index``, or ``(index, seed)`` from :class:`~dap_pretrain.data.loader.SeededSampler`: then the
        transform's random draws (``random``, numpy's and torch's global generators: timm's RandAugment draws its
        ops from numpy) start from ``seed``, so a sample's
        augmentation depends on the seed alone, not on which worker process loads it or what it loaded before.

        An image file that cannot be read comes back as ``(None, -1, index)`` with a warning naming it; the
        collate function drops it, so it is neither trained nor counted as trained (the epoch reports it as
        untrained)."""
        if not isinstance(index, tuple):
            return self._load(index)
        index, seed = index
        if torch.utils.data.get_worker_info() is None:  # the main process: leave its generators as they were
            states = random.getstate(), np.random.get_state(), torch.get_rng_state()
            try:
                _seed_all(seed)
                return self._load(index)
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])
        _seed_all(seed)
        return self._load(index)

    def _load(self, index: int) -> tuple[Any, Any, int]:
        try:
            img, target = self.dataset[index]
        except RuntimeError as e:
            if not str(e).startswith("Failed to load"):  # timm's unreadable-file error; anything else is a bug
                raise
            _logger.warning(
                "skipped unreadable image %s: not trained this epoch; remove or replace the file", self.name(index)
            )
            return None, -1, int(index)
        return img, target, int(index)

    @property
    def samples(self) -> list[tuple[Any, int]] | None:
        """The wrapped ImageFolder's ``(path, label)`` list in index order; None where there is no file list."""
        return getattr(getattr(self.dataset, "reader", None), "samples", None) or None

    def file_digest(self) -> str | None:
        """What ``--resume`` checks that a run goes on with the same images: a digest (16 hex digits) of every
        sample's file name relative to the dataset's root, in index order, with its label. The root is left out, so
        the same tree moved or extracted elsewhere (an archive's cache folder) gives the same digest; another image
        set of the same size, or the same files under other labels, gives another. None where there is no file list
        (torchvision datasets): then only the sample count is checked. Computed once (about 1 s per million files).
        """
        if not hasattr(self, "_file_digest"):
            self._file_digest = _file_digest(self.dataset)
        return self._file_digest

    def name(self, index: int) -> str:
        """The file behind ``index`` (for messages), else ``sample <index>``."""
        samples = self.samples
        return str(samples[index][0]) if samples else f"sample {index}"

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


def _file_digest(dataset: Any) -> str | None:
    """See :meth:`IndexedDataset.file_digest`; a ``Subset`` digests its own samples."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if not samples:
        return None
    picked = (samples[i] for i in indices) if indices is not None else samples
    return files_digest(picked, root=str(getattr(reader, "root", "")))


def files_digest(samples: Iterable[tuple[Any, int]], *, root: str = "") -> str:
    """A digest (16 hex digits) of ``(file, label)`` pairs in order, each file named relative to ``root`` where it
    lies under it (a path, or a tar member's ``TarInfo``): what a resumed run compares with its checkpoint's to
    know it trains the same images under the same labels (both front ends; see
    :meth:`IndexedDataset.file_digest`)."""
    root = os.path.join(root, "") if root else ""
    digest = hashlib.sha256()
    for item, label in samples:
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else str(getattr(item, "name", item))
        name = name[len(root) :] if root and name.startswith(root) else name
        digest.update(f"{name}\t{int(label) if isinstance(label, numbers.Integral) else label}\n".encode())
    return digest.hexdigest()[:16]


def _cache_key(archive: Path) -> str:
    """``<name>-<size>-<digest>``: a changed archive gets a fresh folder, an unchanged one reuses its own.

    Up to :data:`HASH_WHOLE_BYTES` the digest is the archive's content (sha256), so every copy of one archive (each
    clone of this repository holds the embedded one, with its own mtime) shares one extraction. A larger archive is
    not read through on every run: its digest covers its first and last :data:`HASH_ENDS_BYTES` and its mtime.
    """
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    st = archive.stat()
    h = hashlib.sha256()
    with archive.open("rb") as f:
        if st.st_size <= HASH_WHOLE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(HASH_ENDS_BYTES))
            f.seek(max(0, st.st_size - HASH_ENDS_BYTES))
            h.update(f.read())
            h.update(str(int(st.st_mtime)).encode())
    return f"{name}-{st.st_size}-{h.hexdigest()[:16]}"


def _cache_unwritable(folder: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the dataset cache {folder} ({_one_line(e)}); set XDG_CACHE_HOME to a writable folder"
    )


def _hold(dest: Path) -> None:
    """Mark the cache entry ``dest`` in use by this process (``python -m dap_pretrain cache --clean`` skips it);
    where no mark can be made (no file locks, another user's read-only cache) the entry is read unmarked."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if not dest.is_dir():
            raise _cache_unwritable(dest.parent, e) from None
    cache.hold(dest)


def _make_tmp_beside(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise _cache_unwritable(dest.parent, e) from None


def publish_folder(tmp: Path, dest: Path) -> None:
    """Moves the finished ``tmp`` to ``dest``; if another process published ``dest`` first, keeps theirs."""
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
        _logger.debug("%s was published by another process first; using it", dest)


def _cache_entry(dest: Path, build, what: str) -> Path:
    """The cache entry ``dest``, held in use by this process (:mod:`dap_pretrain.data.cache`) and built once:
    ``build(tmp)`` fills a hidden folder beside it, which is then published atomically (so an entry that exists is
    complete). A build that fails or is interrupted leaves neither its folder nor the entry's mark behind."""
    _hold(dest)  # before looking: a cleaner removes no entry a process holds
    if dest.is_dir():
        return dest
    tmp = _make_tmp_beside(dest)
    _logger.info("%s into %s (once; later runs reuse it)", what, dest)
    try:
        build(tmp)
    except BaseException:  # a DataError, Ctrl-C, SIGTERM's SystemExit
        shutil.rmtree(tmp, ignore_errors=True)
        cache.release_unbuilt(dest)
        raise
    publish_folder(tmp, dest)
    return dest


def _extract(archive: Path, tmp: Path) -> None:
    # the 'data' filter refuses absolute paths, links out of the tree and device files (Python >= 3.10.12)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, **safe)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"archive {archive} is corrupt or not a tar file ({_one_line(e)}); re-create it with "
            "`tar -czf NAME.tar.gz FOLDER` or pass --data-dir the extracted folder"
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot extract {archive} into {tmp.parent} ({_one_line(e)}); free disk space or set "
            "XDG_CACHE_HOME to a writable folder with room"
        ) from None


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
        cache_dir: where archives are extracted, each into ``<name>-<size>-<digest>/`` below it; defaults to
            ``$XDG_CACHE_HOME/dap-pretrain/datasets`` (``~/.cache/...``). An existing extraction is reused; this
            process holds it in use until it exits (:mod:`dap_pretrain.data.cache`).

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
        what = "is a symlink that leads nowhere (dangling, or a loop)" if path.is_symlink() else "does not exist"
        raise DataError(f"data folder {path} {what}; {_DATA_DIR_HINT}")
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{path} is a file but not a .tar/.tar.gz/.tgz archive; {_DATA_DIR_HINT}")
    dest = _cache_entry(cache.root(cache_dir) / _cache_key(path), lambda tmp: _extract(path, tmp), f"extracting {path}")
    return _single_top_folder(dest)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``, or copy it where links are not possible."""
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
                link_or_copy(f, dst_dir / f.name)


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
    dest = cache.root(cache_dir) / f"{_cache_key(EMBEDDED_ARCHIVE)}-split{EMBEDDED_TRAIN_PER_CLASS}"
    return _cache_entry(dest, lambda tmp: _build_split(source, tmp), "splitting the embedded CIFAR-10 sample")


SPLIT_SYNONYMS = (("train", "training"), ("val", "valid", "validation", "eval", "evaluation"), ("test",))


def split_folder(root: Path, split: str) -> Path:
    """The folder timm's ImageFolder search reads for ``split`` (``root`` itself when there is no split folder)."""
    name = split.split("[")[0]
    synonyms = SPLIT_SYNONYMS[:2]
    for candidate in (name, *next((s for s in synonyms if name in s), ())):
        if candidate and (root / candidate).exists():
            return root / candidate
    return root


def _check_class_depth(dataset: Any, folder: Path) -> None:
    """Refuses images that are not exactly one folder below ``folder``: timm labels an image by the name of the
    folder that holds it, so Tiny-ImageNet's ``train/<wnid>/images/*.JPEG`` made one class named ``images`` of
    every class (silently, with ``--val-split ''``), a ``cat/sub/`` folder a class ``sub``, and images lying in
    ``folder`` itself a class with an empty name. About 1 s per million files."""
    reader = getattr(dataset, "reader", None)
    given = str(getattr(reader, "root", folder))  # the samples' paths start with timm's root as given ('..' and all)
    top = os.path.normpath(given)
    for path, _ in getattr(reader, "samples", None) or []:
        holder = os.path.dirname(str(path))
        if os.path.dirname(holder) == given or os.path.normpath(os.path.dirname(holder)) == top:
            continue
        if os.path.normpath(holder) == top:
            raise DataError(
                f"{folder} holds images itself ({os.path.basename(str(path))}, ...), which timm would put in a class "
                f"with no name; move each class's images into a folder of their own: {folder}/<class>/"
            )
        rel = os.path.relpath(os.path.normpath(holder), top)
        raise DataError(
            f"images in {holder} would be labelled '{os.path.basename(holder)}' (timm names each class after the "
            f"folder that holds its images, not after {rel.split(os.sep)[0]}/); move them up into "
            f"{os.path.join(top, rel.split(os.sep)[0])}/ (Tiny-ImageNet's train/<class>/images/ too) so each class is "
            f"one folder of images under {folder}"
        )


def _check_first_image(dataset: Any, folder: Path) -> None:
    """Decodes sample 0 directly: timm's ImageDataset would skip an unreadable file with only a warning.

    Also warns when it is a 16-bit (or 32-bit integer) grayscale image: PIL's ``convert('RGB')``, which timm
    applies, clips such values at 255, so the image (and likely every other one in the folder) trains as white.
    """
    reader = getattr(dataset, "reader", None)
    if reader is None or len(dataset) == 0:
        return
    try:
        handle = reader[0][0]
        with handle, Image.open(handle) as img:
            img.convert(getattr(dataset, "input_img_mode", None) or "RGB")
            high_bit = img.mode in _HIGH_BIT_MODES and (img.getextrema()[1] or 0) > 255
            mode = img.mode
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"cannot decode {dataset.filename(0, absolute=True)} ({_one_line(e)}); the images under "
            f"{folder} are unreadable: remove or re-encode the broken files"
        ) from None
    if high_bit:
        _logger.warning(
            "%s is a 16-bit image (PIL mode %s): converting it to RGB clips every value above 255, so it trains "
            "as pure white; re-encode the images under %s as 8-bit (e.g. `mogrify -depth 8 *.png`)",
            dataset.filename(0, absolute=True),
            mode,
            folder,
        )


def dataset_classes(dataset: Any) -> dict[str, int] | None:
    """The class name -> index map of a timm ImageFolder or torchvision dataset; None where it has none.

    Pass the train split's map as ``create_dataset(..., class_to_idx=...)`` for the val split.
    """
    reader = getattr(dataset, "reader", None)
    classes = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
    return dict(classes) if classes else None


def _image_labels(folder: Path) -> set[str]:
    """The labels timm's folder reader gives the images below ``folder``: their parent folders' names."""
    extensions = set(timm.data.get_img_extensions(as_set=True))
    labels = set()
    for parent, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            labels.add(os.path.basename(parent))
    return labels


def _unreadable(path: object) -> str:
    return f"{path} cannot be read (permission denied); ask for read access, or copy the data"


def _unread_reason(folder: Path) -> str | None:
    """Why timm finds no images in ``folder`` when it is not simply empty: it cannot be read, or its files have
    extensions timm's reader does not take (WebP, TIFF, ...). Only called on the way to an error."""
    if not os.access(folder, os.R_OK | os.X_OK):
        return _unreadable(folder)
    read = set(timm.data.get_img_extensions(as_set=True))
    Image.init()
    images = set(Image.registered_extensions()) - read  # PIL's image formats that timm does not read; not .txt
    others: dict[str, int] = {}
    for _, _, files in os.walk(folder, followlinks=True):
        for f in files:
            ext = os.path.splitext(f)[1].lower()
            if ext in images and not f.startswith("."):
                others[ext] = others.get(ext, 0) + 1
    if not others:
        return None
    held = ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda kv: -kv[1])[:3])
    return (
        f"{folder} holds {held} files, but timm reads only {', '.join(sorted(read))}; convert them (to .jpg or "
        ".png) or remove them"
    )


def _check_class_folders(folder: Path, split: str, classes: dict[str, int], *, given: bool) -> None:
    """Refuses class folders that would shift labels; see :func:`create_dataset` for the rules.

    ``classes`` is the map the split is read with; ``given`` says it came from the caller (the train split's),
    so an empty folder cannot shift labels but a class outside the map would lose its images.

    Only ``<class>/`` folders missing from the map are walked (timm names classes after leaf folders, so a
    folder absent from it is either empty or nested), which keeps this to one ``listdir`` on a normal tree.
    """
    if not folder.is_dir():
        return
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in subdirs:
        if sub.name in classes:
            continue
        labels = _image_labels(sub)
        if not labels:
            reason = None if given else _unread_reason(sub)  # val: such a class goes unmeasured, warned below
            if reason:
                raise DataError(reason)
            if not given:
                raise DataError(
                    f"class folder {sub} has no images, so every later class would get a shifted label; "
                    "remove the folder or add images to it"
                )
            continue  # the map fixes the labels; reported below with the other classes that have no images
        foreign = sorted(labels - set(classes)) if given else []
        if foreign:
            raise DataError(
                f"{split} class folder {sub} holds images of classes the train split does not have "
                f"({', '.join(foreign[:5])}); the model cannot predict them: add them to train or remove them"
            )


def _warn_missing_classes(dataset: Any, folder: Path, split: str, class_to_idx: dict[str, int]) -> None:
    present = {t for _, t in getattr(getattr(dataset, "reader", None), "samples", [])}
    missing = [name for name, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]) if idx not in present]
    if missing:
        _logger.warning(
            "%d of the train split's %d classes have no images under %s (%s%s); labels stay aligned with train, "
            "but their %s accuracy is not measured: add images or remove those class folders",
            len(missing),
            len(class_to_idx),
            folder,
            ", ".join(missing[:5]),
            ", ..." if len(missing) > 5 else "",
            split,
        )


def check_batch_size(
    *,
    num_samples: int,
    batch_size: int,
    drop_last: bool,
    num_replicas: int = 1,
    smallest_subset: int | None = None,
    subset_fix: str = "raise --dap-keep",
) -> None:
    """Refuses a batch size that ``--drop-last`` would leave with nothing to train, before training starts.

    Called by the trainer once the train dataset and the sampler's plan are known.

    Args:
        num_samples: training samples in the dataset.
        batch_size: per process.
        drop_last: whether each epoch's last partial batch is dropped (nothing to check otherwise).
        num_replicas: processes sharing each epoch's samples.
        smallest_subset: the fewest samples any epoch trains (DaP's smallest subset, InfoBatch's worst case);
            default ``num_samples``.
        subset_fix: the error's advice for a subset too small (the policy's flag).

    Raises:
        DataError: some epoch would train no sample at all.
    """
    if not drop_last:
        return
    per_rank = num_samples // num_replicas
    if per_rank < batch_size:
        raise DataError(
            f"--batch-size {batch_size} is larger than the {per_rank} training samples per process, and "
            f"--drop-last drops every batch, so nothing would train; pass -b {max(per_rank, 1)} or less, "
            "or drop --drop-last"
        )
    if smallest_subset is not None and smallest_subset // num_replicas < batch_size:
        small = smallest_subset // num_replicas
        raise DataError(
            f"--batch-size {batch_size} is larger than the smallest epoch's subset ({small} samples per process), and "
            f"--drop-last drops every batch of it, so that epoch would train nothing; pass -b {max(small, 1)} or "
            f"less, drop --drop-last, or {subset_fix}"
        )


def dataset_prefix(name: str) -> str:
    """timm's reader prefix of a ``--dataset`` name, lower case ('torch', 'hfds', ...), or '' for none."""
    prefix, slash, _ = name.partition("/")
    return prefix.lower() if slash else ""


def create_dataset(
    *,
    name: str,
    root: str | os.PathLike,
    split: str,
    is_training: bool,
    cache_dir: str | os.PathLike | None = None,
    class_to_idx: dict[str, int] | None = None,
    **kwargs: Any,
) -> torch.utils.data.Dataset:
    """Builds a dataset with ``timm.data.create_dataset``, first resolving archives, and checks it is usable.

    Called by the trainer once per split before wrapping the result in :class:`IndexedDataset`: first the
    train split, then the val split with ``class_to_idx=dataset_classes(train)``.

    Class folders (ImageFolder trees). timm numbers the classes it finds images for, separately per split, so
    an empty ``<class>/`` folder silently shifts every later label (a perfect model scores top-1 0 when it is
    in val; an IndexError after a full epoch when it is in train). Hence:

    * train (no ``class_to_idx``): an empty class folder is a :class:`DataError` naming it. Training without a
      class the user laid out is never what they meant, and the fix (remove it or add images) is one command;
      fewer than two classes is refused too (one class gives every sample loss 0, so DaP ranks nothing).
    * val (with the train split's ``class_to_idx``): labels are the train split's, as timm's ``--class-map``
      gives both splits the same map, so an empty or missing val class cannot shift anything; it only leaves
      that class unmeasured, so it is a warning naming the classes, not a refusal of the whole run. A val class
      with images that the train split lacks is a :class:`DataError` (timm would silently drop those images).

    Dataset names (``name``), as timm reads them, with its prefix case-insensitive:

    * no prefix ('', 'imagefolder', 'imagenet', ...) or a prefix timm does not know: an ImageFolder tree or an
      archive of one, with the class checks below (timm reads every such name as a folder);
    * 'torch/NAME': a torchvision dataset (:data:`TORCH_DATASETS`); another name is a :class:`DataError`;
    * 'hfds/NAME': a Hugging Face dataset, random access (needs the ``datasets`` package, not installed by
      ``tools/install.sh``); ``root`` is its cache folder;
    * 'hfids/', 'tfds/', 'wds/': refused. timm reads them as streams (``IterableImageDataset``), with no sample
      index for DaP to keep or drop, so a :class:`DataError` says so before their packages are imported.

    Args:
        name: the dataset name, see above.
        root: the dataset folder or archive (for 'torch/...' names, torchvision's download folder).
        split: split folder to read below ``root`` ('train', 'val', ...); as in timm, ``root`` itself is read
            when there is no such folder.
        is_training: passed to timm (shuffling for iterable datasets); a training split needs >= 2 classes.
        cache_dir: extraction cache, see :func:`resolve_data_dir`.
        class_to_idx: class name -> label, normally the train split's (:func:`dataset_classes`); ImageFolder
            trees only. Default: numbered from this split's own folders, as timm does.
        **kwargs: passed to ``timm.data.create_dataset`` (``download``, ...).

    Returns:
        The timm / torchvision dataset, yielding ``(img, target)``.

    Raises:
        DataError: missing folder, corrupt archive, no images, an empty class folder, a val class the train
            split lacks, a one-class training split, an undecodable first image; a streaming or unknown torch/
            name, a missing package, or a dataset its library cannot load.
    """
    prefix = dataset_prefix(name)
    if prefix in STREAMING_PREFIXES:
        raise DataError(
            f"--dataset {name}: timm reads {prefix}/ datasets as a stream, which has no sample index for DaP to keep "
            "or drop; use an ImageFolder tree (or a .tar of one), or a hfds/ or torch/ dataset"
        )
    if prefix not in ("torch", "hfds"):  # timm reads every other name as a folder (or a .tar)
        root = resolve_data_dir(root, cache_dir=cache_dir)
        if not os.access(root, os.R_OK | os.X_OK):
            raise DataError(_unreadable(root))
        folder = split_folder(root, split)
        where = str(folder) if folder != root else f"{root} (it has no {split}/ folder)"
        splits = sorted(n for group in SPLIT_SYNONYMS for n in group if (root / n).is_dir()) if folder == root else []
        if is_training and splits:  # a misspelt --train-split: timm would train on every split, val's included
            likely = next((n for n in SPLIT_SYNONYMS[0] if n in splits), splits[0])
            raise DataError(
                f"{root} has no {split}/ folder but has {', '.join(n + '/' for n in splits)}: training would read "
                f"every split's images, the evaluation's included; pass --train-split {likely} (or the right one)"
            )
        if class_to_idx is not None and folder == root and not is_training:
            _logger.warning(
                "%s has no %s/ folder, so evaluation reads every image under it, the training images included (as "
                "timm does); make a %s/ folder, or pass --val-split '' to skip evaluation",
                root, split, split,
            )  # fmt: skip
        if class_to_idx is not None:
            _check_class_folders(folder, split, class_to_idx, given=True)  # before timm, which drops unmapped images
            kwargs["class_map"] = dict(class_to_idx)
        try:
            dataset = timm.data.create_dataset("", root=str(root), split=split, is_training=is_training, **kwargs)
        except RuntimeError:  # timm's folder reader: "Found 0 images in subfolders of ..."
            reason = _unread_reason(folder)
            raise DataError(
                reason or f"no images found under {where}; expected <class>/<image> folders there"
            ) from None
        except PermissionError as e:  # a folder below it that this user may not list
            raise DataError(_unreadable(e.filename)) from None
        if is_training:  # evaluation reads with the train split's map: images of other folders are not read
            _check_class_depth(dataset, folder)
        _check_first_image(dataset, folder)
        if class_to_idx is None:
            _check_class_folders(folder, split, dataset_classes(dataset) or {}, given=False)
        else:
            _warn_missing_classes(dataset, folder, split, class_to_idx)
        classes = dataset_classes(dataset) or {}
        if is_training and len(classes) < 2:
            raise DataError(
                f"the {split} split under {where} has {len(classes)} class ({', '.join(classes)}); a classifier "
                "needs >= 2 (with one, every loss is 0 and DaP has nothing to rank): add <class>/ folders"
            )
    elif prefix == "torch":
        torch_name = name.split("/", 2)[-1].lower()  # timm's reading: torch/foo and torch/x/foo are both foo
        if torch_name not in TORCH_DATASETS:
            raise DataError(
                f"--dataset {name}: timm knows no torchvision dataset {torch_name}; use one of "
                + ", ".join(f"torch/{n}" for n in TORCH_DATASETS)
            )
        fetch = "point --data-dir at the folder that holds it"
        if kwargs.get("download"):
            fetch = "the download failed: check this machine's network access, or fetch it elsewhere and " + fetch
        elif torch_name not in TORCH_NO_DOWNLOAD:
            fetch = "pass --dataset-download to fetch it there, or " + fetch
        try:
            dataset = timm.data.create_dataset(
                name, root=str(Path(root).expanduser()), split=split, is_training=is_training, **kwargs
            )
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted. You can use ..."
            raise DataError(f"cannot load {name} from {root} ({_one_line(e)}); {fetch}") from None
    else:  # hfds/: load_dataset's errors (no such dataset, split or key) are the user's input
        spec = importlib.util.find_spec("datasets")
        if spec is None or spec.origin is None:  # absent, or a datasets/ folder here; before timm prints its line
            raise DataError(
                f"--dataset {name} needs Hugging Face's datasets package, which this environment lacks; "
                f"{sys.executable} -m pip install datasets"
            )
        try:
            dataset = timm.data.create_dataset(name, root=root, split=split, is_training=is_training, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise DataError(
                f"cannot load {name} split {split} into {root} ({type(e).__name__}: {_one_line(e)}); check the "
                "name, and --train-split/--val-split against its splits"
            ) from None
    if len(dataset) == 0:
        raise DataError(
            f"dataset {name or 'imagefolder'} at {root} split {split} is empty; "
            "point --data-dir at a folder with images"
        )
    return dataset
