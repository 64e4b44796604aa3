"""Helpers shared by the benchmarks (``cifar_ablation.py``, ``wallclock.py``, ``gpu_check.py``).

* data: find the shared CIFAR-10 tarballs and build, once, a cache folder holding ``train/`` and ``test/``
  (optionally the first k images per class by sorted file name), or a 224 px ImageFolder from
  ``imagenet_sample``; never writes under the shared data folder.
* schedule: the paper's CIFAR schedule (300 epochs, W=40, I=10, p=0.9, R=150, LR /10 at 150 and 225) compressed
  to E' epochs by one stated rule.
* runs: launch ``python -m dap_pretrain.train`` as a subprocess; a folder that already holds ``run.json`` is not
  re-run, so a killed sweep continues where it stopped.
* :func:`bare_loop`: a plain PyTorch training loop over the project's own dataset and loader
  (``create_dataset`` -> ``IndexedDataset`` -> ``create_loader``), so trainer-vs-bare differs only in the trainer.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks run as scripts import the package from this checkout
    sys.path.insert(0, str(REPO))
CIFAR_CANDIDATES = (REPO.parent / "shared/data/cifar10", REPO / "shared/data/cifar10")
IMAGENET_CANDIDATES = (REPO.parent / "shared/data/imagenet_sample", REPO / "shared/data/imagenet_sample")
CIFAR_TARBALLS = {"train": "cifar10_train_jpg.tar.gz", "test": "cifar10_test_jpg.tar.gz"}
DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dap-pretrain" / "benchmarks"


from dap_pretrain.data.dataset import link_or_copy as _link  # noqa: E402  (the package's own folder helpers)
from dap_pretrain.data.dataset import publish_folder as _publish  # noqa: E402


def _paper_cifar() -> dict:
    """The paper's CIFAR setting (Section 4.1, Table 2's baseline), read from configs/pretrain like every preset."""
    from dap_pretrain.config import paper_setting

    s = paper_setting("cifar10")
    return dict(epochs=s["epochs"], warmup=s["dap_warmup"], interval=s["dap_interval"], keep=s["dap_keep"],
                reuse=s["dap_reuse"][0], milestones=tuple(s["decay_milestones"]))


PAPER_CIFAR = _paper_cifar()  # epochs=300, warmup=40, interval=10, keep=0.9, reuse=150, milestones=(150, 225)


class BenchmarkError(RuntimeError):
    """A benchmark cannot go on; main() prints the one-line message and exits 2."""


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def find_dir(explicit: str | None, candidates, must_hold: tuple[str, ...] = ()) -> Path:
    """The first existing folder among ``explicit`` (if given, only it) or ``candidates`` that holds ``must_hold``."""
    options = [Path(explicit).expanduser()] if explicit else [Path(c) for c in candidates]
    for folder in options:
        if folder.is_dir() and all((folder / name).exists() for name in must_hold):
            return folder.resolve()
    wanted = f" holding {', '.join(must_hold)}" if must_hold else ""
    raise BenchmarkError(f"no data folder{wanted} at {' or '.join(str(o) for o in options)}; pass --data DIR")


def _link_split(source: Path, out: Path, per_class: int | None) -> int:
    count = 0
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (out / class_dir.name).mkdir(parents=True)
        for f in sorted(p for p in class_dir.iterdir() if p.is_file())[:per_class]:
            _link(f, out / class_dir.name / f.name)
            count += 1
    return count


def _first_k_from_archive(archive: Path, out: Path, per_class: int, *, split: str) -> bool:
    """Writes to ``out/<class>/`` the first ``per_class`` files of each class folder, by sorted file name, read from
    ``archive`` itself, so that a few images per class cost no full extraction (CIFAR-10's 60,000 files took 30 s
    on cpu-2). The class folders are the archive's deepest folders, all at one depth below at most one top folder,
    as :func:`_link_split` reads the tree extracted for ``split``; a name given twice counts once, with its later
    member's bytes, as extraction overwrites. Returns False for any other layout (a link, a hidden name, a folder
    inside a class, a class named ``split``), a name that leaves the folder, or an archive it cannot read; then
    nothing is written before the check, ``out`` is the caller's to remove, and the caller extracts instead (whose
    error names a corrupt archive)."""
    import tarfile
    import zlib
    from pathlib import PurePosixPath

    try:
        with tarfile.open(archive) as tar:
            members = [(PurePosixPath(m.name), m) for m in tar.getmembers()]
            if any(not (m.isfile() or m.isdir()) for _, m in members):  # links or devices: extract instead
                return False
            if any(m.name.startswith("/") or any(p.startswith(".") for p in path.parts) for path, m in members):
                return False  # a name that leaves the folder ('..', absolute), or a hidden one
            files = {path: m for path, m in members if m.isfile()}  # a later member replaces an earlier
            dirs = {path for path, m in members if m.isdir()}
            if files.keys() & dirs:
                return False
            by_class: dict[PurePosixPath, list] = {}
            for path, m in files.items():
                if len(path.parts) not in (2, 3):
                    return False
                by_class.setdefault(path.parent, []).append((path.name, m))
            tops = {c.parent for c in by_class}
            if len(tops) != 1:
                return False
            top = tops.pop()
            for d in dirs:
                if d.parent == top:
                    by_class.setdefault(d, [])  # a class folder without files is a class all the same
                elif d != top and d not in top.parents:  # only the top folder and its ancestors besides classes
                    return False
            if any(c.name == split for c in by_class):  # the extracted tree would be read from that folder
                return False
            for cls in by_class:
                (out / cls.name).mkdir(parents=True, exist_ok=True)
            chosen = [m for entries in by_class.values() for _, m in sorted(entries, key=lambda f: f[0])[:per_class]]
            for m in sorted(chosen, key=lambda m: m.offset_data):  # in archive order: one pass over the stream
                *_, cls, name = PurePosixPath(m.name).parts
                (out / cls / name).write_bytes(tar.extractfile(m).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return False
    return True


def cifar_folder(data: Path, work_dir: Path, *, train_per_class: int | None = None,
                 test_per_class: int | None = None) -> Path:
    """Returns ``work_dir/cifar10-<tag>/`` holding ``train/<class>/`` and ``test/<class>/``, building it once.

    A split with ``*_per_class`` set holds the first that many images of each class by sorted file name, read
    from its tarball alone (:func:`_first_k_from_archive`); a split with all images (None) holds hard links into
    the tarball extracted once (``dap_pretrain.data.dataset.resolve_data_dir`` into ``work_dir/extracted``). Built
    in a temporary folder and published with ``os.replace``.
    """
    from dap_pretrain.data.dataset import resolve_data_dir

    tag = f"train{train_per_class or 'all'}-test{test_per_class or 'all'}"
    dest = work_dir / f"cifar10-{tag}"
    if dest.is_dir():
        return dest
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=work_dir))
    try:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            archive = data / CIFAR_TARBALLS[split]
            if per_class and archive.is_file() and _first_k_from_archive(archive, tmp / split, per_class, split=split):
                continue
            shutil.rmtree(tmp / split, ignore_errors=True)
            root = resolve_data_dir(archive, cache_dir=work_dir / "extracted")
            source = root / split if (root / split).is_dir() else root
            _link_split(source, tmp / split, per_class)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, dest)
    return dest


def imagenet_folder(data: Path, work_dir: Path, *, copies: int = 1, size: int = 224,
                    max_classes: int | None = None) -> Path:
    """Returns ``work_dir/imagenet<size>x<copies>/train/<wnid>/``: each image center-cropped to ``size`` px.

    The crops are re-encoded once (JPEG quality 90) so workers decode a 224 px image, not a 256 px one; ``copies``
    hard links of each make an epoch long enough to time (1,000 classes, ``1000 * copies`` images);
    ``max_classes`` keeps the first classes by name (toy runs).
    """
    from PIL import Image

    dest = work_dir / (f"imagenet{size}x{copies}" + (f"-{max_classes}cls" if max_classes else ""))
    if dest.is_dir():
        return dest
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=work_dir))
    try:
        for class_dir in sorted(p for p in data.iterdir() if p.is_dir())[:max_classes]:
            out = tmp / "train" / class_dir.name
            out.mkdir(parents=True)
            for f in sorted(class_dir.iterdir()):
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    w, h = im.size
                    s = min(w, h)
                    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size))
                    first = out / f"{f.stem}_0.jpg"
                    im.save(first, quality=90)
                for k in range(1, copies):
                    _link(first, out / f"{f.stem}_{k}.jpg")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, dest)
    return dest


def compressed_schedule(epochs: int) -> dict:
    """The paper's CIFAR schedule scaled to ``epochs``: every epoch count times E'/300, rounded half up.

    W and I are at least 1; milestones are kept distinct and inside the run. At E'=30 every count but the
    second milestone (22.5 -> 23) scales exactly, so the drop/reuse pattern is the paper's.
    """
    s = epochs / PAPER_CIFAR["epochs"]
    milestones = sorted({min(epochs - 1, max(1, _half_up(m * s))) for m in PAPER_CIFAR["milestones"]})
    return dict(epochs=epochs, warmup=max(1, _half_up(PAPER_CIFAR["warmup"] * s)),
                interval=max(1, _half_up(PAPER_CIFAR["interval"] * s)), keep=PAPER_CIFAR["keep"],
                reuse=min(epochs - 1, max(1, _half_up(PAPER_CIFAR["reuse"] * s))), milestones=milestones)


def schedule_flags(sched: dict) -> list[str]:
    """Trainer flags for :func:`compressed_schedule`'s output (step LR /10 at the milestones, DaP reuse at R)."""
    return ["--epochs", str(sched["epochs"]), "--sched", "step", "--decay-milestones",
            *map(str, sched["milestones"]), "--decay-rate", "0.1", "--dap-warmup", str(sched["warmup"]),
            "--dap-interval", str(sched["interval"]), "--dap-keep", str(sched["keep"]),
            "--dap-reuse", str(sched["reuse"])]


