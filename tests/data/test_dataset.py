"""Dataset plumbing on real CIFAR-10 JPEGs from ../shared/data: archives, the embedded split, indices, bad input."""

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm.data
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import ToTensor

from dap_pretrain.data.dataset import DataError, IndexedDataset, create_dataset, embedded_data_dir, resolve_data_dir

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CIFAR_TEST_TGZ = SHARED / "cifar10" / "cifar10_test_jpg.tar.gz"

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory) -> Path:
    return embedded_data_dir(cache_dir=tmp_path_factory.mktemp("cache"))


def test_archive_is_extracted_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    inputs_before = _listing(CIFAR_TEST_TGZ.parent)
    root = resolve_data_dir(CIFAR_TEST_TGZ, cache_dir=tmp_path)
    assert root.name == "test" and root.parent.parent == tmp_path  # the archive's single top-level folder
    assert sorted(p.name for p in root.iterdir()) == CLASSES
    assert len(list(root.glob("*/*.jpg"))) == 10_000
    entry = root.parent
    # no temporary folder left behind; beside the entry, the file that marks it in use and the cache's marker
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, f".{entry.name}.use", "CACHEDIR.TAG"])
    assert _listing(CIFAR_TEST_TGZ.parent) == inputs_before  # nothing written next to the (read-only) input

    def no_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted again")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    assert resolve_data_dir(CIFAR_TEST_TGZ, cache_dir=tmp_path) == root
    # an archive goes straight into create_dataset; with no train/ folder timm's fallback reads the root
    dataset = create_dataset(
        name="imagefolder", root=CIFAR_TEST_TGZ, split="train", is_training=True, cache_dir=tmp_path
    )
    assert len(dataset) == 10_000


def test_copies_of_one_archive_share_an_extraction_and_a_changed_one_does_not(tmp_path, monkeypatch):
    """The cache is keyed by the archive's content, not its mtime: each clone of the repository holds its own copy
    of the embedded archive, and every one of them extracting 40 MB anew filled ~/.cache (2.3 GB seen)."""
    from dap_pretrain.data import dataset as ds_module
    from dap_pretrain.data.dataset import EMBEDDED_ARCHIVE, _cache_key

    a, b = tmp_path / "a" / EMBEDDED_ARCHIVE.name, tmp_path / "b" / EMBEDDED_ARCHIVE.name
    for copy, mtime in ((a, 1_000_000), (b, 2_000_000)):  # two clones, made at different times
        copy.parent.mkdir()
        copy.write_bytes(EMBEDDED_ARCHIVE.read_bytes())
        os.utime(copy, (mtime, mtime))
    assert _cache_key(a) == _cache_key(b) == _cache_key(EMBEDDED_ARCHIVE)
    changed = bytearray(a.read_bytes())
    changed[len(changed) // 2] ^= 1  # one bit in the middle, same size
    b.write_bytes(bytes(changed))
    assert _cache_key(b) != _cache_key(a)
    monkeypatch.setattr(ds_module, "HASH_WHOLE_BYTES", 4096)  # a large archive: its ends and its mtime, not all of it
    monkeypatch.setattr(ds_module, "HASH_ENDS_BYTES", 1024)
    os.utime(b, (1_000_000, 1_000_000))
    assert _cache_key(b) == _cache_key(a)  # the same ends and mtime: not read through
    os.utime(b, (2_000_000, 2_000_000))
    assert _cache_key(b) != _cache_key(a)


def test_folder_is_returned_as_is(tmp_path):
    assert resolve_data_dir(tmp_path) == tmp_path


def test_embedded_split_is_800_200_per_class_by_file_name(embedded_root):
    train = create_dataset(name="", root=embedded_root, split="train", is_training=True)
    val = create_dataset(name="", root=embedded_root, split="validation", is_training=False)  # timm synonym
    assert (len(train), len(val)) == (8_000, 2_000)
    assert sorted(train.reader.class_to_idx) == CLASSES and sorted(val.reader.class_to_idx) == CLASSES
    names = [f"{i:04d}.jpg" for i in range(1000)]  # CIFAR-10 test JPEGs per class, as packed in the archive
    for cls in CLASSES:
        assert sorted(p.name for p in (embedded_root / "train" / cls).iterdir()) == names[:800]
        assert sorted(p.name for p in (embedded_root / "val" / cls).iterdir()) == names[800:]


def test_embedded_split_is_deterministic_and_survives_concurrent_builders(embedded_root, tmp_path):
    assert embedded_data_dir(cache_dir=embedded_root.parent) == embedded_root  # idempotent
    with ThreadPoolExecutor(3) as pool:  # three "ranks" building one fresh cache at once
        roots = list(pool.map(lambda _: embedded_data_dir(cache_dir=tmp_path), range(3)))
    assert len(set(roots)) == 1
    assert _listing(roots[0]) == _listing(embedded_root)
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".use")]
    assert not hidden  # losers cleaned up their temp folders


def test_indexed_dataset_carries_the_index_through_a_shuffling_loader():
    n = 37
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)  # each image encodes its own index
    labels = (torch.arange(n) * 7) % 10
    dataset = IndexedDataset(TensorDataset(images, labels))
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for x, y, index in loader:
        assert torch.equal(x.view(-1).long(), index) and torch.equal(y, labels[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(n))


def test_indexed_dataset_on_a_real_folder_through_timm_loader(embedded_root):
    base = create_dataset(name="", root=embedded_root, split="val", is_training=False)
    dataset = IndexedDataset(base)
    assert len(dataset) == 2_000 and dataset.transform is None
    assert dataset.targets == [t for _, t in base.reader.samples]
    img, target, index = dataset[1234]
    assert index == 1234 and target == dataset.targets[1234] == base[1234][1]

    dataset.transform = ToTensor()
    assert base.transform is dataset.transform  # timm's create_loader sets dataset.transform
    assert dataset[0][0].shape == (3, 32, 32)
    loader = timm.data.create_loader(
        dataset, input_size=(3, 32, 32), batch_size=64, is_training=False, use_prefetcher=False, num_workers=0
    )
    x, y, index = next(iter(loader))
    assert x.shape == (64, 3, 32, 32)
    assert y.tolist() == [dataset.targets[i] for i in index.tolist()]


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=tmp_path / "nope", split="train", is_training=True)
    message = _one_line_error(excinfo)
    assert "does not exist" in message and "--data-dir" in message


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=tmp_path, split="train", is_training=True)
    assert f"no images found under {tmp_path / 'train'}" in _one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=tmp_path, split="val", is_training=False)
    assert "has no val/ folder" in _one_line_error(excinfo)


def test_unreadable_images_are_a_data_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=tmp_path, split="train", is_training=True)
    assert "cannot decode" in _one_line_error(excinfo)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_archive_is_a_data_error_and_leaves_no_partial_cache(tmp_path, content):
    archive = tmp_path / "data.tar.gz"
    data = CIFAR_TEST_TGZ.read_bytes()
    archive.write_bytes(b"\x1f\x8b garbage" * 100 if content == "garbage" else data[: len(data) // 3])
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir(archive, cache_dir=cache)
    assert "corrupt" in _one_line_error(excinfo)
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # the cache's marker only


def test_other_files_and_torch_datasets_give_data_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir(tmp_path / "notes.txt")
    assert "not a .tar" in _one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="torch/cifar10", root=tmp_path, split="train", is_training=True, download=False)
    assert "--dataset-download" in _one_line_error(excinfo)
