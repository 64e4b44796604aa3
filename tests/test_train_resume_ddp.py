"""Real training subprocesses: SIGKILL + resume equals an uninterrupted run; 2-process DDP equals 1 process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--model",
    "cifar_resnet20",
    "--workers",
    "1",
    "--lr",
    "0.05",
    "--epochs",
    "5",
    "--decay-milestones",
    "4",
    "--dap-warmup",
    "1",
    "--dap-interval",
    "1",
    "--dap-keep",
    "0.6",
    "--dap-active",
    "2",
    "--no-plot",
]


def _digests(out: Path) -> list[tuple]:
    with (out / "summary.csv").open() as f:
        return [(r["epoch"], r["subset_size"], r["samples_trained"], r["subset_digest"]) for r in csv.DictReader(f)]


def _two_processes(*args, port: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """``tools/pretrain.sh ARGS`` as 2 DDP processes (gloo, one thread each) on master ``port``, output as text."""
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "tools/pretrain.sh", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _train_cmd(*args):
    return [sys.executable, "-m", "dap_pretrain.train", *args]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, cifar_tiny):
    # with Mixup/CutMix per image: their draws too must continue as the uninterrupted run's did
    mixing = ["--mixup", "0.4", "--cutmix", "1.0", "--mixup-mode", "elem"]
    common = [*ARGS, "-b", "64", "--data-dir", str(cifar_tiny), *mixing]
    full = tmp_path / "full"
    subprocess.run(_train_cmd(*common, "--output", str(full)), check=True, capture_output=True, cwd=REPO, timeout=600)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _train_cmd(*common, "--output", str(cut)), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (cut / "last.pth.tar").exists() and torch.load(cut / "last.pth.tar", weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(cut / "last.pth.tar", weights_only=True)["epoch"]
    assert 2 <= done < 5 and not (cut / "run.json").exists()

    subprocess.run(
        _train_cmd(*common, "--output", str(cut), "--resume", str(cut / "last.pth.tar")),
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=600,
    )
    assert _digests(cut) == _digests(full)
    assert all("mixing batches: Mixup alpha 0.4 or CutMix" in (d / "log.txt").read_text() for d in (full, cut))
    a, b = (json.loads((d / "run.json").read_text()) for d in (full, cut))
    for key in ("samples_trained", "compute_fraction_measured", "compute_fraction_planned", "top1", "top5"):
        assert a[key] == b[key], key
    wa = torch.load(full / "last.pth.tar", weights_only=True)["state_dict"]
    wb = torch.load(cut / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_process_ddp_matches_single_process(tmp_path, cifar_tiny, free_port):
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for select in ("random", "hard"):
        ddp, single = tmp_path / f"ddp_{select}", tmp_path / f"single_{select}"
        common = [*ARGS, "--data-dir", str(cifar_tiny), "--dap-select", select, "--epochs", "4"]
        subprocess.run(
            ["bash", "tools/pretrain.sh", *common, "-b", "32", "--output", str(ddp)],
            check=True,
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(
            _train_cmd(*common, "-b", "64", "--output", str(single)),
            check=True,
            cwd=REPO,
            capture_output=True,
            timeout=600,
        )
        d, s = _digests(ddp), _digests(single)
        assert [r[:3] for r in d] == [r[:3] for r in s]  # subset sizes and samples trained per epoch
        with (ddp / "summary.csv").open() as f:  # img/s is the job's (both ranks'), not rank 0's half
            rows = list(csv.DictReader(f))
        assert all(float(r["img_per_s"]) * float(r["epoch_time_s"]) >= int(r["samples_trained"]) for r in rows), rows
        if select == "random":  # subsets do not depend on losses: identical sequence
            assert d == s
        a, b = (json.loads((x / "run.json").read_text()) for x in (ddp, single))
        assert (
            a["samples_trained"] == b["samples_trained"]
            and a["compute_fraction_measured"] == b["compute_fraction_measured"]
        )
        assert a["compute_fraction_measured"] < 1.0 and (a["processes"], b["processes"]) == (2, 1)
        # timm's default --dist-bn reduce: the evaluation the 2 ranks share is the saved checkpoint's (the other
        # modes: test_ddp_ranks_evaluate_the_model_rank0_saves)
        assert _eval_gap(ddp, cifar_tiny) < 1e-5


def test_ddp_refusal_on_rank0_stops_every_rank_in_one_line(tmp_path, cifar_tiny, free_port):
    """tools/pretrain.sh checks every input in one process before torchrun starts: one line, exit 2 (before, one
    line per rank, torchrun's ChildFailedError report and exit 1). Under torchrun started directly, rank 0 refuses
    an output folder holding another run and rank 1 stops with the same refusal (it used to wait at the next barrier
    until the process-group timeout), which is printed once per node, not once per process."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "run.json").write_text("{}")
    proc = _two_processes(*ARGS, "--data-dir", str(cifar_tiny), "--output", str(held), port=free_port(), timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: output folder") and (held / "run.json").read_text() == "{}"
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "dap_pretrain.train", *ARGS, "--data-dir", str(cifar_tiny), "--output", str(held)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 120
    refusals = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: output folder")]
    assert len(refusals) == 1, proc.stderr  # once per node (it was once per process)
    assert "dap_pretrain/" not in proc.stderr  # no traceback of ours (torchrun adds its own failure report)
    assert (held / "run.json").read_text() == "{}"


def test_augmentation_does_not_depend_on_the_worker_count(tmp_path, cifar_tiny):
    """Per-sample seeds (seed, epoch, index): JPEG decoding in 0 or 2 persistent workers trains the same weights."""
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"j{workers}"
        subprocess.run(
            _train_cmd(*ARGS, "-b", "64", "--data-dir", str(cifar_tiny), "--epochs", "2", "--in-memory", "off",
                       "--workers", workers, "--output", str(out)),
            check=True, capture_output=True, cwd=REPO, timeout=600,
        )  # fmt: skip
        runs[workers] = torch.load(out / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])


def _eval_gap(out: Path, data: Path) -> float:
    """How far the last epoch's reported eval loss of the run in ``out`` is from its checkpoint's loss over
    ``data/val`` computed here."""
    with (out / "summary.csv").open() as f:
        reported = float(list(csv.DictReader(f))[-1]["eval_loss"])
    return abs(reported - _checkpoint_val_loss(out / "last.pth.tar", data / "val"))


def _checkpoint_val_loss(ckpt: Path, val_dir: Path) -> float:
    """Mean cross-entropy of a checkpoint's model over every image of ``val_dir``, in this one process."""
    import timm
    from timm.data import create_dataset

    import dap_pretrain.models  # noqa: F401  (registers cifar_resnet20)
    from dap_pretrain.checkpoint import load_checkpoint
    from dap_pretrain.data.loader import trainer_transform
    from dap_pretrain.models.cifar import CIFAR10_MEAN, CIFAR10_STD

    model = timm.create_model("cifar_resnet20", num_classes=10)
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    ds = create_dataset("", root=str(val_dir), is_training=False)
    ds.transform = trainer_transform(img_size=32, is_training=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).float().div(255)
    x = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.eval()(x), y))


