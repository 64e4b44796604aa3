"""Real mmengine runs through tools/pretrain_mm.sh on real CIFAR-10 images (cifar_tiny: 400 train, 100 val).

The configs stay the paper's; --cfg-options shrink them (ResNet-18 at 32 px, loader workers off, a fixed seed).
The module's one 4-epoch run is the issue's "Done when" command; the others resume it, run it on 2 gloo ranks,
and feed it an iteration-based scheduler.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dap_pretrain.schedule import DaPConfig, plan

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "pretrain_mm.sh"
CONFIG = "configs/mmpretrain/resnet18_dap75_in1k.py"
FAST = [
    "train_dataloader.dataset.pipeline.1.scale=32",  # RandomResizedCrop to 32 px (stock 224)
    "val_dataloader.dataset.pipeline.1.scale=36",  # ResizeEdge, short side
    "val_dataloader.dataset.pipeline.2.crop_size=32",  # CenterCrop
    "train_dataloader.num_workers=0",
    "val_dataloader.num_workers=0",
    "randomness.seed=0",  # exact resume needs a fixed seed (the hook's docstring says why)
]
DONE_WHEN = ["train_cfg.max_epochs=4", "dap.warmup=1", "dap.interval=1", "dap.keep=0.5", "dap.reuse=[]"]
DONE_WHEN_CONFIG = DaPConfig(epochs=4, warmup=1, interval=1, keep=0.5, active=10, reuse=())


def pretrain_mm(work_dir: Path, data_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), CONFIG, "--data-root", str(data_root), "--work-dir", str(work_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def rows(work_dir: Path) -> list[dict]:
    with (work_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def timm_run_json_keys() -> list[str]:
    """The keys of the timm trainer's run.json (``runner._finish`` writes ``Accounting.run_summary``)."""
    from dap_pretrain.runner import Accounting

    acct = Accounting(num_samples=1, baseline_epochs=1, planned=1)
    none = dict(top1=None, top5=None, ema_top1=None, ema_top5=None)
    return list(acct.run_summary(model="m", epochs=1, dataset="d", wall_s=0.0, dap={}, **none))


def timm_summary_columns() -> list[str]:
    from dap_pretrain.runner import Accounting

    report = SimpleNamespace(size_before=1, seen=1, event="keep")
    row = Accounting(1, 1, 1).epoch_row(
        epoch=1, report=report, train_loss=0.0, ev={}, lr=0.1, seconds=1.0, img_per_s=1.0, digest="0"
    )
    return list(row)