def child_env(threads: int | None) -> dict:
    """Environment for a child Python: the repo on PYTHONPATH, unbuffered output, ``threads`` torch threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    return env


def run_trainer(output: Path, flags: list[str], *, threads: int | None = None, rerun: bool = False,
                echo: bool = True, timeout: float | None = None, entry: list[str] | None = None) -> dict:
    """Runs one training into ``output`` and returns its ``run.json``; an existing ``run.json`` is reused.

    The flags are stamped into ``output/flags.json``; a finished run is reused only when its stamp matches
    ``flags`` (or it has none: runs from before the stamp), else it is run again, so a cache folder never hands
    back a run of another schedule. A folder without ``run.json`` (a run killed part-way) is started over with
    ``--overwrite``. The trainer's output goes to ``output/trainer.log``. After ``timeout`` seconds the trainer is
    killed (BenchmarkError). ``entry``: what follows the interpreter instead of ``-m dap_pretrain.train`` (a script
    that wraps the trainer; it is part of the stamp).
    """
    stamped = list(flags) if entry is None else [*entry, *flags]
    entry = entry or ["-m", "dap_pretrain.train"]
    done, stamp = output / "run.json", output / "flags.json"
    if done.is_file() and not rerun:
        if not stamp.is_file() or json.loads(stamp.read_text()) == stamped:
            return json.loads(done.read_text())
        print(f"  {output}: finished with other flags, running again", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    stamp.write_text(json.dumps(stamped))
    cmd = [sys.executable, *entry, *flags, "--output", str(output), "--overwrite", "--no-plot"]
    if echo:
        print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    with (output / "trainer.log").open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(threads),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"trainer killed after its {timeout:.0f} s budget: {output}") from None
    if rc or not done.is_file():
        tail = (output / "trainer.log").read_text().strip().splitlines()[-3:]
        raise BenchmarkError(f"trainer exited {rc} for {output}: {' | '.join(tail)}")
    summary = json.loads(done.read_text())
    if echo:
        top1 = "n/a" if summary["top1"] is None else f"{summary['top1']:.2f}"
        print(f"  top-1 {top1}, compute {summary['compute_fraction_measured']:.4f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def read_summary_csv(output: Path) -> list[dict]:
    """The trainer's per-epoch ``summary.csv`` as a list of dicts (numbers as floats where they parse)."""
    import csv

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    with (output / "summary.csv").open() as f:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def machine_info() -> dict:
    """CPU model, cores, GPU, torch/timm versions, UTC date and git commit: the provenance of every figure."""
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if os.environ.get("DAP_GIT_COMMIT"):  # a GPU job's copy of the tree: its .git, if any, is not the checkout's
        git = os.environ["DAP_GIT_COMMIT"]
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout
        git = (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.strip() else "")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "git": git}