def test_ddp_ranks_evaluate_the_model_rank0_saves(tmp_path, cifar_tiny, free_port):
    """timm's --dist-bn (default reduce): after each epoch every rank holds the same BatchNorm running statistics,
    so the evaluation that the 2 ranks share is that of the checkpoint rank 0 saves (checked on the runs of
    test_two_process_ddp_matches_single_process, which train with it: one 2-process run less, about 20 s). With
    --dist-bn '' rank 1 evaluates its half with its own statistics, and the reported loss is not the saved model's.
    broadcast gives every rank rank 0's."""
    gaps = {}
    for mode in ("broadcast", ""):
        out = tmp_path / (mode or "own")
        args = [*ARGS, "--epochs", "2", "-b", "32", "--data-dir", str(cifar_tiny), "--output", str(out)]
        proc = _two_processes(*args, "--dist-bn", mode, port=free_port())
        assert proc.returncode == 0, proc.stderr[-3000:]
        gaps[mode] = _eval_gap(out, cifar_tiny)
    assert gaps["broadcast"] < 1e-5 and gaps[""] > 1e-3, gaps  # measured: 4e-8, 0.088


def test_sync_bn_on_cpu_processes_is_refused_in_one_line(tmp_path, cifar_tiny, free_port):
    """torch's SyncBatchNorm runs on GPUs only: under CPU DDP --sync-bn is refused before any data is read, by
    tools/pretrain.sh's one-process check for 2 processes."""
    out = tmp_path / "run"
    proc = _two_processes(*ARGS, "--data-dir", str(cifar_tiny), "--output", str(out), "--sync-bn", port=free_port())
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--sync-bn needs GPUs" in lines[0] and "drop it" in lines[0]
    assert not (out / "run.json").exists() and not (out / "last.pth.tar").exists()


def test_two_process_infobatch_ranks_agree_on_every_subset(tmp_path, cifar_tiny, free_port):
    """InfoBatch under DDP: each rank draws the pruned set from the merged scores; the trainer compares the ranks'
    subsets every epoch and stops on a difference, so a run that ends has them equal. Something is pruned, and
    the measured compute is the samples trained."""
    out = tmp_path / "ib"
    args = [*ARGS, "--dap-select", "infobatch", "--infobatch-ratio", "0.5", "-b", "32"]
    proc = _two_processes(*args, "--data-dir", str(cifar_tiny), "--output", str(out), port=free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    sizes = [int(r["subset_size"]) for r in rows]
    assert sizes[0] == 400 and min(sizes) < 400, sizes
    run = json.loads((out / "run.json").read_text())
    assert run["compute_fraction_measured"] == sum(int(r["samples_trained"]) for r in rows) / (5 * 400) < 1.0


def test_compare_under_ddp_trains_the_baseline_on_every_rank(tmp_path, cifar_tiny, free_port):
    """--compare under torchrun: rank 1 skipped the baseline (its run() returns None), and rank 0 died in the
    baseline's first collective (gloo; on NCCL a hang): no full_data/, no table, exit 1."""
    out = tmp_path / "cmp"
    args = [*ARGS, "--epochs", "2", "--decay-milestones", "-b", "32", "--val-split", "", "--compare"]
    proc = _two_processes(*args, "--data-dir", str(cifar_tiny), "--output", str(out), port=free_port(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("DaP top-1 n/a at ") == 1, proc.stdout[-2000:]  # the table, printed by rank 0 only
    full = json.loads((out / "full_data" / "run.json").read_text())
    assert full["compute_fraction_measured"] == 1.0 and full["processes"] == 2