@pytest.fixture(scope="module")
def done_when(cifar_tiny, tmp_path_factory) -> Path:
    """The issue's "Done when" command (4 epochs, W=1, I=1, p=0.5, no reuse) on cifar_tiny; its work dir."""
    work = tmp_path_factory.mktemp("mm_done_when") / "work"
    proc = pretrain_mm(work, cifar_tiny, "--cfg-options", *DONE_WHEN, *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


def test_done_when_run_spends_the_planned_compute(done_when):
    p = plan(DONE_WHEN_CONFIG, 400)
    run = json.loads((done_when / "run.json").read_text())
    assert list(run) == timm_run_json_keys()
    assert run["compute_fraction_measured"] == run["compute_fraction_planned"] == p.compute_fraction == 0.6875
    assert run["samples_trained"] == p.samples_trained and run["samples_untrained"] == 0
    assert run["model"] == "resnet18" and run["num_samples"] == 400 and run["epochs"] == 4
    assert run["dap"]["keep"] == 0.5 and run["dap"]["reuse"] == [] and 0 <= run["top1"] <= 100
    assert isinstance(run["dap"]["seed"], int)  # the sampler's: the runner's randomness.seed here
    r = rows(done_when)
    assert list(r[0]) == timm_summary_columns()
    assert [int(x["subset_size"]) for x in r] == p.subset_sizes == [400, 400, 200, 100]
    # every subset member's loss was recorded under its own index: sample_idx travels in the batch
    assert [int(x["samples_trained"]) for x in r] == p.subset_sizes
    assert [x["event"] for x in r] == ["warm-up", "drop", "drop", "drop"]
    assert len({x["subset_digest"] for x in r}) == 3  # epochs 1-2 all data, then two different subsets


def test_checkpoint_carries_the_dap_state_and_run(done_when):
    ckpt = torch.load(done_when / "epoch_4.pth", map_location="cpu", weights_only=False)  # this test's own file
    dap = ckpt["dap"]
    assert set(dap) == {"version", "epoch", "sampler", "accounting", "history", "rng", "run"}
    assert dap["epoch"] == 4 and dap["sampler"]["subset"].numel() == 50 and len(dap["rng"]) == 1
    run = json.loads((done_when / "run.json").read_text())
    assert dap["run"]["timm_model"] == "resnet18" and dap["run"]["num_classes"] == 10
    assert len(dap["run"]["files_digest"]) == 16  # what a --resume compares (test_refused_runs_...)
    for key in ("compute_fraction_measured", "samples_trained", "top1", "top5", "dap"):
        assert dap["run"][key] == run[key], key  # the last epoch's validation reached its checkpoint too
    assert [h["subset_digest"] for h in dap["history"]] == [x["subset_digest"] for x in rows(done_when)]
    keys = {k for k in ckpt["state_dict"] if not k.startswith("backbone.")}
    assert keys == {"head.fc.weight", "head.fc.bias"}


def test_resume_from_the_mm_checkpoint_equals_the_uninterrupted_run(done_when, cifar_tiny, tmp_path):
    work = tmp_path / "resumed"
    work.mkdir()
    shutil.copy(done_when / "epoch_2.pth", work / "epoch_2.pth")
    (work / "last_checkpoint").write_text(str(work / "epoch_2.pth"))  # as if killed after epoch 2
    proc = pretrain_mm(work, cifar_tiny, "--resume", "--cfg-options", *DONE_WHEN, *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    timing = ("epoch_time_s", "img_per_s")
    strip = [{k: v for k, v in x.items() if k not in timing} for x in rows(work)]
    assert strip == [{k: v for k, v in x.items() if k not in timing} for x in rows(done_when)]
    a, b = (json.loads((d / "run.json").read_text()) for d in (done_when, work))
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}
    wa, wb = (torch.load(d / "epoch_4.pth", weights_only=False)["state_dict"] for d in (done_when, work))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # resumed once more, finished: it says so, and run.json keeps its figures (the wall time was this start's); as
    # if 2 processes had written it: no warning that the augmentation changes, since nothing is trained
    recorded = (work / "run.json").read_text()
    ckpt = torch.load(work / "epoch_4.pth", weights_only=False)
    ckpt["dap"]["rng"] = [ckpt["dap"]["rng"][0]] * 2
    torch.save(ckpt, work / "epoch_4.pth")
    proc = pretrain_mm(work, cifar_tiny, "--resume", "--cfg-options", *DONE_WHEN, *FAST)
    assert proc.returncode == 0 and "the resumed run is finished (4 of 4 epochs)" in proc.stdout + proc.stderr
    assert "RNG states for 2 processes" not in proc.stdout + proc.stderr
    assert (work / "run.json").read_text() == recorded


def test_two_gloo_ranks_agree(cifar_tiny, tmp_path, free_port):
    """2 processes (torchrun, gloo): the hook checks every epoch that both ranks hold the same subset (and raises if
    not); the merged losses cover each subset, so compute is as planned."""
    work = tmp_path / "ddp"
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    args = [*DONE_WHEN, "train_cfg.max_epochs=3", "train_dataloader.batch_size=16", *FAST]
    proc = pretrain_mm(work, cifar_tiny, "--cfg-options", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = plan(DaPConfig(epochs=3, warmup=1, interval=1, keep=0.5, active=10), 400)
    assert [int(x["samples_trained"]) for x in rows(work)] == p.subset_sizes == [400, 400, 200]
    run = json.loads((work / "run.json").read_text())
    assert run["compute_fraction_measured"] == run["compute_fraction_planned"] == p.compute_fraction
    assert len(torch.load(work / "epoch_3.pth", weights_only=False)["dap"]["rng"]) == 2  # gathered from both ranks


def test_an_ema_hook_run_records_the_ema_top1_and_exports_say_whose(cifar_tiny, tmp_path):
    """mmpretrain's EMAHook validates the EMA weights, then, with ``evaluate_on_origin=True``, the raw ones: run.json's
    ema_top1 is the first figure and top1 the second (mmpretrain's ``val/accuracy/top1_origin``), each epoch's row
    holds both, and the export labels the weights it releases with their own top-1: the EMA's by default, the raw
    weights' with --no-ema. Before, the raw weights' figure was not read (top1 None). Without evaluate_on_origin the
    raw weights are never validated and top1 is None (tests/mm/test_mm_units.py)."""
    config = tmp_path / "ema.py"
    hooks = "[dict(type='DaPHook'), dict(type='EMAHook', momentum=0.01, evaluate_on_origin=True)]"
    config.write_text(f"_base_ = ['{REPO / CONFIG}']\ncustom_hooks = {hooks}\n")
    work = tmp_path / "ema"
    cmd = ["bash", str(SCRIPT), str(config), "--data-root", str(cifar_tiny), "--work-dir", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--cfg-options", *DONE_WHEN, "train_cfg.max_epochs=2", *FAST,
         "default_hooks.checkpoint.save_best=accuracy/top1"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((work / "run.json").read_text())
    last = rows(work)[-1]
    (best,) = work.glob("best_accuracy_top1_epoch_*.pth")  # saved before the raw weights' validation, then updated
    dap = torch.load(best, map_location="cpu", weights_only=False)["dap"]
    assert dap["history"][-1]["eval_top1_origin"] is not None and dap["run"]["top1"] is not None
    assert run["ema_top1"] == pytest.approx(float(last["eval_top1"]))
    assert run["top1"] == pytest.approx(float(last["eval_top1_origin"]))
    assert run["top5"] == pytest.approx(float(last["eval_top5_origin"]))
    assert all(row["eval_top1_origin"] != "" for row in rows(work))  # validated every epoch, read every epoch
    logged = [json.loads(line) for line in open(next(work.glob("*/vis_data/scalars.json")))]
    origin = [e["accuracy/top1_origin"] for e in logged if "accuracy/top1_origin" in e]
    assert origin and run["top1"] == pytest.approx(origin[-1])  # mmpretrain's own figure
    assert f"top-1 (EMA) {run['ema_top1']:.2f}%, raw weights {run['top1']:.2f}%" in proc.stdout + proc.stderr
    for flags, weights, top1 in (([], "ema", run["ema_top1"]), (["--no-ema"], "raw", run["top1"])):
        out = tmp_path / f"export_{weights}"
        export = [str(REPO / ".venv/bin/python"), "-m", "dap_pretrain", "export", str(work / "epoch_2.pth")]
        done = subprocess.run([*export, "--out", str(out), *flags], cwd=REPO, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        meta = json.loads((out / "meta.json").read_text())
        assert meta["weights"] == weights and meta["top1"] == top1, meta
        timm_cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]  # evaluated at 32 px, not 224
        assert timm_cfg["input_size"] == [3, 32, 32] and timm_cfg["crop_pct"] == pytest.approx(32 / 36), timm_cfg


def test_mixup_and_cutmix_run_with_hard_selection(cifar_tiny, tmp_path):
    """train_cfg.augments (Mixup or CutMix per batch), inherited from the stock config: the run drops by each
    sample's own label's share of the mixed losses and spends the planned compute."""
    config = tmp_path / "mixed.py"
    config.write_text(
        f"_base_ = ['{REPO / CONFIG}']\n"
        "model = dict(train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))\n"
    )
    work = tmp_path / "mixed"
    cmd = ["bash", str(SCRIPT), str(config), "--data-root", str(cifar_tiny), "--work-dir", str(work)]
    args = [*DONE_WHEN, "train_cfg.max_epochs=3", *FAST]
    proc = subprocess.run(
        [*cmd, "--cfg-options", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        "batch augments Mixup, CutMix: each sample's loss for DaP is its own label's loss" in proc.stdout + proc.stderr
    )
    p = plan(DaPConfig(epochs=3, warmup=1, interval=1, keep=0.5, active=10), 400)
    assert [int(x["samples_trained"]) for x in rows(work)] == p.subset_sizes == [400, 400, 200]
    assert [x["event"] for x in rows(work)] == ["warm-up", "drop", "drop"]
    run = json.loads((work / "run.json").read_text())
    assert run["compute_fraction_measured"] == p.compute_fraction


def test_iteration_based_scheduler_is_refused_in_one_line(cifar_tiny, tmp_path):
    args = [*DONE_WHEN, *FAST, "param_scheduler.convert_to_iter_based=True"]
    proc = pretrain_mm(tmp_path / "iter", cifar_tiny, "--cfg-options", *args)
    assert proc.returncode == 2
    ours = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_mm:")]
    assert len(ours) == 1 and ours[0] == proc.stderr.strip().splitlines()[-1]
    assert ours[0].startswith("pretrain_mm: error: param_scheduler MultiStepLR counts iterations")
    assert "use by_epoch=True" in ours[0] and "Traceback" not in proc.stderr


def tree(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for folders): a work dir, byte for byte."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    ours = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_mm:")]
    assert proc.returncode == 2 and len(ours) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return ours[0]


def finished_copy(done_when: Path, work: Path) -> Path:
    shutil.copytree(done_when, work)
    (work / "last_checkpoint").write_text(str(work / "epoch_4.pth"))
    return work


def test_refused_runs_leave_the_work_dir_as_it_was(done_when, cifar_tiny, tmp_path, capsys):
    """Refusals from the config (another max_epochs on --resume, an iteration-counting scheduler), from the built
    run (another dataset on --resume, by size or by class names; another model), and failures before training
    (a key mmengine refuses) leave a finished work dir byte for byte, and create no new one. So does a resume on
    other images of the same classes and count (the checkpoint's file digest). The config's refusals, made before
    mmengine's runner is built, run in this process through the same entry point (a process spends about 6 s on
    imports); the rest as processes through tools/pretrain_mm.sh."""
    from dap_pretrain.mm.train import main as mm_main

    def refused_here(work_dir: Path, *args: str) -> str:
        code = mm_main([str(REPO / CONFIG), "--data-root", str(cifar_tiny), "--work-dir", str(work_dir), *args])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pretrain_mm:")]
        assert code == 2 and len(lines) == 1, lines
        return lines[0]

    work = finished_copy(done_when, tmp_path / "finished")
    before = tree(work)
    line = refused_here(work, "--resume", "--cfg-options", *DONE_WHEN, *FAST, "train_cfg.max_epochs=6")
    assert "train_cfg.max_epochs=4, this run has train_cfg.max_epochs=6" in line and "dap block" not in line
    assert tree(work) == before
    smaller = tmp_path / "smaller"  # 9 classes: another dataset size, seen only once the runner has built it
    shutil.copytree(cifar_tiny, smaller, symlinks=True)
    shutil.rmtree(smaller / "train" / sorted(p.name for p in (smaller / "train").iterdir())[0])
    shutil.rmtree(smaller / "val" / sorted(p.name for p in (smaller / "val").iterdir())[0])
    proc = pretrain_mm(work, smaller, "--resume", "--cfg-options", *DONE_WHEN, *FAST)
    assert "resume with the same dataset" in one_error_line(proc)
    assert tree(work) == before
    line = refused_here(work, "--overwrite", "--cfg-options", *DONE_WHEN, *FAST, "param_scheduler.by_epoch=False")
    assert "counts iterations" in line
    assert tree(work) == before
    refused_here(tmp_path / "new" / "w", "--cfg-options", *DONE_WHEN, *FAST, "param_scheduler.by_epoch=False")
    assert not (tmp_path / "new").exists()
    # a key mmengine's loop refuses (its traceback, as under mmpretrain's train.py) with --overwrite: before, the
    # finished run's config dump was replaced by the failed one's, and a log folder and a lock file were left
    proc = pretrain_mm(work, cifar_tiny, "--overwrite", "--cfg-options", *DONE_WHEN, *FAST, "train_cfg.max_epoch=1")
    assert proc.returncode == 1 and "max_epoch" in proc.stderr and tree(work) == before
    # the same number of images under other class names: mmengine only warned, and DaP went on with the old subset
    other = tmp_path / "other"
    for split in ("train", "val"):
        for k, cls in enumerate(sorted((cifar_tiny / split).iterdir())):
            shutil.copytree(cls, other / split / f"other{k}", symlinks=True)
    proc = pretrain_mm(work, other, "--resume", "--cfg-options", *DONE_WHEN, *FAST)
    assert "trained on other classes" in one_error_line(proc) and tree(work) == before
    # the same classes and count, one image of two classes moved to the other (before, DaP went on with them)
    swapped = tmp_path / "swapped"
    shutil.copytree(cifar_tiny, swapped, symlinks=True)
    a, b = sorted((swapped / "train").iterdir())[:2]
    fa, fb = sorted(a.iterdir())[0], sorted(b.iterdir())[0]
    fa.rename(b / f"moved_{fa.name}")  # the count per class stays; file names may repeat across classes
    fb.rename(a / f"moved_{fb.name}")
    proc = pretrain_mm(work, swapped, "--resume", "--cfg-options", *DONE_WHEN, *FAST)
    assert "trained on other images than this run's data root" in one_error_line(proc) and tree(work) == before
    # another model's config: mmengine's size-mismatch lines, then a traceback; now one line at the end
    cmd = ["bash", str(SCRIPT), "configs/mmpretrain/resnet50_dap75_in1k.py", "--data-root", str(cifar_tiny),
           "--work-dir", str(work), "--resume", "--cfg-options", *DONE_WHEN, *FAST]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "do not fit this config's model" in proc.stderr.strip().splitlines()[-1] and tree(work) == before


def test_missing_config_data_path_is_one_line_and_writes_nothing(tmp_path, cifar_tiny):
    """Also with NPROC_PER_NODE=2: the script's one-process --check refuses it before torchrun (before, one line per
    process, torchrun's ChildFailedError report and exit 1); --check on good input writes nothing."""
    cmd = ["bash", str(SCRIPT), str(REPO / CONFIG), "--work-dir", str(tmp_path / "w")]
    for nproc in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": nproc, "MASTER_PORT": "29587"}
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert "data/imagenet does not exist" in one_error_line(proc) and "--data-root" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1  # mmengine's pkg_resources warnings added 4 lines before
        assert list(tmp_path.iterdir()) == []
    proc = subprocess.run([*cmd, "--data-root", str(cifar_tiny), "--check"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0 and "pretrain_mm: inputs ok" in proc.stdout, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_overwrite_removes_the_previous_runs_checkpoints(done_when, cifar_tiny, tmp_path):
    """A 4-epoch run overwritten by a 2-epoch one: no epoch_3/4.pth or old log folder is left to be mistaken for
    the new run's; other files stay."""
    work = finished_copy(done_when, tmp_path / "w")
    (work / "notes.txt").write_text("mine")
    old_logs = [p.name for p in work.iterdir() if p.is_dir()]
    proc = pretrain_mm(work, cifar_tiny, "--overwrite", "--cfg-options", *DONE_WHEN, *FAST, "train_cfg.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in work.glob("*.pth")) == ["epoch_1.pth", "epoch_2.pth"]
    assert (work / "notes.txt").read_text() == "mine" and not any((work / d).exists() for d in old_logs)
    assert json.loads((work / "run.json").read_text())["epochs"] == 2
    assert not (work / ".replaced").exists()  # set aside only until the new run's first checkpoint