def sgd_step(net, opt, scaler, images, targets, *, dev, dtype):
    """One plain mixed-precision training step (returns the loss): the bare loop's and the model-only timing's."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(net(images).float(), targets)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss


def bare_loop(*, model: str, data_root: Path, split: str, img_size: int, batch_size: int, epochs: int,
              workers: int, device: str = "cpu", amp: bool = False, amp_dtype: str = "float16",
              channels_last: bool = False, lr: float = 0.1, seed: int = 0, threads: int | None = None) -> list[dict]:
    """Trains ``model`` with a plain PyTorch loop; returns per-epoch ``{"samples", "seconds", "img_per_s"}``.

    Same dataset, transform and loader as the trainer (``create_dataset``, ``IndexedDataset``, ``trainer_transform``
    (CIFAR augmentation up to 64 px, else timm's), ``create_loader``), SGD with momentum and mean cross-entropy; no
    per-sample loss recording, LR schedule, sampler bookkeeping, evaluation or checkpoints. An epoch is timed like
    the trainer's (from creating the iterator to the loss of the last step on the host).
    """
    import timm
    import torch

    import dap_pretrain.models  # noqa: F401  (registers cifar_*)
    from dap_pretrain.data.dataset import IndexedDataset, create_dataset
    from dap_pretrain.data.loader import create_loader, trainer_transform
    from dap_pretrain.distributed import cuda_speed_flags

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    cuda_speed_flags(dev)  # as the trainer it is compared with
    dataset = IndexedDataset(create_dataset(name="", root=Path(data_root), split=split, is_training=True))
    dataset.transform = trainer_transform(img_size=img_size, aug="auto", is_training=True)
    num_classes = len(dataset.dataset.reader.class_to_idx)
    net = timm.create_model(model, num_classes=num_classes).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    cfg = net.pretrained_cfg
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = create_loader(dataset, batch_size=batch_size, sampler=sampler, mean=tuple(cfg["mean"]),
                           std=tuple(cfg["std"]), device=dev, num_workers=workers, channels_last=channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    dtype = None
    if amp:
        dtype = torch.bfloat16 if dev.type == "cpu" or amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    out = []
    for _ in range(epochs):
        net.train()
        n, t0 = 0, time.perf_counter()
        for images, targets, _idx in loader:
            loss = sgd_step(net, opt, scaler, images, targets, dev=dev, dtype=dtype)
            n += targets.numel()
        float(loss.detach())  # wait for the device, as the trainer's epoch does
        seconds = time.perf_counter() - t0
        out.append({"samples": n, "seconds": seconds, "img_per_s": n / seconds})
    return out


def bare_loop_subprocess(*, timeout: float | None = None, **kwargs) -> list[dict]:
    """:func:`bare_loop` in a fresh Python process, like the trainer's, so process state cannot favour either."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from common import bare_loop; "
            "print('BARE ' + json.dumps(bare_loop(**json.loads(sys.argv[2]))))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), json.dumps(kwargs)],
                             capture_output=True, text=True, cwd=REPO, env=child_env(kwargs.get("threads")),
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"bare loop killed after its {timeout:.0f} s budget") from None
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BARE ")]
    if out.returncode or not lines:
        raise BenchmarkError(f"bare loop failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1][5:])


def steady_img_per_s(epochs: list[dict], key: str = "img_per_s") -> float:
    """Median images/s over all epochs but the first (worker start-up and allocator warm-up)."""
    values = [float(e[key]) for e in epochs]
    return statistics.median(values[1:] if len(values) > 1 else values)


def after_first_batch(row: dict) -> float | None:
    """A summary.csv row's images/s once its first batch arrived: the training loop's seconds less
    ``first_batch_s`` (the epoch's fixed start; ``None`` where the row has none)."""
    if row.get("first_batch_s") in (None, ""):
        return None
    seconds = row["samples_trained"] / row["img_per_s"] - row["first_batch_s"]
    return row["samples_trained"] / seconds


def trainer_vs_bare(*, model: str, data_root: Path, img_size: int, batch_size: int, epochs: int, workers: int,
                    out_dir: Path, device: str = "cpu", amp: bool = False, channels_last: bool = False,
                    threads: int | None = None, timeout: float | None = None) -> dict:
    """images/s of the trainer (``--dap-select none`` and DaP) and of :func:`bare_loop`, same model/data/loader.

    Each runs ``epochs`` epochs of ``data_root/train`` with no evaluation; the figure is the median over epochs 2..E
    of the trainer's per-epoch ``img_per_s`` (summary.csv: samples / training seconds of that epoch) and of the
    bare loop's, timed the same way. DaP here: W=1, I=1, p=0.9, no reuse, cosine LR (drops from epoch 3).
    """
    common = ["--model", model, "--data-dir", str(data_root), "--train-split", "train", "--val-split", "",
              "--img-size", str(img_size), "-b", str(batch_size), "--epochs", str(epochs), "--sched", "cosine",
              "--lr", "0.1", "-j", str(workers), "--device", device, "--seed", "0",
              "--in-memory", "off"]  # JPEG decoding in workers, as the bare loop does
    common += ["--amp", "--amp-dtype", "float16"] if amp else []
    common += ["--channels-last"] if channels_last else []
    out = {}
    variants = {"trainer_none": ["--dap-select", "none"],
                "trainer_dap": ["--dap-select", "hard", "--dap-warmup", "1", "--dap-interval", "1", "--dap-keep", "0.9",
                                "--dap-reuse"]}
    for name, flags in variants.items():
        run_trainer(out_dir / name, common + flags, threads=threads, rerun=True, timeout=timeout)
        rows = read_summary_csv(out_dir / name)
        out[name] = {"img_per_s": steady_img_per_s(rows), "per_epoch": [r["img_per_s"] for r in rows],
                     "samples": [r["samples_trained"] for r in rows]}
    bare = bare_loop_subprocess(model=model, data_root=str(data_root), split="train", img_size=img_size,
                                batch_size=batch_size, epochs=epochs, workers=workers, device=device, amp=amp,
                                channels_last=channels_last, threads=threads, timeout=timeout)
    out["bare_loop"] = {"img_per_s": steady_img_per_s(bare), "per_epoch": [e["img_per_s"] for e in bare],
                        "samples": [e["samples"] for e in bare]}
    out["trainer_none_vs_bare"] = out["trainer_none"]["img_per_s"] / out["bare_loop"]["img_per_s"]
    return out
